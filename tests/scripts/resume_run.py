"""One lit_sft run for the resume-on-another-GPU-count tests (``tests/test_resume_world_size.py``), launched as a
subprocess (Lightning re-launches it once per extra device; CPU, gloo, fp32).

Trains ``--model-dir`` on ``--data`` (rows shuffled by the planner, seed 3) with ``--devices`` processes and
``--rows-per-step`` rows per optimizer step (micro-batch 1, accumulation ``rows / devices``), a cosine schedule with
warmup, under ``CPUDeepSpeedStrategy`` (ZeRO stage 3 requested; with one process lit_sft runs it as stage 2, so the
tests cross both the world size and the parameter layout) or, with ``--strategy none``, a plain single process.
``--partition`` is the strategy's ``zero3_partition_parameters``; ``--checkpoint-every k`` writes a DeepSpeed
checkpoint every k steps; ``--resume PATH`` resumes from one (after ``strategy.check_resume(PATH)``, as the CLI does).
Rank 0 writes into ``--out``: ``steps.jsonl`` (step, loss, supervised tokens, learning rate), ``params.pt`` (the
gathered trained parameters) and ``warnings.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import lightning as L  # noqa: E402

from scripts.sft_run import SaveParameters  # noqa: E402
from sft_harness import TOKENIZER  # noqa: E402


class Record(L.Callback):
    """Per optimizer step (rank 0): the logged loss, supervised tokens and the learning rate the step used."""

    def __init__(self, out: str) -> None:
        self.out, self.last = out, None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        metrics = getattr(module, "last_step_metrics", None)
        if trainer.global_step == self.last or not metrics:
            return
        self.last = trainer.global_step
        if trainer.is_global_zero:
            with open(os.path.join(self.out, "steps.jsonl"), "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": metrics["train/loss"],
                                    "tokens": metrics["train/step_loss_tokens"],
                                    "lr": metrics["train/learning_rate"]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["zero", "none"], default="zero")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--rows-per-step", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--partition", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_sft import SFTDataModule, SFTModule

    os.makedirs(args.out, exist_ok=True)
    warnings.simplefilter("always")
    if args.strategy == "zero":
        from cpu_deepspeed import CPUDeepSpeedStrategy

        partition = {"auto": "auto", "true": True, "false": False}[args.partition]
        strategy = CPUDeepSpeedStrategy(zero_stage=3, zero3_partition_parameters=partition)
    else:
        strategy = "auto"
    callbacks = [Record(args.out), SaveParameters(args.out)]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "checkpoints"), filename="step-{step:06d}",
                                         auto_insert_metric_name=False, every_n_train_steps=args.checkpoint_every,
                                         save_top_k=-1))
    datamodule = SFTDataModule(args.data, tokenizer_name_or_path=TOKENIZER, max_length=None, seed=3,
                               per_device_train_batch_size=1,
                               gradient_accumulation_steps=args.rows_per_step // args.devices, num_workers=0)
    module = SFTModule(args.model_dir, torch_dtype="float32", attn_implementation="sdpa",
                       gradient_checkpointing=False, learning_rate=0.5, lr_scheduler_type="cosine",
                       lr_scheduler_kwargs={}, warmup_ratio=0.25, adam_epsilon=1.0, max_grad_norm=None)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, precision="32-true",
                        max_steps=args.max_steps, logger=False, enable_checkpointing=bool(args.checkpoint_every),
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=callbacks)
    if args.resume and hasattr(strategy, "check_resume"):
        strategy.check_resume(args.resume)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule, ckpt_path=args.resume)
    if trainer.is_global_zero:
        with open(os.path.join(args.out, "warnings.txt"), "w") as f:
            f.write("\n".join(str(w.message) for w in caught))


if __name__ == "__main__":
    main()
