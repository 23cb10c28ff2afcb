"""Prints the throughput comparison: lit_sft step records (StepRecorder JSON lines) vs the TRL reference result.

Usage: python benchmarks/summarize.py TRL_RESULT.json LIT_STEPS.jsonl [GSM8K_STEPS.jsonl]
Tokens/s over steps 4..N (as the TRL runner), MFU by lit_sft.metrics.training_flops for both runs (the TRL run's
FLOPs are computed from the same rows: same data order, 16 rows per step), peak memory, per-step losses and ratios.
"""

import json
import sys

trl = json.load(open(sys.argv[1]))
lit = [json.loads(line) for line in open(sys.argv[2])]
skip = 3


def step_tokens(rows):
    """Records written before the TRL metric names carry the step's tokens as ``train/num_tokens``."""
    for r in rows:
        r.setdefault("train/step_tokens", r.get("train/num_tokens"))
    return rows


step_tokens(lit)


def tokens_per_s(rows):
    timed = rows[skip:]
    return sum(r["train/step_tokens"] for r in timed) / sum(r["train/step_tokens"] / r["train/tokens_per_s"] for r in timed)


lit_tps = tokens_per_s(lit)
lit_mfu = sum(r["train/mfu"] * r["train/step_tokens"] / r["train/tokens_per_s"] for r in lit[skip:]) / sum(
    r["train/step_tokens"] / r["train/tokens_per_s"] for r in lit[skip:])
trl_tps = trl["tokens_per_s"]
losses = list(zip(trl["loss"], [r["train/loss"] for r in lit]))
rel = [abs(a - b) / abs(a) for a, b in losses]
print("STEP  trl_loss  lit_loss  rel_diff  trl_tokens  lit_tokens")
for i, ((a, b), d) in enumerate(zip(losses, rel)):
    print(f"{i + 1:4d}  {a:8.4f}  {b:8.4f}  {d:8.2e}  {int(trl['tokens'][i]):10d}  {int(lit[i]['train/step_tokens']):10d}")
summary = {
    "trl_tokens_per_s": trl_tps, "lit_tokens_per_s": lit_tps, "speedup": lit_tps / trl_tps,
    "lit_mfu": lit_mfu, "trl_mfu_same_flops": lit_mfu * trl_tps / lit_tps,
    "trl_peak_mem_gib": trl["peak_mem_gib"], "lit_peak_mem_gib": max(r.get("train/peak_mem_gib", 0) for r in lit),
    "max_rel_loss_diff": max(rel), "mean_rel_loss_diff": sum(rel) / len(rel),
}
if len(sys.argv) > 3:
    g = step_tokens([json.loads(line) for line in open(sys.argv[3])])
    summary["gsm8k_tokens_per_s"] = tokens_per_s(g)
    summary["gsm8k_mfu"] = sum(r["train/mfu"] for r in g[skip:]) / len(g[skip:])
    summary["gsm8k_peak_mem_gib"] = max(r.get("train/peak_mem_gib", 0) for r in g)
print("SUMMARY", json.dumps(summary))
