"""Triton kernels of the ROBE pooled lookup: forward, backward, fused sparse updates.

Same inputs, outputs and hash as the C++ CPU operator (``robe_dist/csrc/robe_cpu.cpp``, whose
header describes the layout of ``values``, ``offsets``, ``meta`` and ``starts``); ``robe_dist.ops``
registers these launchers as the CUDA implementation of its custom ops.

Design (one program per (bag, feature) for the forward and the fast backward, one per tile of
``TILE`` array slots for the deterministic backward):

* forward: the program reads its bag's bounds from the KeyedJaggedTensor's offsets, and for each
  id hashes its ``nb = dim / Z`` block starts (one hash per block, never one index per element),
  reads the ``[nb, Z]`` tile of the array (``Z`` contiguous floats per block), accumulates in fp32
  with the per-sample weight, and writes its ``dim`` output columns once (MEAN divides first).
  The starts are stored for the backward (``[R * N * MB]``, ``-1`` where no feature reads; int32
  where the array allows, as ``robe_dist.ops.starts_dtype`` says).
* backward, default: the program loads its bag's upstream gradient row once and atomically adds
  ``scale * grad`` into the array's gradient at every block of every id (fp32 accumulation).
  Order of the atomic adds, hence the last bits, varies from run to run.
* backward, deterministic (``torch.use_deterministic_algorithms(True)``, as FBGEMM's sorted
  backward): the starts are sorted (stable), each program owns ``TILE`` consecutive slots, finds
  the blocks that overlap them by binary search (``torch.searchsorted``) and sums their
  contributions in sorted order in registers: the same bits on every run, and the dense gradient
  is written once with no memset. The same program can instead apply SGD or Adagrad to its slots
  (the fused updates): every contribution to a slot is in one program, so Adagrad's
  ``state += g * g`` sees the complete gradient, as ``torch.optim.Adagrad`` does.
* fused SGD, default: the fast backward with the array itself as target and ``-lr`` as scale.

No host synchronisation: grid sizes come from shapes (batch, features, array size), never from
tensor contents. Malformed inputs cannot make a kernel read or write out of bounds: bag bounds
are clamped to ``[0, N]``, an out-of-range id of the paper mapping gets no block (start ``-1``,
zeros); both are recorded in the ``status`` tensor the forward returns
(``robe_dist.ops`` turns it into an error message).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from robe_dist.hashing import num_block_starts
from robe_dist.ops import starts_dtype

TILE = 64
"""Array slots per program of the deterministic (sorted) backward and the fused updates."""
TILE_CHUNK = 16
"""Sorted blocks the tile kernel reads per iteration (their loads in flight together)."""

META_COLUMNS = 7
STATUS_OK = torch.iinfo(torch.int64).max
"""``status`` entries hold the first bad position, or this when there was none."""

OPT_SGD = 1
OPT_ADAGRAD = 2


# ---------------------------------------------------------------------------------------- hash
@triton.jit
def _fmix64(k):
    # MurmurHash3's 64-bit finaliser on uint64 (wrapping multiply, logical shifts)
    k ^= k >> 33
    k *= 0xFF51AFD7ED558CCD
    k ^= k >> 33
    k *= 0xC4CEB9FE1A85EC53
    k ^= k >> 33
    return k


@triton.jit
def _block_starts(x, key, blk, num_starts, align, pa, pb, pc, pp, HASH: tl.constexpr):
    """Starts ``[NBP]`` (int64: ``align`` times a hash value in ``[0, num_starts)``) of blocks
    ``blk`` of id ``x`` (int64)."""
    if HASH == 0:
        h = _fmix64(x.to(tl.uint64, bitcast=True) ^ key.to(tl.uint64, bitcast=True))
        hb = _fmix64(h + (blk.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15)
        # tl.cast, not num_starts.to(): an array of one block gives num_starts == 1, which the
        # launcher specialises into a constant that has no .to()
        starts = ((hb >> 1) % tl.cast(num_starts, tl.uint64)).to(tl.int64)
    else:
        # ((g * A + c * B + C) mod P) mod (m - Z + 1), evaluated without int64 overflow
        g = x + key
        g = ((g % pp) + pp) % pp
        base = (g * pa + pc) % pp
        starts = ((base + blk * pb) % pp) % num_starts
    return starts * align


@triton.jit
def _bag_bounds(offsets_ptr, key_index, b, batch, num_values, status_ptr):
    """``[lo, hi)`` of bag ``b`` of key ``key_index``, clamped to ``[0, num_values]``; a malformed
    pair (negative length, past the values) is recorded in ``status[1]``."""
    pos = key_index * batch + b
    lo = tl.load(offsets_ptr + pos).to(tl.int64)
    hi = tl.load(offsets_ptr + pos + 1).to(tl.int64)
    if (lo < 0) | (hi < lo) | (hi > num_values):
        tl.atomic_min(status_ptr + 1, pos)
    lo = tl.minimum(tl.maximum(lo, 0), num_values)
    hi = tl.minimum(tl.maximum(hi, lo), num_values)
    return lo, hi


# ------------------------------------------------------------------------------------- forward
@triton.jit
def _forward_kernel(
    array_ptr, values_ptr, weights_ptr, offsets_ptr, meta_ptr, out_ptr, starts_ptr, status_ptr,
    batch, out_dim, num_values, num_bags, num_starts, align, pa, pb, pc, pp,
    HASH: tl.constexpr, Z: tl.constexpr, ZP: tl.constexpr, NBP: tl.constexpr, MB: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64)
    if (b == 0) & (f == 0):  # offsets that do not cover the values exactly, from 0: position K * B
        past = b + num_bags  # (int64, also where num_bags is the constant 1)
        if (tl.load(offsets_ptr).to(tl.int64) != 0) | (tl.load(offsets_ptr + past).to(tl.int64) != num_values):
            tl.atomic_min(status_ptr + 1, past)
    row = meta_ptr + f * 7
    key = tl.load(row)
    num_embeddings = tl.load(row + 1)
    dim = tl.load(row + 2)
    col = tl.load(row + 3)
    pooling = tl.load(row + 4)
    occurrence = tl.load(row + 6)
    lo, hi = _bag_bounds(offsets_ptr, tl.load(row + 5), b, batch, num_values, status_ptr)

    blk = tl.arange(0, NBP).to(tl.int64)
    j = tl.arange(0, ZP).to(tl.int64)
    bmask = blk < dim // Z
    emask = bmask[:, None] & (j[None, :] < Z)
    acc = tl.zeros([NBP, ZP], dtype=tl.float32)
    starts_row = starts_ptr + occurrence * num_values * MB
    for i in range(lo, hi):
        x = tl.load(values_ptr + i).to(tl.int64)
        s = _block_starts(x, key, blk, num_starts, align, pa, pb, pc, pp, HASH)
        if HASH == 1:
            if (x < 0) | (x >= num_embeddings):
                tl.atomic_min(status_ptr, i)
                s = tl.full([NBP], -1, tl.int64)
        tl.store(starts_row + i * MB + blk, s.to(starts_ptr.dtype.element_ty), mask=bmask)
        e = tl.load(array_ptr + s[:, None] + j[None, :], mask=emask & (s[:, None] >= 0), other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            e = e * tl.load(weights_ptr + i).to(tl.float32)
        acc += e
    if pooling == 1:
        acc = acc * (1.0 / tl.maximum(hi - lo, 1).to(tl.float32))
    dst = out_ptr + b * out_dim + col + blk[:, None] * Z + j[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=emask)


# ------------------------------------------------------------------------ backward (atomic adds)
@triton.jit
def _backward_atomic_kernel(
    grad_out_ptr, weights_ptr, offsets_ptr, meta_ptr, starts_ptr, target_ptr, status_ptr, alpha,
    batch, out_dim, num_values,
    Z: tl.constexpr, ZP: tl.constexpr, NBP: tl.constexpr, MB: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64)
    row = meta_ptr + f * 7
    dim = tl.load(row + 2)
    col = tl.load(row + 3)
    pooling = tl.load(row + 4)
    occurrence = tl.load(row + 6)
    lo, hi = _bag_bounds(offsets_ptr, tl.load(row + 5), b, batch, num_values, status_ptr)

    blk = tl.arange(0, NBP).to(tl.int64)
    j = tl.arange(0, ZP).to(tl.int64)
    bmask = blk < dim // Z
    emask = bmask[:, None] & (j[None, :] < Z)
    scale = alpha
    if pooling == 1:
        scale = alpha * (1.0 / tl.maximum(hi - lo, 1).to(tl.float32))
    if hi > lo:
        g = tl.load(grad_out_ptr + b * out_dim + col + blk[:, None] * Z + j[None, :], mask=emask, other=0.0)
        g = g.to(tl.float32)
        starts_row = starts_ptr + occurrence * num_values * MB
        for i in range(lo, hi):
            s = tl.load(starts_row + i * MB + blk, mask=bmask, other=-1).to(tl.int64)
            w = scale
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + i).to(tl.float32) * scale
            tl.atomic_add(target_ptr + s[:, None] + j[None, :], g * w, mask=emask & (s[:, None] >= 0), sem="relaxed")


# -------------------------------------------------------------- backward (sorted, deterministic)
@triton.jit
def _row_info_kernel(
    weights_ptr, offsets_ptr, meta_ptr, row_base_ptr, row_scale_ptr, status_ptr,
    batch, out_dim, num_values, HAS_WEIGHTS: tl.constexpr,
):  # fmt: skip
    """For every value read by a feature: where its upstream gradient row starts and its scale."""
    b = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64)
    row = meta_ptr + f * 7
    col = tl.load(row + 3)
    pooling = tl.load(row + 4)
    occurrence = tl.load(row + 6)
    lo, hi = _bag_bounds(offsets_ptr, tl.load(row + 5), b, batch, num_values, status_ptr)
    scale = 1.0
    if pooling == 1:
        scale = 1.0 / tl.maximum(hi - lo, 1).to(tl.float32)
    for i in range(lo, hi):
        w = scale
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + i).to(tl.float32) * scale
        tl.store(row_base_ptr + occurrence * num_values + i, b * out_dim + col)
        tl.store(row_scale_ptr + occurrence * num_values + i, w)


@triton.jit
def _tile_kernel(
    sorted_ptr, order_ptr, bounds_ptr, row_base_ptr, row_scale_ptr, grad_out_ptr, target_ptr, state_ptr,
    num_tiles, array_size, lr, eps,
    Z: tl.constexpr, MB: tl.constexpr, T: tl.constexpr, MODE: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    """Slots ``[t * T, (t + 1) * T)``: the sum of every block overlapping them, in sorted order,
    ``CH`` blocks at a time (a fixed order: the same bits on every run); MODE 0 writes it as the
    gradient, 1 applies SGD to the array, 2 Adagrad (state too).

    ``CH`` blocks per iteration, not one: a tile holding a hot id's slots overlaps as many blocks
    as the id has occurrences (MLPerf's 3-row tables: ~22,000 in a one-hot batch of 65536), and
    one block per iteration made that tile a chain of dependent loads of ~0.5-1 us each."""
    t = tl.program_id(0).to(tl.int64)
    lo = tl.load(bounds_ptr + t)
    hi = tl.load(bounds_ptr + num_tiles + t)
    offs = t * T + tl.arange(0, T).to(tl.int64)
    acc = tl.zeros([T], dtype=tl.float32)
    for k0 in range(lo, hi, CH):
        ks = k0 + tl.arange(0, CH).to(tl.int64)
        live = ks < hi
        s = tl.load(sorted_ptr + ks, mask=live, other=0).to(tl.int64)
        e = tl.load(order_ptr + ks, mask=live, other=0)
        ri = e // MB
        base = tl.load(row_base_ptr + ri, mask=live, other=0) + (e % MB) * Z
        scale = tl.load(row_scale_ptr + ri, mask=live, other=0.0)
        jj = offs[None, :] - s[:, None]  # [CH, T]
        inside_block = live[:, None] & (jj >= 0) & (jj < Z)
        g = tl.load(grad_out_ptr + base[:, None] + jj, mask=inside_block, other=0.0).to(tl.float32)
        acc += tl.sum(scale[:, None] * g, axis=0)
    inside = offs < array_size
    if MODE == 0:
        tl.store(target_ptr + offs, acc.to(target_ptr.dtype.element_ty), mask=inside)
    elif MODE == 1:
        if hi > lo:
            p = tl.load(target_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            tl.store(target_ptr + offs, (p - lr * acc).to(target_ptr.dtype.element_ty), mask=inside)
    else:
        if hi > lo:
            st = tl.load(state_ptr + offs, mask=inside, other=0.0).to(tl.float32) + acc * acc
            p = tl.load(target_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            std = tl.sqrt_rn(st) + eps
            p = p - lr * tl.div_rn(acc, std)
            tl.store(state_ptr + offs, st.to(state_ptr.dtype.element_ty), mask=inside)
            tl.store(target_ptr + offs, p.to(target_ptr.dtype.element_ty), mask=inside)


# ------------------------------------------------------------------------------------ launchers
def _shape_constants(block_size: int, max_blocks: int) -> Tuple[int, int]:
    return triton.next_power_of_2(block_size), triton.next_power_of_2(max(max_blocks, 1))


def _num_warps(elements: int) -> int:
    return max(1, min(8, elements // 128))


def forward(
    array: torch.Tensor,
    values: torch.Tensor,
    weights: Optional[torch.Tensor],
    offsets: torch.Tensor,
    meta: torch.Tensor,
    batch: int,
    out_dim: int,
    max_blocks: int,
    occurrences: int,
    hash_mode: int,
    block_size: int,
    paper_constants: List[int],
    block_align: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [batch, out_dim], starts [R * N * MB] (``starts_dtype``), status [2] int64)``; see the
    module doc."""
    num_values = values.numel()
    num_features = meta.shape[0]
    out = torch.empty(batch, out_dim, dtype=array.dtype, device=array.device)
    starts = torch.full((occurrences * num_values * max_blocks,), -1, dtype=starts_dtype(array.numel()),
                        device=array.device)
    status = torch.full((2,), STATUS_OK, dtype=torch.int64, device=array.device)
    if batch == 0 or out_dim == 0:  # no program runs: values no bag holds, checked here (device ops)
        covered = (offsets[0] == 0) & (offsets[-1] == num_values)
        status[1] = torch.where(covered, status[1], torch.full_like(status[1], offsets.numel() - 1))
        return out, starts, status
    zp, nbp = _shape_constants(block_size, max_blocks)
    pa, pb, pc, pp = paper_constants
    _forward_kernel[(batch, num_features)](
        array, values, weights if weights is not None else array, offsets, meta, out, starts, status,
        batch, out_dim, num_values, offsets.numel() - 1, num_block_starts(array.numel(), block_size, block_align),
        block_align,
        pa, pb, pc, pp,
        HASH=hash_mode, Z=block_size, ZP=zp, NBP=nbp, MB=max_blocks, HAS_WEIGHTS=weights is not None,
        num_warps=_num_warps(zp * nbp),
    )  # fmt: skip
    return out, starts, status


def _atomic_backward(
    target: torch.Tensor, alpha: float, grad_out, weights, offsets, meta, starts, batch, block_size, max_blocks, num_values
) -> None:
    zp, nbp = _shape_constants(block_size, max_blocks)
    status = torch.empty(2, dtype=torch.int64, device=grad_out.device)  # the forward reported already
    _backward_atomic_kernel[(batch, meta.shape[0])](
        grad_out, weights if weights is not None else grad_out, offsets, meta, starts, target, status, alpha,
        batch, grad_out.shape[1], num_values,
        Z=block_size, ZP=zp, NBP=nbp, MB=max_blocks, HAS_WEIGHTS=weights is not None,
        num_warps=_num_warps(zp * nbp),
    )  # fmt: skip


def tile_bounds(sorted_starts: torch.Tensor, first: torch.Tensor, block_size: int, array_size: int) -> torch.Tensor:
    """``[2, tiles]``: for the tiles of slots ``[first, first + TILE)``, the range of
    ``sorted_starts`` whose blocks overlap them (starts in ``[first - Z + 1, first + TILE)``).
    The queries are clamped to ``[0, array_size]`` before they take the starts' dtype: the end of
    the last tile of an array just under 2^31 slots would wrap in int32 (every start is at most
    ``array_size - Z``, so the clamp changes no range)."""
    queries = torch.stack([first - block_size + 1, first + TILE]).clamp_(0, array_size)
    return torch.searchsorted(sorted_starts, queries.to(sorted_starts.dtype)).contiguous()


def _sorted_tiles(
    mode: int, target: torch.Tensor, state: Optional[torch.Tensor], lr: float, eps: float,
    grad_out, weights, offsets, meta, starts, batch, block_size, max_blocks, num_values,
) -> None:  # fmt: skip
    device = grad_out.device
    array_size = target.numel()
    occurrences = starts.numel() // max(num_values * max_blocks, 1)
    row_base = torch.empty(occurrences * num_values, dtype=torch.int64, device=device)
    row_scale = torch.empty(occurrences * num_values, dtype=torch.float32, device=device)
    status = torch.empty(2, dtype=torch.int64, device=device)
    if batch > 0 and num_values > 0:
        _row_info_kernel[(batch, meta.shape[0])](
            weights if weights is not None else grad_out, offsets, meta, row_base, row_scale, status,
            batch, grad_out.shape[1], num_values, HAS_WEIGHTS=weights is not None,
        )  # fmt: skip
    sorted_starts, order = torch.sort(starts, stable=True)  # the -1 entries (no block) come first
    num_tiles = triton.cdiv(array_size, TILE)
    first = torch.arange(num_tiles, device=device, dtype=torch.int64) * TILE
    bounds = tile_bounds(sorted_starts, first, block_size, array_size)
    _tile_kernel[(num_tiles,)](
        sorted_starts, order, bounds, row_base, row_scale, grad_out, target, state if state is not None else target,
        num_tiles, array_size, lr, eps, Z=block_size, MB=max_blocks, T=TILE, MODE=mode, CH=TILE_CHUNK,
    )  # fmt: skip


def backward(
    grad_out: torch.Tensor,
    weights: Optional[torch.Tensor],
    offsets: torch.Tensor,
    meta: torch.Tensor,
    starts: torch.Tensor,
    batch: int,
    array_size: int,
    block_size: int,
    max_blocks: int,
    num_values: int,
    deterministic: bool,
) -> torch.Tensor:
    """Dense gradient ``[array_size]`` of the array, in ``grad_out``'s dtype."""
    grad_out = grad_out.contiguous()
    if deterministic:
        grad = torch.empty(array_size, dtype=grad_out.dtype, device=grad_out.device)  # every slot is written
        _sorted_tiles(0, grad, None, 0.0, 0.0, grad_out, weights, offsets, meta, starts, batch, block_size,
                      max_blocks, num_values)  # fmt: skip
        return grad
    acc = torch.zeros(array_size, dtype=torch.float32, device=grad_out.device)
    if batch > 0 and num_values > 0:
        _atomic_backward(acc, 1.0, grad_out, weights, offsets, meta, starts, batch, block_size, max_blocks, num_values)
    return acc if grad_out.dtype == torch.float32 else acc.to(grad_out.dtype)


def fused_update(
    array: torch.Tensor,
    state: Optional[torch.Tensor],
    grad_out: torch.Tensor,
    weights: Optional[torch.Tensor],
    offsets: torch.Tensor,
    meta: torch.Tensor,
    starts: torch.Tensor,
    batch: int,
    block_size: int,
    max_blocks: int,
    num_values: int,
    optimizer: int,
    lr: float,
    eps: float,
    deterministic: bool,
) -> None:
    """Applies SGD (``optimizer=1``) or Adagrad (2, ``state`` = its sum of squares) to ``array`` in
    place with this step's gradient, touching only the slots it reaches."""
    grad_out = grad_out.contiguous()
    if optimizer == OPT_SGD and not deterministic and array.dtype == torch.float32:
        if batch > 0 and num_values > 0:
            _atomic_backward(array, -lr, grad_out, weights, offsets, meta, starts, batch, block_size, max_blocks,
                             num_values)  # fmt: skip
        return
    _sorted_tiles(optimizer, array, state, lr, eps, grad_out, weights, offsets, meta, starts, batch, block_size,
                  max_blocks, num_values)  # fmt: skip
