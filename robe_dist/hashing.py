"""The two ROBE mappings from (table, id, block) to a block's start in the shared array.

Both map block ``c`` of the embedding of id ``x`` in table ``t`` to a start in
``[0, m - Z]`` (a block never wraps around the end of the array); element ``j`` of the
embedding is then ``array[start(t, x, j // Z) + j % Z]``. The formulas below are for starts at
any slot (alignment ``a = 1``, the paper's); with ``RobeConfig.block_align = a`` a start is
``a * (u mod S)`` with ``S = (m - Z) // a + 1`` (``num_block_starts``) and ``u`` the same hash
value, so every block begins on a multiple of ``a`` (``a = 16``: a 64-byte line of float32).

``"universal"`` (robe_dist's own; raw int64 ids of any value, no vocabulary)::

    key_t = fmix64(fnv1a64(table_name) ^ fmix64(seed ^ G))       # per table, computed once
    h     = fmix64(uint64(x) ^ key_t)                              # per id
    start = (fmix64(h + (c + 1) * G) >> 1) mod (m - Z + 1)         # per block

with MurmurHash3's 64-bit finaliser ``fmix64``, ``G = 0x9E3779B97F4A7C15`` and all arithmetic
modulo 2**64. The table enters through its *name*, so adding or reordering tables leaves the
other tables' mappings unchanged.

``"paper"`` (the authors' published mapping, apd10/universal_memory_allocation)::

    A, B, C = R[2], R[1], R[0]  with R = numpy.random.RandomState(seed).randint(0, P, 10)
    g       = x + sum(num_embeddings of the tables before t)
    start   = ((g * A + c * B + C) mod P) mod (m - Z + 1),   P = 2038074743

evaluated in exact integers (the kernels compute ``(((g mod P) * A + C) mod P + c * B) mod P``, the
same number, which never overflows int64 for global ids below ``2**62``).

With the authors' seed 1024, ``R[:3] = 634329019, 1825252241, 871205356``.

This module holds the scalar (pure Python) definitions, used as the specification in tests
and docs, and the vectorised PyTorch versions used on devices without the C++ operator.
"""

from __future__ import annotations

import numpy as np
import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
FMIX_C1 = 0xFF51AFD7ED558CCD
FMIX_C2 = 0xC4CEB9FE1A85EC53
PAPER_PRIME = 2038074743
PAPER_DEFAULT_SEED = 1024


# ---------------------------------------------------------------------------- scalar spec
def fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finaliser on a Python int taken modulo 2**64."""
    k &= MASK64
    k ^= k >> 33
    k = (k * FMIX_C1) & MASK64
    k ^= k >> 33
    k = (k * FMIX_C2) & MASK64
    k ^= k >> 33
    return k


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a of ``data`` (stable across processes, unlike Python's ``hash``)."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def table_key(table_name: str, seed: int) -> int:
    """The universal mapping's per-table key, an unsigned 64-bit int."""
    return fmix64(fnv1a64(table_name.encode("utf-8")) ^ fmix64((seed & MASK64) ^ GOLDEN))


def num_block_starts(array_size: int, block_size: int, block_align: int = 1) -> int:
    """``S``, how many starts a block can have: the multiples of ``block_align`` in ``[0, m - Z]``."""
    return (array_size - block_size) // block_align + 1


def universal_start(key: int, x: int, block: int, num_starts: int) -> int:
    """Start of ``block`` of id ``x`` under table key ``key``; ``num_starts = m - Z + 1`` (aligned:
    ``num_block_starts(m, Z, a)``, and the start is ``a`` times this)."""
    h = fmix64((x & MASK64) ^ key)
    return (fmix64(h + (block + 1) * GOLDEN) >> 1) % num_starts


def paper_constants(seed: int = PAPER_DEFAULT_SEED) -> tuple[int, int, int, int]:
    """``(A, B, C, P)`` of the paper mapping, drawn the way the authors draw them."""
    r = np.random.RandomState(seed).randint(0, PAPER_PRIME, 10)
    return int(r[2]), int(r[1]), int(r[0]), PAPER_PRIME


def paper_start(g: int, block: int, num_starts: int, constants: tuple[int, int, int, int]) -> int:
    """Start of ``block`` of global id ``g`` in the paper mapping."""
    a, b, c, p = constants
    return ((g * a + block * b + c) % p) % num_starts


# ---------------------------------------------------------------------------- torch versions
def _signed(u: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def fmix64_torch(k: torch.Tensor) -> torch.Tensor:
    """``fmix64`` on int64 tensors holding uint64 bits (wrapping multiply, logical shifts)."""
    k = k ^ _shr(k, 33)
    k = k * _signed(FMIX_C1)
    k = k ^ _shr(k, 33)
    k = k * _signed(FMIX_C2)
    return k ^ _shr(k, 33)


def universal_starts_torch(ids: torch.Tensor, key: int, num_blocks: int, num_starts: int) -> torch.Tensor:
    """Block starts of ``ids`` (int64 [n]) for one table: int64 [n, num_blocks]."""
    h = fmix64_torch(ids.long() ^ _signed(key))
    blocks = torch.arange(1, num_blocks + 1, device=ids.device, dtype=torch.long) * _signed(GOLDEN)
    hb = fmix64_torch(h.unsqueeze(1) + blocks.unsqueeze(0))
    return _shr(hb, 1) % num_starts


def paper_starts_torch(
    ids: torch.Tensor, offset: int, num_blocks: int, num_starts: int, constants: tuple[int, int, int, int]
) -> torch.Tensor:
    """Block starts of ``ids`` (int64 [n], already checked) in the paper mapping: [n, num_blocks]."""
    a, b, c, p = constants
    g = (ids.long() + offset) % p  # (g mod P) * A < 2**62: no int64 overflow for any id below 2**62
    blocks = torch.arange(num_blocks, device=ids.device, dtype=torch.long) * b
    return (((g * a + c) % p).unsqueeze(1) + blocks.unsqueeze(0)) % p % num_starts


def take_moduli(values: torch.Tensor, moduli: torch.Tensor) -> torch.Tensor:
    """``values % moduli`` where the modulus is positive; where it is 0 the id is left as it is
    (negative and 63-bit ids included: the universal mapping hashes any int64). The trainer and
    the exported model (``robe_dist.trainer.data.cap_ids``,
    ``robe_dist.inference.export.ScoringModel``) both take ids through it."""
    return torch.where(moduli > 0, values % moduli.clamp(min=1), values)
