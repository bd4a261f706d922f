"""On-disk layout of a binary Criteo dataset directory, and its manifest.

One directory holds, per input unit ``NAME`` (``day_0``, ``train``, ...), the TorchRec layout::

    NAME_dense.npy     float32 [N, 13]   log(1 + max(x, 0)) of the integer features, missing -> 0
    NAME_sparse.npy    int64   [N, 26]   categorical ids (hex parsed as uint32), missing -> 0
                                         (int32 after ``robe-data vocab``: dense per-table indices)
    NAME_labels.npy    int32   [N, 1]    click label 0/1

and optionally, for multi-hot data (fixed bag size ``s_t`` per table, as MLPerf DLRMv2)::

    NAME_sparse_multi_hot.npy  int64 [N, sum(s_t)]  table t's bag in columns
                                                    offsets[t] : offsets[t] + s_t; the first id
                                                    of each bag equals NAME_sparse.npy[:, t]

plus ``manifest.json`` (written last, atomically: a unit listed there is complete)::

    {"format": "robe_dist.criteo-npy", "version": 1, "kind": "criteo" | "synthetic" | "vocab",
     "files": [{"name": "day_0", "rows": N, ...}, ...],   # in day order
     "table_sizes": [...] | null, "multi_hot_sizes": [...] | null, ...}

A directory written by TorchRec's scripts (``day_{i}_{dense,sparse,labels}.npy``, no manifest)
is read as is: :func:`read_manifest` builds the manifest from the ``.npy`` headers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from robe_dist.data.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from robe_dist.data.npy import npy_header, partial_path

MANIFEST_NAME = "manifest.json"
FORMAT = "robe_dist.criteo-npy"
VERSION = 1
PARTS = ("dense", "sparse", "labels")
MULTI_HOT_PART = "sparse_multi_hot"


class DataError(Exception):
    """A data file or directory is missing, empty or not what was expected (the CLI exits 2)."""


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``day_2`` before ``day_10``."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def part_path(directory: str | os.PathLike, name: str, part: str) -> Path:
    """``DIR/NAME_PART.npy``."""
    return Path(directory) / f"{name}_{part}.npy"


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """``write(f)`` into a temporary file beside ``path``, fsync it, rename it to ``path``: readers
    see the old file or the whole new one."""
    path = Path(path)
    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Holds an exclusive lock on ``<directory>.lock`` (created next to it): two processes that
    build the same cached dataset at once take turns, and the second finds it built; with
    ``wait=False`` the second gets a ``DataError`` at once (two robe-data commands writing one
    directory). Where the lock file cannot be made or locked (a read-only place, a file system
    without ``flock``), it goes on without one."""
    path = Path(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.parent / f"{path.name}.lock", "a")
    except OSError:  # a read-only place (a finished dataset there is only read): no lock to take
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DataError(f"{path}: another process is writing it (it holds {fh.name}); wait for it to end") from None
        except OSError:  # a file system without flock (some NFS mounts): go on unlocked, as before
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json_atomic(path: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` as JSON to ``path`` atomically (``write_atomic``)."""
    return write_atomic(path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))


SPLITS = ("train", "val", "test")
SINGLE_FILE_HOLDOUT = 1 / 7


def split_range(file_rows: list[int], split: str, holdout_fraction: float | None = None) -> tuple[int, int]:
    """[start, stop) of ``split`` in the concatenation of the files' rows."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    total = sum(file_rows)
    if holdout_fraction is None and len(file_rows) >= 2:
        holdout = file_rows[-1]
    else:
        fraction = SINGLE_FILE_HOLDOUT if holdout_fraction is None else holdout_fraction
        if not 0 < fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
        holdout = round(total * fraction)
    start = total - holdout
    val_stop = start + (holdout + 1) // 2
    return {"train": (0, start), "val": (start, val_stop), "test": (val_stop, total)}[split]


def train_parts(manifest: dict) -> list[tuple[str, int]]:
    """``(file name, rows)`` of the train split as ``split_range`` defines it: every row of each
    file but the last (several files), or the first ``1 - 1/7`` of a single file's rows (Kaggle's
    day held out); a file's rows are counted from its start."""
    rows = [int(f["rows"]) for f in manifest["files"]]
    _, stop = split_range(rows, "train") if rows else (0, 0)
    parts, start = [], 0
    for entry, n in zip(manifest["files"], rows):
        if start >= stop:
            break
        parts.append((entry["name"], min(n, stop - start)))
        start += n
    return parts


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (temporary name, fsync, rename)."""
    return write_json_atomic(Path(directory) / MANIFEST_NAME, manifest)


def output_dir(path: str | os.PathLike, what: str = "the output directory") -> Path:
    """Create directory ``path`` (and its parents) if needed; :class:`DataError` naming ``what``
    (``--out`` on a command line) if it, or a parent, is a file or it cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path}: is a file, expected a directory (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{what} {path}: cannot create the directory ({e.strerror or type(e).__name__})") from None
    return path


def dataset_dir(path: str | os.PathLike, what: str = "") -> Path:
    """``path`` as an existing directory; :class:`DataError` naming ``what`` (``--data`` on a
    command line) if it is missing or is a file."""
    path = Path(path)
    where = f"{what} {path}" if what else str(path)
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"{where}: is a file, expected a dataset directory")
    raise DataError(f"{where}: dataset directory not found")


def load_manifest_file(directory: str | os.PathLike) -> dict | None:
    """The parsed ``manifest.json`` of ``directory``, or None if there is none; :class:`DataError`
    naming it if it is not a robe_dist manifest (not JSON, another format, no list of files)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{path}: not valid JSON ({e}); a damaged manifest: rerun the command that wrote it") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: not a robe_dist manifest (format {found!r}, expected {FORMAT!r})")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("rows", 0), int) for e in files
    ):
        raise DataError(f"{path}: 'files' must be a list of {{\"name\": str, \"rows\": int}} entries; a damaged manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise DataError(f"{path}: format version {version!r}; this robe_dist reads version {VERSION} and older: "
                        "upgrade robe_dist, or rewrite the dataset with this one")  # fmt: skip
    for entry in files:  # a unit's files lie in the directory itself
        if Path(entry["name"]).name != entry["name"] or entry["name"] in ("", ".", ".."):
            raise DataError(f"{path}: file name {entry['name']!r} is not a name inside the directory; a damaged manifest")
    for key in ("table_sizes", "multi_hot_sizes"):
        sizes = manifest.get(key)
        if sizes is not None and not (isinstance(sizes, list) and len(sizes) == CAT_FEATURE_COUNT
                                      and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):  # fmt: skip
            raise DataError(f"{path}: {key} must be null or {CAT_FEATURE_COUNT} positive whole numbers, got "
                            f"{str(sizes)[:80]}; a damaged manifest")  # fmt: skip
    return manifest


def refuse_foreign_days(directory: Path, manifest: dict | None, command: str) -> None:
    """``DataError`` when ``directory`` has no manifest (``manifest``: its ``load_manifest_file``)
    but holds days (a TorchRec-made dataset): ``command`` would write a manifest listing only its
    own days, dropping those from the dataset."""
    if manifest is None:
        days = sorted(p.name for p in Path(directory).glob("*_dense.npy"))
        if days:
            raise DataError(f"{directory}: holds a dataset without a manifest ({', '.join(days[:3])}"
                            f"{' ...' if len(days) > 3 else ''}: TorchRec-made?); {command} into another directory")  # fmt: skip


#: dtype kinds each part may have (numpy ``dtype.kind``): what robe_dist, TorchRec and ``vocab``
#: write (float32 dense, int64 or int32 ids, int32 labels); ids and labels must be integers
#: (float ids lose bits: float32 rounds 32-bit ids).
PART_KINDS = {"dense": ("f", "a floating-point"), "sparse": ("iu", "an integer"), "labels": ("iu", "an integer"),
              MULTI_HOT_PART: ("iu", "an integer")}  # fmt: skip
_EXAMPLE = {"dense": "float32", "sparse": "int64 or int32", "labels": "int32", MULTI_HOT_PART: "int64 or int32"}


def check_npy(path: Path, part: str | None = None) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the ``.npy`` file ``path`` from its header, checked: a readable version 1/2
    header, C order, the file size its header needs, and (for a dataset ``part``) the dtype kind of
    :data:`PART_KINDS`. Raises :class:`DataError` naming the file. Reads no data."""
    try:
        shape, fortran, dtype, offset = npy_header(path)
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable .npy file ({first})") from None
    if fortran:
        raise DataError(f"{path}: a Fortran-order .npy file; expected C order (as numpy.save writes by default)")
    if part in PART_KINDS:
        kinds, words = PART_KINDS[part]
        if dtype.kind not in kinds:
            raise DataError(f"{path}: dtype {dtype}, expected {words} dtype for {part} (e.g. {_EXAMPLE[part]})")
    needed = offset + dtype.itemsize * math.prod(shape)
    if size < needed:
        raise DataError(f"{path}: truncated: {size:,} bytes, its header needs {needed:,} (shape {list(shape)}, {dtype})")
    if size > needed:
        raise DataError(f"{path}: {size:,} bytes, its header says {needed:,} (shape {list(shape)}, {dtype}): "
                        "trailing data, a damaged file")  # fmt: skip
    return shape, dtype


def _check_unit(directory: Path, name: str, multi_hot_width: int | None) -> int:
    """Validate one unit's files from their headers and sizes; return its row count."""
    expected = {"dense": (INT_FEATURE_COUNT,), "sparse": (CAT_FEATURE_COUNT,), "labels": (1,)}
    if multi_hot_width is not None:
        expected[MULTI_HOT_PART] = (multi_hot_width,)
    rows = None
    for part, tail in expected.items():
        path = part_path(directory, name, part)
        if not path.is_file():
            raise DataError(f"{path}: missing (every unit needs {', '.join(f'{name}_{p}.npy' for p in expected)})")
        shape, _ = check_npy(path, part)
        if len(shape) != 2 or shape[1:] != tail:
            raise DataError(f"{path}: shape {shape}, expected [N, {tail[0]}]")
        if rows is not None and shape[0] != rows:
            raise DataError(f"{path}: {shape[0]} rows, but {name}_dense.npy has {rows}")
        rows = shape[0]
    assert rows is not None
    return rows


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a dataset directory, its files checked against their ``.npy`` headers.

    Reads ``manifest.json`` if present; otherwise (a directory from TorchRec's Criteo scripts)
    builds one from every ``NAME_dense.npy`` with matching ``NAME_sparse.npy`` and
    ``NAME_labels.npy``, in natural order of NAME. Raises :class:`DataError` naming the offending
    path if the directory or a file is missing or inconsistent.
    """
    directory = dataset_dir(path)
    manifest = load_manifest_file(directory)
    if manifest is None:
        names = sorted((p.name[: -len("_dense.npy")] for p in directory.glob("*_dense.npy")), key=natural_key)
        if not names:
            raise DataError(f"{directory}: no manifest.json and no NAME_dense.npy files (not a Criteo dataset)")
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": "torchrec-npy", "table_sizes": None,
            "multi_hot_sizes": None, "files": [{"name": n} for n in names],
        }  # fmt: skip
    mh = manifest.get("multi_hot_sizes")
    width = sum(mh) if mh else None
    for entry in manifest["files"]:
        rows = _check_unit(directory, entry["name"], width)
        if entry.setdefault("rows", rows) != rows:
            raise DataError(
                f"{part_path(directory, entry['name'], 'dense')}: {rows} rows, manifest says {entry['rows']}"
            )
    manifest["rows"] = sum(e["rows"] for e in manifest["files"])
    manifest["path"] = str(directory.resolve())
    return manifest
