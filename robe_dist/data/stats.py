"""Per-table id statistics of a training split: what the placement planner reads.

For every table: the distinct ids seen, the occurrences, and a histogram of the ids' counts in
power-of-two bins (bin ``k`` holds the ids seen ``2**k .. 2**(k+1) - 1`` times: how many, and
how many occurrences they account for). A few hundred numbers describe a 40M-id table, enough for
``robe_dist.placement`` to tell hot ids from the tail. And the most frequent ids themselves (up to
``TOP_IDS`` per table, with their counts, in ``table_top_ids.npz`` beside the JSON): the planner
gives the hottest ids of the tables it keeps in the ROBE array exact rows.

Computed in one pass over the train split's sparse ids (``compute_table_stats``; ``robe-data
vocab`` writes them as a by-product of its counting pass), stored as ``table_stats.json`` in the
dataset directory::

    robe-data stats --data data/criteo_vocab          # writes data/criteo_vocab/table_stats.json
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from robe_dist.data.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES
from robe_dist.data.layout import (
    MULTI_HOT_PART, DataError, part_path, read_manifest, train_parts, write_atomic, write_json_atomic,
)  # fmt: skip

STATS_NAME = "table_stats.json"
TOP_IDS_NAME = "table_top_ids.npz"
STATS_VERSION = 1
CHUNK_ROWS = 1 << 20
#: The most frequent ids kept per table (with their counts): what the planner can give exact rows.
TOP_IDS = 1 << 16


@dataclass(frozen=True)
class TableStats:
    """Id statistics of one table over the counted rows."""

    name: str
    """The feature (``cat_0`` .. ``cat_25``)."""
    rows: int
    """Rows (samples) counted."""
    distinct: int
    """Distinct ids seen."""
    occurrences: int
    """Ids seen (``rows`` for a one-hot feature; missing values count as id 0, as stored)."""
    bin_ids: List[int]
    """``bin_ids[k]``: ids seen between ``2**k`` and ``2**(k+1) - 1`` times."""
    bin_counts: List[int]
    """``bin_counts[k]``: their occurrences."""
    top_ids: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    """int64: the ``TOP_IDS`` most frequent ids, most frequent first (ties: smaller id first), as
    the dataset stores them; ``None`` where unknown (statistics written before they were kept)."""
    top_counts: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    """int64: their counts."""

    @classmethod
    def from_counts(cls, name: str, rows: int, counts: np.ndarray, ids: Optional[np.ndarray] = None) -> "TableStats":
        """From the count of every distinct id (any order); with ``ids`` (the id of each count),
        also the most frequent ids."""
        counts = np.asarray(counts, dtype=np.int64)
        seen = counts > 0
        counts = counts[seen]
        bins = np.floor(np.log2(counts)).astype(np.int64) if len(counts) else np.zeros(0, dtype=np.int64)
        nbins = int(bins.max()) + 1 if len(bins) else 0
        top_ids = top_counts = None
        if ids is not None:
            ids = np.asarray(ids, dtype=np.int64)[seen]
            k = min(TOP_IDS, len(counts))
            pick = np.argpartition(-counts, k - 1)[:k] if 0 < k < len(counts) else np.arange(len(counts))
            order = np.lexsort((ids[pick], -counts[pick]))  # count descending, then id
            top_ids, top_counts = ids[pick][order], counts[pick][order]
        return cls(
            name=name, rows=int(rows), distinct=len(counts), occurrences=int(counts.sum()),
            bin_ids=np.bincount(bins, minlength=nbins).tolist(),
            bin_counts=np.bincount(bins, weights=counts, minlength=nbins).astype(np.int64).tolist(),
            top_ids=top_ids, top_counts=top_counts,
        )  # fmt: skip

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mean count)`` per non-empty bin."""
        ids = np.asarray(self.bin_ids, dtype=np.float64)
        counts = np.asarray(self.bin_counts, dtype=np.float64)
        keep = ids > 0
        return ids[keep], counts[keep] / ids[keep]


def count_ids(values: np.ndarray) -> np.ndarray:
    """Counts of the distinct values of ``values`` (sorted by value)."""
    return np.unique(values, return_counts=True)[1]


def _counted_parts(data_dir: Path, files: Optional[Sequence[str]]) -> tuple[dict, list]:
    """The dataset's manifest and ``(file, rows from its start)`` to count: the train split
    (``train_parts``), or the whole ``files``; ``DataError`` for an unfinished dataset."""
    manifest = read_manifest(data_dir)
    if manifest.get("complete") is False:
        raise DataError(f"{data_dir}: dataset is incomplete (INCOMPLETE in robe-data info); finish the command "
                        "that wrote it before computing its statistics")  # fmt: skip
    if files is None:
        return manifest, train_parts(manifest)
    rows = {f["name"]: int(f["rows"]) for f in manifest["files"]}
    return manifest, [(name, rows[name]) for name in files]


def compute_table_stats(
    data_dir: str | os.PathLike, files: Optional[Sequence[str]] = None, log: Optional[Callable[[str], None]] = print
) -> List[TableStats]:
    """One pass over the sparse ids of ``files`` (default: the train split, as training reads it:
    every day file but the last, or a single file's first 6/7) of the complete dataset at
    ``data_dir``; returns one ``TableStats`` per table."""
    from robe_dist.data.vocab import _TableCounter  # the same counter as robe-data vocab

    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    manifest, parts = _counted_parts(data_dir, files)
    bag_sizes = manifest.get("multi_hot_sizes")
    part = MULTI_HOT_PART if bag_sizes else "sparse"
    columns = np.repeat(np.arange(CAT_FEATURE_COUNT), bag_sizes) if bag_sizes else np.arange(CAT_FEATURE_COUNT)
    # a vocabulary's ids are dense in [0, table size): count them in dense arrays
    sizes = manifest.get("table_sizes") if manifest.get("kind") == "vocab" else None
    counters = [_TableCounter(int(sizes[t]) if sizes else 0) for t in range(CAT_FEATURE_COUNT)]
    rows = 0
    for name, limit in parts:
        ids = np.load(part_path(data_dir, name, part), mmap_mode="r")[:limit]
        for lo in range(0, len(ids), CHUNK_ROWS):
            block = np.asarray(ids[lo : lo + CHUNK_ROWS], dtype=np.int64)
            for t in range(CAT_FEATURE_COUNT):
                counters[t].add(block[:, columns == t].reshape(-1))
        rows += len(ids)
    stats = [stats_of_counter(n, rows, c) for n, c in zip(DEFAULT_CAT_NAMES, counters)]
    if log:
        names = ", ".join(name for name, _ in parts)
        log(f"table statistics of {data_dir} ({names}: {rows:,} rows) in {time.perf_counter() - t0:.1f} s")
    return stats


def stats_of_counter(name: str, rows: int, counter, id_map: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> TableStats:
    """``TableStats`` of a ``robe_dist.data.vocab._TableCounter``; ``id_map`` turns its values into
    the ids the dataset stores (a vocabulary's indices), for the most frequent ids."""
    if counter.dense is not None:
        values = np.flatnonzero(counter.dense)
        counts = counter.dense[values].astype(np.int64)
    else:
        values, counts = counter.keys, counter.counts
    st = TableStats.from_counts(name, rows, counts, values)
    if id_map is not None and st.top_ids is not None:
        mapped = np.asarray(id_map(st.top_ids), dtype=np.int64)
        kept = mapped != 0  # values below the vocabulary's min_count share index 0: no exact row
        st = replace(st, top_ids=mapped[kept], top_counts=st.top_counts[kept])
    return st


def _json_fields(st: TableStats) -> dict:
    """What ``table_stats.json`` holds of ``st`` (the most frequent ids go to the ``.npz``)."""
    return {f.name: getattr(st, f.name) for f in fields(st) if not f.name.startswith("top_")}


def write_table_stats(data_dir: str | os.PathLike, stats: Sequence[TableStats], files: Sequence[str]) -> Path:
    """Writes ``table_stats.json`` (and ``table_top_ids.npz`` where the most frequent ids are known)
    atomically; returns the JSON's path."""
    data_dir = Path(data_dir)
    if all(s.top_ids is not None for s in stats):
        arrays = {f"{s.name}.{k}": getattr(s, f"top_{k}") for s in stats for k in ("ids", "counts")}
        write_atomic(data_dir / TOP_IDS_NAME, lambda f: np.savez(f, **arrays))
    record = {"version": STATS_VERSION, "files": list(files), "tables": [_json_fields(s) for s in stats]}
    return write_json_atomic(data_dir / STATS_NAME, record)


def read_table_stats(data_dir: str | os.PathLike) -> Optional[List[TableStats]]:
    """The dataset's ``table_stats.json``, or ``None`` if it has none."""
    path = Path(data_dir) / STATS_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("version") != STATS_VERSION:
            raise DataError(f"{path}: version {record.get('version')}, expected {STATS_VERSION}; recompute it (robe-data stats)")
        stats = [TableStats(**t) for t in record["tables"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a table statistics file ({type(e).__name__}: {e}); recompute it (robe-data stats)") from e
    top = Path(data_dir) / TOP_IDS_NAME
    if not top.is_file():
        return stats  # written before the most frequent ids were kept: the planner keeps whole tables
    try:
        with np.load(top) as z:
            return [replace(s, top_ids=z[f"{s.name}.ids"], top_counts=z[f"{s.name}.counts"]) for s in stats]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{top}: not the most frequent ids of {path.name}'s tables ({type(e).__name__}: {e}); "
                        "recompute them (robe-data stats)") from e  # fmt: skip


def _counted_files(data_dir: str | os.PathLike) -> Optional[List[str]]:
    """The files ``table_stats.json`` says it counted, or ``None``."""
    try:
        return list(json.loads((Path(data_dir) / STATS_NAME).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_table_stats(
    data_dir: str | os.PathLike, log: Optional[Callable[[str], None]] = print, top_ids: bool = False
) -> List[TableStats]:
    """The dataset's statistics of its train split, computed and written first if missing, if they
    counted other rows than the train split has now (days added or redone since, or counted while
    the dataset was unfinished), or, with ``top_ids``, if they were written before the most
    frequent ids were kept. ``DataError`` for an unfinished dataset."""
    stats = read_table_stats(data_dir)
    manifest, parts = _counted_parts(Path(data_dir), None)
    files = [name for name, _ in parts]
    rows = sum(n for _, n in parts)
    stale = stats is not None and (_counted_files(data_dir) != files or any(s.rows != rows for s in stats))
    if stats is None or stale or (top_ids and any(s.top_ids is None for s in stats)):
        if stale and log:
            log(f"{Path(data_dir) / STATS_NAME}: counted other rows than the train split now has "
                f"({', '.join(files)}: {rows:,} rows); recomputing")  # fmt: skip
        stats = compute_table_stats(data_dir, None, log=log)
        write_table_stats(data_dir, stats, files)
    return stats
