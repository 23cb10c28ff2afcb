"""Summarises benchmark runs recorded by ``benchmarks.steptime.StepTimer`` (collected by the scaling scripts into one
JSON-lines file: every line ``{"run": TAG, "gpus": N, "file": "steps"|"timing", ...record}``).

Per run: trained tokens/s (steps after the first ``--skip``), per GPU, MFU (989 TFLOP/s basis per GPU), per-GPU peak
memory (min-max over ranks), the step-time breakdown (rank 0's GPU timeline: forward+backward, optimizer step,
between micro-batches; and the slowest over the fastest rank's forward+backward), the token imbalance of the ranks
(max/mean tokens per rank, mean over steps), and the per-step losses.

Runs that trained identical work (the same tokens in every step: same rows per optimizer step, same seed) are
compared: scaling = tokens/s(N GPUs) / (N x tokens/s(1 GPU)), and the largest relative per-step loss difference.

    python benchmarks/scaling_summary.py records.jsonl [--skip 2]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from statistics import mean


def load(path: str) -> dict[str, dict]:
    runs: dict[str, dict] = defaultdict(lambda: {"steps": {}, "timing": defaultdict(dict), "gpus": 1})
    for line in open(path):
        r = json.loads(line)
        if "train/loss" in r:  # records written before the TRL metric names: per-step tokens in num_tokens
            r.setdefault("train/step_tokens", r.get("train/num_tokens"))
        run = runs[r["run"]]
        run["gpus"] = r.get("gpus", 1)
        if r["file"] == "steps":
            run["steps"][r["step"]] = r
        else:
            run["timing"][r["step"]][r["rank"]] = r
    return dict(runs)


def summarise(run: dict, skip: int) -> dict:
    steps = [run["steps"][s] for s in sorted(run["steps"])]
    timed = [r for r in steps if r["step"] > skip]
    if not timed:
        return {}
    seconds = sum(r["train/step_tokens"] / r["train/tokens_per_s"] for r in timed)
    tokens = sum(r["train/step_tokens"] for r in timed)
    mfu = sum(r["train/mfu"] * r["train/step_tokens"] / r["train/tokens_per_s"] for r in timed) / seconds
    timing = [run["timing"][r["step"]] for r in timed if r["step"] in run["timing"]]
    peaks = [t["peak_mem_gib"] for ranks in run["timing"].values() for t in ranks.values()]

    def rank0(key: str) -> float:
        return mean(ranks[0][key] for ranks in timing if 0 in ranks) if timing else float("nan")

    imbalance = [max(t["gpu_fwd_bwd_s"] for t in ranks.values()) / max(min(t["gpu_fwd_bwd_s"] for t in ranks.values()), 1e-9)
                 for ranks in timing if ranks]
    token_imb = [max(t["tokens"] for t in ranks.values()) / mean(t["tokens"] for t in ranks.values())
                 for ranks in timing if ranks]
    return {
        "gpus": run["gpus"], "steps": len(steps), "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / run["gpus"], "mfu": mfu, "step_s": seconds / len(timed),
        "peak_min_gib": min(peaks) if peaks else float("nan"), "peak_max_gib": max(peaks) if peaks else float("nan"),
        "fwd_bwd_s": rank0("gpu_fwd_bwd_s"), "optimizer_s": rank0("gpu_optimizer_s"), "between_s": rank0("gpu_between_s"),
        "host_fwd_bwd_s": rank0("host_fwd_bwd_s"), "micro_batches": rank0("micro_batches"),
        "rank_time_imbalance": mean(imbalance) if imbalance else float("nan"),
        "rank_token_imbalance": mean(token_imb) if token_imb else float("nan"),
        "rank_token_imbalance_logged": mean(r.get("train/rank_token_imbalance", float("nan")) for r in timed),
        "losses": [r["train/loss"] for r in steps], "work": tuple(int(r["train/step_tokens"]) for r in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("records")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing")
    args = parser.parse_args()
    stats = {tag: s for tag, run in load(args.records).items() if (s := summarise(run, args.skip))}
    print(f"{'run':28s} {'gpus':>4s} {'tok/s':>8s} {'tok/s/gpu':>9s} {'mfu':>6s} {'step_s':>7s} {'fwd_bwd':>7s} "
          f"{'optim':>6s} {'between':>7s} {'mb':>4s} {'t_imb':>6s} {'tok_imb':>7s} {'peak GiB':>11s}")
    for tag, s in stats.items():
        print(f"{tag:28s} {s['gpus']:4d} {s['tokens_per_s']:8.0f} {s['tokens_per_s_per_gpu']:9.0f} {s['mfu']:6.1%} "
              f"{s['step_s']:7.3f} {s['fwd_bwd_s']:7.3f} {s['optimizer_s']:6.3f} {s['between_s']:7.3f} "
              f"{s['micro_batches']:4.1f} {s['rank_time_imbalance']:6.2f} {s['rank_token_imbalance']:7.3f} "
              f"{s['peak_min_gib']:5.1f}-{s['peak_max_gib']:<5.1f}")
    groups: dict[tuple, list[str]] = defaultdict(list)
    for tag, s in stats.items():
        groups[s["work"]].append(tag)
    ratios = []
    for tags in groups.values():
        ones = [t for t in tags if stats[t]["gpus"] == 1]
        for base in ones:
            for tag in tags:
                n = stats[tag]["gpus"]
                if tag == base or (n == 1 and tag in ones):
                    continue
                scaling = stats[tag]["tokens_per_s"] / (n * stats[base]["tokens_per_s"])
                rel = max(abs(a - b) / abs(b) for a, b in zip(stats[tag]["losses"], stats[base]["losses"]))
                ratios.append({"run": tag, "vs": base, "gpus": n, "scaling": scaling, "max_rel_loss_diff": rel})
                print(f"SCALING {tag} vs {base}: {scaling:.3f} of linear on {n} GPUs (identical work, "
                      f"{len(stats[tag]['work'])} steps); per-step losses max rel diff {rel:.2e}")
    print("SUMMARY", json.dumps({"runs": {t: {k: v for k, v in s.items() if k != "work"} for t, s in stats.items()},
                                 "ratios": ratios}))


if __name__ == "__main__":
    main()
