"""The ROBE pooled lookup as ``torch.library`` custom ops, one for every device.

Three ops, registered when this module is imported (``robe_dist``'s modules import it):

* ``torch.ops.robe_dist.pooled_lookup(array, values, weights, offsets, meta, batch, out_dim,
  max_blocks, occurrences, hash_mode, block_size, paper_constants, block_align=1) -> (out, starts, status)``:
  pooled embeddings ``[batch, out_dim]`` of every (feature, bag) of a KeyedJaggedTensor, the block
  starts it read (kept for the backward) and a status of malformed input (see ``STATUS_OK``).
  Differentiable in ``array`` (one autograd registration: ``pooled_lookup_backward``) and in
  ``weights`` (``weights_backward``, computed only when they require a gradient).
* ``torch.ops.robe_dist.pooled_lookup_backward(...) -> grad``: the exact dense gradient of the
  array. Deterministic on CPU always; on CUDA when ``torch.use_deterministic_algorithms(True)``.
* ``torch.ops.robe_dist.pooled_lookup_fused_update(array!, state!, ...)``: SGD or Adagrad applied
  to the array inside the backward, touching only the slots the step reached (single process).

Kernels: CPU runs the C++ operator ``robe_dist._C`` (built by ``pip install --no-build-isolation
-e .``), CUDA runs the Triton kernels of ``robe_dist.kernels.triton_lookup``; any other case (no
extension, no triton, another device) runs the vectorised PyTorch code below, same hash, same
results up to float summation order. Each op has a fake (meta) implementation, so ``torch.compile``
(``fullgraph=True``), ``torch.export`` and FX tracing see one opaque call with static shapes.

The inputs' layout (``values``, ``offsets``, ``meta``, ``starts``) is described at the top of
``robe_dist/csrc/robe_cpu.cpp``. ``LookupSpec`` builds ``meta`` and the static arguments.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import torch

from robe_dist import fbgemm_compat, hashing

_ABI_VERSION = 4
"""The ``robe_dist._C`` this source expects (csrc/robe_cpu.cpp sets ``ABI_VERSION``)."""


def _load_extension():
    try:
        from robe_dist import _C  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - depends on the build
        return None, f"robe_dist._C does not load ({e})"
    if getattr(_C, "ABI_VERSION", None) != _ABI_VERSION:
        return None, (
            f"robe_dist._C was built from other sources (ABI {getattr(_C, 'ABI_VERSION', 1)}, expected {_ABI_VERSION})"
        )
    return _C, None


_C, _C_PROBLEM = _load_extension()
fbgemm_compat.install()  # KJT offsets on CUDA with the CPU-only FBGEMM build (see that module)

HASH_MODE_IDS = {"universal": 0, "paper": 1}
POOLING_IDS = {"SUM": 0, "MEAN": 1}
META_COLUMNS = 7
STATUS_OK = torch.iinfo(torch.int64).max
"""``status[0]``: index of the first value whose id is out of range (paper mapping); ``status[1]``:
position ``k * batch + b`` of the first malformed bag (offsets decreasing or past the values);
``STATUS_OK`` where there is none. CPU kernels raise at once instead."""

OPTIMIZERS = {"sgd": 1, "adagrad": 2}


def has_cpp_extension() -> bool:
    """Whether the C++ operator ``robe_dist._C`` was built (from these sources) and loads."""
    return _C is not None


def cpp_extension_problem() -> Optional[str]:
    """Why ``robe_dist._C`` is not used (``None`` when it is)."""
    return _C_PROBLEM


def set_bus_error_message(line: str) -> bool:
    """Has the process print ``line`` on stderr if it dies of SIGBUS, as it does when a
    memory-mapped data file is truncated or replaced under it (inside NumPy, where no Python
    handler can run); it still ends killed by SIGBUS. ``False`` without ``robe_dist._C``."""
    install = getattr(_C, "set_bus_error_message", None)
    if install is None:
        return False
    install(line)
    return True


def new_array(size: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zeroed 1-D buffer for a ROBE array; on CPU, backed by transparent huge pages.

    Blocks are read at random offsets, so with 4 KiB pages nearly every block misses the TLB;
    the C++ operator maps large buffers 2 MiB-aligned with ``MADV_HUGEPAGE``.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cpu" and _C is not None and dtype in (torch.float32, torch.float64):
        return _C.hugepage_zeros([size], dtype)
    return torch.zeros(size, device=device, dtype=dtype)


@dataclass(frozen=True)
class LookupSpec:
    """Static description of one collection's lookup: one entry per output feature, in output order.

    ``keys`` hold the universal mapping's table keys (uint64) or the paper mapping's global id
    offsets; ``out_cols`` are the features' first columns in the output ``[B, out_dim]``;
    ``occurrence[f]`` counts the earlier features that read the same input feature (a feature
    shared by several tables is read once per table).
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
    occurrence: Tuple[int, ...]
    block_align: int = 1

    @property
    def max_blocks(self) -> int:
        return max(self.dims) // self.block_size if self.dims else 0

    @property
    def occurrences(self) -> int:
        return max(self.occurrence) + 1 if self.occurrence else 1

    @property
    def hash_mode(self) -> int:
        return HASH_MODE_IDS[self.hash]

    def meta_rows(self, key_indices: Sequence[int]) -> List[List[int]]:
        """The rows of ``meta`` (``[F, 7]``) when feature f is key ``key_indices[f]`` of the input."""
        return [
            [hashing._signed(k), n, d, c, POOLING_IDS[p], ki, r]
            for k, n, d, c, p, ki, r in zip(
                self.keys, self.num_embeddings, self.dims, self.out_cols, self.poolings, key_indices, self.occurrence
            )
        ]

    def meta(self, key_indices: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        """int64 ``[F, 7]`` on ``device``: the per-feature table the kernels read."""
        rows = self.meta_rows(key_indices)
        # (made on the CPU whatever the default device: under `with torch.device("meta")` it would have no values)
        return torch.tensor(rows, dtype=torch.long, device="cpu").reshape(len(rows), META_COLUMNS).to(device or "cpu")


# ------------------------------------------------------------------------- PyTorch implementation
def _feature_rows(meta: torch.Tensor) -> List[List[int]]:
    return meta.tolist()  # a host read: this path is the fallback, not the fast one


def starts_dtype(array_size: int) -> torch.dtype:
    """The dtype of ``pooled_lookup``'s block starts: int32 where the array has at most 2^31 - 1
    slots (every start fits; half the bytes the forward writes and the backward reads again),
    int64 beyond. The same on every device (C++ ``starts_dtype``)."""
    return torch.int32 if array_size <= torch.iinfo(torch.int32).max else torch.int64


def _bag_bounds(offsets: torch.Tensor, k: int, batch: int, num_values: int) -> torch.Tensor:
    off = offsets[k * batch : k * batch + batch + 1]
    bad = (off[1:] < off[:-1]).any() | (off[0] < 0) | (off[-1] > num_values)
    if bool(bad):
        raise ValueError(
            f"robe: the offsets of key #{k} must be non-decreasing and within the {num_values} values, "
            f"got {off.tolist()[:16]}"
        )
    return off


def torch_forward(
    array, values, weights, offsets, meta, batch, out_dim, max_blocks, occurrences, hash_mode, block_size, paper_constants,
    block_align=1,
):  # fmt: skip
    """``pooled_lookup`` in vectorised PyTorch (any device): the reference and the fallback."""
    n = values.numel()
    out = array.new_zeros(batch, out_dim)
    starts = torch.full((occurrences, n, max_blocks), -1, dtype=starts_dtype(array.numel()), device=array.device)
    status = torch.full((2,), STATUS_OK, dtype=torch.long, device=array.device)
    values, offsets = values.long(), offsets.long()
    if int(offsets[0]) != 0 or int(offsets[-1]) != n:
        raise ValueError(f"robe: offsets run from {int(offsets[0])} to {int(offsets[-1])} but the KeyedJaggedTensor "
                         f"has {n} values: its lengths must cover the values exactly, from 0")  # fmt: skip
    num_starts = hashing.num_block_starts(array.numel(), block_size, block_align)
    within = torch.arange(block_size, device=array.device)
    for f, (key, num_embeddings, dim, col, pooling, k, r) in enumerate(_feature_rows(meta)):
        off = _bag_bounds(offsets, k, batch, n)
        lo, hi = int(off[0]), int(off[-1])
        ids = values[lo:hi]
        nb = dim // block_size
        if hash_mode == 0:
            s = hashing.universal_starts_torch(ids, key, nb, num_starts) * block_align
        else:
            bad = (ids < 0) | (ids >= num_embeddings)
            if bool(bad.any()):
                raise ValueError(_bad_id_message(int(ids[bad][0]), f"#{f}", num_embeddings))
            s = hashing.paper_starts_torch(ids, key, nb, num_starts, tuple(paper_constants)) * block_align
        starts[r, lo:hi, :nb] = s.to(starts.dtype)
        if pooling == POOLING_IDS["MEAN"] and weights is not None:
            raise ValueError(_MEAN_WEIGHTS_MESSAGE.format(feature=f"#{f}"))
        emb = array[(s.unsqueeze(-1) + within).reshape(len(ids), dim)]
        if weights is not None:
            emb = emb * weights[lo:hi].unsqueeze(1)
        lengths = off[1:] - off[:-1]
        bag_of_id = torch.repeat_interleave(torch.arange(batch, device=array.device), lengths)
        pooled = torch.zeros(batch, dim, device=array.device, dtype=array.dtype).index_add_(0, bag_of_id, emb)
        if pooling == POOLING_IDS["MEAN"]:
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        out[:, col : col + dim] = pooled
    return out, starts.reshape(-1), status


def torch_backward(grad_out, weights, offsets, meta, starts, batch, array_size, block_size, max_blocks, occurrences, num_values):
    """``pooled_lookup_backward`` in vectorised PyTorch (any device)."""
    grad = torch.zeros(array_size, dtype=grad_out.dtype, device=grad_out.device)
    offsets = offsets.long()
    starts = starts.reshape(occurrences, num_values, max_blocks)
    within = torch.arange(block_size, device=grad_out.device)
    for key, num_embeddings, dim, col, pooling, k, r in _feature_rows(meta):
        off = _bag_bounds(offsets, k, batch, num_values)
        lo, hi = int(off[0]), int(off[-1])
        nb = dim // block_size
        lengths = off[1:] - off[:-1]
        bag_of_id = torch.repeat_interleave(torch.arange(batch, device=grad_out.device), lengths)
        scale = torch.ones(hi - lo, dtype=grad_out.dtype, device=grad_out.device)
        if weights is not None:
            scale = scale * weights[lo:hi]
        if pooling == POOLING_IDS["MEAN"]:
            scale = scale / lengths.clamp(min=1).to(grad_out.dtype)[bag_of_id]
        g = grad_out[bag_of_id, col : col + dim].reshape(hi - lo, nb, block_size) * scale[:, None, None]
        slots = (starts[r, lo:hi, :nb].long().unsqueeze(-1) + within).reshape(-1)
        grad.index_add_(0, slots, g.reshape(-1))
    return grad


def weights_backward(grad_out, array, offsets, meta, starts, batch, block_size, max_blocks, occurrences, num_values):
    """The gradient of the per-sample weights, ``[N]``: for each id, the dot product of its
    embedding (read from ``array`` at the forward's block starts) with its bag's upstream gradient,
    summed over the features (tables) that read its key. Vectorised PyTorch with static shapes (no
    host synchronisation: CUDA graphs and ``torch.compile`` take it); an int64 index per element, so
    about the forward's cost again, paid only when the weights require a gradient (TorchRec's
    position-weighted features, ``FeatureProcessedEmbeddingBagCollection``). MEAN bags take no
    weights (refused by the forward)."""
    grad = torch.zeros(num_values, dtype=torch.float32, device=grad_out.device)
    num_keys = (offsets.numel() - 1) // batch if batch > 0 else 0
    if num_values == 0 or num_keys == 0 or meta.shape[0] == 0:
        return grad
    device = grad_out.device
    meta = meta.to(device)
    # which key and bag every value belongs to (offsets: [K * B + 1]; empty bags have equal bounds)
    segment = torch.searchsorted(offsets, torch.arange(num_values, device=device, dtype=offsets.dtype), right=True) - 1
    key_of, bag_of = segment // batch, segment % batch
    # the feature (table) that reads key k as its r-th reader, or -1
    feature_of = torch.full((num_keys, occurrences), -1, dtype=torch.long, device=device)
    feature_of[meta[:, 5], meta[:, 6]] = torch.arange(meta.shape[0], device=device)
    starts = starts.reshape(occurrences, num_values, max_blocks).long()
    within = torch.arange(block_size, device=device)
    block = torch.arange(max_blocks, device=device)
    column = (block[:, None] * block_size + within).reshape(1, -1)  # [1, max_blocks * Z]
    for r in range(occurrences):
        f = feature_of[key_of, r]
        row = meta[f.clamp(min=0)]
        used = (f >= 0)[:, None] & (block * block_size < row[:, 2:3]) & (starts[r] >= 0)  # [N, max_blocks]
        slots = (starts[r].clamp(min=0)[:, :, None] + within).reshape(num_values, -1)
        cols = (row[:, 3:4] + column).clamp(max=grad_out.shape[1] - 1)
        emb = array.detach()[slots].float() * used.repeat_interleave(block_size, dim=1)
        grad += (emb * grad_out[bag_of[:, None], cols].float()).sum(1)
    return grad


def _dense_update(array, state, grad, optimizer: int, lr: float, eps: float) -> None:
    grad = grad.to(array.dtype)
    if optimizer == OPTIMIZERS["sgd"]:
        array.add_(grad, alpha=-lr)
    else:  # as torch.optim.Adagrad (lr_decay = weight_decay = 0, initial_accumulator_value = 0)
        state.addcmul_(grad, grad, value=1)
        array.addcdiv_(grad, state.sqrt().add_(eps), value=-lr)


_MEAN_WEIGHTS_MESSAGE = (
    "robe: feature {feature} pools by MEAN and has per-sample weights; as in nn.EmbeddingBag, weights need SUM pooling"
)


def _bad_id_message(x: int, feature: str, num_embeddings: int) -> str:
    return (
        f"robe: id {x} of feature {feature} is outside [0, num_embeddings) = [0, {num_embeddings}) of its table; "
        "the 'paper' mapping needs ids below num_embeddings"
    )


# ------------------------------------------------------------------------------------ the ops
def _triton() -> bool:
    from robe_dist.kernels import triton_available

    return triton_available()


@torch.library.custom_op("robe_dist::pooled_lookup", mutates_args=())
def pooled_lookup(
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
    """Pooled ROBE embeddings: ``(out [batch, out_dim], starts [R * N * max_blocks], status [2])``;
    ``starts`` has dtype ``starts_dtype(array.numel())`` and holds multiples of ``block_align``
    (the last argument, with a default: artifacts exported before it existed still load)."""
    return torch_forward(array, values, weights, offsets, meta, batch, out_dim, max_blocks, occurrences, hash_mode,
                         block_size, paper_constants, block_align)  # fmt: skip


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def check_inputs(array, values, weights, offsets, meta, batch) -> None:
    """Shape, dtype and device checks of ``pooled_lookup``'s inputs (no data is read, so no
    host synchronisation): ``ValueError`` naming the input and what was expected."""
    device = array.device
    problems = []
    if array.dim() != 1 or array.dtype not in _FLOAT_DTYPES:
        problems.append(f"array must be 1-D of a float dtype {_FLOAT_DTYPES}, got {array.dtype} {tuple(array.shape)}")
    if values.dim() != 1 or values.dtype not in _INDEX_DTYPES:
        problems.append(f"values (ids) must be 1-D int64 or int32, got {values.dtype} {tuple(values.shape)}")
    if offsets.dim() != 1 or offsets.dtype not in _INDEX_DTYPES:
        problems.append(f"offsets must be 1-D int64 or int32, got {offsets.dtype} {tuple(offsets.shape)}")
    elif not isinstance(batch, torch.SymInt) and (batch < 0 or (offsets.shape[0] - 1) % max(batch, 1) != 0):
        # (a SymInt under torch.compile, e.g. a variable batch's largest stride, on which no guard may
        # branch; its padded offsets hold K * batch + 1 by construction, and eager calls check it)
        problems.append(f"offsets must hold K * batch + 1 entries (batch {batch}), got {offsets.shape[0]}")
    if meta.dim() != 2 or meta.shape[1] != META_COLUMNS or meta.dtype != torch.int64:
        problems.append(f"meta must be int64 [F, {META_COLUMNS}], got {meta.dtype} {tuple(meta.shape)}")
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != values.shape[0]):
        problems.append(f"weights must be 1-D with one weight per id ({values.shape[0]}), got {tuple(weights.shape)}")
    if weights is not None and weights.dtype != array.dtype:
        problems.append(f"weights must have the array's dtype {array.dtype}, got {weights.dtype}")
    for name, t in (("values", values), ("offsets", offsets), ("weights", weights)):
        if t is not None and t.device != device:
            problems.append(f"{name} is on {t.device} but the array is on {device}: move the input to the array's device")
    if meta.device != device:  # (the module's lookup_meta buffer, not the user's input)
        problems.append(f"meta (the module's lookup_meta buffer) is on {meta.device} but the array is on {device}: "
                        "move the whole module (.to(device)), not the array alone")  # fmt: skip
    if problems:
        raise ValueError("robe: " + "; ".join(problems))


def check_update_args(array_size: int, block_size: int, state=None, array=None, optimizer: Optional[int] = None) -> None:
    """Checks of the backward's and the fused update's own arguments, on every device (no data
    read): ``ValueError`` naming the argument."""
    if block_size < 1 or array_size < block_size:
        raise ValueError(f"robe: array_size ({array_size}) must be >= block_size ({block_size}) >= 1")
    if optimizer is None:
        return
    if optimizer not in OPTIMIZERS.values():
        raise ValueError(f"robe: optimizer must be one of {OPTIMIZERS} (the ids), got {optimizer}")
    if optimizer == OPTIMIZERS["adagrad"] and (
        state is None or state.shape != array.shape or not state.is_floating_point() or state.device != array.device
    ):
        got = "None" if state is None else f"{state.dtype} {tuple(state.shape)} on {state.device}"
        raise ValueError(f"robe: the fused Adagrad update needs its state: a float tensor shaped like the array "
                         f"({tuple(array.shape)}) on {array.device}, got {got}")  # fmt: skip


@pooled_lookup.register_kernel("cuda")
def _pooled_lookup_cuda(array, values, weights, offsets, meta, batch, out_dim, max_blocks, occurrences, hash_mode,
                        block_size, paper_constants, block_align=1):  # fmt: skip
    check_inputs(array, values, weights, offsets, meta, batch)
    # what the C++ operator checks on the host (no data read): the kernels would hash into a
    # negative number of starts, or take a strided view for a dense one
    check_update_args(array.shape[0], block_size)
    if block_align < 1:
        raise ValueError(f"robe: block_align must be >= 1, got {block_align}")
    c = [int(x) for x in paper_constants]
    if hash_mode == HASH_MODE_IDS["paper"] and not (len(c) == 4 and 0 <= min(c[:3]) and max(c[:3]) < c[3] < 2**31):
        raise ValueError(f"robe: paper constants must satisfy 0 <= A, B, C < P < 2^31, got {c}")
    args = (*_dense(array, values, weights, offsets, meta), batch, out_dim, max_blocks, occurrences, hash_mode, block_size,
            paper_constants, block_align)  # fmt: skip
    if not _triton():
        return torch_forward(*args)
    from robe_dist.kernels import triton_lookup

    return triton_lookup.forward(*args)


@pooled_lookup.register_kernel("cpu")
def _pooled_lookup_cpu(array, values, weights, offsets, meta, batch, out_dim, max_blocks, occurrences, hash_mode,
                       block_size, paper_constants, block_align=1):  # fmt: skip
    check_inputs(array, values, weights, offsets, meta, batch)
    if array.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"robe: the CPU operator takes float32 or float64 arrays, got {array.dtype}; keep the array in "
            "float32 on CPU (bfloat16 and float16 arrays run on CUDA)"
        )
    if _C is None:
        _warn_fallback()
        return torch_forward(array, values, weights, offsets, meta, batch, out_dim, max_blocks, occurrences,
                             hash_mode, block_size, paper_constants, block_align)  # fmt: skip
    w = weights if weights is not None else array.new_empty(0)
    out, starts = _C.robe_forward(
        array.contiguous(), values.long().contiguous(), w.contiguous(), offsets.long().contiguous(), batch,
        meta.contiguous(), out_dim, max_blocks, occurrences, hash_mode, block_size, list(paper_constants), block_align,
    )  # fmt: skip
    return out, starts, torch.full((2,), STATUS_OK, dtype=torch.long)


@pooled_lookup.register_fake
def _pooled_lookup_fake(array, values, weights, offsets, meta, batch, out_dim, max_blocks, occurrences, hash_mode,
                        block_size, paper_constants, block_align=1):  # fmt: skip
    check_inputs(array, values, weights, offsets, meta, batch)
    out = array.new_empty(batch, out_dim)
    starts = values.new_empty(occurrences * values.shape[0] * max_blocks, dtype=starts_dtype(array.shape[0]))
    return out, starts, values.new_empty(2, dtype=torch.long)


@torch.library.custom_op("robe_dist::pooled_lookup_backward", mutates_args=())
def pooled_lookup_backward(
    grad_out: torch.Tensor,
    weights: Optional[torch.Tensor],
    offsets: torch.Tensor,
    meta: torch.Tensor,
    starts: torch.Tensor,
    batch: int,
    array_size: int,
    block_size: int,
    max_blocks: int,
    occurrences: int,
    num_values: int,
    deterministic: bool,
) -> torch.Tensor:
    """Dense gradient ``[array_size]`` of the array from the upstream gradient ``[batch, out_dim]``."""
    return torch_backward(grad_out, weights, offsets, meta, starts, batch, array_size, block_size, max_blocks,
                          occurrences, num_values)  # fmt: skip


@pooled_lookup_backward.register_kernel("cuda")
def _pooled_lookup_backward_cuda(grad_out, weights, offsets, meta, starts, batch, array_size, block_size, max_blocks,
                                 occurrences, num_values, deterministic):  # fmt: skip
    check_update_args(array_size, block_size)
    if not _triton():
        return torch_backward(grad_out, weights, offsets, meta, starts, batch, array_size, block_size, max_blocks,
                              occurrences, num_values)  # fmt: skip
    from robe_dist.kernels import triton_lookup

    weights, offsets, meta, starts = _dense(weights, offsets, meta, starts)  # (the forward's inputs, as given)
    return triton_lookup.backward(grad_out, weights, offsets, meta, starts, batch, array_size, block_size,
                                  max_blocks, num_values, deterministic)  # fmt: skip


def _dense(*tensors: Optional[torch.Tensor]) -> tuple:
    """Contiguous tensors for the Triton kernels, which index them as dense (views: copies)."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


@pooled_lookup_backward.register_kernel("cpu")
def _pooled_lookup_backward_cpu(grad_out, weights, offsets, meta, starts, batch, array_size, block_size, max_blocks,
                                occurrences, num_values, deterministic):  # fmt: skip
    check_update_args(array_size, block_size)
    if _C is None:
        return torch_backward(grad_out, weights, offsets, meta, starts, batch, array_size, block_size, max_blocks,
                              occurrences, num_values)  # fmt: skip
    w = weights if weights is not None else grad_out.new_empty(0)
    return _C.robe_backward(grad_out.contiguous(), w.contiguous(), offsets.long().contiguous(), batch,
                            meta.contiguous(), starts, array_size, block_size, max_blocks, occurrences, num_values)  # fmt: skip


@pooled_lookup_backward.register_fake
def _pooled_lookup_backward_fake(grad_out, weights, offsets, meta, starts, batch, array_size, block_size, max_blocks,
                                 occurrences, num_values, deterministic):  # fmt: skip
    return grad_out.new_empty(array_size)


@torch.library.custom_op("robe_dist::pooled_lookup_fused_update", mutates_args=("array", "state"))
def pooled_lookup_fused_update(
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
    occurrences: int,
    num_values: int,
    optimizer: int,
    lr: float,
    eps: float,
    deterministic: bool,
) -> None:
    """``array`` (and Adagrad's ``state``) updated in place with this step's gradient."""
    grad = torch_backward(grad_out.to(array.dtype), weights, offsets, meta, starts, batch, array.numel(), block_size,
                          max_blocks, occurrences, num_values)  # fmt: skip
    _dense_update(array, state, grad, optimizer, lr, eps)


@pooled_lookup_fused_update.register_kernel("cuda")
def _pooled_lookup_fused_update_cuda(array, state, grad_out, weights, offsets, meta, starts, batch, block_size,
                                     max_blocks, occurrences, num_values, optimizer, lr, eps, deterministic):  # fmt: skip
    check_update_args(array.numel(), block_size, state, array, optimizer)
    if not _triton():
        grad = torch_backward(grad_out.to(array.dtype), weights, offsets, meta, starts, batch, array.numel(),
                              block_size, max_blocks, occurrences, num_values)  # fmt: skip
        _dense_update(array, state, grad, optimizer, lr, eps)
        return
    from robe_dist.kernels import triton_lookup

    if not array.is_contiguous() or (state is not None and not state.is_contiguous()):
        raise ValueError("robe: the fused update writes the array (and its state) in place: both must be contiguous")
    weights, offsets, meta, starts = _dense(weights, offsets, meta, starts)
    triton_lookup.fused_update(array, state, grad_out, weights, offsets, meta, starts, batch, block_size, max_blocks,
                               num_values, optimizer, lr, eps, deterministic)  # fmt: skip


@pooled_lookup_fused_update.register_kernel("cpu")
def _pooled_lookup_fused_update_cpu(array, state, grad_out, weights, offsets, meta, starts, batch, block_size,
                                    max_blocks, occurrences, num_values, optimizer, lr, eps, deterministic):  # fmt: skip
    check_update_args(array.numel(), block_size, state, array, optimizer)
    if _C is not None and optimizer == OPTIMIZERS["sgd"]:
        w = weights if weights is not None else array.new_empty(0)
        _C.robe_backward_sgd(array, grad_out.contiguous(), w.contiguous(), offsets.long().contiguous(), batch,
                             meta.contiguous(), starts, block_size, max_blocks, occurrences, num_values, lr)  # fmt: skip
        return
    # the backward's kernel called directly, not through torch.ops: one operator in a profile
    grad = _pooled_lookup_backward_cpu(grad_out.to(array.dtype), weights, offsets, meta, starts, batch, array.numel(),
                                       block_size, max_blocks, occurrences, num_values, True)  # fmt: skip
    _dense_update(array, state, grad, optimizer, lr, eps)


@pooled_lookup_fused_update.register_fake
def _pooled_lookup_fused_update_fake(array, state, grad_out, weights, offsets, meta, starts, batch, block_size,
                                     max_blocks, occurrences, num_values, optimizer, lr, eps, deterministic):  # fmt: skip
    return None


def _setup_context(ctx, inputs, output) -> None:
    array, values, weights, offsets, meta, batch, out_dim, max_blocks, occurrences, _, block_size = inputs[:11]
    _, starts, _ = output
    ctx.weights_need_grad = weights is not None and weights.requires_grad
    # the array's values are needed only for the weights' gradient
    ctx.save_for_backward(weights, offsets, meta, starts, array if ctx.weights_need_grad else None)
    ctx.sizes = (batch, array.shape[0], block_size, max_blocks, occurrences, values.shape[0])
    ctx.array_dtype = array.dtype


def _weights_grad(ctx, grad_out, array, weights, offsets, meta, starts) -> Optional[torch.Tensor]:
    if not ctx.weights_need_grad:
        return None
    batch, _, block_size, max_blocks, occurrences, num_values = ctx.sizes
    return weights_backward(grad_out, array, offsets, meta, starts, batch, block_size, max_blocks, occurrences,
                            num_values).to(weights.dtype)  # fmt: skip


def _backward(ctx, grad_out, grad_starts, grad_status):
    weights, offsets, meta, starts, array = ctx.saved_tensors
    batch, array_size, block_size, max_blocks, occurrences, num_values = ctx.sizes
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.robe_dist.pooled_lookup_backward(
            grad_out.to(ctx.array_dtype), weights, offsets, meta, starts, batch, array_size, block_size, max_blocks,
            occurrences, num_values, torch.are_deterministic_algorithms_enabled(),
        )  # fmt: skip
    return (grad, None, _weights_grad(ctx, grad_out, array, weights, offsets, meta, starts)) + (None,) * 10


pooled_lookup.register_autograd(_backward, setup_context=_setup_context)


_warned_fallback = False


def _warn_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback:
        warnings.warn(
            f"{_C_PROBLEM}: ROBE runs its PyTorch lookup on CPU, about 100x slower. Rebuild the operator with "
            "`pip install --no-build-isolation -e .` (or `bash launch/setup.sh`) in this environment.",
            stacklevel=3,
        )
        _warned_fallback = True


# ------------------------------------------------------------------------------ the entry point
@dataclass(frozen=True)
class FusedUpdate:
    """An optimiser applied to the array inside the backward (single process; the array's
    ``.grad`` is never materialised). ``optimizer``: ``"sgd"`` or ``"adagrad"`` (as
    ``torch.optim.Adagrad`` with its defaults apart from ``lr`` and ``eps``)."""

    optimizer: str
    lr: float
    eps: float = 1e-10

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FusedUpdate.optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and 0 <= self.lr < math.inf):
            raise ValueError(f"FusedUpdate.lr must be a finite non-negative float, got {self.lr!r}")  # (0: a schedule's end)
        if not (isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool) and 0 < self.eps < math.inf):
            raise ValueError(f"FusedUpdate.eps must be a positive float, got {self.eps!r}")


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, array, values, weights, offsets, meta, batch, spec: LookupSpec, fused: FusedUpdate, state):
        out, starts, status = torch.ops.robe_dist.pooled_lookup(
            array, values, weights, offsets, meta, batch, *_static_args(spec)
        )
        ctx.save_for_backward(weights, offsets, meta, starts)
        ctx.array, ctx.state, ctx.spec, ctx.fused, ctx.batch, ctx.num_values = array, state, spec, fused, batch, values.numel()
        ctx.weights_need_grad = weights is not None and weights.requires_grad
        ctx.sizes = (batch, array.shape[0], spec.block_size, spec.max_blocks, spec.occurrences, values.numel())
        ctx.mark_non_differentiable(status)
        return out, status

    @staticmethod
    def backward(ctx, grad_out, grad_status):
        weights, offsets, meta, starts = ctx.saved_tensors
        spec: LookupSpec = ctx.spec
        # (the weights' gradient reads the array as the forward did: before this step's update)
        weights_grad = _weights_grad(ctx, grad_out, ctx.array, weights, offsets, meta, starts)
        torch.ops.robe_dist.pooled_lookup_fused_update(
            ctx.array.detach(), ctx.state, grad_out.to(ctx.array.dtype), weights, offsets, meta, starts, ctx.batch,
            spec.block_size, spec.max_blocks, spec.occurrences, ctx.num_values, OPTIMIZERS[ctx.fused.optimizer],
            float(ctx.fused.lr), float(ctx.fused.eps), torch.are_deterministic_algorithms_enabled(),
        )  # fmt: skip
        return (None, None, weights_grad) + (None,) * 6


def _static_args(spec: LookupSpec) -> tuple:
    return (spec.out_dim, spec.max_blocks, spec.occurrences, spec.hash_mode, spec.block_size, list(spec.paper_constants),
            spec.block_align)  # fmt: skip


def robe_pooled_lookup(
    array: torch.Tensor,
    values: torch.Tensor,
    weights: Optional[torch.Tensor],
    offsets: torch.Tensor,
    batch: int,
    meta: torch.Tensor,
    spec: LookupSpec,
    fused: Optional[FusedUpdate] = None,
    state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled ROBE embeddings of every (feature, bag), through the custom ops.

    Args:
        array: the shared ROBE array, 1-D ``[m]``.
        values: int64 or int32 ``[N]`` ids (a KeyedJaggedTensor's values; keys not in ``spec`` are skipped).
        weights: ``[N]`` per-sample weights (the array's dtype) or ``None``.
        offsets: int64 or int32 ``[K * B + 1]``, the KeyedJaggedTensor's ``offsets()``: bag ``b`` of
            key ``k`` is ``values[offsets[k * B + b] : offsets[k * B + b + 1]]``.
        batch: ``B``, the KeyedJaggedTensor's stride.
        meta: ``spec.meta(key_indices, array.device)``: feature f is key ``key_indices[f]`` of the input.
        spec: the collection's static lookup description.
        fused: apply this optimiser to ``array`` inside the backward (``array.grad`` stays ``None``).
        state: Adagrad's sum of squares ``[m]`` for ``fused`` Adagrad.

    Returns:
        ``(pooled [B, spec.out_dim], status [2])``: the features side by side in spec order, and
        the malformed-input status of CUDA kernels (``STATUS_OK`` twice when the input was good).

    Example::

        meta = spec.meta([0, 1], array.device)
        pooled, status = robe_pooled_lookup(array, kjt.values(), None, kjt.offsets(), kjt.stride(), meta, spec)
    """
    if fused is not None:
        check_update_args(array.numel(), spec.block_size, state, array, OPTIMIZERS[fused.optimizer])
        return _FusedLookup.apply(array, values, weights, offsets, meta, batch, spec, fused, state)
    out, _, status = torch.ops.robe_dist.pooled_lookup(array, values, weights, offsets, meta, batch, *_static_args(spec))
    return out, status


# ------------------------------------------------------------------- deferred checks (CUDA)
class DeferredStatus:
    """Reports a CUDA lookup's malformed input a few calls later, without synchronising each step.

    CUDA kernels cannot raise: they keep every access in bounds and record the first bad
    position in ``status``. ``submit`` copies it to pinned host memory asynchronously and queues
    it; ``poll`` checks, oldest first, every queued status whose copy has landed and raises
    ``ValueError`` (with its ``describe`` message) for the first bad one; ``poll(wait=True)``
    waits for all of them. A queue, not one slot: while the device runs behind the host, a new
    call must not drop the status of one whose copy has not landed yet.
    """

    def __init__(self) -> None:
        self._pending: Deque[Tuple[torch.Tensor, "torch.cuda.Event", Callable[[int, int], str]]] = deque()

    def submit(self, status: torch.Tensor, describe: Callable[[int, int], str]) -> None:
        host = torch.empty(2, dtype=torch.long, pin_memory=True)
        with torch.cuda.device(status.device):  # the copy and its event on the status's device's stream
            host.copy_(status, non_blocking=True)  # (a module on cuda:1 with cuda:0 current read the
            event = torch.cuda.Event()  # pinned buffer before the copy had landed)
            event.record(torch.cuda.current_stream(status.device))
        self._pending.append((host, event, describe))

    def poll(self, wait: bool = False) -> None:
        while self._pending:
            host, event, describe = self._pending[0]
            if not wait and not event.query():
                return
            event.synchronize()
            self._pending.popleft()
            bad_value, bad_bag = host.tolist()
            if bad_value != STATUS_OK or bad_bag != STATUS_OK:
                raise ValueError(describe(bad_value, bad_bag))
