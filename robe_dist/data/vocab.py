"""Dense per-table ids for full-table baselines: MLPerf's modulo cap and a frequency vocabulary.

For each table ``t``, every id ``x`` is first capped, ``v = x % max_ind_range`` (MLPerf:
40,000,000; ``max_ind_range <= 0`` keeps raw ids), then counted over the counted files. Values
seen at least ``min_count`` times get indices ``1 .. K_t`` in increasing order of ``v``; all
others (rare, or unseen in the counted files) map to index 0. So table ``t`` needs
``K_t + 1`` rows: ``table_sizes`` in the output manifest and in ``cardinalities.json``.

The output directory is a complete dataset: remapped ``NAME_sparse.npy`` (int32, and
``NAME_sparse_multi_hot.npy`` if present), the dense and label files hard-linked (or copied)
from the source, ``table_stats.json`` (per-table id statistics of the counted files, for the
placement planner: robe_dist.data.stats), ``vocab_values.npz`` (the kept values of every table:
``Vocabulary`` applies them to raw ids, as robe-predict does for raw Criteo rows) and a manifest
(kind "vocab", with the vocabulary's fingerprint) written last.

Cost: one pass to count, one to remap, in chunks of ``CHUNK_ROWS`` rows. Counts are sorted
(value, count) arrays per table; with the cap, a table with more than ``max_ind_range / 16``
distinct values switches to a dense uint32 array (``4 * max_ind_range`` bytes: 160 MB at 40M,
so at most 4.2 GB for 26 tables), and remapping uses a dense int32 lookup array for tables with
more than ``DENSE_LUT_MIN_KEPT`` kept values (same size).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from robe_dist.data.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES, MLPERF_MAX_IND_RANGE
from robe_dist.data.layout import (
    FORMAT, MULTI_HOT_PART, VERSION, DataError, directory_lock, load_manifest_file, output_dir, part_path, read_manifest, refuse_foreign_days, train_parts, write_atomic, write_json_atomic, write_manifest,
)  # fmt: skip
from robe_dist.data.npy import NpyAppender, commit, partial_path
from robe_dist.data.stats import stats_of_counter, write_table_stats

CHUNK_ROWS = 1 << 20
#: Above this many kept values a table is remapped through a dense lookup array of size
#: max_ind_range (fast); below, by binary search in the sorted kept values (small memory).
DENSE_LUT_MIN_KEPT = 1 << 20
CARDINALITIES_NAME = "cardinalities.json"
VALUES_NAME = "vocab_values.npz"


class _TableCounter:
    """Occurrence counts of one table's (capped) values: sorted (value, count) arrays, switched to a
    dense uint32 array of size ``cap`` once the table has more than ``cap / 16`` distinct values."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.dense: np.ndarray | None = None
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        u, c = np.unique(values, return_counts=True)
        if self.dense is not None:
            self.dense[u] = np.minimum(self.dense[u] + c, np.iinfo(np.uint32).max)  # saturate, never wrap
            return
        pos = np.searchsorted(self.keys, u)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == u[found]
        self.counts[pos[found]] += c[found]  # u is unique, so no index repeats
        if not found.all():
            new = ~found
            self.keys = np.insert(self.keys, pos[new], u[new])
            self.counts = np.insert(self.counts, pos[new], c[new])
        if 0 < self.cap < 16 * len(self.keys):
            self.dense = np.zeros(self.cap, dtype=np.uint32)
            self.dense[self.keys] = np.minimum(self.counts, np.iinfo(np.uint32).max)
            self.keys = self.counts = np.zeros(0, dtype=np.int64)

    def kept(self, min_count: int) -> np.ndarray:
        """Sorted values seen at least ``min_count`` (>= 1) times."""
        if self.dense is not None:
            return np.flatnonzero(self.dense >= max(min_count, 1))
        return self.keys[self.counts >= max(min_count, 1)]


class _TableMap:
    """value -> index in 1..K (kept values, ascending) or 0."""

    def __init__(self, kept: np.ndarray, cap: int) -> None:
        self.kept = kept
        self.lut: np.ndarray | None = None
        if cap > 0 and len(kept) >= DENSE_LUT_MIN_KEPT:
            self.lut = np.zeros(cap, dtype=np.int32)
            self.lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.lut is not None:
            return self.lut[values]
        if len(self.kept) == 0:
            return np.zeros(values.shape, dtype=np.int32)
        pos = np.searchsorted(self.kept, values)
        hit = self.kept[np.minimum(pos, len(self.kept) - 1)] == values
        return np.where(hit, pos + 1, 0).astype(np.int32)


def capped(ids: np.ndarray, max_ind_range: int) -> np.ndarray:
    """int64 ``ids % max_ind_range`` (MLPerf's cap; ``max_ind_range <= 0``: the ids as they are)."""
    ids = np.asarray(ids).astype(np.int64)
    return ids % max_ind_range if max_ind_range > 0 else ids


def fingerprint(kept: list[np.ndarray], max_ind_range: int) -> str:
    """A short digest of a vocabulary (its cap and every table's kept values): models record it,
    and robe-predict checks that the vocabulary it applies is the one the model was trained on."""
    h = hashlib.sha256(f"robe_dist.vocab/1;max_ind_range={max_ind_range};".encode())
    for values in kept:
        values = np.ascontiguousarray(values, dtype=np.int64)
        h.update(len(values).to_bytes(8, "little"))
        h.update(values.tobytes())
    return h.hexdigest()[:16]


class Vocabulary:
    """The value -> index maps of a ``robe-data vocab`` directory, applied to raw ids.

    Example::

        vocab = Vocabulary.load("data/criteo_vocab")
        ids = vocab.apply(raw_ids)        # int64 [n, 26] raw -> int32 [n, 26] indices (0: unseen)
    """

    def __init__(self, kept: list[np.ndarray], max_ind_range: int, fingerprint: str) -> None:
        self.kept, self.max_ind_range, self.fingerprint = kept, max_ind_range, fingerprint
        self._maps = [_TableMap(k, max_ind_range) for k in kept]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Vocabulary":
        """Raises ``DataError`` for a directory that is not a vocabulary, one written before the
        values were stored, or a values file that does not match the manifest's fingerprint."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        params = manifest.get("vocab") or {}
        if manifest.get("kind") != "vocab":
            raise DataError(f"{directory}: not a robe-data vocab directory (its manifest is of kind {manifest.get('kind')!r})")
        if "fingerprint" not in params:
            raise DataError(
                f"{directory}: a vocabulary written before robe_dist stored its values (no {VALUES_NAME}); "
                "rebuild it with robe-data vocab (synthetic data: delete the directory, robe-train rebuilds it)"
            )
        with np.load(directory / params.get("values", VALUES_NAME)) as npz:
            kept = [npz[name] for name in DEFAULT_CAT_NAMES]
        found = fingerprint(kept, params["max_ind_range"])
        if found != params["fingerprint"]:
            raise DataError(f"{directory}: {VALUES_NAME} does not match the manifest (fingerprint {found}, manifest "
                            f"{params['fingerprint']}): damaged or replaced; rebuild it with robe-data vocab")  # fmt: skip
        return cls(kept, params["max_ind_range"], found)

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """int32 ``[n, 26]`` indices of raw ids ``[n, 26]`` (capped first, as when the vocabulary
        was built; values it did not keep map to 0)."""
        ids = capped(ids, self.max_ind_range)
        if ids.ndim != 2 or ids.shape[1] != len(self._maps):
            raise DataError(f"Vocabulary.apply: ids must be [rows, {len(self._maps)}], got {list(ids.shape)}")
        out = np.empty(ids.shape, dtype=np.int32)
        for t, table in enumerate(self._maps):
            out[:, t] = table(ids[:, t])
        return out


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = partial_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)


def build_vocab(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_ind_range: int = MLPERF_MAX_IND_RANGE,
    min_count: int = 1,
    train_only: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Write ``src`` with dense per-table ids to ``out``; returns the new manifest (see module doc).

    ``train_only`` counts only the train split (all files but the last; a single file's first
    6/7, as ``split_range`` splits it), so values that first appear in validation/test data map
    to 0, as unseen ids would in production."""
    t0 = time.perf_counter()
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise DataError(f"--min-count must be a whole number >= 1 (keep values seen at least that often), got {min_count!r}")
    if (isinstance(max_ind_range, bool) or not isinstance(max_ind_range, (int, np.integer))
            or not 0 <= max_ind_range < 2**63):  # fmt: skip
        raise DataError(f"--max-ind-range must be a whole number in [0, 2**63) (0: no cap), got {max_ind_range!r}")
    src_dir, out_dir = Path(src), Path(out)
    manifest = read_manifest(src_dir)
    if manifest.get("complete") is False:
        raise DataError(f"{src_dir}: dataset is incomplete; finish ingesting it first")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: is a file, expected the output directory (created if missing)")
    if out_dir.resolve() == src_dir.resolve():
        raise DataError(f"{out_dir}: output directory must differ from the source")
    output_dir(out_dir)
    with directory_lock(out_dir, wait=False):  # (two commands writing one directory)
        return _build_vocab(src_dir, out_dir, manifest, max_ind_range, min_count, train_only, log, t0)


def _build_vocab(src_dir: Path, out_dir: Path, manifest: dict, max_ind_range: int, min_count: int, train_only: bool,
                 log: Callable[[str], None] | None, t0: float) -> dict:  # fmt: skip
    old = load_manifest_file(out_dir)
    refuse_foreign_days(out_dir, old, "write the vocabulary")
    if old is not None and old.get("kind") != "vocab":
        raise DataError(f"{out_dir}: holds a {old.get('kind')!r} dataset; write the vocabulary elsewhere")
    # from here on the directory is marked unfinished (never left manifest-less: a directory without
    # a manifest reads as a TorchRec-made dataset, complete, whatever mix of old and new days it holds)
    write_manifest(out_dir, {"format": FORMAT, "version": VERSION, "kind": "vocab", "complete": False, "files": []})

    names = [f["name"] for f in manifest["files"]]
    bag_sizes = manifest.get("multi_hot_sizes")
    id_part = MULTI_HOT_PART if bag_sizes else "sparse"
    columns = np.repeat(np.arange(CAT_FEATURE_COUNT), bag_sizes) if bag_sizes else np.arange(CAT_FEATURE_COUNT)
    # train_only: the train split as training reads it (a single file's first 6/7 too)
    parts = train_parts(manifest) if train_only else [(f["name"], int(f["rows"])) for f in manifest["files"]]
    counted = [name for name, _ in parts]

    counters = [_TableCounter(max_ind_range) for _ in range(CAT_FEATURE_COUNT)]
    counted_rows = 0
    for name, limit in parts:
        ids = np.load(part_path(src_dir, name, id_part), mmap_mode="r")[:limit]
        counted_rows += len(ids)
        for lo in range(0, len(ids), CHUNK_ROWS):
            block = capped(ids[lo : lo + CHUNK_ROWS], max_ind_range)
            for t in range(CAT_FEATURE_COUNT):
                counters[t].add(block[:, columns == t].reshape(-1))
        if log:
            log(f"counted {name} ({len(ids):,} rows)")
    # the placement planner's input, from the same pass (robe_dist.data.stats), its most frequent
    # ids as the vocabulary's indices
    stats, maps = [], []
    for t in range(CAT_FEATURE_COUNT):
        maps.append(_TableMap(counters[t].kept(min_count), max_ind_range))
        stats.append(stats_of_counter(DEFAULT_CAT_NAMES[t], counted_rows, counters[t], id_map=maps[t]))
        counters[t] = None  # type: ignore[call-overload]  # free the counts
    table_sizes = [len(m.kept) + 1 for m in maps]
    write_atomic(out_dir / VALUES_NAME,
                 lambda f: np.savez(f, **{name: m.kept.astype(np.int64) for name, m in zip(DEFAULT_CAT_NAMES, maps)}))
    digest = fingerprint([m.kept for m in maps], max_ind_range)

    parts = ["sparse"] + ([MULTI_HOT_PART] if bag_sizes else [])
    for name in names:
        outs = []
        for part in parts:
            ids = np.load(part_path(src_dir, name, part), mmap_mode="r")
            cols = columns if part == MULTI_HOT_PART else np.arange(CAT_FEATURE_COUNT)
            dst = part_path(out_dir, name, part)
            with NpyAppender(partial_path(dst), np.int32, (ids.shape[1],)) as writer:
                for lo in range(0, len(ids), CHUNK_ROWS):
                    block = capped(ids[lo : lo + CHUNK_ROWS], max_ind_range)
                    mapped = np.empty(block.shape, dtype=np.int32)
                    for t in range(CAT_FEATURE_COUNT):
                        sel = cols == t
                        mapped[:, sel] = maps[t](block[:, sel])
                    writer.append(mapped)
            outs.append(dst)
        for part in ("dense", "labels"):
            dst = part_path(out_dir, name, part)
            _link_or_copy(part_path(src_dir, name, part), dst)
            outs.append(dst)
        commit(outs)
        if log:
            log(f"remapped {name}")

    params = {"max_ind_range": max_ind_range, "min_count": min_count, "train_only": train_only, "oov_index": 0,
              "values": VALUES_NAME, "fingerprint": digest}  # fmt: skip
    cards = {"table_sizes": table_sizes, "feature_names": list(DEFAULT_CAT_NAMES), **params, "source": manifest["path"]}
    write_json_atomic(out_dir / CARDINALITIES_NAME, cards)
    # everything else (multi_hot_sizes, params, planted_auc: the labels are unchanged) carries over
    new = {k: v for k, v in manifest.items() if k not in ("path", "rows")}
    new.update({
        "kind": "vocab", "complete": True, "table_sizes": table_sizes, "vocab": params,
        "source": manifest["path"], "source_kind": manifest.get("kind"),
        "files": [{"name": f["name"], "rows": f["rows"]} for f in manifest["files"]],
        "seconds": round(time.perf_counter() - t0, 2),
    })  # fmt: skip
    write_table_stats(out_dir, stats, counted)
    write_manifest(out_dir, new)
    if log:
        log(f"{out_dir}: table sizes {table_sizes} (sum {sum(table_sizes):,}); {out_dir / CARDINALITIES_NAME}")
    return read_manifest(out_dir)
