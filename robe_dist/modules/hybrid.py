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

# (child index, first column, last column + 1) of a run of output columns, in output order
_Slice = Tuple[int, int, int]


@torch.fx.wrap
def _merge_pooled(
    pooled: List[Union[KeyedTensor, Awaitable[KeyedTensor]]],
    slices: List[_Slice],
    keys: List[str],
    length_per_key: List[int],
) -> KeyedTensor:
    """One KeyedTensor from the children's: columns ``pooled[c].values()[:, a:b]`` in ``slices`` order.

    ``torch.fx.wrap``-ed: TorchRec's pipelines trace the model and see this as one call.
    """
    values = []
    for kt in pooled:
        if isinstance(kt, Awaitable):  # a sharded child returns LazyAwaitable[KeyedTensor]
            kt = kt.wait()
        values.append(kt.values())
    if len(slices) == 1:
        c, a, b = slices[0]
        merged = values[c] if (a == 0 and b == values[c].shape[1]) else values[c][:, a:b]
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

        # output layout: global embedding names (shared features are "feature@table") in table
        # order, and where each one's columns lie in the children's outputs
        global_names = get_embedding_names_by_table(tables)
        col = {0: 0, 1: 0}  # running column per child (0: robe, 1: full)
        pieces: List[_Slice] = []
        for t, t_names in zip(tables, global_names):
            c = 0 if t.name in robe_set else 1
            for _ in t_names:
                pieces.append((c, col[c], col[c] + t.embedding_dim))
                col[c] += t.embedding_dim
        present = [c for c in (0, 1) if col[c] > 0]
        position = {c: i for i, c in enumerate(present)}
        slices: List[_Slice] = []
        for c, a, b in pieces:  # merge contiguous runs of one child
            i = position[c]
            if slices and slices[-1][0] == i and slices[-1][2] == a:
                slices[-1] = (i, slices[-1][1], b)
            else:
                slices.append((i, a, b))
        self._slices: List[_Slice] = slices
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
        return _merge_pooled(pooled, self._slices, self._keys, self._length_per_key)

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
