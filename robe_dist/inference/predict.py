"""robe-predict: score a dataset with an artifact of robe-export, without torchrun or the trainer.

    robe-predict --model model.pt2 --data data_cache/synthetic-1500000-3-0-0.001-vocab --split test --out scores.txt

``--data`` is a dataset in robe_dist's npy layout (``robe-data ingest`` of Criteo TSV/CSV, or a
synthetic dataset; the same ids the model was trained on, so the vocab dir for a vocab-trained
model) with ``--split`` one of its splits, or a raw labelled Criteo file (TSV/CSV, plain or gzip,
parsed as ``robe-data ingest`` parses it: bad lines counted and skipped, never scored). A model
trained on ids remapped by ``robe-data vocab`` scores raw rows through that vocabulary:
``--vocab DIR`` (default: the directory it was trained on, if it is still there), checked against
the fingerprint the model recorded. One probability per row goes to ``--out`` (text, one line
each, in row order; for a raw file, one line per line of the file after its header, so that line
``k`` of the scores is the ``k``-th data line, and ``nan`` for a bad line); the labels of the
scored rows give AUC and log-loss, printed.

    robe-predict --model model.pt2 --data day_23.gz --out scores.txt
    robe-predict --model model.pt2 --data day_23.gz --vocab data/criteo_vocab --out scores.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from robe_dist import ops
from robe_dist.inference.export import FORMAT_VERSION, META_FILE, ExportError, is_or_inside


class Scorer:
    """The exported program as a function of ``(dense, values, lengths)``. torch.export
    specialises size-1 dimensions away (its graph guards ``batch != 1``), so a single row is
    scored as two copies of itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if dense.shape[0] != 1:
            return self.module(dense, values, lengths)
        segments = torch.split(values, lengths.tolist())
        doubled = torch.cat([x for seg in segments for x in (seg, seg)])
        return self.module(dense.repeat(2, 1), doubled, lengths.repeat_interleave(2))[:1]


def read_metadata(path: Path) -> Dict[str, Any]:
    """robe_dist's metadata of an artifact (``robe_dist.json``), read from the archive without
    loading the program, so that options are checked against it at once; ``ExportError`` for a
    missing, truncated, foreign or newer artifact."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"--model {path}: is a directory; a .pt2 file written by robe-export was expected")
    if not path.exists():
        raise ExportError(f"--model {path}: no such file")
    if not path.is_file():
        raise ExportError(f"--model {path}: not a regular file; a .pt2 file written by robe-export was expected")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"--model {path}: not a robe-export artifact (not a torch.export archive; truncated?)")
    try:
        with zipfile.ZipFile(path) as z:  # torch.export.save writes extra files as <archive>/extra/<name>
            damaged = z.testzip()  # (the weights are stored uncompressed: only their CRC would notice)
            names = [n for n in z.namelist() if n.split("/")[-2:] == ["extra", META_FILE]]
            text = z.read(names[0]).decode() if len(names) == 1 and damaged is None else None
    except Exception as e:  # (BadZipFile, OSError, zlib.error, encrypted or unknown compression members, ...)
        raise ExportError(f"--model {path}: cannot be read ({type(e).__name__}: {str(e).strip()[:200]})") from None
    if damaged is not None:
        raise ExportError(f"--model {path}: damaged: its member {damaged} fails its CRC check (a copy cut or changed?)")
    if text is None:  # another layout of the archive: torch's own reader finds it
        extra = {META_FILE: ""}
        _load_program(path, extra)
        text = extra[META_FILE]
    if not text:
        raise ExportError(f"--model {path}: a torch.export archive without robe_dist's metadata (not from robe-export)")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ExportError(f"--model {path}: its robe_dist metadata is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"--model {path}: its robe_dist metadata is damaged (not a mapping)")
    vocab = meta.get("vocab")
    if not isinstance(meta.get("format_version", 0), int) or not (
        vocab is None or isinstance(vocab, dict) and all(isinstance(vocab.get(k), str) for k in ("path", "fingerprint"))
    ):  # fmt: skip
        raise ExportError(f"--model {path}: its robe_dist metadata is damaged (format_version {meta.get('format_version')!r}, "
                          f"vocab {vocab!r}: an integer, and null or a path and a fingerprint were expected)")  # fmt: skip
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(
            f"--model {path}: format version {meta['format_version']} is newer than this robe_dist reads "
            f"({FORMAT_VERSION}); upgrade robe_dist"
        )
    return meta


@contextlib.contextmanager
def _quiet_deserializer() -> Iterator[None]:
    """Silences torch's warnings while a program is loaded, none of which a robe-predict user can
    act on: "Symbol u59 did not appear in the graph that was deserialized", one line per size that
    a quotient-remainder model's graph computes from the ids (dozens per model), and the traceback
    torch.export.load prints of an archive it cannot read (robe-predict's one line says it)."""
    loggers = [logging.getLogger(name) for name in ("torch._export.serde.serialize", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_program(path: Path, extra: Optional[Dict[str, str]] = None) -> torch.nn.Module:
    import robe_dist.ops  # noqa: F401  registers robe_dist::pooled_lookup and FBGEMM's ops, which the graph calls

    try:
        with _quiet_deserializer():
            return torch.export.load(str(path), extra_files=extra).module()
    except Exception as e:  # a damaged archive fails in many ways
        raise ExportError(f"--model {path}: cannot be read ({type(e).__name__}: {str(e).strip()[:200]})") from None


def load_artifact(path: Path) -> Tuple[Scorer, Dict[str, Any]]:
    """The exported scoring module and its metadata; ``ExportError`` for a missing, truncated,
    foreign or newer artifact (found before the program is loaded)."""
    meta = read_metadata(path)
    return Scorer(_load_program(Path(path))), meta


def score_split(model, data: Path, split: str, batch_size: int, multi_hot: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels of every row of ``split``, in order."""
    from robe_dist.data.dataset import CriteoIterableDataset

    ds = CriteoIterableDataset(data, split, batch_size=batch_size, rank=0, world_size=1, shuffle_buffer=0,
                               drop_last=False, multi_hot=multi_hot)  # fmt: skip
    probs, labels = [], []
    with torch.no_grad():
        for b in ds:
            kjt = b.sparse_features
            probs.append(model(b.dense_features, kjt.values(), kjt.lengths().to(torch.int64)))
            labels.append(b.labels)
    if not probs:
        raise ExportError(f"--data {data}: split {split!r} has no rows")
    return torch.cat(probs), torch.cat(labels)


def check_dataset_ids(meta: Dict[str, Any], data: Path) -> None:
    """``ExportError`` unless the npy dataset ``data`` holds the ids the model was trained on: raw
    ids for a raw-id model, ids mapped by the same vocabulary (fingerprint) for a vocab-trained one.
    Artifacts that record neither (older ones) are not checked."""
    from robe_dist.data.layout import read_manifest

    ids, recorded = meta.get("ids"), meta.get("vocab")
    if ids is None:
        return
    manifest = read_manifest(data)
    if (ids == "torchrec-npy") != (manifest.get("kind") == "torchrec-npy"):
        made = "a directory made by TorchRec's scripts" if ids != "torchrec-npy" else "a dataset made by robe-data"
        raise ExportError(
            f"--data {data}: is {made}, but this model was trained on "
            f"{'one made by TorchRec' if ids == 'torchrec-npy' else 'one made by robe_dist'}: their dense features "
            "differ (TorchRec: log(x - min + 2); robe_dist: log(1 + max(x, 0))), and so may the ids; score data made as the training data was"
        )
    found = (manifest.get("vocab") or {}).get("fingerprint")
    if ids == "vocab" and recorded and found != recorded["fingerprint"]:
        held = f"ids mapped by vocabulary {found}" if found else "raw ids"
        raise ExportError(
            f"--data {data}: holds {held}, but this model was trained on ids mapped by vocabulary "
            f"{recorded['fingerprint']} (built at {recorded['path']}): score that dataset, or raw rows (.tsv/.csv), "
            "which go through the model's vocabulary"
        )
    if ids == "raw" and found:
        raise ExportError(
            f"--data {data}: holds ids mapped by vocabulary {found}, but this model was trained on raw ids: "
            "score the dataset the vocabulary was built from"
        )


def model_vocabulary(meta: Dict[str, Any], vocab_dir: Optional[Path]):
    """The ``Vocabulary`` a vocab-trained model reads raw ids through: ``vocab_dir``, or the
    directory recorded at training; ``ExportError`` unless its fingerprint is the model's."""
    from robe_dist.data.layout import DataError
    from robe_dist.data.vocab import Vocabulary

    recorded = meta.get("vocab")
    if not recorded and vocab_dir is None:
        raise ExportError(
            "this model was trained on ids remapped by robe-data vocab, but its checkpoint does not record which "
            "vocabulary (trained before robe_dist stored vocabularies, or on one without stored values): pass "
            "--vocab DIR (that vocabulary, rebuilt by robe-data vocab if needed), or score a dataset in the npy layout"
        )
    where = vocab_dir if vocab_dir is not None else Path(recorded["path"])
    if vocab_dir is None and not where.is_dir():
        raise ExportError(
            f"this model reads ids through the vocabulary it was trained with ({where}, no longer there): "
            "pass --vocab DIR (that robe-data vocab output)"
        )
    named = f"--vocab {where}" if vocab_dir is not None else f"the vocabulary the model was trained with, {where}"
    try:
        vocab = Vocabulary.load(where)
    except (DataError, FileNotFoundError, OSError, KeyError, ValueError) as e:
        raise ExportError(f"{named}: {e}") from None
    if not recorded:
        print(f"robe-predict: warning: the model records no vocabulary; {where} ({vocab.fingerprint}) is used "
              "unchecked: it must be the one the model was trained with", file=sys.stderr)  # fmt: skip
    elif vocab.fingerprint != recorded["fingerprint"]:
        raise ExportError(
            f"{named}: vocabulary {vocab.fingerprint} is not the one this model was trained with "
            f"({recorded['fingerprint']}, built at {recorded['path']})"
        )
    return vocab


def score_raw(model, path: Path, batch_size: int, meta: Dict[str, Any],
              vocab_dir: Optional[Path] = None) -> Tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:  # fmt: skip
    """Probabilities, labels and data-line indices (0 = the first line after the header) of the
    good rows of a raw Criteo file (TSV or CSV, plain or gzip, labelled: Criteo's 40 fields),
    parsed as ``robe-data ingest`` parses it; bad rows are counted and skipped (the returned
    ParseStats says how many and why), never scored. A vocab-trained model's ids go through its
    vocabulary (``model_vocabulary``) first."""
    from robe_dist.data.ingest import ParsedFile

    if meta.get("ids") == "torchrec-npy":
        raise ExportError(
            f"--data {path}: this model was trained on a directory made by TorchRec's scripts, whose dense features "
            "(log(x - min + 2), with the file's minimum) and ids robe-predict cannot rebuild from raw rows: "
            "score npy files made the same way (--data DIR)"
        )
    if path.stat().st_size == 0:
        raise ExportError(f"--data {path}: the file is empty; a raw labelled Criteo file (.tsv/.csv, gzip or not) was expected")
    vocab = model_vocabulary(meta, vocab_dir) if meta.get("ids") == "vocab" else None
    if meta.get("multi_hot"):
        raise ExportError(f"--data {path}: a multi-hot model scores npy datasets only (raw Criteo rows are one-hot)")
    parsed = None
    probs, labels, lines = [], [], []
    try:
        parsed = ParsedFile(path)
        with torch.no_grad():
            for block in parsed:
                lines.append(torch.from_numpy(block.lines - (2 if parsed.header else 1)))
                ids = vocab.apply(block.sparse) if vocab is not None else block.sparse
                for a in range(0, len(block.labels), batch_size):
                    sparse = torch.from_numpy(ids[a : a + batch_size])
                    n = sparse.shape[0]
                    values = sparse.t().reshape(-1).to(torch.int64)
                    probs.append(model(torch.from_numpy(block.dense[a : a + batch_size]), values,
                                       torch.ones(sparse.shape[1] * n, dtype=torch.int64)))  # fmt: skip
                    labels.append(torch.from_numpy(block.labels[a : a + batch_size, 0]).float())
    except (EOFError, OSError, zlib.error) as e:  # worded as robe-data ingest words it
        damaged = "; a truncated or corrupt download?" if isinstance(e, (EOFError, zlib.error)) else ""
        raise ExportError(f"--data {path}: cannot read it ({type(e).__name__}: {e}){damaged}") from None
    finally:
        if parsed is not None:
            parsed.close()
    if not parsed.stats.lines:
        raise ExportError(f"--data {path}: the file is empty (no data line{' after its header' if parsed.header else ''})")
    if not probs:
        raise ExportError(f"--data {path}: no valid Criteo row ({parsed.stats.bad_rows:,} bad lines: {dict(parsed.stats.bad)})")
    return torch.cat(probs), torch.cat(labels), parsed.stats, torch.cat(lines)


def metrics(probs: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    from torchmetrics.functional.classification import binary_auroc

    p = probs.double().clamp(1e-7, 1 - 1e-7)
    logloss = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    one_class = labels.numel() == 0 or bool((labels == labels.flatten()[0]).all())
    auc = float("nan") if one_class else float(binary_auroc(probs.float(), labels.long()))  # (undefined for one class)
    return {"auc": auc, "logloss": float(logloss)}


def check_options(args: argparse.Namespace, meta: Dict[str, Any]) -> None:
    """``ExportError`` for an option that would be ignored: ``--split`` with a raw file (scored
    whole), ``--vocab`` where no raw ids go through a vocabulary (a raw-id model, an artifact that
    does not say, an npy dataset: its ids are already the model's)."""
    raw = args.data.is_file()
    if raw and args.split is not None:
        raise ExportError(
            f"--split {args.split}: applies to npy datasets only; --data {args.data} is a raw file, scored whole: drop --split"
        )
    if args.vocab is None:
        return
    if not raw and args.data.is_dir():
        raise ExportError(
            f"--vocab {args.vocab}: applies to raw rows only; the npy dataset --data {args.data} already holds the ids "
            "it is scored on (checked against the model's vocabulary): drop --vocab"
        )
    if raw and meta.get("ids") == "raw":
        raise ExportError(f"--vocab {args.vocab}: this model was trained on raw ids, not on ids of a vocabulary: drop --vocab")
    if raw and meta.get("ids") is None:
        raise ExportError(
            f"--vocab {args.vocab}: this artifact (from an older robe-export) does not record whether its model reads "
            "ids through a vocabulary, so none is applied: re-export it from its checkpoint, or drop --vocab"
        )


def check_out(out: Path, inputs: List[Tuple[str, Optional[Path]]]) -> None:
    """``ExportError`` unless the scores can be written to ``out`` without overwriting an input
    (``(option, path)``: a file, or a directory that ``out`` must not be inside): not a
    directory, its missing parents creatable; checked before scoring."""
    for option, path in inputs:
        if path is not None and is_or_inside(out, path):
            if path.is_file() and path.resolve() in out.resolve().parents:
                continue  # a path under a file (model.pt2/x): the parent check below says so
            if path.is_file() or out.resolve() == path.resolve():
                what = f"is the {option} {'file' if path.is_file() else 'directory'}"
            else:
                what = f"is inside the {option} directory {path}"
            raise ExportError(f"--out {out}: {what}, which the scores would overwrite: write them elsewhere")
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; give the scores' file name (e.g. {out / 'scores.txt'})")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: cannot write in {parent} (permission denied)")
    longest, limit = len(_temporary(out).name), os.pathconf(parent, "PC_NAME_MAX")  # (it failed after scoring)
    if longest > limit:
        raise ExportError(f"--out {out}: its name is too long to write it atomically ({longest} characters with its "
                          f"temporary file's prefix and suffix; at most {limit} in {parent})")  # fmt: skip


def _temporary(out: Path) -> Path:
    """The file the scores are written to before it is renamed ``out``."""
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def write_scores(out: Path, scores: torch.Tensor) -> None:
    """One score per line to ``out``, atomically (a temporary file beside it, renamed); missing
    parent directories are created."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(out)
        try:
            with open(tmp, "w") as f:
                f.write("\n".join(f"{p:.7g}" for p in scores.tolist()) + "\n")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)  # (after the rename there is nothing left to remove)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write it ({type(e).__name__}: {e.strerror or e})") from None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="robe-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="an artifact of robe-export")
    p.add_argument("--data", type=Path, required=True,
                   help="a dataset dir in robe_dist's npy layout, or a raw labelled Criteo file (.tsv/.csv, gzip or not)")
    p.add_argument("--split", default=None, choices=["train", "val", "test"], help="npy datasets: the split to score (default: test)")
    p.add_argument("--vocab", type=Path, default=None, metavar="DIR",
                   help="raw rows, vocab-trained model: the robe-data vocab directory it was trained with "
                        "(default: the one recorded at training)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write one probability per row here")
    p.add_argument("--batch-size", type=int, default=16384, help="rows per forward call (positive)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    from robe_dist.data.layout import DataError

    args = parse_args(argv)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # "is_fx_tracing will return true ...", as robe-export
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size {args.batch_size}: must be a positive number of rows (default 16384)")
        meta = read_metadata(args.model)  # the options are checked before the program is loaded
        if not args.data.exists() and args.data.name.endswith((".tsv", ".csv", ".gz", ".txt")):
            raise ExportError(f"--data {args.data}: no such file")
        check_options(args, meta)
        if args.out is not None:  # before any scoring
            recorded = (meta.get("vocab") or {}).get("path") if isinstance(meta.get("vocab"), dict) else None
            check_out(args.out, [("--model", args.model), ("--data", args.data), ("--vocab", args.vocab),
                                 ("model's recorded vocabulary", Path(recorded) if recorded else None)])  # fmt: skip
        model = Scorer(_load_program(args.model))
        split = args.split or "test"
        t0 = time.time()
        skipped, per_line = "", None
        if args.data.is_file():
            probs, labels, stats, lines = score_raw(model, args.data, args.batch_size, meta, args.vocab)
            if stats.bad_rows:
                reasons = ", ".join(f"{k}: {v:,}" for k, v in stats.bad.items() if v)
                where = ", ".join(str(line) for line, _ in stats.bad_examples[:3]) + (", ..." if stats.bad_rows > 3 else "")
                skipped = f"; {stats.bad_rows:,} bad lines skipped, not scored ({reasons}; file lines {where})"
                per_line = torch.full((stats.lines,), float("nan"))
                per_line[lines] = probs
                if args.out:
                    skipped += ": their lines in the scores say nan"
        else:
            check_dataset_ids(meta, args.data)
            ops.set_bus_error_message(f"robe-predict: bus error (SIGBUS) reading the memory-mapped data: a file under "
                                      f"{args.data} was truncated or replaced while it was read; nothing was written")  # fmt: skip
            probs, labels = score_split(model, args.data, split, args.batch_size, meta.get("multi_hot", False))
        seconds = time.time() - t0
        if args.out is not None:
            write_scores(args.out, probs if per_line is None else per_line)
    except (ExportError, DataError, FileNotFoundError) as e:
        print(f"robe-predict: {e}", file=sys.stderr)
        return 2
    m = metrics(probs, labels)
    auc = "AUC undefined (every label is the same)" if math.isnan(m["auc"]) else f"AUC {m['auc']:.4f}"
    split = "" if args.data.is_file() else f" ({split})"
    print(f"robe-predict: {len(probs):,} rows of {args.data}{split} in {seconds:.1f} s "
          f"({len(probs) / max(seconds, 1e-9):,.0f} rows/s): {auc}, log-loss {m['logloss']:.4f}"
          + (f"; scores in {args.out}" if args.out else "") + skipped)  # fmt: skip
    return 0


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
