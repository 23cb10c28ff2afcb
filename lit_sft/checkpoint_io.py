"""Crash-safe checkpoint files and folders: what is on disk under a checkpoint's name is complete.

Two formats live in ``output_dir/checkpoints``, both named ``step-NNNNNN.ckpt``:

* **a file** (every strategy but DeepSpeed), written by :class:`AtomicCheckpointIO`, Lightning's ``CheckpointIO``
  plugin hook: ``torch.save`` streams into a hidden temporary file *in the same folder*
  (``.step-NNNNNN.ckpt.tmp-<pid>``), which is flushed, ``fsync``-ed and renamed over the final name (``os.replace``,
  atomic within a file system), then the folder is ``fsync``-ed. Lightning's own ``TorchCheckpointIO`` serialises to
  memory and writes through an fsspec transaction, which creates the temporary file in ``TMPDIR``; when ``TMPDIR`` is
  on another file system (local ``/tmp`` or ``/dev/shm`` vs. a shared ``output_dir``) the final move is a copy, and a
  kill or a full disk during that copy leaves a truncated ``step-N.ckpt`` under its final name, plus the orphaned
  temporary file.
* **a folder** (DeepSpeed: every rank writes its own shards, ``engine.save_checkpoint``). DeepSpeed's ``latest``
  file is no completion signal: rank 0 writes it after its *own* shards, while other ranks may still be writing.
  :func:`save_folder_checkpoint` lets every rank write into a hidden folder ``.step-NNNNNN.ckpt.partial``, waits for
  all of them (DeepSpeed's closing barrier, then each rank ``fsync``-s, then a barrier), writes the completion marker
  :data:`FOLDER_MARKER` and renames the folder to its final name.

**The completion marker** ``step-NNNNNN.ckpt/lit_sft_complete.json`` (written last, atomically, by global rank 0
after every rank finished) holds ``format_version``, ``global_step``, ``world_size``, ``tag`` (DeepSpeed's tag
folder, ``checkpoint``; also in ``latest``) and ``files``: ``{relative path: size in bytes}`` of every file of the
checkpoint. A folder is complete iff the marker parses and every listed file exists with its size. Code that writes
a derived checkpoint folder (e.g. DeepSpeed's universal checkpoint) should write the same marker last with
:func:`write_folder_marker`, so that resume and rotation treat it alike.

A checkpoint is removed by renaming it to a hidden ``.<name>.trash-<pid>`` first (atomic), then deleting, so that a
kill during a deletion never leaves a half-deleted checkpoint under a final name. Hidden temporary names are
orphans once no save is running; :func:`clean_orphans` deletes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

log = logging.getLogger(__name__)

FOLDER_MARKER = "lit_sft_complete.json"
STEP_RE = re.compile(r"^step-(\d+)\.ckpt$")
_ORPHAN_RE = re.compile(r"^\.step-\d+\.ckpt\.(tmp-\d+|partial|trash-\d+)$|^\.finished\.json\.tmp-\d+$")


def fsync_dir(path: str) -> None:
    """``fsync`` a directory (or a file), so that a rename or creation inside it survives a power loss (no-op where
    it cannot be opened, e.g. a directory on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder (mode ``0666 & ~umask``,
    like any new file), which is flushed, ``fsync``-ed and renamed over ``path``; the folder is then ``fsync``-ed.

    On any error (``ENOSPC``, an exception in ``write``) the temporary file is removed and the error re-raised;
    ``path`` is never left partly written. A kill leaves only the hidden temporary file (see :func:`clean_orphans`).
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """:func:`atomic_write` of ``data`` as indented JSON."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True, default=str).encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose saves are atomic on local file systems (see the module docstring):
    a checkpoint file is visible under its final name only once complete, and nothing is written to ``TMPDIR``.
    Remote (fsspec) paths keep Lightning's behaviour. Removal renames to a hidden name first.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(str(path), lambda f: torch.save(checkpoint, f))

    def remove_checkpoint(self, path: Any) -> None:
        if not _is_local_file_protocol(path):
            return super().remove_checkpoint(path)
        remove_checkpoint_path(str(path))


def remove_checkpoint_path(path: str) -> None:
    """Delete a checkpoint file or folder; a folder is first renamed to a hidden ``.<name>.trash-<pid>``."""
    if os.path.isdir(path) and not os.path.islink(path):
        folder, name = os.path.split(os.path.abspath(path))
        trash = os.path.join(folder, f".{name}.trash-{os.getpid()}")
        os.replace(path, trash)
        fsync_dir(folder)
        shutil.rmtree(trash, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    log.debug("removed checkpoint %s", path)


def partial_folder(path: str) -> str:
    """The hidden folder a DeepSpeed checkpoint ``path`` is written into before it is complete."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.partial")


def _folder_files(folder: str) -> dict[str, int]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != FOLDER_MARKER:
                files[rel] = os.path.getsize(full)
    return files


def fsync_tree(folder: str) -> None:
    """``fsync`` every file and folder under ``folder`` (the data of another rank's files too, when they share the
    local file system; a network file system has flushed them on close)."""
    for root, dirs, names in os.walk(folder):
        for name in names:
            fsync_dir(os.path.join(root, name))
        fsync_dir(root)


def write_folder_marker(folder: str, global_step: int, world_size: int, **extra: Any) -> None:
    """Write :data:`FOLDER_MARKER` into ``folder`` (after every rank finished writing it; global rank 0 only)."""
    tag = None
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
    data = {"format_version": 1, "global_step": int(global_step), "world_size": int(world_size), "tag": tag,
            "files": _folder_files(folder), **extra}
    write_json_atomic(os.path.join(folder, FOLDER_MARKER), data)


def save_folder_checkpoint(trainer: Any, filepath: str, weights_only: bool = False) -> None:
    """Save a DeepSpeed (folder) checkpoint so that ``filepath`` appears only once every rank finished: a collective,
    every rank must call it. See the module docstring for the steps and the marker."""
    strategy = trainer.strategy
    filepath = strategy.broadcast(os.path.abspath(filepath))
    tmp = partial_folder(filepath)
    if trainer.is_global_zero and os.path.lexists(tmp):
        remove_checkpoint_path(tmp)  # a leftover of an interrupted save
    strategy.barrier("lit_sft_ckpt_begin")
    trainer.save_checkpoint(tmp, weights_only)  # DeepSpeed's engine.save_checkpoint ends with a barrier
    fsync_tree(tmp)
    strategy.barrier("lit_sft_ckpt_written")
    if trainer.is_global_zero:
        write_folder_marker(tmp, trainer.global_step, trainer.world_size)
        if os.path.lexists(filepath):  # the same step saved again (e.g. after resuming from an older checkpoint)
            remove_checkpoint_path(filepath)
        os.replace(tmp, filepath)
        fsync_dir(os.path.dirname(filepath))
    strategy.barrier("lit_sft_ckpt_done")


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from, or ``None`` if it is complete and loadable.

    A file must open as a ``torch.save`` archive (its zip directory is read with ``mmap``, the tensors are not); a
    folder must hold a valid :data:`FOLDER_MARKER` whose files all exist with their recorded sizes.
    """
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        marker = os.path.join(path, FOLDER_MARKER)
        if not os.path.isfile(marker):
            return (f"no completion marker {FOLDER_MARKER} (an interrupted save, or written without lit_sft's "
                    "checkpoint callback)")
        try:
            with open(marker) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as err:
            return f"unreadable completion marker ({err})"
        for rel, size in files.items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                return f"{rel} is missing"
            if os.path.getsize(full) != size:
                return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
        return None
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # truncated or corrupt: torch raises RuntimeError, EOFError, pickle errors ...
        return f"cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def read_checkpoint(path: str) -> dict[str, Any]:
    """The Lightning checkpoint dictionary of a file or DeepSpeed folder (tensors memory-mapped, not read).

    For a folder it is the client state DeepSpeed saved with rank 0's module states (``<tag>/mp_rank_00_model_
    states.pt``, under ZeRO-3 ``<tag>/zero_pp_rank_0_mp_rank_00_model_states.pt``): hyper-parameters, loops,
    callbacks, ``global_step``.
    """
    if os.path.isdir(path):
        tag = "checkpoint"
        latest = os.path.join(path, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            if os.path.isfile(os.path.join(path, tag, name)):
                path = os.path.join(path, tag, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no DeepSpeed model states of rank 0 under {tag}/")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def step_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the entries named ``step-NNNNNN.ckpt`` in ``folder``, newest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := STEP_RE.match(name))]
    return sorted(found, reverse=True)


def is_complete(path: str) -> bool:
    """Cheap completeness test used by rotation: a file under its final name (only ever renamed there once
    complete), or a folder whose marker exists."""
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, FOLDER_MARKER))


def newest_loadable(folder: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """The newest complete and loadable checkpoint in ``folder`` and ``[(path, reason)]`` of the newer ones that
    were skipped."""
    skipped = []
    for _, path in step_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def clean_orphans(folder: str) -> tuple[list[str], list[str]]:
    """Delete the hidden temporary entries of interrupted saves and deletions in ``folder`` (call it only when no
    save is running, e.g. at the start of training on global rank 0). A DeepSpeed ``.partial`` folder whose marker
    shows it complete (killed between the marker and the rename) is renamed to its final name instead, if that
    name is free. Returns ``(names removed, final names recovered)``."""
    removed: list[str] = []
    recovered: list[str] = []
    if not os.path.isdir(folder):
        return removed, recovered
    for name in sorted(os.listdir(folder)):
        if not _ORPHAN_RE.match(name):
            continue
        path = os.path.join(folder, name)
        final = name[1:-len(".partial")] if name.endswith(".partial") else None
        if final and not os.path.lexists(os.path.join(folder, final)) and checkpoint_problem(path) is None:
            os.replace(path, os.path.join(folder, final))
            recovered.append(final)
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(name)
    if removed or recovered:
        fsync_dir(folder)
    return removed, recovered
