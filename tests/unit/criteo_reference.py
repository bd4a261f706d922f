"""Line-by-line pure-Python parser of raw Criteo text: the executable specification of the
parsing and bad-row policy that :func:`robe_dist.data.parse.parse_buffer` implements vectorised.
Slow (about 100x); the data tests compare the vectorised parser with it."""

from __future__ import annotations

import math
import re

import numpy as np

from robe_dist.data.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT, MIN_FIELDS, MISSING_CAT_ID, NUM_COLUMNS

_LABEL = re.compile(rb"[01](?:\.0*)?")
_DENSE = re.compile(rb"[+-]?[0-9]+(?:\.0*)?")
_HEX = re.compile(rb"[0-9a-fA-F]{1,8}")


def parse_line(line: bytes, delimiter: bytes = b"\t") -> tuple[tuple[int, list[float], list[int]] | None, str | None]:
    """((label, dense [13] transformed, sparse [26]) or None, bad reason or None) of one line
    without its newline."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line:
        return None, "blank_line"
    fields = line.split(delimiter)
    if len(fields) > NUM_COLUMNS:
        return None, "too_many_fields"
    if len(fields) < MIN_FIELDS:
        return None, "too_few_fields"
    fields = [f.strip() for f in fields] + [b""] * (NUM_COLUMNS - len(fields))
    if not _LABEL.fullmatch(fields[0]):
        return None, "bad_label"
    dense = []
    for f in fields[1 : 1 + INT_FEATURE_COUNT]:
        if not f:
            dense.append(0.0)
            continue
        if not _DENSE.fullmatch(f) or abs(int(f.split(b".")[0])) >= 2**63:
            return None, "bad_dense"
        dense.append(float(np.log1p(np.float32(max(int(f.split(b".")[0]), 0)))))
    sparse = []
    for f in fields[1 + INT_FEATURE_COUNT :]:
        if f and not _HEX.fullmatch(f):
            return None, "bad_categorical"
        sparse.append(int(f, 16) if f else MISSING_CAT_ID)
    assert len(dense) == INT_FEATURE_COUNT and len(sparse) == CAT_FEATURE_COUNT and not math.isnan(sum(dense))
    return (int(fields[0][:1]), dense, sparse), None


def parse_text(text: bytes, delimiter: bytes = b"\t") -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """(dense float32 [n, 13], sparse int64 [n, 26], labels int32 [n, 1]) of the good lines of
    ``text``, and the bad reason (or None) of every line. A final line may lack its newline."""
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows, reasons = [], []
    for line in lines:
        row, reason = parse_line(line, delimiter)
        reasons.append(reason)
        if row is not None:
            rows.append(row)
    dense = np.array([r[1] for r in rows], dtype=np.float32).reshape(-1, INT_FEATURE_COUNT)
    sparse = np.array([r[2] for r in rows], dtype=np.int64).reshape(-1, CAT_FEATURE_COUNT)
    labels = np.array([r[0] for r in rows], dtype=np.int32).reshape(-1, 1)
    return dense, sparse, labels, reasons
