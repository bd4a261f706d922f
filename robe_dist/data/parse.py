"""Vectorised parsing of raw Criteo text (TSV or CSV) held in a byte buffer.

No Python runs per row on well-formed input: field boundaries come from one scan for separators,
and every field is read as the 8 bytes that end at it (an unaligned uint64 gather), then decoded
with SWAR arithmetic (8 decimal or 8 hex digits per uint64 in a handful of numpy operations).
Fields the fast path cannot decode (stray whitespace, ``260.0``-style integers, more than 8
digits, garbage) fall back to a per-field Python parser that decides them or marks the row bad.

Bad-row policy (also in docs/data.md):

* a line with ``MIN_FIELDS`` (15) to 39 fields is padded: its missing trailing fields are
  missing values (counted as ``padded_rows``; real Criteo lines have 37-38 fields);
* a line with more than 40 fields, fewer than 15, or an empty line is skipped;
* a label that is not 0/1 (empty included), an integer feature that is not a signed decimal
  integer below 2**63 in magnitude (``12.0``, ``12.`` are accepted as 12), or a categorical that
  is not 1 to 8 hex digits makes the row skipped; every skipped row is counted under its first
  reason (label, then integer features, then categoricals, left to right);
* whitespace around a field (spaces, ``\\r``, ``\\v``, ``\\f``) is stripped and counted
  (``stripped_fields``); a field with whitespace inside is malformed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from robe_dist.data.criteo import INT_FEATURE_COUNT, MIN_FIELDS, MISSING_CAT_ID, NUM_COLUMNS

#: Bytes a parse buffer must hold before the first line (field windows may reach into them).
PAD = 8
NEWLINE = 10
TAB = 9
COMMA = 44
BAD_REASONS = (
    "blank_line", "too_few_fields", "too_many_fields", "bad_label", "bad_dense", "bad_categorical",
    "line_too_long",
)  # fmt: skip


def _every_byte(byte: int) -> np.uint64:
    """A uint64 with ``byte`` in each of its 8 bytes (SWAR constant)."""
    return np.uint64(int.from_bytes(bytes([byte]) * 8, "little"))


_ZEROS, _X0F, _XF0, _X06 = _every_byte(0x30), _every_byte(0x0F), _every_byte(0xF0), _every_byte(0x06)
_X20, _X40, _X01, _X76 = _every_byte(0x20), _every_byte(0x40), _every_byte(0x01), _every_byte(0x76)
# _KEEP[k]: mask of the top k bytes of a little-endian word (the last k characters of the window);
# _FILL[k]: ASCII '0' in the other bytes, so a short field reads as if left-padded with zeros.
_KEEP = np.array([((1 << 64) - 1) ^ ((1 << (8 * (8 - k))) - 1) for k in range(9)], dtype=np.uint64)
_FILL = _ZEROS & ~_KEEP
_U = np.uint64

_DENSE_RE = re.compile(rb"[+-]?[0-9]+(?:\.0*)?")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,8}")
_LABEL_RE = re.compile(rb"[01](?:\.0*)?")


@dataclass
class ParseStats:
    """Counts of one parsed buffer (and, summed, of one file)."""

    lines: int = 0
    rows: int = 0
    padded_rows: int = 0
    stripped_fields: int = 0
    bad: Counter = field(default_factory=Counter)
    #: ``(line number, reason)`` of the first few bad lines, 1-based line numbers.
    bad_examples: list[tuple[int, str]] = field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        return sum(self.bad.values())

    def add(self, other: ParseStats, max_examples: int = 10) -> None:
        self.lines += other.lines
        self.rows += other.rows
        self.padded_rows += other.padded_rows
        self.stripped_fields += other.stripped_fields
        self.bad.update(other.bad)
        room = max_examples - len(self.bad_examples)
        if room > 0:
            self.bad_examples.extend(other.bad_examples[:room])

    def to_json(self) -> dict:
        return {
            "lines": self.lines,
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "bad_reasons": {k: self.bad[k] for k in BAD_REASONS if self.bad[k]},
            "bad_examples": [list(e) for e in self.bad_examples],
            "padded_rows": self.padded_rows,
            "stripped_fields": self.stripped_fields,
        }


@dataclass
class ParsedBlock:
    """Good rows of one buffer. ``dense`` float32 [n, 13] = log(1 + max(x, 0)), missing 0;
    ``sparse`` int64 [n, 26], hex parsed as uint32, missing ``MISSING_CAT_ID``; ``labels`` int32 [n, 1];
    ``lines`` int64 [n], the rows' line numbers (``first_line`` of the buffer's first line)."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    stats: ParseStats
    lines: np.ndarray


def _decimal8(x: np.ndarray, ndigits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode uint64 windows whose last ``ndigits`` (0..8) bytes are ASCII decimal digits.

    Returns (value uint64, valid bool), same shape as ``x``."""
    x = (x & _KEEP[ndigits]) | _FILL[ndigits]
    valid = ((x & _XF0) == _ZEROS) & (((x + _X06) & _XF0) == _ZEROS)
    d = x - _ZEROS
    d = (d * _U(10) + (d >> _U(8))) & _U(0x00FF00FF00FF00FF)
    d = (d * _U(100) + (d >> _U(16))) & _U(0x0000FFFF0000FFFF)
    d = (d * _U(10000) + (d >> _U(32))) & _U(0xFFFFFFFF)
    return d, valid


def _hex8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode uint64 windows of 8 ASCII hex digits (either case). Returns (value, valid)."""
    y = x | _X20  # lower-case letters; digits unchanged
    nib = y >> _U(6)
    nib &= _X01
    nib *= _U(9)
    nib += y & _X0F  # per byte: the digit's value if it is a hex digit
    # A byte is a hex digit iff re-encoding its nibble gives it back (and the nibble is < 16), and
    # only letters had their 0x20 bit added (else 0x10-0x19 would pass as digits). Collect every
    # violation as set bits of one error word.
    err = nib + _X76
    err >>= _U(7)
    err &= _X01
    err *= _U(0x27)
    err += nib
    err += _ZEROS
    err ^= y
    err |= nib & _XF0
    flipped = x ^ y
    flipped <<= _U(1)
    flipped &= _X40
    flipped ^= flipped & y
    err |= flipped
    # pack: nibble i (byte i, i = 0 most significant) -> bits 28 - 4i of the result
    v = nib << _U(4)
    v |= nib >> _U(8)
    v &= _U(0x00FF00FF00FF00FF)
    nib = v >> _U(16)
    v <<= _U(8)
    v |= nib
    v &= _U(0x0000FFFF0000FFFF)
    nib = v >> _U(32)
    v <<= _U(16)
    v |= nib
    v &= _U(0xFFFFFFFF)
    return v, err == 0


def _split_fields(u8: np.ndarray, delimiter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Field boundaries of every line. ``u8[PAD:]`` holds whole lines, each ending in '\\n'.

    Returns (ends [N, 40], nfields [N], line_starts [N]): field k of line i ends (exclusive) at
    ``ends[i, k]`` and starts after the end of field k - 1 (field 0 at ``line_starts[i]``);
    fields past a short line's last one end at the line's end (they are empty)."""
    if delimiter == TAB:
        seps = np.flatnonzero(u8 <= NEWLINE)
        sep_bytes = u8[seps]
        if sep_bytes.min(initial=NEWLINE) < TAB:  # NUL or control bytes: field content, not separators
            keep = sep_bytes >= TAB
            seps, sep_bytes = seps[keep], sep_bytes[keep]
    else:
        seps = np.flatnonzero((u8 == delimiter) | (u8 == NEWLINE))
        sep_bytes = u8[seps]
    nl = np.flatnonzero(sep_bytes == NEWLINE)
    n = len(nl)
    line_ends = seps[nl]
    nfields = np.diff(nl, prepend=-1)
    line_starts = np.empty(n, dtype=np.int64)
    line_starts[:1] = PAD
    line_starts[1:] = line_ends[:-1] + 1
    if n and (nfields == NUM_COLUMNS).all():
        ends = seps.reshape(n, NUM_COLUMNS)
    else:
        # Scatter each separator to its cell of the [n, 40] grid; cells past a short line's last
        # field keep the line's end (empty fields). Lines with too many fields keep their first 40.
        if (nfields > NUM_COLUMNS).any():
            col = np.arange(len(seps)) - np.repeat(nl - nfields + 1, nfields)
            keep = col < NUM_COLUMNS - 1
            keep[nl] = True  # the newline stays the last separator of its line
            seps, kept = seps[keep], np.minimum(nfields, NUM_COLUMNS)
        else:
            kept = nfields
        missing = NUM_COLUMNS - kept
        target = np.arange(len(seps)) + np.repeat(np.cumsum(missing) - missing, kept)
        ends = np.repeat(line_ends, NUM_COLUMNS)
        ends[target] = seps
        ends = ends.reshape(n, NUM_COLUMNS)
    if n and (u8[line_ends - 1] == 13).any():  # CRLF: the carriage return is not part of the last field
        cr = np.flatnonzero((u8[line_ends - 1] == 13) & (nfields <= NUM_COLUMNS))
        ends[cr, nfields[cr] - 1] -= 1
    return ends, nfields, line_starts


def _slow_field(raw: bytes, kind: str) -> tuple[int | None, bool]:
    """Parse one field the fast path could not: (value or None if malformed, whether stripped)."""
    s = raw.strip()
    stripped = len(s) != len(raw)
    if kind == "cat":
        if not s:
            return MISSING_CAT_ID, stripped
        return (int(s, 16) if _HEX_RE.fullmatch(s) else None), stripped
    if kind == "dense":
        if not s:
            return 0, stripped
        if not _DENSE_RE.fullmatch(s):
            return None, stripped
        value = int(s.split(b".")[0])
        return (value if abs(value) < 2**63 else None), stripped
    return (int(s[:1]) if _LABEL_RE.fullmatch(s) else None), stripped


def parse_buffer(buf: bytearray, *, delimiter: int = TAB, first_line: int = 1) -> ParsedBlock:
    """Parse whole Criteo lines. ``buf[:PAD]`` is scratch (any bytes); ``buf[PAD:]`` holds complete
    lines, each terminated by ``\\n``. ``first_line`` numbers the first line in ``bad_examples``."""
    u8 = np.frombuffer(buf, dtype=np.uint8)
    win = np.ndarray(shape=(max(len(u8) - 7, 0),), dtype="<u8", buffer=buf, strides=(1,))
    ends, nfields, line_starts = _split_fields(u8, delimiter)
    n = len(nfields)
    stats = ParseStats(lines=n)
    reason = np.zeros(n, dtype=np.int8)  # 0 = good, else 1 + index into BAD_REASONS
    blank = (nfields == 1) & (ends[:, 0] == line_starts)
    reason[(nfields < MIN_FIELDS) & ~blank] = 2
    reason[blank] = 1
    reason[nfields > NUM_COLUMNS] = 3
    padded = (nfields >= MIN_FIELDS) & (nfields < NUM_COLUMNS)
    stats.padded_rows = int(padded.sum())

    def start(r: np.ndarray, k: np.ndarray) -> np.ndarray:  # first byte of field k of rows r
        return np.where(k == 0, line_starts[r], ends[r, np.maximum(k - 1, 0)] + 1)

    lens = np.empty_like(ends)
    lens[:, 0] = ends[:, 0] - line_starts
    np.subtract(ends[:, 1:], ends[:, :-1] + 1, out=lens[:, 1:])
    if stats.padded_rows or reason.any():
        np.maximum(lens, 0, out=lens)  # cells past a short line's end
    num_ends = ends[:, : 1 + INT_FEATURE_COUNT]  # label and integer features
    if buf.find(b".", PAD) >= 0:  # "260.0"-style integers (CSV): drop a trailing ".0"
        num_ends = num_ends.copy()
        l = lens[:, : 1 + INT_FEATURE_COUNT]
        dot0 = (l >= 3) & (u8[num_ends - 1] == 0x30) & (u8[num_ends - 2] == 0x2E)
        num_ends -= 2 * dot0
        l -= 2 * dot0

    slow: list[tuple[np.ndarray, np.ndarray, str, int]] = []  # (rows, cols, kind, reason code)

    # label
    first = u8[line_starts]
    labels = (first - 48).astype(np.int32)
    ok = (lens[:, 0] == 1) & ((first == 48) | (first == 49))
    if not ok.all():
        slow.append((*np.nonzero(~ok[:, None]), "label", 4))

    # integer features: up to 8 digits, or '-' and up to 8 digits (-> 0), in the fast path
    l = lens[:, 1 : 1 + INT_FEATURE_COUNT]
    e = num_ends[:, 1:]
    raw, ok = _decimal8(win[e - 8], np.minimum(l, 8))
    ok &= l <= 8
    if not ok.all():
        r, c = np.nonzero(~ok)
        ln = l[r, c] - 1
        _, neg_ok = _decimal8(win[e[r, c] - 8], np.clip(ln, 0, 8))
        neg_ok &= (u8[start(r, c + 1)] == 0x2D) & (ln >= 1) & (ln <= 8)
        raw[r[neg_ok], c[neg_ok]] = 0  # log(1 + max(x, 0)) of a negative x
        slow.append((r[~neg_ok], c[~neg_ok], "dense", 5))

    # categorical features: 1-8 hex digits, read as 8 with zero fill; empty reads as 0 (missing)
    assert MISSING_CAT_ID == 0
    l = lens[:, 1 + INT_FEATURE_COUNT :]
    lc = np.minimum(l, 8)
    x = win[ends[:, 1 + INT_FEATURE_COUNT :] - 8]
    x &= _KEEP[lc]
    x |= _FILL[lc]
    ids, ok = _hex8(x)
    ok &= l <= 8
    if not ok.all():
        slow.append((*np.nonzero(~ok), "cat", 6))

    # per-field fallback for what the fast path left undecided, on rows not already bad
    targets = {"label": labels[:, None], "dense": raw, "cat": ids}
    col0 = {"label": 0, "dense": 1, "cat": 1 + INT_FEATURE_COUNT}
    for rows, cols, kind, code in slow:
        live = reason[rows] == 0
        rows, cols = rows[live], cols[live]
        k = cols + col0[kind]
        field_ends = num_ends[rows, k] if kind != "cat" else ends[rows, k]
        for r, c, a, b in zip(rows.tolist(), cols.tolist(), start(rows, k).tolist(), field_ends.tolist()):
            if reason[r]:
                continue
            value, stripped = _slow_field(bytes(buf[a:b]), kind)
            stats.stripped_fields += stripped
            if value is None:
                reason[r] = code
            else:
                targets[kind][r, c] = max(value, 0)  # negative integers transform to 0 anyway

    good = reason == 0
    stats.rows = int(good.sum())
    lines = np.arange(first_line, first_line + n, dtype=np.int64)
    if stats.rows < n:
        bad_rows = np.flatnonzero(~good)
        codes = reason[bad_rows]
        for code, count in zip(*np.unique(codes, return_counts=True)):
            stats.bad[BAD_REASONS[code - 1]] += int(count)
        stats.bad_examples = [(first_line + int(r), BAD_REASONS[reason[r] - 1]) for r in bad_rows[:10]]
        raw, ids, labels, lines = raw[good], ids[good], labels[good], lines[good]
    dense = np.log1p(raw.astype(np.float32))
    # ids < 2**32, so the uint64 bits are the int64 value
    return ParsedBlock(dense=dense, sparse=ids.view(np.int64), labels=labels.reshape(-1, 1), stats=stats, lines=lines)
