"""Benchmark of ``lit_sft.data.packing.pack_rows`` (issue 10 item 11): 100k rows of R1-like lengths in < 5 s.

Lengths are lognormal with median 1,000 tokens, clipped to ``[16, 16384]`` (OpenR1-Math-220k's traces: median about
a thousand tokens, a long tail up to the recipe's ``max_length`` of 16,384), packed into sequences of 16,384 tokens.
``--old`` also times the quadratic best-fit-decreasing that ``pack_rows`` replaced, on smaller inputs.

    python benchmarks/pack_rows.py [--rows 100000] [--old]
"""

from __future__ import annotations

import argparse
import random
import time

from lit_sft.data.packing import pack_rows


def r1_like_lengths(n: int, seed: int = 0, median: int = 1000, max_length: int = 16384) -> list[int]:
    rng = random.Random(seed)
    return [min(max(int(rng.lognormvariate(0.0, 1.0) * median), 16), max_length) for _ in range(n)]


def quadratic_bfd(lengths: list[int], max_length: int) -> list[list[int]]:
    """The ``pack_rows`` of lit_sft before issue 10: every open bin scanned for every row."""
    groups: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        fits = [g for g, free in enumerate(room) if lengths[row] <= free]
        if fits:
            g = min(fits, key=lambda g: room[g])
            groups[g].append(row)
            room[g] -= lengths[row]
        else:
            groups.append([row])
            room.append(max_length - lengths[row])
    return groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--old", action="store_true", help="also time the old quadratic packing (5k, 10k rows)")
    args = parser.parse_args()
    lengths = r1_like_lengths(args.rows, max_length=args.max_length)
    start = time.perf_counter()
    groups = pack_rows(lengths, args.max_length)
    seconds = time.perf_counter() - start
    fill = sum(lengths) / (len(groups) * args.max_length)
    print(f"pack_rows: {args.rows} rows (median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)} tokens) "
          f"-> {len(groups)} sequences of <= {args.max_length} tokens, {fill:.1%} full, in {seconds:.2f} s")
    if args.old:
        for n in (5_000, 10_000):
            start = time.perf_counter()
            old = quadratic_bfd(lengths[:n], args.max_length)
            print(f"old quadratic pack_rows: {n} rows -> {len(old)} sequences in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
