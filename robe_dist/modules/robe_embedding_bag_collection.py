"""RobeEmbeddingBagCollection: TorchRec's EmbeddingBagCollection, with every table in one ROBE array."""

from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_dist import hashing
from robe_dist.config import RobeConfig
from robe_dist.ops import STATUS_OK, DeferredStatus, FusedUpdate, LookupSpec, new_array, robe_pooled_lookup

_SIGNATURE_VERSION = 1
_PAPER_MAX_GLOBAL_ID = 2**62  # the kernels reduce g mod P first: no overflow below this
_INIT_CAP = 2**31


_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing
)  # torch < 2.12 has only is_fx_tracing


def _tracing() -> bool:
    """Inside torch.compile / torch.export or torchrec.fx / torch.fx symbolic tracing."""
    return torch.compiler.is_compiling() or _fx_symbolic_tracing()


def kept_with(holder: torch.Tensor, name: str, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, made once per ``key`` and kept in ``holder.__dict__[name]`` for later calls
    (``holder``: a module's buffer, so a moved module, with new buffers, keeps nothing stale; at
    most 64 kept). Made with inference mode off: a first call under ``torch.inference_mode()``
    must not leave later training an inference tensor to save. Compiled, exported or fake-tensor
    calls make it afresh (a constant of their graph)."""
    if type(holder) is not torch.Tensor or torch.compiler.is_compiling():
        return make()
    cache: Dict[Hashable, torch.Tensor] = holder.__dict__.setdefault(name, {})
    value = cache.get(key)
    if value is None:
        if len(cache) >= 64:  # key orders are few in practice; bound it anyway
            cache.clear()
        with torch.inference_mode(False):
            value = cache[key] = make()
    return value


try:  # TorchRec's collections also take a TensorDict of jagged (nested) tensors, one per key
    from torchrec.sparse.tensor_dict import maybe_td_to_kjt as _maybe_td_to_kjt
except ImportError:  # pragma: no cover - a TorchRec without TensorDict inputs
    _maybe_td_to_kjt = None


@torch.fx.wrap
def as_kjt(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``features`` as a KeyedJaggedTensor: a TensorDict of jagged tensors (one per key) is
    converted as TorchRec's ``EmbeddingBagCollection`` converts it; anything else is returned."""
    return features if _maybe_td_to_kjt is None else _maybe_td_to_kjt(features, None)


@torch.fx.wrap
def _lookup_inputs(
    features: KeyedJaggedTensor, meta: torch.Tensor, feature_names: List[str], weighted: bool, array: torch.Tensor
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """``(values, weights, offsets, meta, batch)`` for the lookup of ``features`` in ``array``
    (weights converted to the array's dtype).

    ``meta`` is the collection's per-feature table for an input whose keys are exactly
    ``feature_names`` (its distinct features, in order); for another key order the key-index
    column is rewritten once and the result cached on ``meta``. ``torch.fx.wrap``-ed: FX and
    TorchRec's tracer see one call (the key order is only known at run time).
    """
    if not isinstance(features, KeyedJaggedTensor):
        raise TypeError(f"RobeEmbeddingBagCollection: the input must be a KeyedJaggedTensor, got {type(features).__name__}")
    values = features.values()
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(
            f"RobeEmbeddingBagCollection: ids must be an integer tensor (int64 or int32), got {values.dtype}"
        )
    weights = None
    if weighted:
        weights = features.weights_or_none()
        if weights is None:
            raise ValueError("RobeEmbeddingBagCollection(is_weighted=True) needs a KeyedJaggedTensor with weights")
        weights = weights.to(array.dtype)
    keys = features.keys()
    if features.variable_stride_per_key():
        offsets, batch = _padded_offsets(features)
    else:
        offsets, batch = features.offsets(), features.stride()
        if offsets.numel() - 1 != len(keys) * batch:  # (shapes only: no host synchronisation)
            raise ValueError(
                f"RobeEmbeddingBagCollection: the KeyedJaggedTensor has {offsets.numel() - 1} lengths for "
                f"{len(keys)} keys x batch (stride) {batch}; expected one length per key and sample"
            )
    if keys != feature_names:

        def variant() -> torch.Tensor:  # once per key order
            index = {k: i for i, k in enumerate(keys)}
            missing = [f for f in feature_names if f not in index]
            if missing:
                raise ValueError(
                    f"RobeEmbeddingBagCollection: feature(s) {missing} of its tables are missing from the input "
                    f"KeyedJaggedTensor (keys: {list(keys)})"
                )
            position = torch.tensor([index[f] for f in feature_names], dtype=torch.long)
            out = meta.clone()
            out[:, 5] = position.to(meta.device)[meta[:, 5]]
            return out

        meta = kept_with(meta, "_robe_by_keys", tuple(keys), variant)
    return values, weights, offsets, meta, batch


def _padded_offsets(features: KeyedJaggedTensor) -> Tuple[torch.Tensor, int]:
    """``(offsets, batch)`` of a variable-batch (VBE) input as the kernels read one: every key
    given ``batch = max(stride_per_key())`` bags, its own followed by empty ones. The values keep
    their order; the pooled rows of the padding are never read (``_expand_variable_batch``). Made
    on the input's device from the strides (no host-to-device copy); under torch.compile the
    strides are unbacked sizes, so that path takes no branch on them."""
    strides = features.stride_per_key()
    lengths = features.lengths()
    if torch.compiler.is_compiling():
        torch._check(lengths.numel() == sum(strides))
        batch = functools.reduce(torch.sym_max, strides, 0)
    else:
        if lengths.numel() != sum(strides):  # (shapes only: no host synchronisation)
            raise ValueError(
                f"RobeEmbeddingBagCollection: the KeyedJaggedTensor has {lengths.numel()} lengths for its keys' "
                f"batch sizes (stride_per_key) {strides}, which add up to {sum(strides)}; expected one length per bag"
            )
        batch = max(strides, default=0)
        if all(s == batch for s in strides):
            return features.offsets(), batch
    where = torch.cat([torch.arange(s, device=lengths.device) + k * batch for k, s in enumerate(strides)])
    padded = lengths.new_zeros(len(strides) * batch).index_copy_(0, where, lengths)
    return torch.cat([padded.new_zeros(1), torch.cumsum(padded, dim=0, dtype=padded.dtype)]), batch


@torch.fx.wrap
def _expand_variable_batch(
    pooled: torch.Tensor, features: KeyedJaggedTensor, input_features: List[str], dims: List[int]
) -> torch.Tensor:
    """``pooled`` ``[B, sum of dims]`` as is, or for a variable-batch (VBE) input, each feature's
    pooled rows expanded to the full batch by the input's ``inverse_indices`` (``[keys, B_out]``),
    as TorchRec's ``EmbeddingBagCollection`` expands them: ``[B_out, sum of dims]``."""
    if not features.variable_stride_per_key():
        return pooled
    found = features.inverse_indices_or_none()
    if found is None:
        raise ValueError(
            "RobeEmbeddingBagCollection: a KeyedJaggedTensor with a variable batch per feature (VBE) needs "
            "inverse_indices, which map each sample of the output batch to its bag in every feature"
        )
    inverse_keys, inverse = found
    row = {k: i for i, k in enumerate(inverse_keys)}
    distinct = list(dict.fromkeys(input_features))
    missing = [f for f in distinct if f not in row]
    if missing:
        raise ValueError(f"RobeEmbeddingBagCollection: inverse_indices has no row for feature(s) {missing}")
    if inverse.dim() != 2 or inverse.shape[0] != len(inverse_keys):
        raise ValueError(
            f"RobeEmbeddingBagCollection: inverse_indices must have one row per key ({len(inverse_keys)}), "
            f"got shape {tuple(inverse.shape)}"
        )
    stride = dict(zip(features.keys(), features.stride_per_key()))
    if inverse.device.type == "cpu" and not _tracing() and inverse.numel():  # (CUDA: no host synchronisation)
        low, high = inverse.aminmax(dim=1)
        for f in distinct:
            lo, hi = int(low[row[f]]), int(high[row[f]])
            if lo < 0 or hi >= stride[f]:
                raise ValueError(
                    f"RobeEmbeddingBagCollection: inverse_indices of feature {f!r} run over [{lo}, {hi}], "
                    f"outside its {stride[f]} bags (stride_per_key)"
                )
    inverse = inverse.to(pooled.device, non_blocking=True)
    parts, col = [], 0
    for f, d in zip(input_features, dims):
        parts.append(pooled[:, col : col + d].index_select(0, inverse[row[f]]))
        col += d
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class RobeEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A collection of pooled embedding tables that all live in ONE shared ROBE array.

    Drop-in for ``torchrec.EmbeddingBagCollection``: same constructor tables, same input
    (``KeyedJaggedTensor``), same output (``KeyedTensor`` with the same keys, order and widths).
    Instead of a ``num_embeddings x embedding_dim`` weight per table, the module holds one
    parameter ``array`` of ``robe.array_size`` floats; element ``j`` of the embedding of id ``x``
    in table ``t`` is ``array[start(t, x, j // Z) + j % Z]`` (docs/robe.md). Pooling: SUM or
    MEAN, multi-hot bags, empty bags (zeros), per-sample weights (``is_weighted``), a variable
    batch per feature (VBE: ``stride_per_key_per_rank`` and ``inverse_indices``, expanded to the
    full batch as TorchRec's collection expands it).

    Args:
        tables (List[EmbeddingBagConfig]): the tables; they share the array. ``embedding_dim``
            must be a multiple of ``robe.block_size``. With ``robe.hash == "universal"``,
            ``num_embeddings`` is only used for sizing helpers and the default init (ids may take
            any int64 value); with ``"paper"`` ids must lie in ``[0, num_embeddings)``.
        robe (RobeConfig): array size, block size Z, hash mapping and seed.
        device (Optional[torch.device]): where the array lives (``"meta"`` allowed).
        is_weighted (bool): the features carry per-sample weights (``KeyedJaggedTensor.weights()``);
            each id's embedding is multiplied by its weight before pooling.
        fused_sgd_lr (Optional[float]): single-process fast path: the backward applies
            ``array -= lr * grad`` in place, touching only the slots hit in the step, and
            ``array.grad`` stays ``None`` (the dense optimiser then skips it). Not for replicated
            training, where the gradient must be all-reduced first. Shorthand for
            ``fused_update=FusedUpdate("sgd", lr)``.
        fused_update (Optional[FusedUpdate]): the same with SGD or Adagrad (``FusedUpdate("adagrad",
            lr, eps)``, exact ``torch.optim.Adagrad``; its sum of squares is the buffer
            ``fused_state``, saved with the module).

    Call args:
        features (KeyedJaggedTensor): ids of shape ``[sum of all bag lengths]`` keyed by feature;
            must contain every feature of ``tables`` (extra keys are ignored). A ``TensorDict`` of
            jagged tensors (one per key) is read as TorchRec's collection reads it.

    Returns:
        KeyedTensor: values ``[B, sum of embedding dims]``, one key per (table, feature).

    Example::

        tables = [
            EmbeddingBagConfig(name="t1", embedding_dim=64, num_embeddings=10**9, feature_names=["f1"]),
            EmbeddingBagConfig(name="t2", embedding_dim=32, num_embeddings=10**6, feature_names=["f2"]),
        ]
        ebc = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=1 << 20, block_size=32))

        #        0       1        2  <-- batch
        # "f1"   [0,1] None    [2]
        # "f2"   [3]    [4]    [5,6,7]
        features = KeyedJaggedTensor(
            keys=["f1", "f2"],
            values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]),
            lengths=torch.tensor([2, 0, 1, 1, 1, 3]),
        )
        pooled = ebc(features)
        pooled.values().shape   # torch.Size([3, 96])
        pooled.keys()           # ['f1', 'f2']
        pooled["f2"].shape      # torch.Size([3, 32])
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        robe: RobeConfig,
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
        fused_sgd_lr: Optional[float] = None,
        fused_update: Optional[FusedUpdate] = None,
    ) -> None:
        super().__init__()
        torch._C._log_api_usage_once(f"robe_dist.modules.{self.__class__.__name__}")
        self._check_tables(tables, robe, is_weighted)
        self._embedding_bag_configs = list(tables)
        self._robe = robe
        self._is_weighted = is_weighted
        if fused_sgd_lr is not None:
            if fused_update is not None:
                raise ValueError("pass fused_sgd_lr or fused_update, not both")
            if not (isinstance(fused_sgd_lr, (int, float)) and not isinstance(fused_sgd_lr, bool)
                    and 0 < fused_sgd_lr < math.inf):  # fmt: skip
                raise ValueError(f"fused_sgd_lr must be a finite positive float or None, got {fused_sgd_lr!r}")
            fused_update = FusedUpdate("sgd", float(fused_sgd_lr))
        self.fused_update = fused_update

        self._feature_names: List[List[str]] = [t.feature_names for t in tables]
        self._embedding_names: List[str] = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._lengths_per_embedding: List[int] = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._input_features: List[str] = [f for t in tables for f in t.feature_names]

        keys, offset = [], 0
        for t in tables:
            keys.append(hashing.table_key(t.name, robe.seed) if robe.hash == "universal" else offset)
            offset += t.num_embeddings
        per_feature = [(i, t) for i, t in enumerate(tables) for _ in t.feature_names]
        # distinct input features, in order: the key order the lookup table ``lookup_meta`` assumes
        self._distinct_features: List[str] = list(dict.fromkeys(self._input_features))
        occurrence, seen = [], {}
        for f in self._input_features:
            occurrence.append(seen.get(f, 0))
            seen[f] = occurrence[-1] + 1
        out_cols = [0]
        for _, t in per_feature:
            out_cols.append(out_cols[-1] + t.embedding_dim)
        self._spec = LookupSpec(
            hash=robe.hash,
            block_size=robe.block_size,
            array_size=robe.array_size,
            paper_constants=hashing.paper_constants(robe.seed) if robe.hash == "paper" else (0, 0, 0, 1),
            keys=tuple(keys[i] for i, _ in per_feature),
            num_embeddings=tuple(t.num_embeddings for _, t in per_feature),
            dims=tuple(t.embedding_dim for _, t in per_feature),
            out_cols=tuple(out_cols[:-1]),
            poolings=tuple(t.pooling.name for _, t in per_feature),
            out_dim=out_cols[-1],
            occurrence=tuple(occurrence),
            block_align=robe.block_align,
        )
        # (device None: the default device, also under `with torch.device("meta")`, where the array goes)
        self.register_buffer("lookup_meta", self.lookup_meta_for(device or torch.get_default_device()), persistent=False)
        self._lookup_meta_checked = self.lookup_meta  # the tensor last found to describe the tables
        self._status = DeferredStatus()

        self.array = nn.Parameter(new_array(robe.array_size, device))
        if fused_update is not None and fused_update.optimizer == "adagrad":
            self.register_buffer("fused_state", torch.zeros(robe.array_size, device=device))
        # (version, mapping, seed, Z, m, table-layout fingerprint): saved with the model, checked on load.
        self.register_buffer(
            "hash_signature", torch.tensor(self.expected_signature(), dtype=torch.long, device=device)
        )
        self._signature_checked = (self.hash_signature, self.hash_signature._version)
        self._register_load_state_dict_pre_hook(self._check_loaded_signature, with_module=False)
        self.register_load_state_dict_post_hook(RobeEmbeddingBagCollection._remake_lookup_meta)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_tables(tables: List[EmbeddingBagConfig], robe: RobeConfig, is_weighted: bool) -> None:
        if not isinstance(robe, RobeConfig):
            raise TypeError(f"RobeEmbeddingBagCollection: robe must be a RobeConfig, got {type(robe).__name__}")
        if not tables:
            raise ValueError("RobeEmbeddingBagCollection needs at least one EmbeddingBagConfig")
        names = set()
        for t in tables:
            if not isinstance(t, EmbeddingBagConfig):
                raise TypeError(f"RobeEmbeddingBagCollection: tables must be EmbeddingBagConfigs, got {type(t).__name__}")
            if t.embedding_dim < 1:
                raise ValueError(f"table {t.name!r}: embedding_dim must be >= 1, got {t.embedding_dim}")
            if t.name in names:
                raise ValueError(f"table name {t.name!r} appears twice; table names must be unique")
            names.add(t.name)
            if t.embedding_dim % robe.block_size != 0:
                raise ValueError(
                    f"table {t.name!r}: embedding_dim ({t.embedding_dim}) must be a multiple of "
                    f"RobeConfig.block_size ({robe.block_size})"
                )
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {t.name!r}: pooling {t.pooling.name} is not supported (SUM or MEAN)")
            if not t.feature_names:
                raise ValueError(f"table {t.name!r} has no feature_names")
            if t.num_embeddings < 1:
                raise ValueError(f"table {t.name!r}: num_embeddings must be >= 1, got {t.num_embeddings}")
            if t.need_pos:
                raise ValueError(f"table {t.name!r}: need_pos is not supported")
            if is_weighted and t.pooling == PoolingType.MEAN:
                raise ValueError(
                    f"table {t.name!r}: MEAN pooling with per-sample weights (is_weighted=True) is not supported; "
                    "as in nn.EmbeddingBag, weighted bags need SUM pooling"
                )
        unused = []
        for t in tables:
            # (TorchRec gives every config an init_fn, functools.partial(uniform_, ...): only another one is the user's)
            own_init = t.init_fn is not None and not (isinstance(t.init_fn, functools.partial)
                                                      and t.init_fn.func is torch.nn.init.uniform_)  # fmt: skip
            fields = [name for name, used in (("init_fn", own_init), ("weight_init_min", t.weight_init_min is not None),
                                              ("weight_init_max", t.weight_init_max is not None),
                                              ("data_type", t.data_type != DataType.FP32)) if used]  # fmt: skip
            if fields:
                unused.append(f"{t.name}: {', '.join(fields)}")
        if unused:
            warnings.warn(
                f"RobeEmbeddingBagCollection: the ROBE array does not use these EmbeddingBagConfig fields ({'; '.join(unused)}): "
                "it is one array for all tables, initialised by RobeConfig.init_scale, of the dtype the module is moved to",
                stacklevel=3,
            )
        if robe.hash == "paper":
            total = sum(t.num_embeddings for t in tables)
            if total > _PAPER_MAX_GLOBAL_ID:
                raise ValueError(
                    f"hash='paper' lays tables end to end: the sum of num_embeddings ({total}) must stay "
                    f"below 2**62; use hash='universal' for raw ids"
                )

    def expected_signature(self) -> List[int]:
        """``[format version, mapping, seed, Z, m, table-layout fingerprint]``; mapping is 0
        (universal) or 1 (paper), plus ``2 * (block_align - 1)``: the signatures of modules made
        before ``block_align`` existed (alignment 1) are unchanged."""
        layout = ";".join(f"{t.name}:{t.num_embeddings}:{t.embedding_dim}" for t in self._embedding_bag_configs)
        fingerprint = hashing._signed(hashing.fnv1a64(layout.encode()))
        mode = (0 if self._robe.hash == "universal" else 1) + 2 * (self._robe.block_align - 1)
        return [_SIGNATURE_VERSION, mode, self._robe.seed, self._robe.block_size, self._robe.array_size, fingerprint]

    def reset_parameters(self) -> None:
        """Uniform in ``[-s, s]``, ``s = robe.init_scale`` or ``sqrt(1 / largest num_embeddings)``;
        and the buffers derived from the config (``lookup_meta``, ``hash_signature``) made anew, so
        that a module built on ``meta``, then ``to_empty(device=...)`` (whose buffers hold whatever
        memory it got) and ``reset_parameters()``, is the module built on that device."""
        device = self.array.device
        if device.type == "meta":
            return
        self.lookup_meta = self._lookup_meta_checked = self.lookup_meta_for(device)
        self.hash_signature = torch.tensor(self.expected_signature(), dtype=torch.long, device=device)
        self._signature_checked = (self.hash_signature, self.hash_signature._version)
        scale = self._robe.init_scale
        if scale is None:
            largest = min(max(t.num_embeddings for t in self._embedding_bag_configs), _INIT_CAP)
            scale = math.sqrt(1.0 / largest)
        with torch.no_grad():
            self.array.uniform_(-scale, scale)

    # ------------------------------------------------------------------ state checks
    def describe_signature(self, sig: List[int]) -> str:
        """A readable form of a ``hash_signature`` (mapping, seed, Z, m, table fingerprint)."""
        mode = {0: "universal", 1: "paper"}[sig[1] % 2] if sig[1] >= 0 else f"?{sig[1]}"
        align = f" block_align={sig[1] // 2 + 1}" if sig[1] >= 2 else ""
        return (f"hash={mode} seed={sig[2]} block_size={sig[3]}{align} array_size={sig[4]} "
                f"tables=#{sig[5] & 0xFFFFFFFF:08x}")  # fmt: skip

    def verify_signature(self, found: List[int], where: str) -> None:
        """Raises ``RuntimeError`` naming both sides when ``found`` is not this module's signature."""
        expected = self.expected_signature()
        if found != expected:
            raise RuntimeError(
                f"{where}: the ROBE hash signature does not match this module: checkpoint has "
                f"[{self.describe_signature(found)}], module has [{self.describe_signature(expected)}]. "
                "Embeddings hashed with another mapping, seed, block size or alignment, array size or table layout "
                "would be read from the wrong slots; rebuild the module with the checkpoint's RobeConfig."
            )

    def _check_loaded_signature(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "hash_signature"
        if key in state_dict:
            self.verify_signature(self._signature_list(state_dict[key], "load_state_dict"), "load_state_dict")
        if self.array.device.type != "meta":  # (derived, not saved: after to_empty() it holds garbage)
            self.lookup_meta = self._lookup_meta_checked = self.lookup_meta_for(self.array.device)

    @staticmethod
    def _remake_lookup_meta(module: "RobeEmbeddingBagCollection", incompatible_keys) -> None:
        """After ``load_state_dict(..., assign=True)`` of a module built on ``meta`` the array is
        the loaded tensor, on its device, while the derived ``lookup_meta`` was left on ``meta``."""
        device = module.array.device
        if device.type != "meta" and module.lookup_meta.device != device:
            module.lookup_meta = module._lookup_meta_checked = module.lookup_meta_for(device)

    def check_signature_unchanged(self, force: bool = False) -> None:
        """Verifies ``hash_signature`` if it was written since the last check (or always, with ``force``).

        In-place loads (``torch.distributed.checkpoint.load``) bypass ``load_state_dict`` hooks;
        the buffer's version counter tells when it was written, and the check then runs once.
        """
        sig, version = self.hash_signature, self.hash_signature._version
        checked, checked_version = self._signature_checked
        if force or sig is not checked or version != checked_version:  # replaced, or written in place
            self.verify_signature(self._signature_list(sig, "loaded state"), "loaded state")
            self._signature_checked = (sig, version)

    @staticmethod
    def _signature_list(sig: object, where: str) -> List[int]:
        if not (isinstance(sig, torch.Tensor) and sig.dtype == torch.long and tuple(sig.shape) == (6,)):
            got = f"{sig.dtype} {tuple(sig.shape)}" if isinstance(sig, torch.Tensor) else type(sig).__name__
            raise RuntimeError(f"{where}: hash_signature must be an int64 tensor of shape (6,), got {got}")
        return sig.tolist()

    def check_lookup_meta(self) -> None:
        """Verifies, once per tensor, that the ``lookup_meta`` buffer describes the tables: after
        ``to_empty(device=...)`` it holds whatever memory it got, which the kernels would read as
        columns and key positions."""
        if self.lookup_meta is self._lookup_meta_checked:
            return
        if self.lookup_meta.tolist() != self.lookup_meta_for(None).tolist():
            raise RuntimeError(
                "RobeEmbeddingBagCollection: its buffers hold uninitialised memory, as after to_empty(device=...): "
                "call reset_parameters() (or load_state_dict() a checkpoint) before the forward"
            )
        self._lookup_meta_checked = self.lookup_meta

    # ------------------------------------------------------------------ TorchRec interface
    @property
    def robe_config(self) -> RobeConfig:
        return self._robe

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def lookup_spec(self) -> LookupSpec:
        return self._spec

    def lookup_meta_for(self, device: Optional[torch.device]) -> torch.Tensor:
        """int64 ``[F, 7]``: the kernels' per-feature table for an input keyed exactly by the
        collection's distinct features in order (``_lookup_inputs`` adapts it to other orders)."""
        return self._spec.meta([self._distinct_features.index(f) for f in self._input_features], device)

    @property
    def fused_sgd_lr(self) -> Optional[float]:
        """The fused SGD learning rate, or ``None`` (no fused update, or Adagrad)."""
        f = self.fused_update
        return f.lr if f is not None and f.optimizer == "sgd" else None

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of ``features``: KeyedTensor of values ``[B, sum of dims]``."""
        return self.lookup(features, self.fused_update, getattr(self, "fused_state", None))

    def lookup(
        self, features: KeyedJaggedTensor, fused: Optional[FusedUpdate] = None, state: Optional[torch.Tensor] = None
    ) -> KeyedTensor:
        """``forward`` with the fused update given per call (``None``: a dense gradient into
        ``array.grad``); ``state``: Adagrad's sum of squares ``[m]``. The sharded module uses it to
        apply its optimiser's current step (``ShardedRobeEmbeddingBagCollection.fuse_optimizer``)."""
        # (CUDA graph capture forbids the event queries of the deferred input check)
        # (on meta, as after .to("meta"), the op's fake kernel gives the shapes; nothing to check)
        eager = not _tracing() and not self.array.is_meta and not (self.array.is_cuda and torch.cuda.is_current_stream_capturing())
        if eager:
            self.check_lookup_meta()
            self.check_signature_unchanged()
            self._status.poll()  # a CUDA error of an earlier call whose status has landed
        features = as_kjt(features)
        values, weights, offsets, meta, batch = _lookup_inputs(
            features, self.lookup_meta, self._distinct_features, self._is_weighted, self.array
        )
        array = self.array
        if (
            not _fx_symbolic_tracing()  # (a Proxy's dtype is not a value)
            and array.dtype in (torch.bfloat16, torch.float16)
            and array.device.type == "cpu"
            and not (torch.is_grad_enabled() and array.requires_grad)
        ):
            # a 16-bit array stored for inference (robe-export --dtype): the CPU operator reads
            # float32, so scoring gets a float32 copy; training such an array on CPU is refused by
            # the operator, as before (per-sample weights, made in the array's dtype, widen with it)
            array = array.float()
            weights = weights.float() if weights is not None else None
        try:
            pooled, status = robe_pooled_lookup(
                array, values, weights, offsets, batch, meta, self._spec,
                fused=fused, state=state,
            )  # fmt: skip
        except ValueError as e:  # the kernels number features; name them
            raise ValueError(
                re.sub(r"feature #(\d+)", lambda m: self._feature_label(int(m.group(1))), str(e))
            ) from None
        if eager and status.is_cuda:
            self._status.submit(status, self._describe_status(values, offsets, meta, batch))
        return KeyedTensor(
            keys=self._embedding_names,
            values=_expand_variable_batch(pooled, features, self._input_features, self._lengths_per_embedding),
            length_per_key=self._lengths_per_embedding,
        )

    def check_input_errors(self) -> None:
        """Raises ``ValueError`` if the last CUDA lookup met malformed input (out-of-range ids of
        the paper mapping, offsets that decrease or run past the values). CUDA kernels record such
        input without stopping the device; ``forward`` raises it in a later call, once the status
        has reached the host, this at once (it waits for the device). CPU lookups raise in the
        call itself."""
        self._status.poll(wait=True)

    def _describe_status(self, values: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor, batch: int):
        def describe(bad_value: int, bad_bag: int) -> str:
            rows = meta.tolist()
            if bad_bag == offsets.numel() - 1:  # (triton_lookup.forward: past every bag)
                return (
                    f"RobeEmbeddingBagCollection: the offsets run from {int(offsets[0])} to {int(offsets[-1])} but "
                    f"the KeyedJaggedTensor has {values.numel()} values: its lengths must cover the values exactly"
                )
            if bad_bag != STATUS_OK:
                k, b = divmod(bad_bag, max(batch, 1))
                lo, hi = offsets[bad_bag : bad_bag + 2].tolist()
                return (
                    f"RobeEmbeddingBagCollection: bag {b} of input key #{k} has offsets [{lo}, {hi}), which "
                    f"decrease or run past the {values.numel()} values: the KeyedJaggedTensor is malformed"
                )
            starts = offsets[[r[5] * batch for r in rows]].tolist()
            ends = offsets[[r[5] * batch + batch for r in rows]].tolist()
            f = next(f for f, (lo, hi) in enumerate(zip(starts, ends)) if lo <= bad_value < hi)
            return (
                f"RobeEmbeddingBagCollection: id {int(values[bad_value])} of {self._feature_label(f)} is outside "
                f"[0, num_embeddings) = [0, {rows[f][1]}); the 'paper' mapping needs ids below num_embeddings"
            )

        return describe

    def _table_of_feature(self, f: int) -> str:
        return [t.name for t in self._embedding_bag_configs for _ in t.feature_names][f]

    def _feature_label(self, f: int) -> str:
        if not 0 <= f < len(self._input_features):
            return f"feature #{f}"
        return f"feature {self._input_features[f]!r} (table {self._table_of_feature(f)!r})"

    @property
    def device(self) -> torch.device:
        return self.array.device

    def extra_repr(self) -> str:
        r = self._robe
        return (
            f"tables={[t.name for t in self._embedding_bag_configs]}, array_size={r.array_size}, "
            f"block_size={r.block_size}, hash={r.hash!r}, seed={r.seed}"
        )
