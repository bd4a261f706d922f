"""Raw Criteo text (TSV or CSV, plain or gzip) -> the binary layout of :mod:`robe_dist.data.layout`.

Each input file is streamed in chunks of whole lines (bounded memory), parsed by
:func:`robe_dist.data.parse.parse_buffer` and appended to ``NAME_{dense,sparse,labels}.npy``
written under temporary names; the three are renamed into place when the file is finished, and
``manifest.json`` (the only place a unit is marked done) is rewritten after that. A rerun skips
units the manifest marks done whose source is unchanged (same size and mtime) and redoes the
others from scratch, so an interrupted unit is never mistaken for a finished one.
Files are converted in parallel, one process per file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robe_dist.data.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT, MISSING_CAT_ID
from robe_dist.data.layout import (
    FORMAT, MANIFEST_NAME, PARTS, VERSION, DataError, directory_lock, load_manifest_file, natural_key, output_dir,
    part_path, refuse_foreign_days, write_atomic, write_manifest,
)  # fmt: skip
from robe_dist.data.npy import PARTIAL_SUFFIX, NpyAppender, commit, partial_path
from robe_dist.data.parse import COMMA, PAD, TAB, ParsedBlock, ParseStats, parse_buffer
from robe_dist.data.reader import LineBlocks, detect_format, is_header, open_text

INPUT_SUFFIXES = (".tsv", ".txt", ".csv")
FORMATS = ("tsv", "csv")


@dataclass(frozen=True)
class Job:
    """One input file to convert into ``out_dir/NAME_*.npy``."""

    source: Path
    name: str
    out_dir: Path
    fmt: str | None  # None: detect
    max_bad_fraction: float = 0.01  # more bad lines than this share: the file is refused


def unit_name(path: Path) -> str:
    """Output name of an input: its file name without extensions (``day_0.tsv.gz`` -> ``day_0``)."""
    name = path.name
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in INPUT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_DAY_NAME = re.compile(r"day_\d+(\.tsv|\.csv|\.txt)?(\.gz)?")


def _is_input_name(path: Path) -> bool:
    base = path.name.removesuffix(".gz")
    if path.name.startswith(".") or base.endswith((".npy", ".json", PARTIAL_SUFFIX)):
        return False
    return base.startswith("day_") or base.endswith(INPUT_SUFFIXES)


def discover_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Input files from files and directories (a directory contributes its ``day_N`` and
    ``*.tsv|txt|csv`` files, optionally ``.gz``), in natural order of their unit names.

    Raises :class:`DataError` for a path that does not exist, an empty file, a directory with
    no input files, or two inputs with the same unit name."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = [p for p in path.iterdir() if p.is_file() and _is_input_name(p)]
            odd = sorted(p.name for p in inside if p.name.startswith("day_") and not _DAY_NAME.fullmatch(p.name))
            if odd:  # (day_2.bak was taken for one more day, the last: the test split)
                raise DataError(f"{path}: {', '.join(odd[:3])}: named day_* but not day_N[.tsv|.csv|.txt][.gz]; "
                                "move it out of the directory or rename it")  # fmt: skip
            if not inside:
                raise DataError(f"{path}: directory has no input files (day_* or *.tsv, *.txt, *.csv, optionally .gz)")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        elif path.exists():  # /dev/null, a FIFO, a socket: no file to read twice and size
            raise DataError(f"{path}: not a regular file; a Criteo TSV/CSV file (or .gz) or a directory of them was expected")
        else:
            raise DataError(f"{path}: input not found")
    for path in found:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: input file is empty")
    found.sort(key=lambda p: natural_key(unit_name(p)))
    names = [unit_name(p) for p in found]
    for name in sorted(set(names)):
        if names.count(name) > 1:
            clash = [str(p) for p in found if unit_name(p) == name]
            raise DataError(f"inputs {clash} would all be written as {name}_*.npy; rename one")
    return found


class ParsedFile:
    """The parsed blocks of one raw Criteo file (TSV or CSV, plain or gzip), in order: a header
    line is skipped, bad lines are counted in ``stats`` (and skipped), ``fmt`` is detected from the
    first line unless given. Used by ingestion and by ``robe-predict`` on raw files."""

    def __init__(self, source: Path, fmt: str | None = None, progress: Callable[[int], None] | None = None) -> None:
        self.source, self.fmt, self.header = source, fmt, False
        self.stats = ParseStats()
        self.raw, self.stream = open_text(source)
        reported = 0

        def on_bytes() -> None:
            nonlocal reported
            if progress is not None and self.raw.bytes > reported:
                progress(self.raw.bytes - reported)
                reported = self.raw.bytes

        self.blocks = LineBlocks(self.stream, on_bytes)

    def __iter__(self) -> Iterator[ParsedBlock]:
        parsed_lines, delimiter = 0, TAB  # lines parsed so far, the header included
        for i, buf in enumerate(self.blocks):
            if i == 0:
                if buf[PAD : PAD + 3] == b"\xef\xbb\xbf":  # a UTF-8 byte order mark (a file saved by a text editor)
                    del buf[PAD : PAD + 3]
                first = bytes(buf[PAD : buf.find(b"\n", PAD)])
                self.fmt = self.fmt or detect_format(first, self.source)
                delimiter = COMMA if self.fmt == "csv" else TAB
                if is_header(first, delimiter):
                    self.header, parsed_lines = True, 1
                    del buf[PAD : PAD + len(first) + 1]
            # the over-long lines dropped so far all come before this buffer's lines
            parsed = parse_buffer(buf, delimiter=delimiter, first_line=1 + parsed_lines + self.blocks.too_long)
            parsed_lines += parsed.stats.lines
            self.stats.add(parsed.stats)
            yield parsed
        if self.blocks.too_long:
            self.stats.lines += self.blocks.too_long
            self.stats.bad["line_too_long"] += self.blocks.too_long

    def close(self) -> None:
        self.stream.close()


def convert_file(job: Job, progress: Callable[[int], None] | None = None) -> dict:
    """Convert one raw Criteo file; returns its manifest entry. Outputs appear atomically."""
    t0 = time.perf_counter()
    source = job.source
    stat = source.stat()
    outs = {part: part_path(job.out_dir, job.name, part) for part in PARTS}
    parsed_file = ParsedFile(source, job.fmt, progress)
    writers = [
        NpyAppender(partial_path(outs["dense"]), np.float32, (INT_FEATURE_COUNT,)),
        NpyAppender(partial_path(outs["sparse"]), np.int64, (CAT_FEATURE_COUNT,)),
        NpyAppender(partial_path(outs["labels"]), np.int32, (1,)),
    ]
    try:
        for parsed in parsed_file:
            for writer, arr in zip(writers, (parsed.dense, parsed.sparse, parsed.labels)):
                writer.append(arr)
        _check_quality(source, parsed_file.stats, job.max_bad_fraction, parsed_file.header)
        for writer in writers:
            writer.finish()
    except BaseException as e:
        for writer in writers:
            writer.abort()
        if isinstance(e, (EOFError, OSError, zlib.error)) and not isinstance(e, FileNotFoundError):
            raise DataError(
                f"{source}: cannot read it ({type(e).__name__}: {e}); a truncated or corrupt download?"
            ) from e
        raise
    finally:
        parsed_file.close()
    commit(list(outs.values()))
    seconds = time.perf_counter() - t0
    stats, blocks = parsed_file.stats, parsed_file.blocks
    return {
        "name": job.name,
        "status": "done",
        "source": str(source.resolve()),
        "source_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "source_crc32": f"{parsed_file.raw.crc:08x}",
        "format": parsed_file.fmt or "tsv",
        "header_skipped": parsed_file.header,
        "missing_final_newline": blocks.missing_final_newline,
        **stats.to_json(),
        "seconds": round(seconds, 3),
        "rows_per_s": round(stats.lines / seconds) if seconds > 0 else None,
    }


def _check_quality(source: Path, stats: ParseStats, max_bad_fraction: float, header: bool = False) -> None:
    """Refuses a file that yields no row, or more bad lines than ``max_bad_fraction`` of its lines
    (not Criteo data, or badly damaged): nothing of it is published."""
    reasons = ", ".join(f"{k} {v:,}" for k, v in stats.bad.most_common(3))
    examples = "; ".join(f"line {n}: {r}" for n, r in stats.bad_examples[:3])
    if stats.rows == 0:
        raise DataError(
            f"{source}: no valid Criteo row in {stats.lines:,} lines"
            + (f" (bad: {reasons}; {examples})" if stats.lines else " (a header line only)" if header else " (empty file)")
        )
    # blank lines are counted and skipped, but hold no data to lose: they do not count against the
    # fraction (a small file ending in a few empty lines was refused)
    damaged = stats.bad_rows - stats.bad["blank_line"]
    if stats.lines and damaged > max_bad_fraction * stats.lines:
        raise DataError(
            f"{source}: {damaged:,} of {stats.lines:,} lines are bad ({damaged / stats.lines:.1%}, more than "
            f"--max-bad-fraction {max_bad_fraction:g}{'; blank lines aside' if stats.bad['blank_line'] else ''}): "
            f"{reasons}; {examples}"
        )


def _is_done(entry: dict | None, source: Path, out_dir: Path) -> bool:
    if not entry or entry.get("status") != "done":
        return False
    st = source.stat()
    if (entry.get("source_bytes"), entry.get("source_mtime_ns")) != (st.st_size, st.st_mtime_ns):
        return False
    return all(part_path(out_dir, entry["name"], p).is_file() for p in PARTS)


# ------------------------------------------------------------------------ worker processes
_progress_queue: mp.Queue[int] | None = None


def _init_worker(q: mp.Queue[int]) -> None:
    global _progress_queue
    _progress_queue = q
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent ends the pool
    if sys.platform.startswith("linux"):  # a parent killed outright (SIGTERM, SIGKILL) takes its workers along:
        import ctypes  # left running, they committed days into a directory a rerun was already writing

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(job: Job) -> dict:
    q = _progress_queue
    return convert_file(job, progress=(lambda n: q.put(n)) if q is not None else None)


def _mp_context() -> mp.context.BaseContext:
    # fork starts workers instantly (the package imports torch); workers only run numpy.
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def ingest(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    fmt: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    max_bad_fraction: float = 0.01,
) -> dict:
    """Convert raw Criteo files (or directories of them) into ``out_dir``; returns the manifest.

    ``fmt``: "tsv", "csv" or None (detect: ``.csv`` name, or commas and no tabs on the first line).
    ``workers``: processes (default: one per file, at most the CPU count); 1 runs in-process.
    ``max_bad_fraction``: a file with more bad lines than this share of its lines, or with no
    valid row, is refused (``DataError`` naming it and the first reasons; nothing of it written).
    Finished units with unchanged sources are skipped; everything else is (re)done.
    """
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"format {fmt!r}: expected one of {FORMATS}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise DataError(f"--workers must be a whole number >= 1 (parallel processes), got {workers!r}")
    sources = discover_inputs(inputs)
    out = output_dir(out_dir, "--out")
    with directory_lock(out, wait=False):
        return _ingest(sources, out, workers, fmt, progress, log, max_bad_fraction)


def _ingest(sources: list[Path], out: Path, workers: int | None, fmt: str | None, progress: bool,
            log: Callable[[str], None], max_bad_fraction: float) -> dict:  # fmt: skip
    manifest = load_manifest_file(out)
    refuse_foreign_days(out, manifest, "ingest")
    manifest = manifest or {}
    if manifest and manifest.get("kind") != "criteo":
        raise DataError(f"{out}: holds a {manifest.get('kind')!r} dataset; ingest into an empty directory")
    previous = {e["name"]: e for e in manifest.get("files", [])}
    jobs: list[Job] = []
    entries: dict[str, dict] = {}
    for src in sources:
        name = unit_name(src)
        if _is_done(previous.get(name), src, out):
            entries[name] = previous[name]
            log(f"{name}: already done ({entries[name]['rows']:,} rows), skipped")
        else:
            jobs.append(Job(src, name, out, fmt, max_bad_fraction))
    scheduled = {j.name for j in jobs}
    for name, entry in previous.items():  # units ingested by earlier runs from other inputs
        if name not in entries and name not in scheduled and all(part_path(out, name, p).is_file() for p in PARTS):
            entries[name] = entry

    def build(complete: bool) -> dict:
        files = [entries[n] for n in sorted(entries, key=natural_key)]
        return {
            "format": FORMAT, "version": VERSION, "kind": "criteo", "complete": complete,
            "dense_transform": "log(1 + max(x, 0)), missing -> 0", "missing_cat_id": MISSING_CAT_ID,
            "table_sizes": None, "multi_hot_sizes": None, "files": files,
            "rows": sum(e["rows"] for e in files), "bad_rows": sum(e["bad_rows"] for e in files),
        }  # fmt: skip

    def save(complete: bool) -> dict:
        doc = build(complete)
        write_manifest(out, doc)
        return doc

    if not jobs:
        doc = build(complete=True)
        if doc != manifest:  # a rerun with nothing to do leaves the manifest as it is
            write_manifest(out, doc)
        return doc
    # A complete dataset that only gains new units stays as it is until one of them is committed,
    # and is restored if the command then fails: a failed ingest leaves it usable. A unit that is
    # redone (its source changed, a file is missing) is unlisted first: its files are replaced.
    # A fresh or interrupted dataset is marked incomplete at once; every committed unit is
    # recorded, so an interrupted run resumes where it stopped.
    restore = bool(manifest) and manifest.get("complete", True) is True and not (scheduled & previous.keys())
    old_bytes = (out / MANIFEST_NAME).read_bytes() if restore else b""
    if not restore:
        save(complete=False)
    try:
        doc = _run(jobs, workers, progress, log, entries, save)
    except Exception:
        if restore:
            write_atomic(out / MANIFEST_NAME, lambda f: f.write(old_bytes))
        raise
    log(f"total: {doc['rows']:,} rows, {doc['bad_rows']:,} bad rows skipped, {len(doc['files'])} files in {out}")
    return doc


def _run(
    jobs: list[Job], workers: int | None, progress: bool, log: Callable[[str], None], entries: dict[str, dict],
    save: Callable[[bool], dict],
) -> dict:
    """Convert ``jobs``, recording each finished unit in ``entries`` and the manifest (``save``)."""
    total = sum(j.source.stat().st_size for j in jobs)
    bar = _progress_bar(total, progress)

    def finished(entry: dict) -> None:
        entries[entry["name"]] = entry
        save(False)
        bar.clear()
        log(_summary(entry))
        bar.refresh()

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if n_workers == 1:
        for job in jobs:
            finished(convert_file(job, progress=bar.update))
    else:
        ctx = _mp_context()
        q: mp.Queue[int] = ctx.Queue()
        with ctx.Pool(n_workers, initializer=_init_worker, initargs=(q,)) as pool:
            pending = [pool.apply_async(_worker, (job,)) for job in jobs]
            while pending:
                try:
                    bar.update(q.get(timeout=0.2))
                except queue.Empty:
                    pass
                for res in [r for r in pending if r.ready()]:
                    pending.remove(res)
                    finished(res.get())  # re-raises a worker's exception
    bar.close()
    return save(True)


def _summary(e: dict) -> str:
    extra = []
    if e["bad_rows"]:
        extra.append("bad: " + ", ".join(f"{k} {v:,}" for k, v in e["bad_reasons"].items()))
    if e["padded_rows"]:
        extra.append(f"padded {e['padded_rows']:,} short lines")
    if e["stripped_fields"]:
        extra.append(f"stripped whitespace in {e['stripped_fields']:,} fields")
    if e["header_skipped"]:
        extra.append("header line skipped")
    if e["missing_final_newline"]:
        extra.append("last line had no newline")
    note = f" ({'; '.join(extra)})" if extra else ""
    return (
        f"{e['name']}: {e['rows']:,} rows, {e['bad_rows']:,} bad rows skipped{note}; "
        f"{e['seconds']:.1f} s, {e['rows_per_s'] or 0:,} lines/s"
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def clear(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="ingest", file=sys.stderr)
