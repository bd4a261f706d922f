"""QREmbeddingBagCollection: compositional (quotient-remainder) embeddings as a TorchRec collection.

Shi, Mudigere, Naumov, Yang, "Compositional Embeddings Using Complementary Partitions for
Memory-Efficient Recommendation Systems" (KDD 2020): a table of ``n`` rows is replaced by a
quotient table of ``ceil(n / c)`` rows and a remainder table of ``c`` rows; id ``i`` reads row
``i // c`` of the first and ``i % c`` of the second, and the two pooled bags are combined
(``mult``: element-wise product, the paper's best; ``add``). Every id keeps a distinct pair of
rows, with ``ceil(n / c) + c`` rows instead of ``n``. robe_dist uses it as a baseline: the
comparison (``robe-compare``) trains it at the same memory as the ROBE array and the hashing trick.
"""

from __future__ import annotations

import math
from typing import List, Literal, Optional, Sequence, Tuple, Union

import torch
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

Operation = Literal["mult", "add"]


def qr_collisions(num_embeddings: int, max_rows: int) -> Optional[int]:
    """The remainder table's size ``c`` for a table of ``num_embeddings`` ids to take at most
    ``max_rows`` rows: ``None`` when the table already fits (kept whole), else the smallest ``c``
    with ``ceil(n / c) + c <= max_rows`` (the largest quotient table: fewest ids share a row).

    Raises:
        ValueError: no ``c`` fits (``max_rows < 2 ceil(sqrt(n))`` or so: a two-way split of
            ``n`` ids needs about ``2 sqrt(n)`` rows).
    """
    n = int(num_embeddings)
    if n <= max_rows:
        return None
    best = math.isqrt(n - 1) + 1  # ceil(sqrt(n)) minimises ceil(n/c) + c
    if math.ceil(n / best) + best > max_rows:
        raise ValueError(
            f"a quotient-remainder split of {n:,} ids needs at least {math.ceil(n / best) + best:,} rows, "
            f"more than the {max_rows:,} allowed"
        )
    lo, hi = 2, best  # ceil(n/c) + c decreases on [2, sqrt(n)]: bisect the smallest c that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if math.ceil(n / mid) + mid <= max_rows:
            hi = mid
        else:
            lo = mid + 1
    return lo


def qr_rows(num_embeddings: int, max_rows: int) -> int:
    """Rows (quotient + remainder, or the whole table) that ``qr_collisions`` leads to."""
    c = qr_collisions(num_embeddings, max_rows)
    return int(num_embeddings) if c is None else math.ceil(num_embeddings / c) + c


@torch.fx.wrap
def _split_ids(
    features: KeyedJaggedTensor, keys: List[str], collisions: List[int], out_keys: List[str], weighted: bool,
    tables: List[str], sizes: List[int],
) -> KeyedJaggedTensor:
    """The inner collection's input: per table feature ``f`` with ``c > 0``, ``f@q`` (ids // c)
    and ``f@r`` (ids % c); ``f`` itself where ``c == 0``. ``torch.fx.wrap``-ed: one call in a trace.
    On CPU, ids outside ``[0, num_embeddings)`` are refused, naming the table (a split table would
    read the quotient table's last row for ids up to ``ceil(n / c) * c``)."""
    jts = features.to_dict()
    values, lengths, weights = [], [], []
    for key, c, table, n in zip(keys, collisions, tables, sizes):
        jt = jts[key]
        v, length = jt.values(), jt.lengths()
        if not torch.compiler.is_compiling() and v.device.type == "cpu" and v.numel():  # (numel: a guard under export)
            lo, hi = (int(x) for x in v.aminmax())
            if lo < 0 or hi >= n:
                raise ValueError(f"QREmbeddingBagCollection: ids of feature {key!r} (table {table!r}) must lie in "
                                 f"[0, {n}), got [{lo}, {hi}]")  # fmt: skip
        parts = [v] if c == 0 else [torch.div(v, c, rounding_mode="floor"), torch.remainder(v, c)]
        for part in parts:
            values.append(part)
            lengths.append(length)
            if weighted:
                weights.append(jt.weights())
    return KeyedJaggedTensor.from_lengths_sync(
        keys=out_keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weighted else None,
    )


@torch.fx.wrap
def _combine(
    pooled: Union[KeyedTensor, Awaitable[KeyedTensor]],
    plan: List[Tuple[str, str]],
    keys: List[str],
    length_per_key: List[int],
    operation: str,
) -> KeyedTensor:
    """The output KeyedTensor: per table, ``q * r`` (or ``q + r``) of its two inner embeddings
    (``plan``: their names, the second ``""`` for a whole table), found by name (a sharded inner
    collection may order its embeddings by sharding type)."""
    if isinstance(pooled, Awaitable):  # a sharded inner collection returns LazyAwaitable[KeyedTensor]
        pooled = pooled.wait()
    values, offsets = pooled.values(), pooled.offset_per_key()
    where = {k: (offsets[i], offsets[i + 1]) for i, k in enumerate(pooled.keys())}
    cols = []
    for first, second in plan:
        a, b = where[first]
        x = values[:, a:b]
        if second:
            c, d = where[second]
            y = values[:, c:d]
            x = x * y if operation == "mult" else x + y
        cols.append(x)
    return KeyedTensor(keys=keys, length_per_key=length_per_key, values=torch.cat(cols, dim=1))


class QREmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Quotient-remainder compositional embeddings, a drop-in for ``EmbeddingBagCollection``.

    Every table with more than ``max_rows`` rows becomes a quotient table (``t@q``,
    ``ceil(n / c)`` rows, feature ``f@q``) and a remainder table (``t@r``, ``c`` rows, feature
    ``f@r``), with ``c = qr_collisions(n, max_rows)``; smaller tables stay whole. All of them live
    in one inner ``EmbeddingBagCollection`` (child ``ebc``), which ``DistributedModelParallel``
    shards with TorchRec's own sharders (table-wise, row-wise, ...). As in the authors' reference
    implementation (facebookresearch/dlrm ``QREmbeddingBag``), each bag is pooled in both tables and
    the two pooled vectors are combined, and both tables start uniform in ``[sqrt(1/n), 1]``.

    The split runs in the forward (``torch.fx.wrap``-ed), so TorchRec's train pipelines cannot
    start the inner collection's input all-to-all ahead of the forward: it runs inside the
    forward, unpipelined (TorchRec logs that it cannot pipeline the module).

    Args:
        tables (List[EmbeddingBagConfig]): one feature each, SUM or MEAN pooling.
        max_rows (int): tables with more rows are split (each takes at most ``max_rows`` rows).
        operation (str): ``mult`` (default) or ``add``.
        device (Optional[torch.device]): ``"meta"`` lets DMP materialise only each rank's shards.
        is_weighted (bool): the features carry per-sample weights.

    Call args:
        features (KeyedJaggedTensor): ids ``0 <= id < num_embeddings`` of every table's feature.

    Returns:
        KeyedTensor: ``[B, sum of embedding dims]``, keys in ``tables`` order, as an
        ``EmbeddingBagCollection`` of ``tables`` returns.

    Example::

        tables = [EmbeddingBagConfig(name="t_user", embedding_dim=16, num_embeddings=1_000_000, feature_names=["user"])]
        qr = QREmbeddingBagCollection(tables, max_rows=2000)   # 1M ids -> 1000 + 1000 rows
        qr(kjt).values().shape                                   # [B, 16]
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        max_rows: int,
        operation: Operation = "mult",
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        if operation not in ("mult", "add"):
            raise ValueError(f"QREmbeddingBagCollection: operation must be 'mult' or 'add', got {operation!r}")
        if max_rows < 1:
            raise ValueError(f"QREmbeddingBagCollection: max_rows must be >= 1, got {max_rows}")
        inner: List[EmbeddingBagConfig] = []
        self._keys: List[str] = []
        self._collisions: List[int] = []
        self._inner_keys: List[str] = []
        plan: List[Tuple[str, str]] = []
        for t in tables:
            if len(t.feature_names) != 1:
                raise ValueError(f"QREmbeddingBagCollection: table {t.name} must have exactly one feature, has {t.feature_names}")
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"QREmbeddingBagCollection: table {t.name}: pooling must be SUM or MEAN, got {t.pooling}")
            f, n, d = t.feature_names[0], t.num_embeddings, t.embedding_dim
            try:
                c = qr_collisions(n, max_rows)
            except ValueError as e:
                raise ValueError(f"QREmbeddingBagCollection: table {t.name}: {e}") from None
            self._keys.append(f)
            self._collisions.append(c or 0)
            if c is None:
                inner.append(t)
                self._inner_keys.append(f)
                plan.append((f, ""))
                continue
            lo = math.sqrt(1.0 / n)
            for part, rows in (("q", math.ceil(n / c)), ("r", c)):
                inner.append(
                    EmbeddingBagConfig(
                        name=f"{t.name}@{part}", embedding_dim=d, num_embeddings=rows, feature_names=[f"{f}@{part}"],
                        pooling=t.pooling, weight_init_min=lo, weight_init_max=1.0,
                    )  # fmt: skip
                )
                self._inner_keys.append(f"{f}@{part}")
            plan.append((f"{f}@q", f"{f}@r"))
        self._plan = plan
        self._operation = operation
        self._length_per_key = [t.embedding_dim for t in tables]
        self._embedding_bag_configs = list(tables)
        # (plain lists for _split_ids: FX records no EmbeddingBagConfig as an argument)
        self._table_names = [t.name for t in tables]
        self._table_sizes = [t.num_embeddings for t in tables]
        self._is_weighted = is_weighted
        self.max_rows = max_rows
        self.ebc = EmbeddingBagCollection(inner, is_weighted=is_weighted, device=device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings ``[B, sum of dims]`` in table order."""
        inner = _split_ids(features, self._keys, self._collisions, self._inner_keys, self._is_weighted,
                           self._table_names, self._table_sizes)  # fmt: skip
        return _combine(self.ebc(inner), self._plan, self._keys, self._length_per_key, self._operation)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def num_rows(self) -> int:
        """Rows of all inner tables (the memory: ``num_rows() * dim`` floats)."""
        return sum(qr_rows(t.num_embeddings, self.max_rows) for t in self._embedding_bag_configs)

    def extra_repr(self) -> str:
        split = [f"{k}:c={c}" for k, c in zip(self._keys, self._collisions) if c]
        return f"max_rows={self.max_rows}, operation={self._operation}, split=[{', '.join(split)}]"


def qr_max_rows_for_budget(sizes: Sequence[int], dim: int, budget_floats: int) -> int:
    """The largest ``max_rows`` whose quotient-remainder tables take at most ``budget_floats``.

    Raises:
        ValueError: even the smallest split (about ``2 sqrt(n)`` rows per table) is too large.
    """
    def floats(m: int) -> Optional[int]:
        try:
            return sum(qr_rows(n, m) for n in sizes) * dim
        except ValueError:
            return None

    # both feasibility and size grow with m: bisect the largest m that is infeasible or fits,
    # then it must also be feasible (else every smaller m is infeasible too)
    lo, hi = 1, max(sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        f = floats(mid)
        if f is None or f <= budget_floats:
            lo = mid
        else:
            hi = mid - 1
    if floats(lo) is None or floats(lo) > budget_floats:
        # the smallest cap every table can meet: the largest of the tables' smallest splits
        floor = max(min(int(n), math.ceil(n / (math.isqrt(n - 1) + 1)) + math.isqrt(n - 1) + 1) for n in sizes)
        raise ValueError(
            f"quotient-remainder embeddings cannot fit {budget_floats:,} floats: the smallest split of these tables "
            f"(every table at most {floor:,} rows) takes {floats(floor):,}"
        )
    return lo
