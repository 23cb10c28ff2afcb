"""Benchmark-only callbacks: where an optimizer step's time goes, a torch-profiler window, and a clean exit.

* :class:`StepTimer` splits every optimizer step of every rank into forward+backward (all micro-batches), the
  optimizer step (DeepSpeed's ``step``: gradient finalisation, clipping, AdamW, parameter refresh, plus the step's
  metric reduction) and the time between micro-batches (data loading, Lightning's loop), on the GPU timeline (CUDA
  events, read once per step after the step's own metric synchronisation) and on the host clock. One JSON line per
  step per rank in ``<default_root_dir>/timing_rank<R>.jsonl``, with this rank's tokens and micro-batches (rank
  imbalance). Rank 0 also writes the step's logged metrics (``StepRecorder``'s record) into ``steps.jsonl``.
* :class:`TorchProfile` records optimizer steps ``BENCH_PROFILE_STEPS=a,b`` (1-based, inclusive; unset: off) with
  ``torch.profiler`` and writes ``profile_rank<R>.txt`` (kernel-time categories, host synchronisations, NCCL
  kernels, top ops) and, on rank 0, ``trace.json.gz`` (Chrome/Perfetto trace).
* :class:`ExitAtTrainEnd` ends every process right after training (skips the Hugging Face export, which a
  throughput benchmark does not measure).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from typing import Any, Optional

import lightning as L
import torch


def _root(trainer: L.Trainer) -> str:
    os.makedirs(trainer.default_root_dir, exist_ok=True)
    return trainer.default_root_dir


class StepTimer(L.Callback):
    """Per-step time breakdown of every rank (see the module docstring); CUDA only (does nothing on CPU)."""

    def __init__(self) -> None:
        self._marks: list[tuple[str, Any, float]] = []
        self._tokens = 0
        self._micro = 0
        self._step = None

    def _mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._marks.append((name, event, time.perf_counter()))

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not torch.cuda.is_available():
            return
        self._mark("start")
        self._tokens += int(batch["input_ids"].numel())
        self._micro += 1

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if torch.cuda.is_available():
            self._mark("opt")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if not torch.cuda.is_available():
            return
        self._mark("end")
        if self._step == trainer.global_step:  # not the step's last micro-batch
            return
        self._step = trainer.global_step
        self._marks[-1][1].synchronize()
        gpu = {"fwd_bwd": 0.0, "optimizer": 0.0, "between": 0.0}
        host = dict(gpu)
        prev = None
        for name, event, clock in self._marks:
            if prev is not None:
                phase = {"start": "between", "opt": "fwd_bwd", "end": "fwd_bwd" if prev[0] == "start" else "optimizer"}
                gpu[phase[name]] += prev[1].elapsed_time(event) / 1e3
                host[phase[name]] += clock - prev[2]
            prev = (name, event, clock)
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "micro_batches": self._micro,
                  "tokens": self._tokens, **{f"gpu_{k}_s": v for k, v in gpu.items()},
                  **{f"host_{k}_s": v for k, v in host.items()},
                  "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        with open(os.path.join(_root(trainer), f"timing_rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        metrics = getattr(module, "last_step_metrics", None)
        if trainer.is_global_zero and metrics:
            with open(os.path.join(_root(trainer), "steps.jsonl"), "a") as f:
                f.write(json.dumps({"step": trainer.global_step, **metrics}) + "\n")
        self._marks = self._marks[-1:]  # the step's end starts the next step's "between"
        self._tokens = self._micro = 0


def _summarise(prof: Any, steps: int) -> str:
    """Kernel-time categories, host synchronisations and the top ops of a profiler window, per optimizer step."""
    rows = prof.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    cats = {"nccl": 0.0, "gemm": 0.0, "attention": 0.0, "memcpy/memset": 0.0, "other": 0.0}
    for e in rows:
        t = device_us(e)
        if not t or str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":  # kernels only: no double count
            continue
        name = e.key.lower()
        if "nccl" in name:
            cats["nccl"] += t
        elif "gemm" in name or "cutlass" in name or "nvjet" in name or "sm90" in name or "xmma" in name:
            cats["gemm"] += t
        elif "flash" in name or "attn" in name or "fmha" in name:
            cats["attention"] += t
        elif "memcpy" in name or "memset" in name:
            cats["memcpy/memset"] += t
        else:
            cats["other"] += t
    lines = [f"per optimizer step (window of {steps} steps), device time by category (ms):"]
    lines += [f"  {k:14s} {v / 1e3 / steps:10.1f}" for k, v in cats.items()]
    syncs = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
             "aten::item", "cudaMemcpy", "cudaMemcpyAsync", "cudaStreamWaitEvent", "cudaLaunchKernel",
             "record_param_comms", "c10d::allgather_", "c10d::_allgather_base_", "c10d::reduce_scatter_",
             "c10d::_reduce_scatter_base_", "c10d::allreduce_")
    by_key = {e.key: e for e in rows}
    lines.append("host calls per step (count, self CPU ms):")
    for key in syncs:
        if key in by_key:
            e = by_key[key]
            lines.append(f"  {key:32s} {e.count / steps:9.1f} {e.self_cpu_time_total / 1e3 / steps:9.1f}")
    lines.append("NCCL kernels per step (count, device ms):")
    for e in sorted(rows, key=device_us, reverse=True):
        if "nccl" in e.key.lower() and device_us(e):
            lines.append(f"  {e.key[:70]:70s} {e.count / steps:7.1f} {device_us(e) / 1e3 / steps:9.2f}")
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        try:
            lines.append(rows.table(sort_by=key, row_limit=30, max_name_column_width=70))
        except Exception as e:  # a key renamed in another torch version
            lines.append(f"(table by {key}: {e})")
    return "\n".join(lines)


class TorchProfile(L.Callback):
    """``torch.profiler`` over optimizer steps ``BENCH_PROFILE_STEPS=a,b`` (1-based, inclusive), every rank."""

    def __init__(self) -> None:
        steps = os.environ.get("BENCH_PROFILE_STEPS")
        self.window: Optional[tuple[int, int]] = tuple(int(s) for s in steps.split(",")) if steps else None
        self._prof: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.window and self._prof is None and trainer.global_step + 1 == self.window[0]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._prof is None or trainer.global_step < self.window[1]:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        steps = self.window[1] - self.window[0] + 1
        prof, self._prof, self.window = self._prof, None, None
        prof.__exit__(None, None, None)
        root = _root(trainer)
        with open(os.path.join(root, f"profile_rank{trainer.global_rank}.txt"), "w") as f:
            f.write(_summarise(prof, max(steps, 1)))
        if trainer.is_global_zero:
            path = os.path.join(root, "trace.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(path)


class ExitAtTrainEnd(L.Callback):
    """Ends every process right after the last optimizer step (no export); the step records are already written."""

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.strategy.barrier("bench_exit")
        os._exit(0)
