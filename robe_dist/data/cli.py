"""``robe-data``: convert, generate, re-index and inspect Criteo datasets (see docs/data.md).

Exit codes: 0 success, 2 bad arguments or input (missing/empty path, wrong format), 1 other
errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from robe_dist.data.criteo import MLPERF_MAX_IND_RANGE
from robe_dist.data.layout import DataError

_LAYOUT = (
    "Output layout per input NAME (the file name without extensions, e.g. day_0): NAME_dense.npy "
    "float32 [N,13] = log(1+max(x,0)), missing 0; NAME_sparse.npy int64 [N,26] = the hex ids as "
    "uint32, missing 0; NAME_labels.npy int32 [N,1]; and manifest.json (rows, bad rows, source, "
    "checksum). The same layout as TorchRec's Criteo scripts."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="robe-data",
        description="Criteo data for robe_dist: raw TSV -> memory-mappable .npy, synthetic data with a "
        "known best AUC, dense vocabularies for full-table baselines, and dataset summaries.",
        epilog="Run 'robe-data COMMAND --help' for each command. Docs: docs/data.md.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ing = sub.add_parser(
        "ingest",
        help="convert raw Criteo TSV/CSV (plain or .gz) to .npy files",
        description="Convert raw Criteo click logs (label, 13 integer, 26 hex categorical columns; "
        "1TB day_N files or Kaggle train.txt; plain or gzip) into .npy files, one process per file. "
        "Resumable: finished files (per manifest.json, source unchanged) are skipped, interrupted ones "
        "redone. Bad rows: lines with 15-39 fields are padded with missing values; lines with more "
        "than 40 or fewer than 15 fields, or unparsable values, are skipped and counted per file. " + _LAYOUT,
    )
    ing.add_argument(
        "--input",
        "-i",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help="input files, or directories holding day_N / *.tsv / *.txt / *.csv (optionally .gz; a day_* of another name is refused)",
    )
    ing.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory (created if needed)")
    ing.add_argument(
        "--max-bad-fraction", type=float, default=0.01, metavar="F",
        help="refuse a file (exit 2, nothing written for it) with more bad lines than this share (default 0.01; "
        "blank lines aside), or with no valid row",
    )  # fmt: skip
    ing.add_argument(
        "--workers",
        "-j",
        type=int,
        default=None,
        metavar="N",
        help="parallel processes, one file each (default: number of CPUs, at most one per file)",
    )
    ing.add_argument(
        "--format",
        choices=("tsv", "csv"),
        default=None,
        help="input format (default: detect; CSV = comma separated, a 'label,...' header line is skipped)",
    )
    ing.add_argument("--no-progress", action="store_true", help="no progress bar")

    syn = sub.add_parser(
        "synth",
        help="generate a synthetic Criteo-like dataset with a planted model",
        description="Generate day_0..day_{K-1} of Criteo-like data: 13 dense and 26 sparse features, per-table "
        "cardinalities = MLPerf's 26 table sizes x SCALE (at least 16; tables smaller than 16 keep their "
        "size), Zipf-like raw 32-bit hashed ids, labels from a hidden DLRM-like logistic model whose best "
        "achievable AUC (planted_auc) is computed on the data, printed and stored in manifest.json. "
        "Deterministic per seed; a rerun with the same parameters does nothing. Output: "
        "day_K_{dense,sparse,labels}.npy as ingest writes them (the sparse ids are the raw 32-bit ids), "
        "and manifest.json (rows and positives per file, table sizes, planted_auc, the parameters).",
    )
    syn.add_argument("--rows", type=int, required=True, metavar="N", help="total rows, split evenly over the days")
    syn.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    syn.add_argument(
        "--days",
        type=int,
        default=3,
        metavar="K",
        help="day files (default 3; train = all but the last, which is split into val and test)",
    )
    syn.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    syn.add_argument(
        "--scale",
        type=float,
        default=1e-3,
        metavar="F",
        help="table size factor on MLPerf's sizes (default 1e-3; 1 = full 188M ids)",
    )
    syn.add_argument(
        "--multi-hot",
        action="store_true",
        help="also write MLPerf v3 multi-hot bags (NAME_sparse_multi_hot.npy, fixed bag size per table)",
    )
    syn.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of id frequencies (default 1.05)")
    syn.add_argument("--ctr", type=float, default=0.25, help="mean click rate (default 0.25)")

    voc = sub.add_parser(
        "vocab",
        help="dense per-table ids (MLPerf modulo cap + frequency threshold) for full-table baselines",
        description="Map each table's ids to 0..K_t: ids are capped (id % MAX_IND_RANGE, MLPerf's "
        "40,000,000; 0 = no cap), values seen at least MIN_COUNT times get 1..K_t (ascending), the rest 0. "
        "Writes a complete dataset to --out (int32 sparse ids, dense/labels hard-linked) and "
        "cardinalities.json with the per-table sizes K_t + 1 for the model config.",
    )
    voc.add_argument("--data", "-d", required=True, metavar="DIR", help="source dataset directory")
    voc.add_argument("--out", "-o", required=True, metavar="DIR", help="output dataset directory")
    voc.add_argument(
        "--max-ind-range",
        type=int,
        default=MLPERF_MAX_IND_RANGE,
        metavar="M",
        help=f"modulo cap on ids before counting (default {MLPERF_MAX_IND_RANGE:,}; 0 = raw ids)",
    )
    voc.add_argument(
        "--min-count",
        type=int,
        default=1,
        metavar="T",
        help="keep values seen at least T times (default 1: every seen value)",
    )
    voc.add_argument("--train-only", action="store_true", help="count only the train split (all files but the last; a single file's first 6/7)")

    sta = sub.add_parser(
        "stats",
        help="per-table id statistics of the train split (for robe.features: auto)",
        description="One pass over the train split's sparse ids (all files but the last; a single file's first 6/7): per table, the "
        "distinct ids, occurrences, a histogram of the ids' counts in power-of-two bins and the most "
        "frequent ids. Written to DIR/table_stats.json and DIR/table_top_ids.npz (robe-data vocab writes "
        "them too); the placement planner reads them.",
    )
    sta.add_argument("--data", "-d", required=True, metavar="DIR", help="dataset directory")
    sta.add_argument("--all-files", action="store_true", help="count every file, not only the train split")

    pla = sub.add_parser(
        "plan",
        help="show the placement of tables (full or ROBE) for a memory budget",
        description="Plan which tables keep full rows, which hot ids get exact rows and how large the ROBE array is for a budget "
        "(bytes such as 64MB, or a compression ratio such as 100x against the full tables), from the "
        "dataset's table sizes and id statistics (table_stats.json; computed first if missing). "
        "Prints the decision as robe-train would (robe.features: auto).",
    )
    pla.add_argument("--data", "-d", required=True, metavar="DIR", help="dataset directory (with table sizes: robe-data vocab)")
    pla.add_argument("--budget", "-b", required=True, help="bytes (64MB, 1.5GiB, 4096) or a ratio (100x)")
    pla.add_argument("--dim", type=int, default=16, help="embedding dim of every table (default 16)")
    pla.add_argument("--block-size", type=int, default=32, help="Z of the array (default 32; at most --dim)")
    pla.add_argument("--no-stats", action="store_true", help="ignore id statistics: sizes only")
    pla.add_argument("--hot-rows", action="store_true", help="let the planner give hot ids exact rows (robe.hot_rows: true)")
    pla.add_argument("--json", action="store_true", help="print the decision as JSON")

    inf = sub.add_parser(
        "info",
        help="summarise a dataset directory",
        description="Print a dataset's files, rows, bad rows, split sizes, table sizes and planted AUC.",
    )
    inf.add_argument("dir", metavar="DIR", help="dataset directory (robe_dist manifest or TorchRec day_*_*.npy files)")
    inf.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return p


def _info(path: str, as_json: bool) -> None:
    from robe_dist.data.dataset import read_manifest, split_range

    m = read_manifest(path)
    if as_json:
        print(json.dumps(m, indent=1))
        return
    print(
        f"{m['path']}: {m.get('kind')} dataset, {m['rows']:,} rows in {len(m['files'])} files"
        + ("" if m.get("complete", True) else " (INCOMPLETE: rerun the command that wrote it)")
    )
    for f in m["files"]:
        bad = f" ({f['bad_rows']:,} bad rows skipped)" if f.get("bad_rows") else ""
        print(f"  {f['name']}: {f['rows']:,} rows{bad}")
    rows = [f["rows"] for f in m["files"]]
    if m["rows"]:
        spans = {s: split_range(rows, s) for s in ("train", "val", "test")}
        print("  splits: " + ", ".join(f"{s} {b - a:,}" for s, (a, b) in spans.items()))
    if m.get("table_sizes"):
        print(f"  table sizes: {m['table_sizes']} (sum {sum(m['table_sizes']):,})")
    if m.get("multi_hot_sizes"):
        print(f"  multi-hot bag sizes: {m['multi_hot_sizes']}")
    if m.get("planted_auc") is not None:
        by = m.get("planted_auc_by_split") or {}
        print(
            f"  planted (best achievable) AUC: {m['planted_auc']:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in by.items() if v is not None)
        )


def _plan(args: argparse.Namespace) -> None:
    # robe-train's rule (train_config.validate): model.embedding_dim > 0, robe.block_size a
    # positive int dividing it; here Z is at most --dim (the default 32 means Z = dim for dim 16)
    if args.dim < 1:
        raise DataError(f"--dim must be a whole number >= 1 (the embedding dim of every table), got {args.dim}")
    if args.block_size < 1:
        raise DataError(f"--block-size must be a whole number >= 1 (Z of the ROBE array), got {args.block_size}")
    block_size = min(args.block_size, args.dim)
    if args.dim % block_size:
        raise DataError(f"--dim ({args.dim}) must be a multiple of --block-size ({args.block_size}), as robe-train "
                        "requires of model.embedding_dim and robe.block_size")  # fmt: skip

    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from robe_dist.data.criteo import DEFAULT_CAT_NAMES
    from robe_dist.data.layout import read_manifest
    from robe_dist.data.stats import ensure_table_stats
    from robe_dist.placement import Budget, PlacementError, plan_placement

    budget = Budget.parse(args.budget, field="--budget")
    manifest = read_manifest(args.data)
    if manifest.get("complete") is False:
        raise DataError(f"{args.data}: dataset is incomplete (INCOMPLETE in robe-data info); finish the command "
                        "that wrote it before planning on it")  # fmt: skip
    sizes = manifest.get("table_sizes")
    if not sizes:
        raise DataError(f"{args.data}: the manifest gives no table sizes; run robe-data vocab first")
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=args.dim, num_embeddings=int(n), feature_names=[f])
        for f, n in zip(DEFAULT_CAT_NAMES, sizes)
    ]
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print  # (--json: stdout is the JSON alone)
    stats = None if args.no_stats else ensure_table_stats(args.data, log=log, top_ids=args.hot_rows)
    t0 = time.perf_counter()
    try:
        placement = plan_placement(tables, budget, stats, block_size=block_size, hot_rows=args.hot_rows)
    except PlacementError as e:  # (its messages name the trainer's field)
        raise DataError(str(e).replace("robe.budget", "--budget", 1)) from None
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({**placement.to_dict(), "planning_s": seconds}, indent=1))
    else:
        print(placement.describe())
        print(f"planned in {seconds * 1e3:.1f} ms")


def _check_paths(args: argparse.Namespace) -> None:
    """One-line errors naming the option for a dataset path that is not a directory, or an output
    path that is a file (before anything is written)."""
    from robe_dist.data.layout import dataset_dir

    for option in ("data", "dir", "out", "input"):  # ("" is the current directory to pathlib)
        values = getattr(args, option, None)
        if any(v is not None and str(v).strip() == "" for v in (values if isinstance(values, list) else [values])):
            raise DataError(f"--{option}: an empty path; give a file or directory name")
    for option in ("data", "dir"):
        if getattr(args, option, None) is not None:
            dataset_dir(getattr(args, option), "--data" if option == "data" else "")
    out = getattr(args, "out", None)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out}: is a file, expected a directory (created if missing)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_paths(args)
        if args.command == "ingest":
            from robe_dist.data.ingest import ingest

            manifest = ingest(
                args.input, args.out, workers=args.workers, fmt=args.format, progress=not args.no_progress,
                max_bad_fraction=args.max_bad_fraction,
            )  # fmt: skip
            bad = manifest["bad_rows"]
            print(
                f"ingested {manifest['rows']:,} rows into {args.out}"
                + (f"; {bad:,} bad rows skipped (see manifest.json)" if bad else "")
            )
        elif args.command == "synth":
            from robe_dist.data.synthetic import generate

            generate(
                args.out,
                args.rows,
                days=args.days,
                seed=args.seed,
                scale=args.scale,
                multi_hot=args.multi_hot,
                alpha=args.alpha,
                ctr=args.ctr,
            )
        elif args.command == "vocab":
            from robe_dist.data.vocab import build_vocab

            build_vocab(
                args.data,
                args.out,
                max_ind_range=args.max_ind_range,
                min_count=args.min_count,
                train_only=args.train_only,
            )
        elif args.command == "stats":
            from robe_dist.data.stats import compute_table_stats, write_table_stats
            from robe_dist.data.layout import read_manifest

            from robe_dist.data.layout import train_parts

            manifest = read_manifest(args.data)
            counted = [f["name"] for f in manifest["files"]] if args.all_files else None  # None: the train split
            files = counted or [name for name, _ in train_parts(manifest)]
            path = write_table_stats(args.data, compute_table_stats(args.data, counted), files)
            print(f"wrote {path}")
        elif args.command == "plan":
            _plan(args)
        elif args.command == "info":
            _info(args.dir, args.json)
    except (DataError, ValueError) as e:
        print(f"robe-data: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable input, a read-only dataset (stats and plan write into it), a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"robe-data: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (what was being written stays marked unfinished; done days are kept)
        print(f"robe-data: {args.command} interrupted; rerun the same command to finish it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
