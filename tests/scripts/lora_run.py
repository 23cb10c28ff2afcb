"""A multi-process LoRA run for ``tests/test_lora_distributed.py`` (launched as a subprocess; Lightning re-launches
this script once per extra device; CPU, gloo, fp32).

Trains ``--model-dir`` with ``model.peft = --peft`` on ``--data`` (rows in file order) under DDP or
``CPUDeepSpeedStrategy`` (``--strategy zero2|zero3``, ``--partition`` = ``zero3_partition_parameters``) and writes,
from global rank 0, into ``--out``:

* ``init.pt``: the adapter weights when training starts (gathered under ZeRO-3; after a resume: as restored), for
  the reference to start from;
* ``params.pt``: every parameter after training (gathered), adapter and base;
* ``report.json``: per-step metrics, and at the start of training per rank: how many elements of the frozen base
  and of the adapters the rank holds locally and as its ZeRO shard, and how many elements its optimizer steps.

``--export-dir`` adds :class:`lit_sft.export.HFExport` (``--merge``: ``merge_adapter``); ``--checkpoint-dir DIR``
adds :class:`lit_sft.checkpoint.SFTCheckpoint` saving every optimizer step there (DeepSpeed: folders of ZeRO
shards); ``--resume PATH`` resumes from one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import lightning as L  # noqa: E402
import torch  # noqa: E402

from scripts.sft_run import RecordSteps, SaveParameters, full_parameters  # noqa: E402
from sft_harness import EPS, LR, TOKENIZER  # noqa: E402


class Layout(L.Callback):
    """At the start of training (after a resumed checkpoint is restored): save the adapters (rank 0) and record each
    rank's memory layout."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        params = list(module.model.named_parameters())

        def count(trainable: bool, what: str) -> int:
            total = 0
            for _, p in params:
                if p.requires_grad == trainable:
                    shard = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                    total += {"local": p.numel(), "shard": shard, "full": getattr(p, "ds_numel", p.numel())}[what]
            return total

        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None:
            optimizer = module.optimizers().optimizer
            stepped = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        else:  # the fp32 master partitions AdamW steps: ZeRO-3's, ZeRO-1/2's
            zero = engine.optimizer
            flat = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
            stepped = sum(t.numel() for t in flat)
        record = {f"{kind}_{what}": count(kind == "adapter", what) for kind in ("adapter", "base")
                  for what in ("local", "shard", "full")}
        record["optimizer_numel"] = stepped
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, record)
        full = {n: p for n, p in full_parameters(module).items() if dict(params)[n].requires_grad}
        if trainer.is_global_zero:
            torch.save(full, os.path.join(self.out, "init.pt"))
            with open(os.path.join(self.out, "layout.json"), "w") as f:
                json.dump(gathered, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--peft", type=json.loads, required=True)
    parser.add_argument("--strategy", choices=["ddp", "zero2", "zero3"], required=True)
    parser.add_argument("--partition", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--padding-free", action="store_true")
    parser.add_argument("--max-tokens-per-micro-batch", type=int)
    parser.add_argument("--export-dir")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume")
    args = parser.parse_args()

    from lit_sft.checkpoint import SFTCheckpoint
    from lit_sft.export import HFExport

    os.makedirs(args.out, exist_ok=True)
    if args.strategy == "ddp":
        strategy = "ddp"
    else:
        from cpu_deepspeed import CPUDeepSpeedStrategy

        partition = {"auto": "auto", "true": True, "false": False}[args.partition]
        strategy = CPUDeepSpeedStrategy(zero_stage=3 if args.strategy == "zero3" else 2,
                                        zero3_partition_parameters=partition)
    record = RecordSteps()
    callbacks = [Layout(args.out), SaveParameters(args.out), record]
    if args.export_dir:
        callbacks.append(HFExport(args.export_dir, merge_adapter=args.merge))
    if args.checkpoint_dir:
        callbacks.append(SFTCheckpoint(args.checkpoint_dir, every_n_train_steps=1))
    # as tests/sft_harness.py's fit_lit_sft (fp32, rows in file order, constant LR, large epsilon), plus resume
    from lit_sft import SFTDataModule, SFTModule

    datamodule = SFTDataModule(args.data, tokenizer_name_or_path=TOKENIZER, max_length=None, shuffle=False,
                               per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.accum,
                               num_workers=0, padding_free=args.padding_free,
                               max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    module = SFTModule(args.model_dir, torch_dtype="float32",
                       attn_implementation="lit_sft_varlen" if args.padding_free else "sdpa",
                       gradient_checkpointing=args.gradient_checkpointing, learning_rate=LR,
                       lr_scheduler_type="constant", lr_scheduler_kwargs={}, warmup_ratio=0.0, adam_epsilon=EPS,
                       max_grad_norm=None, peft=args.peft)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, precision="32-true",
                        max_steps=args.max_steps, logger=False, enable_checkpointing=bool(args.checkpoint_dir),
                        enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks)
    trainer.fit(module, datamodule, ckpt_path=args.resume)
    if trainer.is_global_zero:
        report = {"world_size": trainer.world_size, "global_step": trainer.global_step, "steps": record.steps,
                  "zero_stage": getattr(trainer.strategy, "zero_stage_3", None)}
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
