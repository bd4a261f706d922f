"""Streaming ``.npy`` writing (rows appended, row count unknown up front) and header reading.

An ``.npy`` file is a header then the raw C-order array. :class:`NpyAppender` writes a
fixed-size (128-byte) version 1.0 header with a placeholder row count, appends rows as they
come, and rewrites the header with the true count on :meth:`NpyAppender.finish`, so a day of
Criteo (tens of GB) is written in one pass with bounded memory. The result is a plain ``.npy``
that ``np.load(..., mmap_mode="r")`` and TorchRec's ``BinaryCriteoUtils`` read.

Files are written under a temporary name and renamed into place by the caller once every file
of a unit is complete (see :func:`commit`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

HEADER_BYTES = 128
_MAGIC = b"\x93NUMPY\x01\x00"
PARTIAL_SUFFIX = ".partial"


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    room = HEADER_BYTES - len(_MAGIC) - 2 - 1  # 2-byte length, trailing newline
    if len(text) > room:
        raise ValueError(f"npy header for shape {shape} does not fit in {HEADER_BYTES} bytes")
    body = text.ljust(room).encode("latin1") + b"\n"
    return _MAGIC + len(body).to_bytes(2, "little") + body


class NpyAppender:
    """Append rows of shape ``row_shape`` and dtype ``dtype`` to a new ``.npy`` at ``path``.

    Use as a context manager or call :meth:`finish`; on an exception the file is removed.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | type, row_shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        # a new file, never a truncation: a leftover temporary name may be a hard link to another
        # dataset's file (robe-data vocab links the unchanged parts), which "wb" would overwrite
        self.path.unlink(missing_ok=True)
        self._file: BinaryIO | None = open(self.path, "wb")
        self._file.write(_header((0, *self.row_shape), self.dtype))

    def append(self, rows: np.ndarray) -> None:
        """Append ``rows`` [n, *row_shape] (converted to the file's dtype)."""
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: expected rows of shape {self.row_shape}, got {rows.shape[1:]}")
        assert self._file is not None, "append after finish"
        self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).data)
        self.rows += len(rows)

    def finish(self, fsync: bool = True) -> Path:
        """Write the final header, flush (and fsync) and close. Returns the path."""
        assert self._file is not None, "finish called twice"
        self._file.seek(0)
        self._file.write(_header((self.rows, *self.row_shape), self.dtype))
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> NpyAppender:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._file is not None:
            self.finish()


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under before :func:`commit` renames it."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def commit(paths: list[Path]) -> None:
    """Rename each ``partial_path(p)`` to ``p`` (atomic per file) and fsync the directory."""
    for p in paths:
        os.replace(partial_path(p), p)
        # (a rename between two hard links of one file does nothing and leaves the temporary name)
        partial_path(p).unlink(missing_ok=True)
    if paths:
        fd = os.open(paths[0].parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the data) of an ``.npy`` file, from its header only
    (numpy's errors for a file that is not one: ``ValueError``, ``EOFError``, ...)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return tuple(shape), fortran, dtype, f.tell()


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write a whole array to ``path`` via a temporary name and a rename."""
    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
