"""A multi-process lit_sft run for the data-parallel and ZeRO tests (launched as a subprocess; Lightning re-launches
this script once per extra device).

Trains ``--model-dir`` on ``--data`` (rows in file order) with ``--devices`` processes on CPU (gloo) and writes, from
global rank 0, into ``--out``:

* ``params.pt``: the full trained parameters (gathered with ``deepspeed.zero.GatheredParameters`` under ZeRO-3);
* ``report.json``: the last step's metrics, every step's metrics (``steps``), and with ``--check-load`` what the
  ZeRO-3 model held right after ``configure_model``: per parameter, the local shard size, the gathered shape and
  ``max |gathered - file|``.

With ``--export-dir`` the run also writes the Hugging Face folder with ``lit_sft.export.HFExport``; with
``--save-checkpoint PATH`` it saves the final Lightning checkpoint there (a folder of ZeRO shards under DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import lightning as L  # noqa: E402
import torch  # noqa: E402

from sft_harness import fit_lit_sft  # noqa: E402


def full_parameters(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter of ``module.model``, whole (a collective under ZeRO-3: every rank must call it)."""
    params = dict(module.model.named_parameters())
    if not hasattr(next(iter(params.values())), "ds_id"):
        return {n: p.detach().clone() for n, p in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().clone() for n, p in params.items()}


class CheckLoad(L.Callback):
    """Right after ``configure_model`` and ``deepspeed.initialize``: compare the gathered weights with the file's."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.report: dict = {}

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from safetensors.torch import load_file

        expected = load_file(os.path.join(self.model_dir, "model.safetensors"))
        local = {n: (int(p.numel()), int(getattr(p, "ds_numel", -1)),
                     int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else -1)
                 for n, p in module.model.named_parameters()}
        full = full_parameters(module)
        self.report = {n: {"local_numel": local[n][0], "ds_numel": local[n][1], "shard_numel": local[n][2],
                           "gathered_shape": list(t.shape),
                           "file_shape": list(expected[n].shape) if n in expected else None,
                           "max_abs_diff": (t - expected[n]).abs().max().item()
                           if n in expected and t.shape == expected[n].shape else None}
                       for n, t in full.items()}


class RecordSteps(L.Callback):
    """Every optimizer step's metrics (``SFTModule.last_step_metrics``), in order."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        metrics = getattr(module, "last_step_metrics", None)
        if metrics is not None and (not self.steps or self.steps[-1] is not metrics):
            self.steps.append(metrics)


class SaveParameters(L.Callback):
    """At the end of training, gather the full parameters and save them (rank 0)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        full = full_parameters(module)
        if trainer.is_global_zero:
            torch.save(full, os.path.join(self.out, "params.pt"))


class SaveCheckpoint(L.Callback):
    """At the end of training, ``trainer.save_checkpoint(path)`` (a collective: every rank writes its shards)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data")
    parser.add_argument("--dataset-mixture", type=json.loads, help="data.dataset_mixture as JSON (instead of --data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["ddp", "zero2", "zero3"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--padding-free", action="store_true")
    parser.add_argument("--loss-chunk-size", type=int)
    parser.add_argument("--max-tokens-per-micro-batch", type=int)
    parser.add_argument("--check-load", action="store_true")
    parser.add_argument("--export-dir")
    parser.add_argument("--save-checkpoint")
    args = parser.parse_args()

    from lit_sft.export import HFExport

    os.makedirs(args.out, exist_ok=True)
    if args.strategy == "ddp":
        strategy = "ddp"
    else:
        from cpu_deepspeed import CPUDeepSpeedStrategy

        strategy = CPUDeepSpeedStrategy(zero_stage=3 if args.strategy == "zero3" else 2)
    check = CheckLoad(args.model_dir) if args.check_load else None
    record = RecordSteps()
    callbacks = [c for c in (check, SaveParameters(args.out), record) if c is not None]
    if args.export_dir:
        callbacks.append(HFExport(args.export_dir))
    if args.save_checkpoint:
        callbacks.append(SaveCheckpoint(args.save_checkpoint))
    module_kwargs = {"loss_chunk_size": args.loss_chunk_size} if args.loss_chunk_size else None
    trainer, module = fit_lit_sft(args.model_dir, args.data, args.micro, args.accum, args.max_steps,
                                  devices=args.devices, strategy=strategy,
                                  gradient_checkpointing=args.gradient_checkpointing, callbacks=callbacks,
                                  module_kwargs=module_kwargs,
                                  padding_free=args.padding_free,
                                  max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
                                  dataset_mixture=args.dataset_mixture)
    if trainer.is_global_zero:
        report = {"world_size": trainer.world_size, "global_step": trainer.global_step,
                  "last_step_metrics": module.last_step_metrics, "steps": record.steps,
                  "load": check.report if check else None}
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
