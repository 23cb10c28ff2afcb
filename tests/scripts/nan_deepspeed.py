"""The non-finite guard under DeepSpeed ZeRO-3 (CPU, gloo, 2 processes; Lightning re-launches this script for rank 1).

``SFTModule`` whose loss is multiplied by NaN in optimizer steps ``--nan-steps`` (so every gradient is NaN), with
``max_nonfinite_steps`` ``--tolerate``, checkpoints every step (``SFTCheckpoint``), Hugging Face export at the end.
Writes from global rank 0 into ``--out/report.json``: the error raised (if any), DeepSpeed's ``skipped_steps``, the
gradient norm the engine reported for each step, whether the full weights changed across each step, the
checkpoints left and whether a model was exported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import deepspeed.ops  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_sft import SFTDataModule, SFTModule  # noqa: E402
from lit_sft.checkpoint import SFTCheckpoint  # noqa: E402
from lit_sft.export import HFExport  # noqa: E402
from lit_sft.guard import NonFiniteError  # noqa: E402
from sft_harness import TOKENIZER  # noqa: E402
from sft_run import full_parameters  # noqa: E402


# the CPU shared-memory all-reduce op (inference only) is JIT-built under a shared lock file: not needed here
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class NaNLoss(SFTModule):
    """Multiplies the loss of the micro-batches of optimizer steps ``nan_steps`` by NaN."""

    nan_steps: list[int] = []

    def loss_sums(self, batch):
        sums = super().loss_sums(batch)
        if self.training and self.trainer.global_step + 1 in self.nan_steps:
            sums = sums._replace(loss_sum=sums.loss_sum * float("nan"))
        return sums


class Record(L.Callback):
    """Full weights before and after every optimizer step (a collective), and the engine's gradient norm."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}
        self.grad_norm: dict[int, float] = {}
        self._before = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = full_parameters(module)

    def on_train_batch_end(self, trainer, module, *args):
        after = full_parameters(module)
        step = trainer.global_step
        self.changed[step] = any(not torch.equal(after[k], self._before[k]) for k in after)
        self.grad_norm[step] = float(trainer.strategy.deepspeed_engine.get_global_grad_norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--nan-steps", type=int, nargs="+", required=True)
    parser.add_argument("--tolerate", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=5)
    args = parser.parse_args()

    from cpu_deepspeed import CPUDeepSpeedStrategy

    os.makedirs(args.out, exist_ok=True)
    NaNLoss.nan_steps = args.nan_steps
    module = NaNLoss(args.model_dir, torch_dtype="float32", attn_implementation="sdpa", gradient_checkpointing=False,
                     learning_rate=1e-2, warmup_ratio=0.0, max_nonfinite_steps=args.tolerate)
    data = SFTDataModule(args.data, tokenizer_name_or_path=TOKENIZER, max_length=64, per_device_train_batch_size=1,
                         gradient_accumulation_steps=1, num_workers=0, shuffle=False)
    record = Record()
    checkpoints = os.path.join(args.out, "checkpoints")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(zero_stage=3),
                        precision="32-true", max_steps=args.max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[record, SFTCheckpoint(checkpoints, every_n_train_steps=1),
                                   HFExport(os.path.join(args.out, "export"))])
    error = None
    try:
        trainer.fit(module, data)
    except NonFiniteError as err:
        error = str(err)
    if trainer.is_global_zero:
        report = {"error": error, "skipped_steps": trainer.strategy.deepspeed_engine.skipped_steps,
                  "global_step": trainer.global_step, "changed": record.changed, "grad_norm": record.grad_norm,
                  "checkpoints": sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else [],
                  "exported": os.path.isfile(os.path.join(args.out, "export", "model.safetensors"))}
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
