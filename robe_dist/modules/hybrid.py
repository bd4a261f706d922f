"""RobeHybridEmbeddingBagCollection: some tables in a ROBE array, the others as full tables."""

from __future__ import annotations

from typing import Collection, List, Optional, Tuple, Union

import torch
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_dist.config import RobeConfig
from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

# (child index, the child's own embedding name) of each output embedding, in output order
_Source = Tuple[int, str]


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
        device (Optional[torch.device]): device of both children (``"meta"`` allowed).
        is_weighted (bool): the features carry per-sample weights.

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
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        robe: RobeConfig,
        robe_tables: Optional[Collection[str]] = None,
        max_full_rows: Optional[int] = None,
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("RobeHybridEmbeddingBagCollection needs at least one EmbeddingBagConfig")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"RobeHybridEmbeddingBagCollection: table names must be unique, got {names}")
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
        self.robe: Optional[RobeEmbeddingBagCollection] = (
            RobeEmbeddingBagCollection(robe_cfgs, robe, device=device, is_weighted=is_weighted) if robe_cfgs else None
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

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of all tables: KeyedTensor ``[B, sum of dims]`` in table order."""
        pooled = []
        if self._has_robe:
            pooled.append(self.robe(features))
        if self._has_full:
            pooled.append(self.full(features))
        return _merge_pooled(pooled, self._sources, self._keys, self._length_per_key)

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

    def extra_repr(self) -> str:
        return f"robe_tables={self.robe_table_names}, full_tables={self.full_table_names}"
