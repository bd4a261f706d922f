"""Streaming raw Criteo text: plain or gzip files, checksummed, cut into parse buffers of whole lines."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from robe_dist.data.parse import PAD

#: Bytes of text parsed per call: small enough that the parser's temporaries stay in L2 cache.
CHUNK_BYTES = 384 * 1024
#: Bytes read from the file per read call.
READ_BYTES = 8 * 1024 * 1024
#: A line longer than this that spans reads is dropped (never held whole) as ``line_too_long``.
MAX_LINE_BYTES = 1 << 20


class CountingReader:
    """File wrapper that checksums (CRC-32) and counts the bytes read from disk."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.crc = 0
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.crc = zlib.crc32(data, self.crc)
        self.bytes += len(data)
        return data

    def close(self) -> None:
        self._f.close()


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def detect_format(first_line: bytes, path: Path) -> str:
    if path.name.removesuffix(".gz").endswith(".csv"):
        return "csv"
    return "csv" if b"\t" not in first_line and first_line.count(b",") >= 13 else "tsv"


def is_header(first_line: bytes, delimiter: int) -> bool:
    head = first_line.split(bytes([delimiter]), 1)[0].strip().lower()
    return head in (b"label", b"click", b"clicked")


class LineBlocks:
    """Iterate parse buffers of a stream: ``PAD`` scratch bytes, then whole lines (each ending in
    '\\n', about CHUNK_BYTES in all).

    A final line without a newline gets one (``missing_final_newline``); a line longer than
    MAX_LINE_BYTES is dropped and counted in ``too_long``."""

    def __init__(self, stream, on_read: Callable[[], None]) -> None:
        self.stream = stream
        self.on_read = on_read
        self.missing_final_newline = False
        self.too_long = 0

    @staticmethod
    def _buffer(*parts: bytes | memoryview) -> bytearray:
        buf = bytearray(PAD + sum(len(p) for p in parts))
        at = PAD
        for p in parts:
            buf[at : at + len(p)] = p
            at += len(p)
        return buf

    def __iter__(self) -> Iterator[bytearray]:
        carry = b""
        skipping = False
        while True:
            data = self.stream.read(READ_BYTES)
            self.on_read()
            if not data:
                break
            if skipping:  # inside an over-long line: drop up to its newline
                cut = data.find(b"\n")
                if cut < 0:
                    continue
                data, skipping = data[cut + 1 :], False
            view = memoryview(data)
            start = 0
            if carry:  # the line cut at the end of the previous read
                cut = data.find(b"\n")
                if cut < 0:
                    carry += data
                    if len(carry) > MAX_LINE_BYTES:
                        self.too_long += 1
                        carry, skipping = b"", True
                    continue
                yield self._buffer(carry, view[: cut + 1])
                carry, start = b"", cut + 1
            while len(data) - start > CHUNK_BYTES:
                end = data.rfind(b"\n", start, start + CHUNK_BYTES)
                if end < 0:
                    end = data.find(b"\n", start + CHUNK_BYTES)
                    if end < 0:
                        break
                yield self._buffer(view[start : end + 1])
                start = end + 1
            tail = data.rfind(b"\n", start)
            if tail >= 0:
                yield self._buffer(view[start : tail + 1])
                start = tail + 1
            carry = bytes(view[start:])
            if len(carry) > MAX_LINE_BYTES:
                self.too_long += 1
                carry, skipping = b"", True
        if carry:
            self.missing_final_newline = True
            yield self._buffer(carry, b"\n")


class GunzipReader:
    """Decompress a gzip stream (one or more members, as ``cat a.gz b.gz``) in large blocks.

    ``read(n)`` returns up to ``n`` bytes, ``b""`` at the end; a stream that ends inside a member
    (a truncated download) raises EOFError, a corrupt one ``zlib.error``."""

    def __init__(self, raw: CountingReader) -> None:
        self.raw = raw
        self._d = zlib.decompressobj(wbits=31)
        self._input = b""
        self._in_member = False

    def read(self, n: int) -> bytes:
        while True:
            if self._d.eof:  # next member, starting with what followed this one
                self._input = self._d.unused_data + self._input
                self._d = zlib.decompressobj(wbits=31)
                self._in_member = False
            if not self._input:
                self._input = self.raw.read(READ_BYTES)
                if not self._input:
                    if self._in_member:
                        raise EOFError("compressed file ended before the end-of-stream marker was reached")
                    return b""
            self._in_member = True
            data = self._d.decompress(self._input, n)
            self._input = self._d.unconsumed_tail
            if data:
                return data

    def close(self) -> None:
        self.raw.close()


def open_text(path: Path) -> tuple[CountingReader, CountingReader | GunzipReader]:
    """(the file reader, which checksums and counts the bytes on disk; the text stream)."""
    raw = CountingReader(open(path, "rb"))
    return raw, (GunzipReader(raw) if is_gzip(path) else raw)
