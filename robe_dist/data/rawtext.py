"""Criteo-like raw features and their formatting as Criteo TSV text (vectorised).

Used by the synthetic generator (the features) and by tests and benchmarks (the text: a raw
file whose exact expected parse is known).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robe_dist.data.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT, MISSING_CAT_ID

#: Share of empty values per integer feature I1..I13 (roughly as in Criteo Kaggle).
DENSE_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.76, 0.22)
#: Share of empty values per categorical feature C1..C26 (roughly as in Criteo Kaggle).
CAT_MISSING = (0, 0, 0.03, 0.03, 0, 0.12, 0, 0, 0, 0.03, 0, 0.03, 0, 0, 0, 0.03, 0, 0,
               0.44, 0.44, 0.03, 0.76, 0, 0.03, 0.44, 0.44)  # fmt: skip
#: Share of negative values of I2 (Criteo has -1, -2, -3 there).
NEGATIVE_I2 = 0.05
#: Widest integer written (sign included).
DENSE_WIDTH = 10
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@dataclass
class RawRows:
    """Raw Criteo rows. ``dense`` int64 [n, 13] (meaningless where ``dense_missing``),
    ``ids`` int64 [n, 26] raw 32-bit ids, ``MISSING_CAT_ID`` where empty; ``labels`` int32 [n]."""

    labels: np.ndarray
    dense: np.ndarray
    dense_missing: np.ndarray
    ids: np.ndarray

    def transformed_dense(self) -> np.ndarray:
        """float32 [n, 13]: log(1 + max(x, 0)), missing -> 0 (what ingestion writes)."""
        x = np.where(self.dense_missing, 0, np.maximum(self.dense, 0))
        return np.log1p(x.astype(np.float32))


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint32 (a bijection with fmix32(0) = 0)."""
    h = h ^ (h >> np.uint32(16))
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def raw_ids(ranks: np.ndarray, key: int) -> np.ndarray:
    """Distinct, nonzero, uniform-looking 32-bit ids for ranks in [0, 2**32 - 1) (int64).

    ``fmix32((rank + 1) * odd_key)`` is a bijection of uint32 fixing 0, so ranks map to distinct
    nonzero ids (0 is the missing id)."""
    odd = np.uint32((key | 1) & 0xFFFFFFFF)
    return fmix32((ranks.astype(np.uint32) + np.uint32(1)) * odd).astype(np.int64)


def zipf_ranks(rng: np.random.Generator, shape: tuple[int, ...], cardinality: int, alpha: float) -> np.ndarray:
    """Ranks in [0, cardinality) with P(rank r) roughly proportional to (r + 1) ** -alpha."""
    u = rng.random(shape)
    if cardinality <= 1:
        return np.zeros(shape, dtype=np.int64)
    if abs(alpha - 1.0) < 1e-9:
        x = np.exp(u * np.log(cardinality + 1.0))
    else:
        a = 1.0 - alpha
        x = (1.0 + u * ((cardinality + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, cardinality - 1).clip(0)


def random_dense(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed count-like integer features: (values int64 [n, 13], missing bool [n, 13])."""
    mu = np.linspace(0.5, 4.0, INT_FEATURE_COUNT)
    values = np.floor(np.exp(rng.normal(mu, 1.2, size=(n, INT_FEATURE_COUNT)))).astype(np.int64) - 1
    values = np.minimum(values, 10**8 - 1)
    neg = rng.random(n) < NEGATIVE_I2
    values[neg, 1] = -rng.integers(1, 4, size=int(neg.sum()))
    missing = rng.random((n, INT_FEATURE_COUNT)) < np.asarray(DENSE_MISSING)
    return values, missing


def format_tsv(rows: RawRows, drop_trailing_empty: float = 0.5, seed: int = 0) -> bytes:
    """Criteo TSV text of ``rows``: one line each, '\\n' terminated.

    A share ``drop_trailing_empty`` of the lines that end with empty categoricals lose those
    fields' tabs, as many real Criteo lines do (37-38 fields instead of 40)."""
    n = len(rows.labels)
    width = 2 + INT_FEATURE_COUNT * (DENSE_WIDTH + 1) + CAT_FEATURE_COUNT * 9
    m = np.zeros((n, width), dtype=np.uint8)  # 0 = no byte; removed at the end
    m[:, 0] = 48 + rows.labels
    m[:, 1] = 9
    mag = np.abs(rows.dense)
    for j in range(INT_FEATURE_COUNT):
        o = 2 + j * (DENSE_WIDTH + 1)
        present = ~rows.dense_missing[:, j]
        ndig = np.ones(n, dtype=np.int64)
        for i in range(DENSE_WIDTH - 1):  # digit i counted from the right
            digit = (mag[:, j] // 10**i) % 10
            m[:, o + DENSE_WIDTH - 1 - i] = np.where(present & ((mag[:, j] >= 10**i) | (i == 0)), 48 + digit, 0)
            ndig += mag[:, j] >= 10 ** (i + 1)
        neg = present & (rows.dense[:, j] < 0)
        m[np.flatnonzero(neg), o + DENSE_WIDTH - 1 - ndig[neg]] = ord("-")
        m[:, o + DENSE_WIDTH] = 9
    cat0 = 2 + INT_FEATURE_COUNT * (DENSE_WIDTH + 1)
    ids = rows.ids.astype(np.uint64)
    present = rows.ids != MISSING_CAT_ID
    for t in range(CAT_FEATURE_COUNT):
        o = cat0 + 9 * t
        for i in range(8):
            nib = (ids[:, t] >> np.uint64(4 * (7 - i))) & np.uint64(15)
            m[:, o + i] = np.where(present[:, t], _HEX[nib], 0)
        m[:, o + 8] = 9
    # line end: after the last categorical, or (dropping trailing empties) after the last present one
    last = np.full(n, CAT_FEATURE_COUNT - 1)
    rng = np.random.default_rng([seed, 7])
    drop = rng.random(n) < drop_trailing_empty
    has = present.any(axis=1)
    last_present = CAT_FEATURE_COUNT - 1 - np.argmax(present[:, ::-1], axis=1)
    last[drop & has] = last_present[drop & has]
    end_col = cat0 + 9 * last + 8
    m[np.arange(n), end_col] = 10
    m[np.arange(width)[None, :] > end_col[:, None]] = 0
    return m[m != 0].tobytes()
