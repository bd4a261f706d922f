"""The ROBE pooled lookup as an autograd function, on the C++ operator or in plain PyTorch.

``robe_pooled_lookup`` is the one entry point. On CPU tensors it runs ``robe_dist._C`` (built by
``pip install --no-build-isolation -e .``): a hash per block, contiguous block reads, and a backward
that writes the exact dense gradient (or, with ``fused_sgd_lr``, applies the SGD update to the
array in place without materialising a gradient). On other devices, or when the extension was not
built, it runs a vectorised PyTorch version with the same hash and the same results up to float
summation order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from robe_dist import hashing

try:  # the C++ operator is optional: without it the PyTorch path runs
    from robe_dist import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _C = None

HASH_MODE_IDS = {"universal": 0, "paper": 1}
POOLING_IDS = {"SUM": 0, "MEAN": 1}


def has_cpp_extension() -> bool:
    """Whether the C++ operator ``robe_dist._C`` was built and loads."""
    return _C is not None


def new_array(size: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zeroed 1-D buffer for a ROBE array; on CPU, backed by transparent huge pages.

    Blocks are read at random offsets, so with 4 KiB pages nearly every block misses the TLB;
    the C++ operator maps large buffers 2 MiB-aligned with ``MADV_HUGEPAGE``.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cpu" and _C is not None:
        return _C.hugepage_zeros([size], dtype)
    return torch.zeros(size, device=device, dtype=dtype)


@dataclass(frozen=True)
class LookupSpec:
    """Static description of one collection's lookup: one entry per output feature, in output order.

    ``keys`` hold the universal mapping's table keys (uint64) or the paper mapping's global id
    offsets; ``out_cols`` are the features' first columns in the output ``[B, out_dim]``.
    """

    hash: str
    block_size: int
    array_size: int
    paper_constants: Tuple[int, int, int, int]
    keys: Tuple[int, ...]
    num_embeddings: Tuple[int, ...]
    dims: Tuple[int, ...]
    out_cols: Tuple[int, ...]
    poolings: Tuple[str, ...]
    out_dim: int

    def meta(self, key_indices: Sequence[int]) -> torch.Tensor:
        """int64 [F, 7]: the per-feature table the C++ operator reads; ``key_indices[f]`` is the
        position of feature f's key in the input KeyedJaggedTensor (start bases are filled per call)."""
        rows = [
            [hashing._signed(k), n, d, c, POOLING_IDS[p], 0, ki]
            for k, n, d, c, p, ki in zip(
                self.keys, self.num_embeddings, self.dims, self.out_cols, self.poolings, key_indices
            )
        ]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 7)


class _RobeLookupCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, array, values, weights, offsets, batch, meta, spec: LookupSpec, fused_sgd_lr):
        meta = meta.clone()  # the operator fills in the start bases
        out, starts = _C.robe_forward(
            array.detach(), values, weights, offsets, batch, meta, spec.out_dim,
            HASH_MODE_IDS[spec.hash], spec.block_size, list(spec.paper_constants),
        )
        ctx.save_for_backward(values, weights, offsets, meta, starts)
        ctx.spec, ctx.fused_sgd_lr, ctx.array, ctx.batch = spec, fused_sgd_lr, array, batch
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, weights, offsets, meta, starts = ctx.saved_tensors
        spec: LookupSpec = ctx.spec
        grad_out = grad_out.to(ctx.array.dtype).contiguous()
        if ctx.fused_sgd_lr is not None:
            _C.robe_backward_sgd(
                ctx.array.detach(), grad_out, values, weights, offsets, ctx.batch, meta, starts,
                spec.block_size, float(ctx.fused_sgd_lr),
            )
            grad = None
        else:
            grad = _C.robe_backward(
                grad_out, values, weights, offsets, ctx.batch, meta, starts, spec.array_size, spec.block_size
            )
        return grad, None, None, None, None, None, None, None


def _lookup_torch(
    array: torch.Tensor,
    values: torch.Tensor,
    weights: Optional[torch.Tensor],
    bag_offsets: torch.Tensor,
    spec: LookupSpec,
) -> torch.Tensor:
    batch = bag_offsets.shape[1] - 1
    z = spec.block_size
    num_starts = spec.array_size - z + 1
    within = torch.arange(z, device=array.device)
    bounds = bag_offsets[:, [0, -1]].tolist()
    pooled: List[torch.Tensor] = []
    for f, (lo, hi) in enumerate(bounds):
        ids = values[lo:hi]
        nb = spec.dims[f] // z
        if spec.hash == "universal":
            starts = hashing.universal_starts_torch(ids, spec.keys[f], nb, num_starts)
        else:
            check_paper_ids(ids, spec.num_embeddings[f], f)
            starts = hashing.paper_starts_torch(ids, spec.keys[f], nb, num_starts, spec.paper_constants)
        emb = array[(starts.unsqueeze(-1) + within).reshape(len(ids), spec.dims[f])]
        if weights is not None:
            emb = emb * weights[lo:hi].unsqueeze(1)
        lengths = bag_offsets[f, 1:] - bag_offsets[f, :-1]
        bag_of_id = torch.repeat_interleave(torch.arange(batch, device=array.device), lengths)
        out = torch.zeros(batch, spec.dims[f], device=array.device, dtype=array.dtype).index_add(0, bag_of_id, emb)
        if spec.poolings[f] == "MEAN":
            out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
        pooled.append(out)
    return torch.cat(pooled, dim=1) if pooled else array.new_zeros(batch, 0)


def check_paper_ids(ids: torch.Tensor, num_embeddings: int, feature: int) -> None:
    """Raises ``ValueError`` when an id lies outside ``[0, num_embeddings)`` (paper mapping)."""
    bad = (ids < 0) | (ids >= num_embeddings)
    if bool(bad.any()):
        first = int(ids[bad][0])
        raise ValueError(
            f"robe: id {first} of feature #{feature} is outside [0, num_embeddings) = [0, {num_embeddings}) "
            "of its table; the 'paper' mapping needs ids below num_embeddings"
        )


_warned_fallback = False


def bag_offsets(offsets: torch.Tensor, key_indices: Sequence[int], batch: int) -> torch.Tensor:
    """int64 ``[F, B + 1]``: row f holds the bag offsets of key ``key_indices[f]`` of a KJT whose
    ``offsets()`` are ``offsets`` (``[K * B + 1]``)."""
    rows = torch.tensor(list(key_indices), device=offsets.device, dtype=torch.long) * batch
    return offsets.long()[rows.unsqueeze(1) + torch.arange(batch + 1, device=offsets.device).unsqueeze(0)]


def robe_pooled_lookup(
    array: torch.Tensor,
    values: torch.Tensor,
    weights: Optional[torch.Tensor],
    offsets: torch.Tensor,
    batch: int,
    key_indices: Sequence[int],
    spec: LookupSpec,
    meta: Optional[torch.Tensor] = None,
    fused_sgd_lr: Optional[float] = None,
) -> torch.Tensor:
    """Pooled ROBE embeddings of every (feature, bag).

    Args:
        array: the shared ROBE array, 1-D ``[m]``.
        values: int64 ``[N]`` ids (a KeyedJaggedTensor's values; keys not in ``spec`` are skipped).
        weights: ``[N]`` per-sample weights or ``None``.
        offsets: int64 ``[K * B + 1]``, the KeyedJaggedTensor's ``offsets()``: bag ``b`` of key ``k``
            is ``values[offsets[k * B + b] : offsets[k * B + b + 1]]``.
        batch: ``B``, the KeyedJaggedTensor's stride.
        key_indices: for each of ``spec``'s features, the position ``k`` of its key in the input.
        spec: the collection's static lookup description.
        meta: ``spec.meta(key_indices)``, cached by the caller (built here when ``None``).
        fused_sgd_lr: when set, the backward applies ``array -= lr * grad`` in place and leaves
            ``array.grad`` untouched (C++ operator only).

    Returns:
        ``[B, spec.out_dim]`` pooled embeddings, the features side by side in spec order.
    """
    if weights is not None:
        weights = weights.to(array.dtype).contiguous()
    offsets = offsets.long().contiguous()
    if array.device.type == "cpu" and _C is not None:
        if meta is None:
            meta = spec.meta(key_indices)
        w = weights if weights is not None else array.new_empty(0)
        return _RobeLookupCpp.apply(array, values.contiguous(), w, offsets, batch, meta, spec, fused_sgd_lr)
    if fused_sgd_lr is not None:
        raise NotImplementedError(
            "robe: fused_sgd_lr needs the C++ CPU operator; on "
            f"{array.device.type} (or without robe_dist._C) train the array with a dense optimizer"
        )
    global _warned_fallback
    if array.device.type == "cpu" and not _warned_fallback:
        warnings.warn("robe_dist._C is not built: using the (much slower) PyTorch lookup on CPU", stacklevel=2)
        _warned_fallback = True
    return _lookup_torch(array, values, weights, bag_offsets(offsets, key_indices, batch), spec)
