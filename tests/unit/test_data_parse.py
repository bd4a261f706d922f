"""The vectorised Criteo parser: exact values, the bad-row policy, agreement with the reference."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from robe_dist.data import parse as P
from robe_dist.data.criteo import MISSING_CAT_ID
from criteo_reference import parse_text

CAT8 = [f"{(0x9E3779B1 * (i + 1)) & 0xFFFFFFFF:08x}" for i in range(26)]
DENSE = ["1", "0", "5", "", "1382", "-1", "15", "2", "181", "1", "2", "", "2"]


def line(label: str = "1", dense: list[str] | None = None, cats: list[str] | None = None, sep: str = "\t") -> bytes:
    return sep.join([label, *(DENSE if dense is None else dense), *(CAT8 if cats is None else cats)]).encode()


def parse(text: bytes, delimiter: int = P.TAB) -> P.ParsedBlock:
    if not text.endswith(b"\n"):
        text += b"\n"
    return P.parse_buffer(bytearray(P.PAD) + text, delimiter=delimiter)


def test_well_formed_line_values() -> None:
    blk = parse(line())
    assert blk.stats.rows == 1 and blk.stats.bad_rows == 0
    assert blk.labels.dtype == np.int32 and blk.labels.shape == (1, 1) and blk.labels[0, 0] == 1
    assert blk.sparse.dtype == np.int64 and blk.sparse.shape == (1, 26)
    assert blk.sparse[0].tolist() == [int(c, 16) for c in CAT8]
    expected = [math.log1p(max(int(v), 0)) if v else 0.0 for v in DENSE]
    assert blk.dense.dtype == np.float32
    np.testing.assert_allclose(blk.dense[0], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "value, expected",
    [("0", 0), ("7", 7), ("12345678", 12345678), ("00000009", 9), ("-1", 0), ("-12345678", 0),
     ("123456789", 123456789), ("9" * 18, 10**18 - 1), ("4.0", 4), ("4.", 4), ("4.000", 4),
     (" 42 ", 42), ("+3", 3), ("", 0),
     ("-123456789", 0), (" -7 ", 0), ("-5.0", 0), ("-" + "9" * 18, 0)],  # (negatives off the fast path)
)  # fmt: skip
def test_integer_feature_forms(value: str, expected: int) -> None:
    dense = list(DENSE)
    dense[4] = value
    blk = parse(line(dense=dense))
    assert blk.stats.bad_rows == 0, blk.stats.bad
    assert blk.dense[0, 4] == np.log1p(np.float32(expected))


@pytest.mark.parametrize("value", ["1a", "-", "--1", "1-", "4.5", ".0", "1 2", "9" * 19, "0x10", "١"])
def test_bad_integer_feature_skips_row(value: str) -> None:
    dense = list(DENSE)
    dense[7] = value
    blk = parse(line() + b"\n" + line(dense=dense) + b"\n" + line(label="0"))
    assert blk.stats.rows == 2 and blk.stats.bad == Counter(bad_dense=1)
    assert blk.stats.bad_examples == [(2, "bad_dense")]
    assert blk.labels[:, 0].tolist() == [1, 0]


@pytest.mark.parametrize(
    "value, expected",
    [("ffffffff", 0xFFFFFFFF), ("00000000", 0), ("DEADBEEF", 0xDEADBEEF), ("aBcD0123", 0xABCD0123),
     ("1", 1), ("abc", 0xABC), ("", MISSING_CAT_ID), ("  0a0b0c0d", 0x0A0B0C0D)],
)  # fmt: skip
def test_categorical_forms(value: str, expected: int) -> None:
    cats = list(CAT8)
    cats[9] = value
    blk = parse(line(cats=cats))
    assert blk.stats.bad_rows == 0
    assert blk.sparse[0, 9] == expected
    assert blk.sparse[0, 8] == int(CAT8[8], 16) and blk.sparse[0, 10] == int(CAT8[10], 16)


@pytest.mark.parametrize(
    "value", ["fffffffff", "0xabcdef", "ghijklmn", "abcd efa", "-1234567", "1234567\x19", "12345\xe9"]
)
def test_bad_categorical_skips_row(value: str) -> None:
    cats = list(CAT8)
    cats[3] = value
    blk = parse(line(cats=cats))
    assert blk.stats.rows == 0 and blk.stats.bad == Counter(bad_categorical=1)


def test_short_lines_are_padded_and_long_or_tiny_lines_skipped() -> None:
    text = b"\n".join([
        line(cats=CAT8[:23]),           # 37 fields: padded
        line(cats=CAT8[:24]),           # 38 fields: padded
        line(cats=CAT8 + ["abc"]),      # 41 fields: skipped
        b"1\t2\t3",                     # 3 fields: skipped
        b"",                            # blank line: skipped
        line(label="0"),                # 40 fields
    ])  # fmt: skip
    blk = parse(text)
    assert blk.stats.lines == 6 and blk.stats.rows == 3 and blk.stats.padded_rows == 2
    assert blk.stats.bad == Counter(too_many_fields=1, too_few_fields=1, blank_line=1)
    assert blk.sparse[0, 22] == int(CAT8[22], 16) and blk.sparse[0, 23:].tolist() == [MISSING_CAT_ID] * 3
    assert blk.sparse[1, 24:].tolist() == [MISSING_CAT_ID] * 2
    assert blk.labels[:, 0].tolist() == [1, 1, 0]


def test_labels_must_be_zero_or_one() -> None:
    text = b"\n".join([line(label=v) for v in ("0", "1", "2", "", "1.0", "x", " 1")])
    blk = parse(text)
    assert blk.labels[:, 0].tolist() == [0, 1, 1, 1]
    assert blk.stats.bad == Counter(bad_label=3)


def test_crlf_whitespace_and_control_bytes() -> None:
    cats = list(CAT8)
    cats[0] = CAT8[0] + " "
    text = line() + b"\r\n" + line(cats=cats) + b"\r\n" + line(dense=["\x001"] + DENSE[1:])
    blk = parse(text)
    assert blk.stats.rows == 2 and blk.stats.bad == Counter(bad_dense=1)
    assert blk.stats.stripped_fields == 1  # the space; CRLF endings are not counted
    assert blk.sparse[:, 25].tolist() == [int(CAT8[25], 16)] * 2


def test_csv_with_float_integers() -> None:
    dense = ["", "3", "260.0", "", "17668.0", "", "", "33.0", "", "", "", "0.0", "-1.0"]
    blk = parse(line(label="0", dense=dense, sep=","), delimiter=P.COMMA)
    assert blk.stats.rows == 1
    np.testing.assert_allclose(blk.dense[0, [1, 2, 4, 7, 12]], np.log1p(np.float32([3, 260, 17668, 33, 0])))


def test_empty_buffer() -> None:
    blk = P.parse_buffer(bytearray(P.PAD))
    assert blk.stats.lines == 0 and blk.dense.shape == (0, 13) and blk.sparse.shape == (0, 26)


def test_swar_decoders_against_python() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**32, 2000, dtype=np.uint64)
    text = b"".join(f"{int(v):08x}".encode() for v in ids) + b"".join(f"{int(v):08X}".encode() for v in ids)
    x = np.frombuffer(text, dtype="<u8")
    value, ok = P._hex8(x)
    assert ok.all() and (value == np.concatenate([ids, ids])).all()
    nums = rng.integers(0, 10**8, 2000)
    digits = np.array([len(str(v)) for v in nums])
    text = b"".join(f"{int(v):>8d}".encode() for v in nums)  # right-aligned; the masked bytes are spaces
    value, ok = P._decimal8(np.frombuffer(text, dtype="<u8").copy(), digits)
    assert ok.all() and (value == nums).all()
    bad = np.frombuffer(b"0000000g" b"0000000:" b"000000/0" b"0000000\x10" b"00000`00", dtype="<u8")
    assert not P._hex8(bad)[1].any()
    assert not P._decimal8(np.frombuffer(b"0000000a0000000:000000/0", dtype="<u8").copy(), np.full(3, 8))[1].any()


_MUTATIONS = [
    b" ",
    b"\r",
    b"\t",
    b"-",
    b".",
    b"x",
    b"G",
    b"\x00",
    b"\xff",
    b"0",
    b".0",
    b"9999999999",
    b"\x0b",
    b"+",
    b"\n",
]


@pytest.mark.parametrize("delimiter", [b"\t", b","])
def test_fuzzed_lines_match_reference_parser(delimiter: bytes) -> None:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(600):
        cats = [CAT8[j] if rng.random() > 0.1 else "" for j in range(26)][: rng.choice([24, 25, 26, 26])]
        dense = [str(int(v)) if rng.random() > 0.2 else "" for v in rng.integers(-3, 10**6, 13)]
        ln = bytearray(line(label=str(i % 2), dense=dense, cats=cats, sep=delimiter.decode()))
        for _ in range(rng.integers(0, 3) if rng.random() < 0.4 else 0):
            pos, m = int(rng.integers(0, len(ln) + 1)), _MUTATIONS[rng.integers(len(_MUTATIONS))]
            ln[pos : pos + int(rng.integers(0, 2))] = m
        lines.append(bytes(ln))
    text = b"\n".join(lines)
    dense, sparse, labels, reasons = parse_text(text, delimiter)
    blk = parse(text, delimiter=delimiter[0])
    assert Counter(r for r in reasons if r) == blk.stats.bad
    assert blk.stats.bad_rows > 20 and blk.stats.rows > 300  # the fuzz did exercise both paths
    np.testing.assert_array_equal(blk.sparse, sparse)
    np.testing.assert_array_equal(blk.labels, labels)
    np.testing.assert_allclose(blk.dense, dense, rtol=1e-6)
