"""RobeHybridEmbeddingBagCollection: some tables in a ROBE array, the others as full tables."""

from __future__ import annotations

import itertools
import numbers
from typing import Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_dist.config import RobeConfig
from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection, as_kjt, kept_with

# (child index, the child's own embedding name) of each output embedding, in output order
_Source = Tuple[int, str]

#: A hot id and its feature's slot share one int64 key, ``slot << HOT_ID_BITS | id``: hot ids lie in
#: ``[0, 2**HOT_ID_BITS)`` (Criteo's are 32-bit hashes, a vocabulary's are dense); other ids, of any
#: value, are never taken for hot ones.
HOT_ID_BITS = 40
HOT_SUFFIX = "@hot"


@torch.fx.wrap
def _split_hot(
    features: KeyedJaggedTensor, hot_keys: torch.Tensor, hot_base: torch.Tensor, hot_rows: torch.Tensor,
    slot_of: Dict[str, int],
) -> Tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
    """``(robe_input, hot_input)`` for ``features``: both with its keys and lengths.

    ``robe_input`` carries per-sample weights 0 for the hot ids of split features (1 elsewhere),
    so the array neither reads nor trains them. ``hot_input``'s values are, for split features,
    the hot id's row in its exact table, or the table's tail row ``hot_rows[slot]`` for every
    other id (0 for the other features, which the hot tables do not read). ``slot_of``: the hot
    slot of each split feature. No host synchronisation: the feature of every value is found from
    the lengths on the device, and the slot of every key is a tensor kept there (``kept_with``).
    """
    values, lengths = features.values(), features.lengths()
    slots = [slot_of.get(k, -1) for k in features.keys()]
    num_keys = len(slots)
    if features.variable_stride_per_key():  # (VBE: each key's bags end where its batch does)
        ends = torch.cumsum(torch.stack([part.sum() for part in lengths.split(features.stride_per_key())]), dim=0)
        # (the KJT's own tensor, as TorchRec's KJT methods pass it: under torch.compile its
        # constructor takes no list)
        per_rank = getattr(features, "_stride_per_key_per_rank", None)
        batch = {"stride_per_key_per_rank": per_rank if isinstance(per_rank, torch.Tensor) else features.stride_per_key_per_rank(),
                 "inverse_indices": features.inverse_indices_or_none()}  # fmt: skip
    else:
        ends = torch.cumsum(lengths.view(num_keys, -1).sum(dim=1), dim=0)
        batch = {"stride": features.stride()}
    key_of_value = torch.searchsorted(ends, torch.arange(values.numel(), device=values.device), right=True)
    # the slot of every key, kept on the device per key order (built from the list at every step,
    # it would be a blocking host-to-device copy on CUDA, which no CUDA graph can hold)
    table = kept_with(hot_keys, "_robe_slots_by_keys", tuple(slots),
                      lambda: torch.tensor(slots, dtype=torch.long, device=hot_keys.device))  # fmt: skip
    slot = table[key_of_value]
    split = slot >= 0
    slot0 = slot.clamp(min=0)
    ids = values.long()
    query = (slot0 << HOT_ID_BITS) | ids
    pos = torch.searchsorted(hot_keys, query).clamp(max=hot_keys.numel() - 1)
    # (an id outside [0, 2**40) is no table's hot id, but its bits would reach into the slot's)
    hot = split & (hot_keys[pos] == query) & (ids >= 0) & (ids < (1 << HOT_ID_BITS))
    row = torch.where(hot, pos - hot_base[slot0], hot_rows[slot0])
    hot_values = torch.where(split, row, torch.zeros_like(row)).to(values.dtype)
    robe_input = KeyedJaggedTensor(keys=features.keys(), values=values, weights=(~hot).float(), lengths=lengths, **batch)
    hot_input = KeyedJaggedTensor(keys=features.keys(), values=hot_values, lengths=lengths, **batch)
    return robe_input, hot_input


class HotIdRouter(torch.nn.Module):
    """Routes the ids of tables with exact rows for their hot ids: ``(robe_input, hot_input)``
    (``_split_hot``) from the collection's input.

    A module of its own, with buffers and no parameters, so that TorchRec's
    ``TrainPipelineSparseDist(..., pipeline_postproc=True)`` runs it a batch ahead, as a
    "postproc" module, and the ROBE and ``hot`` children it feeds get their input distribution
    pipelined like the full tables'. Its buffers: ``hot_keys`` (sorted ``slot << 40 | id`` of
    every hot id), ``hot_base`` (where each slot's keys start), ``hot_rows`` (each slot's hot ids,
    the index of its tail row).
    """

    def __init__(self, keys: torch.Tensor, base: torch.Tensor, rows: torch.Tensor, slot_of: Dict[str, int]) -> None:
        super().__init__()
        self.slot_of = dict(slot_of)
        self.register_buffer("hot_keys", keys)
        self.register_buffer("hot_base", base)
        self.register_buffer("hot_rows", rows)
        self._initial = {name: t.detach().cpu().clone() for name, t in (("hot_keys", keys), ("hot_base", base), ("hot_rows", rows))}

    def reset_parameters(self) -> None:
        """The routing buffers as built (after ``to_empty()`` they hold arbitrary memory)."""
        for name, t in self._initial.items():
            device = getattr(self, name).device
            if device.type != "meta":
                setattr(self, name, t.to(device))

    def forward(self, features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        return _split_hot(features, self.hot_keys, self.hot_base, self.hot_rows, self.slot_of)


@torch.fx.wrap
def _add_hot(merged: KeyedTensor, hot: Union[KeyedTensor, Awaitable[KeyedTensor]], columns: torch.Tensor,
             hot_order: List[str]) -> KeyedTensor:  # fmt: skip
    """``merged`` plus the exact tables' pooled rows added into their tables' columns
    (``columns``: the merged column of each of ``hot_order``'s, concatenated)."""
    if isinstance(hot, Awaitable):
        hot = hot.wait()
    offsets = hot.offset_per_key()
    where = {k: (offsets[i], offsets[i + 1]) for i, k in enumerate(hot.keys())}
    parts = [hot.values()[:, where[k][0] : where[k][1]] for k in hot_order]
    values = merged.values().index_add(1, columns, torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return KeyedTensor(keys=merged.keys(), length_per_key=merged.length_per_key(), values=values)


@torch.fx.wrap
def _merge_pooled(
    pooled: List[Union[KeyedTensor, Awaitable[KeyedTensor]]],
    sources: List[_Source],
    keys: List[str],
    length_per_key: List[int],
) -> KeyedTensor:
    """One KeyedTensor from the children's, its embeddings in ``keys`` order: embedding ``i`` is
    child ``sources[i][0]``'s embedding named ``sources[i][1]``, found by name (a sharded child
    may return its embeddings in another order than its tables': TorchRec groups them by sharding
    type). Contiguous runs are copied as one slice.

    ``torch.fx.wrap``-ed: TorchRec's pipelines trace the model and see this as one call.
    """
    values, where = [], []
    for kt in pooled:
        if isinstance(kt, Awaitable):  # a sharded child returns LazyAwaitable[KeyedTensor]
            kt = kt.wait()
        values.append(kt.values())
        offsets = kt.offset_per_key()
        where.append({k: (offsets[i], offsets[i + 1]) for i, k in enumerate(kt.keys())})
    slices: List[Tuple[int, int, int]] = []
    for c, name in sources:
        a, b = where[c][name]
        if slices and slices[-1][0] == c and slices[-1][2] == a:
            slices[-1] = (c, slices[-1][1], b)
        else:
            slices.append((c, a, b))
    if len(slices) == 1 and slices[0][1] == 0 and slices[0][2] == values[slices[0][0]].shape[1]:
        merged = values[slices[0][0]]
    else:
        merged = torch.cat([values[c][:, a:b] for c, a, b in slices], dim=1)
    return KeyedTensor(keys=keys, length_per_key=length_per_key, values=merged)


class RobeHybridEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Pooled embedding tables split between one ROBE array and ordinary full tables.

    Drop-in for ``torchrec.EmbeddingBagCollection`` (e.g. as ``torchrec.models.dlrm.DLRM``'s
    ``embedding_bag_collection``): takes all ``tables``, one ``KeyedJaggedTensor``, and returns one
    ``KeyedTensor`` whose keys and columns follow ``tables`` order, exactly as an
    ``EmbeddingBagCollection`` of the same tables would. Internally the tables named in
    ``robe_tables`` live in a ``RobeEmbeddingBagCollection`` (child ``robe``) and the others in an
    ``EmbeddingBagCollection`` (child ``full``); both children see the whole input and each reads
    its own features. ``DistributedModelParallel`` shards the children with their sharders
    (``robe``: data-parallel replicated array; ``full``: TorchRec's table-wise/row-wise/...).

    Args:
        tables (List[EmbeddingBagConfig]): all the tables, in output order.
        robe (RobeConfig): the ROBE array of the compressed tables.
        robe_tables (Optional[Collection[str]]): names of the tables to compress; ``None`` means
            all tables whose ``num_embeddings`` exceeds ``max_full_rows``.
        max_full_rows (Optional[int]): with ``robe_tables=None``, tables with more rows go to the
            ROBE array (default: every table).
        device (Optional[torch.device]): device of the children (``"meta"`` allowed).
        is_weighted (bool): the features carry per-sample weights.
        hot_ids (Optional[Dict[str, Sequence[int]]]): for ROBE tables (SUM pooling) the ids that
            get exact rows instead of the array (the most frequent ones, e.g. from the planner):
            table ``t`` then also has an ordinary table ``t@hot`` (child ``hot``) of
            ``len(hot_ids[t]) + 1`` rows, one per hot id and a last, shared by all of ``t``'s
            other ids (its tail row), and ``t``'s embedding of an id is its exact row if the id is
            hot, else the tail row plus the id's ROBE embedding. The array is not read for hot ids.
            Hot ids lie in ``[0, 2**40)``; other ids of any value take the array. A child ``hot_router``
            (``HotIdRouter``) routes the ids; TorchRec's ``TrainPipelineSparseDist`` runs it a
            batch ahead with ``pipeline_postproc=True``.

    Call args:
        features (KeyedJaggedTensor): must contain the features of all tables (extra keys ignored).

    Returns:
        KeyedTensor: values ``[B, sum of embedding dims]``, keys in ``tables`` order.

    Example::

        tables = [
            EmbeddingBagConfig(name="user", embedding_dim=64, num_embeddings=10**9, feature_names=["f_user"]),
            EmbeddingBagConfig(name="country", embedding_dim=64, num_embeddings=250, feature_names=["f_country"]),
        ]
        ebc = RobeHybridEmbeddingBagCollection(tables, RobeConfig(array_size=1 << 24), max_full_rows=100_000)
        ebc.robe.embedding_bag_configs()   # [user]
        ebc.full.embedding_bag_configs()   # [country]
        ebc(kjt).keys()                    # ['f_user', 'f_country']

        # the 3 most frequent users get exact rows; the others share the array (and a tail row)
        hot = RobeHybridEmbeddingBagCollection(tables, RobeConfig(array_size=1 << 24), max_full_rows=100_000,
                                               hot_ids={"user": [7, 42, 1000]})
        hot.hot.embedding_bag_configs()    # [user@hot: 4 rows]
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        robe: RobeConfig,
        robe_tables: Optional[Collection[str]] = None,
        max_full_rows: Optional[int] = None,
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
        hot_ids: Optional[Dict[str, Sequence[int]]] = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("RobeHybridEmbeddingBagCollection needs at least one EmbeddingBagConfig")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"RobeHybridEmbeddingBagCollection: table names must be unique, got {names}")
        if max_full_rows is not None and (isinstance(max_full_rows, bool)
                                          or not isinstance(max_full_rows, numbers.Integral) or max_full_rows < 0):  # fmt: skip
            raise ValueError(f"RobeHybridEmbeddingBagCollection: max_full_rows must be an int >= 0 or None, "
                             f"got {max_full_rows!r}")  # fmt: skip
        if robe_tables is None:
            limit = -1 if max_full_rows is None else max_full_rows
            robe_set = {t.name for t in tables if t.num_embeddings > limit}
        else:
            if max_full_rows is not None:
                raise ValueError("RobeHybridEmbeddingBagCollection: pass robe_tables or max_full_rows, not both")
            robe_set = set(robe_tables)
            unknown = sorted(robe_set - set(names))
            if unknown:
                raise ValueError(f"RobeHybridEmbeddingBagCollection: robe_tables {unknown} are not among the tables {names}")
        self._embedding_bag_configs = list(tables)
        self._is_weighted = is_weighted
        robe_cfgs = [t for t in tables if t.name in robe_set]
        full_cfgs = [t for t in tables if t.name not in robe_set]
        self._robe_tables, self._full_tables = robe_cfgs, full_cfgs
        if hot_ids and any(len(v) for v in hot_ids.values()):
            if is_weighted:
                raise ValueError("RobeHybridEmbeddingBagCollection: hot_ids with weighted features (is_weighted=True) are not supported")
            mean = [t.name for t in robe_cfgs if t.pooling != PoolingType.SUM]
            if mean:
                raise ValueError(f"RobeHybridEmbeddingBagCollection: hot_ids need every ROBE table SUM-pooled (the array is "
                                 f"read with per-sample weights); {mean} are not")  # fmt: skip
        else:
            hot_ids = None
        self.robe: Optional[RobeEmbeddingBagCollection] = (
            RobeEmbeddingBagCollection(robe_cfgs, robe, device=device, is_weighted=is_weighted or bool(hot_ids))
            if robe_cfgs
            else None
        )
        self.full: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(full_cfgs, is_weighted=is_weighted, device=device) if full_cfgs else None
        )

        # output layout: global embedding names (a feature read by several tables is
        # "feature@table") in table order, each taken by name from its child, where it may be
        # named differently (a feature shared only within the other child is plain "feature")
        global_names = get_embedding_names_by_table(tables)
        child_names = {
            t.name: n
            for cfgs in (robe_cfgs, full_cfgs)
            if cfgs
            for t, n in zip(cfgs, get_embedding_names_by_table(cfgs))
        }
        present = [c for c, cfgs in enumerate((robe_cfgs, full_cfgs)) if cfgs]
        position = {c: i for i, c in enumerate(present)}
        self._sources: List[_Source] = [
            (position[0 if t.name in robe_set else 1], local)
            for t, t_names in zip(tables, global_names)
            for local in child_names[t.name]
        ]
        self._keys: List[str] = [n for t_names in global_names for n in t_names]
        self._length_per_key: List[int] = [t.embedding_dim for t, t_names in zip(tables, global_names) for _ in t_names]
        self._has_robe = self.robe is not None
        self._has_full = self.full is not None
        self.hot: Optional[EmbeddingBagCollection] = None
        self.hot_router: Optional[HotIdRouter] = None
        self._hot_tables: List[EmbeddingBagConfig] = []
        if hot_ids:
            self._init_hot(hot_ids, tables, robe_cfgs, device)

    def _init_hot(self, hot_ids: Dict[str, Sequence[int]], tables: List[EmbeddingBagConfig],
                  robe_cfgs: List[EmbeddingBagConfig], device) -> None:  # fmt: skip
        """The exact tables of the hot ids and the buffers that route ids to them (``_split_hot``)."""
        by_name = {t.name: t for t in robe_cfgs}
        unknown = sorted(set(hot_ids) - set(by_name))
        if unknown:
            raise ValueError(f"RobeHybridEmbeddingBagCollection: hot_ids names {unknown}, which are not ROBE tables "
                             f"({sorted(by_name)})")  # fmt: skip
        keys, base, rows, slot_of = [], [], [], {}
        for name in [t.name for t in robe_cfgs if t.name in hot_ids]:
            t = by_name[name]
            ids = torch.as_tensor(list(hot_ids[name]), dtype=torch.long, device="cpu").unique()  # sorted
            if ids.numel() == 0:
                continue
            if int(ids.min()) < 0 or int(ids.max()) >= 1 << HOT_ID_BITS:
                raise ValueError(f"RobeHybridEmbeddingBagCollection: hot_ids of table {name!r} must lie in "
                                 f"[0, 2**{HOT_ID_BITS}), got [{int(ids.min())}, {int(ids.max())}]")  # fmt: skip
            if len(t.feature_names) != 1:
                raise ValueError(f"RobeHybridEmbeddingBagCollection: table {name!r} with hot_ids must read one feature")
            # (the array skips hot ids through per-sample weights, which belong to the feature's
            # values: another ROBE table reading them would lose those ids' embeddings silently)
            sharing = [o.name for o in robe_cfgs if o.name != name and t.feature_names[0] in o.feature_names]
            if sharing:
                raise ValueError(f"RobeHybridEmbeddingBagCollection: table {name!r} with hot_ids reads feature "
                                 f"{t.feature_names[0]!r}, which the ROBE tables {sharing} read too; hot ids need a "
                                 "feature of their own among the ROBE tables (a full table may share it)")  # fmt: skip
            slot = len(rows)
            slot_of[t.feature_names[0]] = slot
            base.append(sum(len(k) for k in keys))
            keys.append((slot << HOT_ID_BITS) | ids)
            rows.append(ids.numel())
            self._hot_tables.append(
                EmbeddingBagConfig(name=name + HOT_SUFFIX, embedding_dim=t.embedding_dim, num_embeddings=ids.numel() + 1,
                                   feature_names=list(t.feature_names), pooling=PoolingType.SUM)  # fmt: skip
            )
        if not self._hot_tables:
            return
        on = device if device is not None and device.type != "meta" else "cpu"  # routing needs the ids, even on meta
        self.hot_router = HotIdRouter(torch.cat(keys).to(on), torch.tensor(base, dtype=torch.long, device=on),
                                      torch.tensor(rows, dtype=torch.long, device=on), slot_of)  # fmt: skip
        self.hot = EmbeddingBagCollection(self._hot_tables, device=device)
        # the output columns of every hot table's base table, in the hot child's table order
        start = dict(zip(self._keys, itertools.accumulate([0] + self._length_per_key)))
        output_name = {t.name: names[0] for t, names in zip(tables, get_embedding_names_by_table(tables))}
        self._hot_order = [t.feature_names[0] for t in self._hot_tables]  # the hot child's embedding names
        cols = [torch.arange(c, c + t.embedding_dim, device="cpu")
                for t in self._hot_tables for c in [start[output_name[t.name[: -len(HOT_SUFFIX)]]]]]  # fmt: skip
        self.register_buffer("hot_columns", torch.cat(cols).to(on), persistent=False)
        self._hot_columns = torch.cat(cols)  # (a CPU copy: the buffer is derived, not saved)
        self._register_load_state_dict_pre_hook(self._remake_hot_columns, with_module=False)

    def _remake_hot_columns(self, *args) -> None:
        """``hot_columns`` made anew at every load: after ``to_empty()`` it holds arbitrary memory,
        which no checkpoint restores (the ROBE child refuses its forward until then)."""
        device = self.hot_columns.device
        if device.type != "meta":
            self.hot_columns = self._hot_columns.to(device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of all tables: KeyedTensor ``[B, sum of dims]`` in table order."""
        features = as_kjt(features)
        pooled = []
        hot_input = None
        robe_input = features
        if self.hot is not None:
            robe_input, hot_input = self.hot_router(features)
        if self._has_robe:
            pooled.append(self.robe(robe_input))
        if self._has_full:
            pooled.append(self.full(features))
        merged = _merge_pooled(pooled, self._sources, self._keys, self._length_per_key)
        if hot_input is not None:
            merged = _add_hot(merged, self.hot(hot_input), self.hot_columns, self._hot_order)
        return merged

    def reset_parameters(self) -> None:
        """Every child's ``reset_parameters()`` and the routing buffers as built: after
        ``to_empty(device=...)`` of a collection built on ``meta``, the collection built there."""
        for child in (self.robe, self.full, self.hot, self.hot_router):
            if child is not None:
                child.reset_parameters()
        if self.hot is not None:
            self._remake_hot_columns()

    @property
    def device(self) -> torch.device:
        """The device of the children's parameters (the ROBE array's where there is one)."""
        return next(self.parameters()).device

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def robe_table_names(self) -> List[str]:
        # fixed at construction: once DMP shards the children they no longer list their configs
        return [t.name for t in self._robe_tables]

    @property
    def full_table_names(self) -> List[str]:
        return [t.name for t in self._full_tables]

    @property
    def hot_table_names(self) -> List[str]:
        """``t@hot`` for every ROBE table with exact rows for its hot ids."""
        return [t.name for t in self._hot_tables]

    def extra_repr(self) -> str:
        hot = f", hot_tables={self.hot_table_names}" if self._hot_tables else ""
        return f"robe_tables={self.robe_table_names}, full_tables={self.full_table_names}{hot}"
