"""Synthetic Criteo-like datasets with a planted ground-truth model (known best AUC).

``generate(out_dir, rows, days=3, seed=0, scale=1e-3)`` writes ``day_0 .. day_{days-1}`` in the
binary layout of :mod:`robe_dist.data.layout`:

* 13 dense features: heavy-tailed counts with Criteo-like missing rates, stored transformed
  (log(1 + max(x, 0)), missing 0);
* 26 categorical features: table ``t`` has ``cardinality_t = min(S_t, max(ceil(S_t * scale), 16))``
  distinct ids (``S_t``: MLPerf's v1 table sizes), drawn Zipf-like (rank r with probability
  ~ (r + 1) ** -alpha: few hot ids, a long tail) and written as raw-looking 32-bit hashed ids
  (a bijection of the rank, never 0, which stays the missing id);
* multi-hot (``multi_hot=True``): MLPerf v3's fixed bag size per table in
  ``NAME_sparse_multi_hot.npy``; the first id of a bag is the one-hot id;
* labels: Bernoulli(sigmoid(logit)) of :class:`robe_dist.data.planted.PlantedModel`, whose bias is
  calibrated to the click rate ``ctr``. The AUC of the true probabilities on the generated labels
  (the best any model can reach) is printed and stored as ``planted_auc`` (all rows) and
  ``planted_auc_by_split`` (train = all days but the last, val/test = halves of the last day).

Everything is a function of the parameters: rows are made in fixed-size chunks, each with its own
seeded generator, so the output does not depend on memory or timing. Memory is bounded by the
chunk size, so a tenth of a Criteo day (~20M rows) is fine.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from robe_dist.data.criteo import (
    CAT_FEATURE_COUNT, INT_FEATURE_COUNT, MISSING_CAT_ID, MLPERF_V1_TABLE_SIZES, MLPERF_V3_MULTI_HOT_SIZES,
)  # fmt: skip
from robe_dist.data.layout import (
    FORMAT, MULTI_HOT_PART, PARTS, VERSION, DataError, load_manifest_file, output_dir, part_path, read_manifest,
    write_manifest,
)  # fmt: skip
from robe_dist.data.npy import NpyAppender, commit, partial_path
from robe_dist.data.planted import PlantedModel, auc_from_histograms, score_histograms, sigmoid
from robe_dist.data.rawtext import CAT_MISSING, RawRows, random_dense, raw_ids, zipf_ranks

GENERATOR_VERSION = 1
CHUNK_ROWS = 1 << 16
MIN_CARDINALITY = 16
DEFAULT_ALPHA = 1.05
DEFAULT_CTR = 0.25
PILOT_ROWS = 20_000  # calibration sample (a fifth of it with multi-hot bags)


def table_sizes(scale: float) -> list[int]:
    """Per-table cardinalities: MLPerf v1 sizes times ``scale``, at least 16 (or the full size)."""
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return [min(s, max(math.ceil(s * scale), MIN_CARDINALITY)) for s in MLPERF_V1_TABLE_SIZES]


def _table_key(seed: int, table: int) -> int:
    return int(np.random.default_rng([seed, 0x1D5, table]).integers(1, 2**32))


class _Sampler:
    """Draws chunks of raw rows (and multi-hot bags) for one parameter set."""

    def __init__(self, seed: int, sizes: list[int], alpha: float, multi_hot: bool) -> None:
        self.seed, self.sizes, self.alpha = seed, sizes, alpha
        self.bag_sizes = list(MLPERF_V3_MULTI_HOT_SIZES) if multi_hot else None
        self.keys = [_table_key(seed, t) for t in range(CAT_FEATURE_COUNT)]

    def chunk(self, rng: np.random.Generator, n: int) -> tuple[RawRows, list[np.ndarray] | None]:
        dense, dense_missing = random_dense(rng, n)
        ids = np.empty((n, CAT_FEATURE_COUNT), dtype=np.int64)
        bags: list[np.ndarray] | None = [] if self.bag_sizes else None
        for t, card in enumerate(self.sizes):
            size = self.bag_sizes[t] if self.bag_sizes else 1
            col = raw_ids(zipf_ranks(rng, (n, size), card, self.alpha), self.keys[t])
            col[rng.random(n) < CAT_MISSING[t]] = MISSING_CAT_ID  # a missing feature: whole bag empty
            ids[:, t] = col[:, 0]
            if bags is not None:
                bags.append(col)
        labels = np.zeros(n, dtype=np.int32)  # drawn later from the planted model
        return RawRows(labels=labels, dense=dense, dense_missing=dense_missing, ids=ids), bags


def _params(rows: int, days: int, seed: int, scale: float, multi_hot: bool, alpha: float, ctr: float) -> dict:
    return {
        "rows": rows, "days": days, "seed": seed, "scale": scale, "multi_hot": multi_hot,
        "alpha": alpha, "ctr": ctr, "generator_version": GENERATOR_VERSION,
    }  # fmt: skip


def _existing(out: Path, params: dict) -> dict | None:
    """The manifest of a complete dataset with these parameters in ``out``, else None."""
    try:
        manifest = load_manifest_file(out)
    except DataError:
        manifest = None
    if not manifest or manifest.get("kind") != "synthetic" or not manifest.get("complete"):
        return None
    if manifest.get("params") != params:
        return None
    try:
        return read_manifest(out)
    except DataError:
        return None


def day_rows(rows: int, days: int) -> list[int]:
    """Rows per day: ``rows`` split as evenly as possible, earlier days one more."""
    return [rows // days + (d < rows % days) for d in range(days)]


_PART_SPECS = {
    "dense": (np.float32, (INT_FEATURE_COUNT,)),
    "sparse": (np.int64, (CAT_FEATURE_COUNT,)),
    "labels": (np.int32, (1,)),
    MULTI_HOT_PART: (np.int64, (sum(MLPERF_V3_MULTI_HOT_SIZES),)),
}


def _write_day(
    out: Path, day: int, n_rows: int, seed: int, sampler: _Sampler, model: PlantedModel, split_at: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Write ``day_{day}`` (atomically). Returns (positives, score histograms of rows
    [0, split_at) and of rows [split_at, n_rows)), each [2, AUC_BINS]."""
    parts = list(PARTS) + ([MULTI_HOT_PART] if sampler.bag_sizes else [])
    paths = [part_path(out, f"day_{day}", p) for p in parts]
    writers = {p: NpyAppender(partial_path(path), *_PART_SPECS[p]) for p, path in zip(parts, paths)}
    positives, before, after = 0, 0, 0
    try:
        for c, start in enumerate(range(0, n_rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, n_rows - start)
            rng = np.random.default_rng([seed, day, c])
            raw, bags = sampler.chunk(rng, n)
            dense = raw.transformed_dense()
            p = sigmoid(model.logits(dense, bags or list(raw.ids.T)))
            labels = (rng.random(n) < p).astype(np.int32)
            positives += int(labels.sum())
            writers["dense"].append(dense)
            writers["sparse"].append(raw.ids)
            writers["labels"].append(labels[:, None])
            if bags is not None:
                writers[MULTI_HOT_PART].append(np.concatenate(bags, axis=1))
            cut = min(max(split_at - start, 0), n)
            before = before + score_histograms(p[:cut], labels[:cut])
            after = after + score_histograms(p[cut:], labels[cut:])
        for w in writers.values():
            w.finish()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    commit(paths)
    return positives, before, after  # type: ignore[return-value]


_OWN_FILE = re.compile(r"day_\d+_(dense|sparse|labels|sparse_multi_hot)\.npy(\.partial)?|manifest\.json(\.partial)?")


def _prepare_dir(out: Path, params: dict) -> None:
    """Create ``out`` and unmark it as complete; refuse one that holds anything but this
    generator's files for these parameters (another dataset, a synthetic dataset with other
    parameters, or files of its own: nothing is overwritten or added to)."""
    try:
        old = load_manifest_file(out) if out.is_dir() else None
    except DataError:
        old = None
    if old and old.get("kind") != "synthetic":
        raise DataError(f"{out}: holds a {old.get('kind')!r} dataset; generate into another directory")
    if old and old.get("complete") and old.get("params") != params:
        theirs = old.get("params") or {}
        diff = ", ".join(f"{k} {theirs.get(k)!r} (asked {v!r})" for k, v in params.items() if theirs.get(k) != v)
        raise DataError(
            f"{out}: holds a synthetic dataset with other parameters ({diff}); use another directory "
            "(data.path) or delete it"
        )
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILE.fullmatch(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise DataError(
                f"{out}: is not empty ({shown}); synthetic data is generated only into an empty or new "
                "directory (or one holding an interrupted generation)"
            )
    output_dir(out)
    # from here on the directory is marked unfinished (not left manifest-less, which reads as a
    # complete TorchRec-made dataset of whatever days were written)
    write_manifest(out, {"format": FORMAT, "version": VERSION, "kind": "synthetic", "complete": False,
                         "params": params, "files": []})  # fmt: skip


def _check_params(rows: int, days: int, seed: int, scale: float, alpha: float, ctr: float) -> None:
    """``ValueError`` naming the parameter (and its ``robe-data synth`` option) out of range."""
    def whole(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def finite(value: object) -> bool:
        return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)

    if not (whole(days) and days >= 1):
        raise ValueError(f"days (--days) must be a whole number >= 1, got {days!r}")
    if not (whole(rows) and rows >= days):
        raise ValueError(f"rows (--rows) must be a whole number >= days ({days}), got {rows!r}")
    if not (whole(seed) and seed >= 0):
        raise ValueError(f"seed (--seed) must be a whole number >= 0, got {seed!r}")
    if not (finite(scale) and scale > 0):
        raise ValueError(f"scale (--scale) must be a finite number > 0 (1 = MLPerf's full table sizes), got {scale!r}")
    if not finite(alpha):
        raise ValueError(f"alpha (--alpha) must be a finite number (the Zipf exponent, e.g. 1.05), got {alpha!r}")
    if not (finite(ctr) and 0 < ctr < 1):
        raise ValueError(f"ctr (--ctr) must be a click rate between 0 and 1 (exclusive), got {ctr!r}")


def generate(
    out_dir: str | os.PathLike,
    rows: int,
    days: int = 3,
    seed: int = 0,
    scale: float = 1e-3,
    multi_hot: bool = False,
    *,
    alpha: float = DEFAULT_ALPHA,
    ctr: float = DEFAULT_CTR,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Write a synthetic dataset to ``out_dir`` and return its manifest (see the module doc).

    Idempotent: if ``out_dir`` already holds a complete synthetic dataset with the same
    parameters, its manifest is returned and nothing is written. A directory holding another
    kind of dataset (e.g. ingested Criteo) is refused rather than overwritten."""
    _check_params(rows, days, seed, scale, alpha, ctr)
    out = Path(out_dir)
    params = _params(rows, days, seed, scale, multi_hot, alpha, ctr)
    done = _existing(out, params)
    if done is not None:
        if log:
            log(f"{out}: synthetic dataset with these parameters exists; planted AUC {done['planted_auc']:.4f}")
        return done
    _prepare_dir(out, params)

    t0 = time.perf_counter()
    sizes = table_sizes(scale)
    sampler = _Sampler(seed, sizes, alpha, multi_hot)
    model = PlantedModel(seed, CAT_FEATURE_COUNT, INT_FEATURE_COUNT)
    pilot, pilot_bags = sampler.chunk(np.random.default_rng([seed, 0xCA1]), PILOT_ROWS // (5 if multi_hot else 1))
    model.calibrate(model.logits(pilot.transformed_dense(), pilot_bags or list(pilot.ids.T)), ctr)

    hists: dict[str, np.ndarray] = {}
    files = []
    for day, n_day in enumerate(day_rows(rows, days)):
        last = day == days - 1  # its first half (rounded up) is val, the rest test, as TorchRec
        positives, first, second = _write_day(
            out, day, n_day, seed, sampler, model, (n_day + 1) // 2 if last else n_day
        )
        for split, h in (("val", first), ("test", second)) if last else (("train", first + second),):
            hists[split] = hists.get(split, 0) + h
        files.append({"name": f"day_{day}", "rows": n_day, "positives": positives})
        if log:
            log(f"day_{day}: {n_day:,} rows, click rate {positives / n_day:.3f}")

    by_split = {s: auc_from_histograms(hists[s]) if s in hists else None for s in ("train", "val", "test")}
    manifest = {
        "format": FORMAT, "version": VERSION, "kind": "synthetic", "complete": True, "params": params,
        "dense_transform": "log(1 + max(x, 0)), missing -> 0", "missing_cat_id": MISSING_CAT_ID,
        "table_sizes": sizes, "multi_hot_sizes": list(MLPERF_V3_MULTI_HOT_SIZES) if multi_hot else None,
        "id_space": "raw 32-bit hashed ids; table_sizes = distinct ids per table (missing id 0 extra)",
        "planted_auc": auc_from_histograms(sum(hists.values())), "planted_auc_by_split": by_split,
        "planted_model": {"kind": "hashed DLRM-like logistic", "bias": model.bias},
        "files": files, "rows": rows, "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    write_manifest(out, manifest)
    if log:
        split_text = ", ".join(f"{k} {v:.4f}" for k, v in by_split.items() if v is not None)
        log(
            f"{out}: {rows:,} rows in {days} days; planted (best achievable) AUC {manifest['planted_auc']:.4f} "
            f"({split_text})"
        )
    return read_manifest(out)
