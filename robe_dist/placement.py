"""Give it a memory budget, get a placement: which tables keep full rows, how large the ROBE array is.

``plan_placement(tables, budget, stats)`` decides, for every table, *full* (an ordinary table of
``num_embeddings x dim`` floats: exact rows) or *ROBE* (a share of one array; with
``hot_rows=True`` also exact rows for its hottest ids), and sizes the array with the bytes the full
tables and exact rows leave. The rule minimises a model of the error that collisions put
into the embeddings, measured against the training split's id statistics
(``robe_dist.data.stats``; without them every table's ids are taken as equally frequent):

* In the array, an element of id ``x`` (seen ``c_x`` times) shares its slot with an element of
  another active id ``y`` with probability ``d_y / m`` (``d`` the dim, ``m`` the array size), and a
  shared slot learns the count-weighted average of the two: against ``y``, ``x`` holds the weight
  ``s = c_y / (c_x + c_y)`` of foreign signal. The targets of unrelated ids are independent, so
  much of that foreign signal cancels out over many colliders: only the share ``gamma`` of it
  remains as error (``COLLISION_WEIGHT``, 0.5, measured). Summed over the array's ids, ``x``
  expects ``lambda_x = gamma * sum_y d_y c_y / (c_x + c_y) / m`` of error against its own 1, so it
  keeps ``1 / (1 + lambda_x)`` of its slots; weighted by how often it is seen, the expected loss is

      E = sum over the array's ids x of  c_x * lambda_x / (1 + lambda_x).

  ``gamma`` and the form ``lambda / (1 + lambda)`` (rather than ``1 - exp(-lambda)``) are what
  trained best on the project's synthetic benchmarks (docs/placement.md): with ``gamma = 1`` the
  planner moved small tables out of arrays of a few thousand floats, which then trained worse than
  the array alone.

  Hot ids colliding with rare ones hardly notice (``c_y / (c_x + c_y)`` is small), rare ids are
  lost anyway; pairs of frequent ids are what hurts. That is why the small tables of a DLRM (few
  ids, each seen very often) lose most in a shared array and cost least as full tables.
* Full tables have no collisions but cost ``num_embeddings x dim`` floats of the budget, which
  shrinks ``m`` and raises ``E`` for the tables left in the array.

* Exact rows for hot ids: a table can also stay in the array but give its most frequent ids rows
  of their own (``hot_rows``; the ids from ``TableStats.top_ids``), at one row per id plus a tail
  row. Those ids leave the array: they no longer lose signal, nor take it from the others. Within
  a large Zipf-like table the hottest ids are few and carry much of its mass, so a few hundred rows
  remove most of the worst collisions (hot with hot). The model prices no cost for an exact row
  (a rarely seen id's row is a noisy estimate that a shared slot regularises), and measured on
  synthetic data it overspends on them: off by default (docs/placement.md).

Greedy: starting from every table in the array, the move that lowers ``E`` the most per float is
taken, until nothing fits: a whole table to full rows, or the next power-of-two count bin of a
table's hottest ids to exact rows; the best placement seen on the way wins (it can be the start:
everything in the array). Ids are grouped in power-of-two count bins per table (``TableStats``),
every move changes ``lambda`` of all bins by one precomputed column, and all candidates of a step
are scored at once, so planning 26 tables takes milliseconds.

Example::

    placement = plan_placement(tables, "100x", stats=read_table_stats("data/criteo_vocab"))
    print(placement.describe())
    ebc = placement.build_collection(tables)     # RobeHybridEmbeddingBagCollection / ...
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import numpy as np
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from robe_dist.data.stats import TableStats

if TYPE_CHECKING:
    from robe_dist.config import RobeConfig

class PlacementError(ValueError):
    """A budget and tables (or statistics) that admit no placement; the message says why."""


BYTES_PER_FLOAT = 4
COLLISION_WEIGHT = 0.5
"""``gamma`` of the module doc: the share of a collision's foreign signal that stays as error."""
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Budget:
    """Memory for the embeddings: ``bytes`` (float32 tables and array), or a compression ``ratio``
    against the full tables (``100`` = a hundredth of their bytes). Optimiser state is not included.

    Example::

        Budget.parse("100x")      # Budget(ratio=100.0)
        Budget.parse("64MiB")     # Budget(bytes=67108864)
        Budget.parse(10**9)       # Budget(bytes=1000000000)
    """

    bytes: Optional[int] = None
    ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.ratio is None):
            raise ValueError("robe.budget: give bytes or a compression ratio, not both")
        if self.bytes is not None and not self.bytes > 0:
            raise ValueError(f"robe.budget must be a positive number of bytes, got {self.bytes}")
        if self.ratio is not None and not (self.ratio > 0 and math.isfinite(self.ratio)):
            raise ValueError(f"robe.budget must be a positive compression ratio such as '100x', got {self.ratio}x")

    @classmethod
    def parse(cls, value: Union[str, int, float, "Budget"], field: str = "robe.budget") -> "Budget":
        """``"100x"`` (compression ratio), ``"64MB"`` / ``"1.5GiB"`` / ``"4096"`` / ``4096`` (bytes).
        Errors name ``field`` (``--budget`` on a command line) and the value as given."""
        if isinstance(value, Budget):
            return value
        kinds = "bytes (e.g. 64MB, 1.5GiB, 4096) or a ratio (e.g. 100x)"
        if isinstance(value, bool):
            raise ValueError(f"{field} must be {kinds}, got {value!r}")
        if isinstance(value, int):
            if not value > 0:
                raise ValueError(f"{field} must be a positive whole number of bytes, got {value!r}")
            return cls(bytes=value)
        if isinstance(value, float):
            if not (value > 0 and math.isfinite(value) and value.is_integer()):
                raise ValueError(f"{field} must be a positive whole number of bytes, got {value!r}")
            return cls(bytes=int(value))
        text = str(value).strip().lower().replace("_", "").replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(x|[kmgt]i?b|b)?", text)
        if not m:
            raise ValueError(f"{field} must be {kinds}, got {value!r}")
        number, unit = float(m.group(1)), m.group(2) or ""
        total = number if unit == "x" else number * _UNITS[unit]
        if not math.isfinite(total):
            raise ValueError(f"{field} must be a finite number, got {value!r}")
        if unit == "x":
            if not number > 0:
                raise ValueError(f"{field} must be a positive compression ratio such as '100x', got {value!r}")
            return cls(ratio=number)
        if not total >= 1:
            raise ValueError(f"{field} must be at least 1 byte, got {value!r}")
        return cls(bytes=int(total))

    def floats(self, full_floats: int) -> int:
        """The budget in float32 elements, given the full tables' elements."""
        if self.bytes is not None:
            return self.bytes // BYTES_PER_FLOAT
        return int(full_floats / self.ratio)

    def __str__(self) -> str:
        return f"{self.ratio:g}x" if self.ratio is not None else f"{self.bytes:,} bytes"


def hashing_trick_sizes(sizes: Sequence[int], dim: int, budget_floats: int) -> List[int]:
    """The hashing trick as DLRM and TorchRec apply it at equal memory: every table capped at
    ``M`` rows (ids taken ``% M``; tables smaller than ``M`` kept whole), ``M`` the largest cap
    whose tables take at most ``budget_floats`` floats of width ``dim``.

    Raises:
        PlacementError: even one row per table does not fit.
    """
    if len(sizes) * dim > budget_floats:
        raise PlacementError(
            f"the hashing trick needs at least one row per table ({len(sizes)} x {dim} = {len(sizes) * dim:,} floats); "
            f"the budget is {budget_floats:,} floats"
        )
    lo, hi = 1, max(sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in sizes) * dim <= budget_floats:
            lo = mid
        else:
            hi = mid - 1
    return [min(int(n), lo) for n in sizes]


@dataclass
class TableChoice:
    """Where one table goes."""

    name: str
    features: List[str]
    rows: int
    dim: int
    placement: str
    """``"full"`` or ``"robe"``."""
    bytes: int
    """Bytes of its full table (``"full"``), or of its exact rows (``"robe"``; its share of the
    array is not separable)."""
    distinct: Optional[int]
    """Distinct ids seen in the training split (``None`` without statistics)."""
    occurrence_share: float
    """Its share of all id occurrences (``1 / tables`` without statistics)."""
    expected_error: float
    """Its part of ``E`` relative to its occurrences (0 for full tables): the expected fraction of
    its signal lost to collisions in the model above."""
    hot_rows: int = 0
    """``"robe"`` tables: ids with exact rows (its most frequent; ``bytes`` counts them and the
    tail row), the others in the array."""


@dataclass
class Placement:
    """A planned split of tables between full rows and one ROBE array."""

    budget: Budget
    budget_bytes: int
    full_table_bytes: int
    """Bytes of every table as a full table (the compression's reference)."""
    tables: List[TableChoice]
    array_size: int
    """Elements of the ROBE array (0: no table in it)."""
    block_size: int
    expected_error: float
    """``E`` over all occurrences (0: no collisions)."""
    load: float
    """Active elements per array slot: distinct ids in the array x dim / array size."""
    used_stats: bool
    notes: List[str] = field(default_factory=list)
    hot_ids: Dict[str, np.ndarray] = field(default_factory=dict)
    """The ids with exact rows of each ``"robe"`` table that has any (``RobeHybridEmbeddingBagCollection``'s ``hot_ids``)."""

    @property
    def full_tables(self) -> List[str]:
        return [t.name for t in self.tables if t.placement == "full"]

    @property
    def robe_tables(self) -> List[str]:
        return [t.name for t in self.tables if t.placement == "robe"]

    @property
    def used_bytes(self) -> int:
        return sum(t.bytes for t in self.tables) + self.array_size * BYTES_PER_FLOAT

    @property
    def compression(self) -> float:
        return self.full_table_bytes / max(self.used_bytes, 1)

    @property
    def collision_probability(self) -> float:
        """Probability that an element of an id in the array shares its slot with another id's."""
        return 1.0 - math.exp(-self.load) if self.array_size else 0.0

    def describe(self) -> str:
        """The decision, as printed by the trainer and ``robe-data plan``."""
        lines = [
            f"placement for budget {self.budget} = {self.budget_bytes:,} bytes (full tables: {self.full_table_bytes:,} bytes): "
            f"{len(self.full_tables)} full tables ({sum(t.bytes for t in self.tables if t.placement == 'full'):,} bytes) + "
            + (f"exact rows for {sum(t.hot_rows for t in self.tables):,} hot ids of {len(self.hot_ids)} tables "
               f"({sum(t.bytes for t in self.tables if t.placement == 'robe'):,} bytes) + " if self.hot_ids else "")
            + f"ROBE array of "
            f"{self.array_size:,} floats ({self.array_size * BYTES_PER_FLOAT:,} bytes, Z={self.block_size}) for "
            f"{len(self.robe_tables)} tables; {self.compression:,.1f}x smaller than the full tables",
        ]
        if self.array_size:
            lines.append(
                f"  array load {self.load:.3g} active elements per slot, collision probability {self.collision_probability:.1%}, "
                f"expected signal lost to collisions {self.expected_error:.2%} of all occurrences"
                + ("" if self.used_stats else " (no id statistics: ids taken as uniform over each table)")
            )
        lines.append(f"  {'table':<14} {'place':<5} {'rows':>12} {'distinct':>10} {'occ.':>6} {'exact':>8} {'bytes':>14} {'lost':>7}")
        for t in self.tables:
            distinct = f"{t.distinct:,}" if t.distinct is not None else "-"
            lost = f"{t.expected_error:.1%}" if t.placement == "robe" else "-"
            exact = f"{t.rows:,}" if t.placement == "full" else f"{t.hot_rows:,}"
            lines.append(
                f"  {t.name:<14} {t.placement:<5} {t.rows:>12,} {distinct:>10} {t.occurrence_share:>6.1%} {exact:>8} "
                f"{t.bytes:>14,} {lost:>7}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def robe_config(self, **kwargs) -> "RobeConfig":
        """The ROBE array's ``RobeConfig`` (``kwargs``: hash, seed, init_scale)."""
        from robe_dist.config import RobeConfig

        if not self.array_size:
            raise ValueError("this placement has no ROBE array (every table is full)")
        return RobeConfig(array_size=self.array_size, block_size=self.block_size, **kwargs)

    def build_collection(self, tables: Sequence[EmbeddingBagConfig], device=None, **robe_kwargs):
        """The embedding collection of this placement over ``tables``: a
        ``RobeEmbeddingBagCollection`` (all in the array), a ``torchrec.EmbeddingBagCollection``
        (all full) or a ``RobeHybridEmbeddingBagCollection`` (both)."""
        from torchrec import EmbeddingBagCollection

        from robe_dist.modules import RobeEmbeddingBagCollection, RobeHybridEmbeddingBagCollection

        if sorted(t.name for t in tables) != sorted(t.name for t in self.tables):
            raise ValueError("build_collection: the tables are not the ones this placement was planned for")
        if not self.robe_tables:
            return EmbeddingBagCollection(tables=list(tables), device=device)
        if not self.full_tables and not self.hot_ids:
            return RobeEmbeddingBagCollection(list(tables), self.robe_config(**robe_kwargs), device=device)
        return RobeHybridEmbeddingBagCollection(
            list(tables), self.robe_config(**robe_kwargs), robe_tables=self.robe_tables, device=device,
            hot_ids={k: v.tolist() for k, v in self.hot_ids.items()} or None,
        )  # fmt: skip

    def to_dict(self) -> Dict:
        return {
            "budget": str(self.budget), "budget_bytes": self.budget_bytes, "full_table_bytes": self.full_table_bytes,
            "used_bytes": self.used_bytes, "compression": round(self.compression, 3), "array_size": self.array_size,
            "block_size": self.block_size, "full_tables": self.full_tables, "robe_tables": self.robe_tables,
            "hot_rows": {k: len(v) for k, v in self.hot_ids.items()},
            "expected_error": self.expected_error, "load": self.load, "collision_probability": self.collision_probability,
            "used_stats": self.used_stats, "notes": self.notes,
        }  # fmt: skip


class _ErrorModel:
    """``E`` of the module doc for any set of count bins in the array and any array size.

    Bins, not tables, are the unit: a table in the array contributes all its bins but those whose
    ids have exact rows (its hottest, ``cut``)."""

    def __init__(self, ids: List[np.ndarray], counts: List[np.ndarray], dims: np.ndarray) -> None:
        self.owner = np.repeat(np.arange(len(ids)), [len(a) for a in ids])
        self.n = np.concatenate(ids)
        self.c = np.concatenate(counts)
        self.d = dims[self.owner]
        # w[k, j] = c_j / (c_k + c_j) * n_j * d_j: an id of bin k's collisions with bin j, times m
        share = self.c[None, :] / (self.c[:, None] + self.c[None, :])
        self.w = share * (self.n * self.d)[None, :]
        self.mass = self.n * self.c
        self.onehot = np.zeros((len(self.n), len(ids)), dtype=bool)  # [bins, tables]: bin k of table t
        self.onehot[np.arange(len(self.n)), self.owner] = True
        # the bins of each table, hottest first (a cut of k takes the table's first k)
        self.hottest = [np.flatnonzero(self.owner == t)[np.argsort(-self.c[self.owner == t], kind="stable")]
                        for t in range(len(ids))]  # fmt: skip

    def inside(self, robe: np.ndarray, cut: Optional[np.ndarray] = None) -> np.ndarray:
        """Bins in the array: those of ``robe`` tables, less each table's ``cut`` hottest."""
        inside = robe[self.owner].copy()
        if cut is not None:
            for t in np.flatnonzero(cut):
                inside[self.hottest[t][: cut[t]]] = False
        return inside

    def sums(self, inside: np.ndarray) -> np.ndarray:
        """``m * lambda_k / gamma`` of every bin (an id does not collide with itself)."""
        return self.w[:, inside].sum(axis=1) - 0.5 * self.d

    def bin_loss(self, inside: np.ndarray, sums: np.ndarray, m) -> np.ndarray:
        """Expected lost occurrences of every bin (0 outside the array) for an array of ``m``
        floats; with ``[bins, candidates]`` arguments and ``m`` per candidate, of each candidate."""
        lam = COLLISION_WEIGHT * np.maximum(sums / np.maximum(m, 1e-300), 0.0)
        mass = self.mass if sums.ndim == 1 else self.mass[:, None]
        return np.where(inside, mass * lam / (1.0 + lam), 0.0)

    def total(self, inside: np.ndarray, sums: np.ndarray, m: float) -> float:
        """``E`` of the bins ``inside`` an array of ``m`` floats, given their ``sums``."""
        return float(self.bin_loss(inside, sums, m).sum()) if m > 0 else 0.0

    def lost(self, robe: np.ndarray, m: float, cut: Optional[np.ndarray] = None) -> np.ndarray:
        """Expected lost occurrences per table (0 for tables not in the array)."""
        inside = self.inside(robe, cut)
        if m <= 0:
            return np.zeros(len(robe))
        return self.bin_loss(inside, self.sums(inside), m) @ self.onehot


class _Problem:
    """The tables, the budget in floats and the error model, shared by the planner and the evaluator."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig], budget: Budget, stats: Optional[Sequence[TableStats]],
                 block_size: int) -> None:  # fmt: skip
        if not tables:
            raise ValueError("a placement needs at least one table")
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        block_size = int(block_size)
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {sorted(n for n in set(names) if names.count(n) > 1)} twice")
        for t in tables:
            if t.num_embeddings < 1 or t.embedding_dim < 1:
                raise ValueError(f"table {t.name!r}: needs num_embeddings >= 1 and embedding_dim >= 1, "
                                 f"got {t.num_embeddings} rows of dim {t.embedding_dim}")  # fmt: skip
        if stats is not None and not all(isinstance(st, TableStats) for st in stats):
            raise TypeError("stats must be a sequence of TableStats (robe_dist.data.stats.read_table_stats)")
        self.tables, self.budget, self.block_size, self.used_stats = list(tables), budget, block_size, stats is not None
        self.rows = np.array([t.num_embeddings for t in tables], dtype=np.float64)
        self.dims = np.array([t.embedding_dim for t in tables], dtype=np.float64)
        self.cost = self.rows * self.dims  # floats of each full table
        self.full_floats = int(self.cost.sum())
        self.budget_floats = budget.floats(self.full_floats)
        self.budget_bytes = budget.bytes if budget.bytes is not None else self.budget_floats * BYTES_PER_FLOAT
        self.min_array = max(int(self.dims.max()), block_size)
        by_feature = None
        if stats is not None:
            by_feature = {s.name: s for s in stats}
            missing = [t.feature_names[0] for t in tables if t.feature_names[0] not in by_feature]
            if missing:
                raise PlacementError(
                    f"the table statistics do not describe the features {missing} (they describe "
                    f"{sorted(by_feature)[:6]}...): statistics of another dataset? Recompute them (robe-data stats)"
                )
        ids, counts, occurrences, self.distinct = [], [], [], []
        self.top: List[Optional[np.ndarray]] = []  # each table's most frequent ids, where known
        for t in tables:
            if by_feature is not None:
                st = by_feature[t.feature_names[0]]
                n, c = st.histogram()
                if len(n) == 0 or st.occurrences < 1 or len(st.bin_ids) != len(st.bin_counts):
                    raise PlacementError(
                        f"the statistics of feature {t.feature_names[0]!r} count no id (or their bins disagree): "
                        "statistics of an empty or another dataset? Recompute them (robe-data stats)"
                    )
                ids.append(n)
                counts.append(c)
                occurrences.append(float(st.occurrences))
                self.distinct.append(st.distinct)
                self.top.append(st.top_ids)
            else:  # one occurrence per sample spread evenly over the rows
                ids.append(np.array([float(t.num_embeddings)]))
                counts.append(np.array([1.0 / t.num_embeddings]))
                occurrences.append(1.0)
                self.distinct.append(None)
                self.top.append(None)
        self.occ = np.array(occurrences)
        self.active = np.array([d if d is not None else r for d, r in zip(self.distinct, self.rows)]) * self.dims
        self.error = _ErrorModel(ids, counts, self.dims)
        # how many of a table's hottest bins can get exact rows: their ids must be among the known
        # most frequent ones, and at least one bin stays in the array (all of them: a full table)
        self.hot_limit = np.zeros(len(tables), dtype=np.int64)
        for i, top in enumerate(self.top):
            if top is None or len(tables[i].feature_names) != 1 or tables[i].pooling != PoolingType.SUM:
                continue
            sizes = np.cumsum(self.error.n[self.error.hottest[i]])
            self.hot_limit[i] = min(int(np.searchsorted(sizes, len(top), side="right")), len(sizes) - 1)

    def hot_count(self, t: int, cut: int) -> int:
        """Ids of table ``t`` with exact rows when its ``cut`` hottest bins are cut."""
        return int(self.error.n[self.error.hottest[t][:cut]].sum())

    def hot_cost(self, cut: np.ndarray) -> np.ndarray:
        """Floats of each table's exact rows: one per hot id and a tail row (0 without a cut)."""
        return np.array([(self.hot_count(t, int(k)) + 1) * self.dims[t] if k else 0.0 for t, k in enumerate(cut)])

    def array_for(self, full: np.ndarray, cut: Optional[np.ndarray] = None) -> float:
        hot = float(self.hot_cost(cut).sum()) if cut is not None else 0.0
        return self.budget_floats - float(self.cost[full].sum()) - hot

    def placement(self, full: np.ndarray, notes: List[str], cut: Optional[np.ndarray] = None) -> Placement:
        robe = ~full
        cut = np.zeros(len(full), dtype=np.int64) if cut is None else np.where(full, 0, cut)
        array_size = int(self.array_for(full, cut)) if robe.any() else 0
        lost = self.error.lost(robe, array_size, cut)
        total_occ = max(self.occ.sum(), 1e-300)
        hot_cost = self.hot_cost(cut)
        hot_ids = {t.name: self.top[i][: self.hot_count(i, int(cut[i]))] for i, t in enumerate(self.tables) if cut[i]}
        choices = [
            TableChoice(
                name=t.name, features=list(t.feature_names), rows=int(t.num_embeddings), dim=int(t.embedding_dim),
                placement="full" if full[i] else "robe",
                bytes=int(self.cost[i] if full[i] else hot_cost[i]) * BYTES_PER_FLOAT,
                distinct=self.distinct[i], occurrence_share=float(self.occ[i] / total_occ),
                expected_error=float(min(lost[i] / max(self.occ[i], 1e-300), 1.0)),
                hot_rows=len(hot_ids.get(t.name, ())),
            )  # fmt: skip
            for i, t in enumerate(self.tables)
        ]
        if robe.any() and not full.any() and not cut.any():
            notes.append("every table is in the ROBE array")
        active = float(self.active[robe].sum() - sum(c.hot_rows * c.dim for c in choices))
        return Placement(
            budget=self.budget, budget_bytes=int(self.budget_bytes), full_table_bytes=self.full_floats * BYTES_PER_FLOAT,
            tables=choices, array_size=array_size, block_size=self.block_size,
            expected_error=float(lost.sum() / total_occ), load=active / array_size if array_size else 0.0,
            used_stats=self.used_stats, notes=notes, hot_ids=hot_ids,
        )  # fmt: skip

    def check_array(self, full: np.ndarray, what: str) -> None:
        if self.array_for(full) < self.min_array:
            raise PlacementError(
                f"robe.budget {self.budget} leaves {max(self.array_for(full), 0) * BYTES_PER_FLOAT:,.0f} bytes for the "
                f"ROBE array {what}, below the smallest "
                f"usable array ({self.min_array} floats = {self.min_array * BYTES_PER_FLOAT:,} bytes: one embedding); all "
                f"{len(self.tables)} tables as full tables would take {self.full_floats * BYTES_PER_FLOAT:,} bytes"
            )


def plan_placement(
    tables: Sequence[EmbeddingBagConfig],
    budget: Union[str, int, float, Budget],
    stats: Optional[Sequence[TableStats]] = None,
    block_size: int = 32,
    hot_rows: bool = False,
) -> Placement:
    """Chooses full tables, exact rows for hot ids and the ROBE array size for ``budget`` (see the
    module doc).

    Args:
        tables: every table (``num_embeddings`` is what a full table costs; ids of a full table
            must lie in ``[0, num_embeddings)``, e.g. after ``robe-data vocab``).
        budget: bytes (``"64MB"``, ``4096``) or a compression ratio (``"100x"``), as ``Budget.parse``.
        stats: id statistics of the training split, one per table's first feature, matched by
            feature name (``robe_dist.data.stats``); ``None``: uniform ids.
        block_size: the array's Z; every ``embedding_dim`` must be a multiple of it.
        hot_rows: the most frequent ids of tables in the array may get exact rows (where the
            statistics list them: ``TableStats.top_ids``); ``False`` (default): whole tables only.
            Measured on synthetic data, the rule spends too much on exact rows at 10x and 1000x
            (docs/placement.md): an option to study, not yet a default.

    Raises:
        ValueError: a budget below one embedding of array, statistics of other features, a
            malformed budget.
    """
    pb = _Problem(tables, Budget.parse(budget), stats, block_size)
    if pb.full_floats <= pb.budget_floats:
        return pb.placement(
            np.ones(len(tables), dtype=bool),
            [f"the budget ({pb.budget}) covers every table as a full table: no compression, no ROBE array"],
        )
    n_tables = len(tables)
    full = np.zeros(n_tables, dtype=bool)
    cut = np.zeros(n_tables, dtype=np.int64)
    pb.check_array(full, "with every table in it")
    em, cost, dims = pb.error, pb.cost, pb.dims
    limit = pb.hot_limit if hot_rows else np.zeros(n_tables, dtype=np.int64)
    owner_onehot = em.onehot
    inside = np.ones(len(em.n), dtype=bool)
    sums = em.sums(inside)
    per_table = em.w @ owner_onehot  # [bins, tables]: the sums' part of each table's inside bins
    spent = np.zeros(n_tables)  # floats each table takes outside the array (full table or exact rows)
    m = float(pb.budget_floats)

    def totals(new_inside: np.ndarray, new_sums: np.ndarray, new_m: np.ndarray) -> np.ndarray:
        """E of each candidate (columns)."""
        return em.bin_loss(new_inside, new_sums, new_m[None, :]).sum(axis=0)

    current = em.total(inside, sums, m)
    best = (full.copy(), cut.copy(), current)
    while True:
        open_t = ~full
        # whole tables: every inside bin of t leaves; t's exact rows (if any) are replaced by the table
        move = np.maximum(cost - spent, 1e-9)
        ok_full = open_t & (m - move >= pb.min_array) & (open_t.sum() > 1)
        # the next hottest bin of t gets exact rows (and t a tail row at its first cut)
        nxt = np.array([em.hottest[t][cut[t]] if cut[t] < limit[t] else -1 for t in range(n_tables)])
        ok_hot = open_t & (nxt >= 0)
        hot_move = np.where(ok_hot, em.n[np.maximum(nxt, 0)] * dims + np.where(cut == 0, dims, 0.0), np.inf)
        ok_hot &= m - hot_move >= pb.min_array
        scores = np.full(2 * n_tables, -np.inf)
        if ok_full.any():
            ts = np.flatnonzero(ok_full)
            new_inside = inside[:, None] & ~owner_onehot[:, ts]
            scores[ts] = (current - totals(new_inside, sums[:, None] - per_table[:, ts], m - move[ts])) / move[ts]
        if ok_hot.any():
            ts = np.flatnonzero(ok_hot)
            js = nxt[ts]
            new_inside = np.repeat(inside[:, None], len(ts), axis=1)
            new_inside[js, np.arange(len(ts))] = False
            scores[n_tables + ts] = (current - totals(new_inside, sums[:, None] - em.w[:, js], m - hot_move[ts])) / hot_move[ts]
        k = int(np.argmax(scores))
        if not np.isfinite(scores[k]):
            break
        if k < n_tables:  # the whole table
            t = k
            sums = sums - per_table[:, t]
            per_table[:, t] = 0.0
            inside &= ~owner_onehot[:, t]
            m -= move[t]
            spent[t] = cost[t]
            full[t], cut[t] = True, 0
        else:
            t = k - n_tables
            j = nxt[t]
            sums = sums - em.w[:, j]
            per_table[:, t] -= em.w[:, j]
            inside[j] = False
            m -= hot_move[t]
            spent[t] += hot_move[t]
            cut[t] += 1
        current = em.total(inside, sums, m)
        if current < best[2]:
            best = (full.copy(), cut.copy(), current)
    return pb.placement(best[0], [], best[1])


def evaluate_placement(
    tables: Sequence[EmbeddingBagConfig],
    budget: Union[str, int, float, Budget],
    robe_tables: Sequence[str],
    stats: Optional[Sequence[TableStats]] = None,
    block_size: int = 32,
) -> Placement:
    """The placement that puts ``robe_tables`` in the array and keeps the others full, with the
    array sized from ``budget`` (what the full tables leave), described like ``plan_placement``'s."""
    pb = _Problem(tables, Budget.parse(budget), stats, block_size)
    names = [t.name for t in tables]
    unknown = sorted(set(robe_tables) - set(names))
    if unknown:
        raise PlacementError(f"robe tables {unknown} are not among the tables {names}")
    if not robe_tables:
        raise PlacementError("a budget needs at least one table in the ROBE array")
    full = np.array([n not in set(robe_tables) for n in names])
    pb.check_array(full, f"next to the {int(full.sum())} full tables")
    return pb.placement(full, [])
