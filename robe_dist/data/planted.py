"""The hidden ground-truth model that labels synthetic Criteo data, and AUC from histograms.

The click probability of a sample is ``sigmoid(logit)`` with a DLRM-like logit over the raw
(hashed) ids and the transformed dense features::

    logit = bias + W_B * sum_t b_t(x_t) + W_I * sum_{t<u} <e_t(x_t), e_u(x_u)> / sqrt(k)
                 + W_D * sum_j w_j * tanh(dense_j - 1.5)

where, per table ``t`` and raw id ``x``, ``b_t(x)`` (a scalar) and ``e_t(x)`` (k numbers) are
pseudo-random, approximately standard normal values computed by hashing (seed, t, x, j): every id
has its own parameters and none is stored. A multi-hot bag uses the mean of its ids' ``b`` and
``e``. Labels are Bernoulli(sigmoid(logit)), so ``sigmoid(logit)`` is the Bayes-optimal score and
its AUC on the generated labels is the best any model can reach on that data (``planted_auc``).
"""

from __future__ import annotations

import numpy as np

EMBED_DIM = 8
W_BIAS = 0.9
W_INTERACTION = 0.9
W_DENSE = 0.45
AUC_BINS = 1 << 16

_U = np.uint64
_C1, _C2 = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)
_GOLDEN = _U(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (a bijection; wraps modulo 2**64)."""
    x = x ^ (x >> _U(30))
    x *= _C1
    x ^= x >> _U(27)
    x *= _C2
    x ^= x >> _U(31)
    return x


def _normal_from_hash(h: np.ndarray) -> np.ndarray:
    """Approximately N(0, 1) float32 from uint64 hashes (sum of four 16-bit uniforms)."""
    total = np.zeros(h.shape, dtype=np.float32)
    for shift in (0, 16, 32, 48):
        total += ((h >> _U(shift)) & _U(0xFFFF)).astype(np.float32)
    return (total * np.float32(1 / 65536) - np.float32(2.0)) * np.float32(3**0.5)


class PlantedModel:
    """Deterministic (per ``seed``) click model over 26 tables of raw ids; see the module doc."""

    def __init__(self, seed: int, num_tables: int, num_dense: int, embed_dim: int = EMBED_DIM) -> None:
        self.k = embed_dim
        self.num_tables = num_tables
        self.table_keys = mix64(np.arange(num_tables, dtype=np.uint64) * _GOLDEN ^ _U(seed & (2**64 - 1)))
        rng = np.random.default_rng([seed, 0x5EED])
        self.dense_w = rng.standard_normal(num_dense).astype(np.float32) / np.float32(num_dense**0.5)
        self.bias = 0.0

    def id_params(self, table: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b [...], e [..., k]) float32 for raw ids of table ``table``."""
        h = mix64(ids.astype(np.uint64) ^ self.table_keys[table])
        b = _normal_from_hash(mix64(h))
        e = _normal_from_hash(mix64(h[..., None] + (np.arange(1, self.k + 1, dtype=np.uint64) * _GOLDEN)))
        return b, e

    def logits(self, dense: np.ndarray, bags: list[np.ndarray]) -> np.ndarray:
        """Logits [n] for transformed dense [n, 13] and one id array per table ([n] or [n, s_t])."""
        n = len(dense)
        bias_sum = np.zeros(n, dtype=np.float32)
        e_sum = np.zeros((n, self.k), dtype=np.float32)
        e_sq = np.zeros(n, dtype=np.float32)
        for t, ids in enumerate(bags):
            uniq, inverse = np.unique(ids, return_inverse=True)  # hot ids repeat: hash each once
            b, e = self.id_params(t, uniq)
            b, e = b[inverse.reshape(ids.shape)], e[inverse.reshape(ids.shape)]
            if ids.ndim == 2:  # multi-hot bag: mean of its ids' parameters
                b, e = b.mean(axis=1), e.mean(axis=1)
            bias_sum += b
            e_sum += e
            e_sq += np.einsum("nk,nk->n", e, e)
        pairs = 0.5 * (np.einsum("nk,nk->n", e_sum, e_sum) - e_sq) / np.float32(self.k**0.5)
        dense_term = np.tanh(dense - np.float32(1.5)) @ self.dense_w
        t = self.num_tables
        return (
            np.float32(self.bias)
            + np.float32(W_BIAS / t**0.5) * bias_sum
            + np.float32(W_INTERACTION / (t * (t - 1) / 2) ** 0.5) * pairs
            + np.float32(W_DENSE * 4) * dense_term
        )

    def calibrate(self, logits: np.ndarray, ctr: float) -> None:
        """Set the bias so that the mean click probability of ``logits`` (bias 0) is ``ctr``."""
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if float(np.mean(sigmoid(logits + mid))) < ctr:
                lo = mid
            else:
                hi = mid
        self.bias = 0.5 * (lo + hi)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def score_histograms(p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[2, AUC_BINS] int64 counts of scores ``p`` in [0, 1] for negatives (row 0) and positives."""
    bins = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
    return np.stack([np.bincount(bins[labels == c], minlength=AUC_BINS) for c in (0, 1)])


def auc_from_histograms(hist: np.ndarray) -> float | None:
    """ROC AUC of binned scores (ties within a bin count one half); None with one class only."""
    neg, pos = hist[0].astype(np.float64), hist[1].astype(np.float64)
    if neg.sum() == 0 or pos.sum() == 0:
        return None
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
