"""A lit_sft run that evaluates after its first optimizer step, for the data-parallel ``eval/loss`` test (launched as a
subprocess; Lightning re-launches this script once per extra device).

Trains ``--model-dir`` for one optimizer step on ``--data`` (a folder with ``train.jsonl`` and ``test.jsonl``),
evaluates once (``SFTEvaluation("steps", 1)``, ``per_device_eval_batch_size`` 1) and writes, from every rank,
``--out/rank{R}.json``: ``eval/loss``, the evaluation batches this rank ran, and the supervised tokens it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import lightning as L  # noqa: E402

from sft_harness import fit_lit_sft  # noqa: E402


class CountEvaluation(L.Callback):
    def __init__(self) -> None:
        self.batches, self.tokens, self.val_loss = 0, 0, None

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.batches += 1
            self.tokens += int((batch["labels"][:, 1:] != -100).sum())

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.val_loss = float(trainer.callback_metrics["eval/loss"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()

    from lit_sft.evaluation import SFTEvaluation

    os.makedirs(args.out, exist_ok=True)
    strategy = "ddp" if args.devices > 1 else "auto"
    count = CountEvaluation()
    micro = 4 // args.devices  # 4 rows per optimizer step whatever the number of processes
    trainer, module = fit_lit_sft(args.model_dir, args.data, micro, 1, 1, devices=args.devices, strategy=strategy,
                                  callbacks=[SFTEvaluation("steps", 1), count], do_eval=True,
                                  per_device_eval_batch_size=1)
    report = {"world_size": trainer.world_size, "global_step": trainer.global_step, "val_loss": count.val_loss,
              "batches": count.batches, "tokens": count.tokens}
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
