"""Summarises ``benchmarks/lora.sh``: full fine-tuning, LoRA and QLoRA on identical rows, side by side.

Per run (``RUN_DIR/logs/metrics.csv`` and ``RUN_DIR.log``): trained tokens/s over the steps after the first
``--skip`` (non-padding tokens / step time, as every lit_sft benchmark), relative to full fine-tuning, MFU (LoRA's
FLOPs: frozen weights 4 per token instead of 6, ``lit_sft.lora.lora_matmul_params``), the peak GPU memory
(``torch.cuda.max_memory_allocated``), the mean step time, the first and last step's loss, the trained parameters and
the decoder layers that recompute (from the run's log). A run that did not train shows the last error line of its log.
Prints a table, then one ``SUMMARY {json}`` line last.

    python benchmarks/lora_summary.py --skip 2 full=/tmp/lora_bench/full lora=/tmp/lora_bench/lora qlora=...
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re


def read_steps(run_dir: str) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from the run's ``logs/metrics.csv`` (empty if it wrote none)."""
    path = os.path.join(run_dir, "logs", "metrics.csv")
    steps: dict[int, dict[str, float]] = {}
    if not os.path.isfile(path):
        return steps
    with open(path) as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
            steps.setdefault(int(float(row["step"])), {}).update(values)
    return steps


def from_log(run_dir: str) -> dict[str, str]:
    """What the run's log says: trained parameters, recomputing layers, or its last error."""
    path = run_dir.rstrip("/") + ".log"
    found: dict[str, str] = {}
    if not os.path.isfile(path):
        return found
    text = open(path, errors="replace").read()
    if m := re.search(r"LoRA: ([\d,]+) of ([\d,]+) parameters train", text):
        found["trained_params"] = m.group(1)
    if m := re.search(r"gradient_checkpointing_layers: auto: (\d+ of \d+)", text):
        found["recompute_layers"] = m.group(1)
    errors = [line for line in text.splitlines() if re.search(r"^\w*(Error|Exception)\b", line.strip())]
    if errors:  # a raised exception's last line (not a library's warning that mentions an ImportError)
        found["error"] = errors[-1].strip()[:300]
    return found


def summarise(run_dir: str, skip: int) -> dict:
    steps = read_steps(run_dir)
    out: dict = {"steps": len(steps), **from_log(run_dir)}
    timed = [steps[s] for s in sorted(steps) if s > skip and steps[s].get("train/tokens_per_s")]
    if not timed:
        return out
    step_tokens = [r.get("train/step_tokens", r["train/num_tokens"]) for r in timed]  # older logs: per-step num_tokens
    seconds = [t / r["train/tokens_per_s"] for t, r in zip(step_tokens, timed)]
    tokens = sum(step_tokens)
    out.update(tokens_per_s=tokens / sum(seconds), step_s=sum(seconds) / len(timed),
               loss_first=steps[min(steps)].get("train/loss"), loss_last=steps[max(steps)].get("train/loss"),
               peak_mem_gib=max((r.get("train/peak_mem_gib", float("nan")) for r in steps.values()), default=None))
    if "tokens_per_s" in out:
        out.pop("error", None)  # it trained: an error line in its log is not why it stopped
    if all("train/mfu" in r for r in timed):
        out["mfu"] = sum(r["train/mfu"] * s for r, s in zip(timed, seconds)) / sum(seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    args = parser.parse_args()
    runs = {name: summarise(path, args.skip) for name, path in (r.split("=", 1) for r in args.runs)}
    base = runs.get("full", {}).get("tokens_per_s")
    print(f"{'run':8s} {'steps':>5s} {'tokens/s':>10s} {'vs full':>8s} {'MFU':>6s} {'peak GiB':>9s} {'step s':>7s} "
          f"{'loss 1st':>9s} {'loss last':>9s} {'trained params':>15s} {'recompute':>9s}")
    for name, r in runs.items():
        if "tokens_per_s" not in r:
            print(f"{name:8s} {r['steps']:5d}  did not train: {r.get('error', 'no metrics')}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        peak = r["peak_mem_gib"] or float("nan")
        print(f"{name:8s} {r['steps']:5d} {r['tokens_per_s']:10.0f} {ratio:>8s} {r.get('mfu', float('nan')):6.1%} "
              f"{peak:9.1f} {r['step_s']:7.2f} {r['loss_first']:9.4f} {r['loss_last']:9.4f} "
              f"{r.get('trained_params', 'all'):>15s} {r.get('recompute_layers', '-'):>9s}")
    print("SUMMARY " + json.dumps(runs, sort_keys=True))


if __name__ == "__main__":
    main()
