"""Measured collision behaviour of the two ROBE mappings.

    .venv/bin/python benchmarks/collisions.py [--ids 500000]

Hashes ``--ids`` distinct (table, id) keys spread over 26 tables (Criteo-like raw 32-bit ids for
the universal mapping; ids below MLPerf's v1 table sizes for the paper mapping), 4 blocks each
(dim 128, Z=32), into arrays of m slots, and counts over ALL pairs of distinct (table, id, block)
keys: how many start at the same slot (ideal: C(N, 2) / (m - Z + 1)) and how many overlap at all,
|start1 - start2| < Z (ideal: C(N, 2) (2Z - 1) / (m - Z + 1)). A ratio of 1.00 is what a truly
random placement gives.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from robe_dist import hashing

MLPERF_V1_SIZES = [39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
                   2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36]
Z, BLOCKS = 32, 4


def all_starts(mode: str, num_ids: int, num_starts: int) -> np.ndarray:
    """Starts of every block of ``num_ids`` distinct (table, id) keys: int64 [num_ids * 4]."""
    rng = np.random.default_rng(0)
    sizes = np.array(MLPERF_V1_SIZES)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    weights = sizes / sizes.sum() if mode == "paper" else np.full(26, 1 / 26)
    per_table = rng.multinomial(num_ids, weights)
    consts = hashing.paper_constants()
    out = []
    for t, n in enumerate(per_table):
        high = 2**32 if mode == "universal" else int(sizes[t])
        n = min(int(n), high)
        x = torch.from_numpy(rng.choice(high, size=n, replace=False) if high < 10 * n else
                             np.unique(rng.integers(0, high, size=n)))
        if mode == "universal":
            s = hashing.universal_starts_torch(x, hashing.table_key(f"t_cat_{t}", 0), BLOCKS, num_starts)
        else:
            s = hashing.paper_starts_torch(x, int(offsets[t]), BLOCKS, num_starts, consts)
        out.append(s.reshape(-1).numpy())
    return np.concatenate(out)


def pair_counts(starts: np.ndarray, num_starts: int) -> tuple[int, int]:
    """(pairs with the same start, pairs with |difference| < Z), over all pairs of keys."""
    h = np.bincount(starts, minlength=num_starts).astype(np.int64)
    same = int((h * (h - 1) // 2).sum())
    near = sum(int(np.dot(h[:-d], h[d:])) for d in range(1, Z) if d < num_starts)
    return same, same + near


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=500_000, help="distinct (table, id) keys (x4 blocks)")
    args = p.parse_args()
    print(f"{'mapping':10} {'m':>11} {'starts':>9} {'same-start pairs':>17} {'ideal':>12} {'ratio':>6} "
          f"{'overlapping':>12} {'ideal':>12} {'ratio':>6}")
    for mode in ("universal", "paper"):
        for m in (100_000, 1_000_000, 27_000_000):
            n = m - Z + 1
            starts = all_starts(mode, args.ids, n)
            k = len(starts)
            same, overlap = pair_counts(starts, n)
            pairs = k * (k - 1) / 2
            ideal_same, ideal_overlap = pairs / n, pairs * (2 * Z - 1) / n
            print(f"{mode:10} {m:>11,} {k:>9,} {same:>17,} {ideal_same:>12,.0f} {same / ideal_same:6.3f} "
                  f"{overlap:>12,} {ideal_overlap:>12,.0f} {overlap / ideal_overlap:6.3f}")


if __name__ == "__main__":
    main()
