"""Training / evaluation batches from the binary layout: an IterableDataset of TorchRec ``Batch``.

Splits (MLPerf's): the files in day order are concatenated; ``train`` is every file but the last,
``val`` the first half (rounded up) of the last file and ``test`` its second half, as TorchRec's
``InMemoryBinaryCriteoIterDataPipe``. A dataset of one file (Criteo Kaggle's ``train``) holds out
its last ``holdout_fraction`` (default 1/7: Kaggle spans 7 days, the last one is held out); pass
``holdout_fraction`` to hold out a share of all rows instead of the last file.

Ranks, training (``drop_last=True``; ``interleave`` defaults to it): batches are interleaved by
global batch. The split's rows, in the (shuffled) stream order below, are cut into global batches
of ``G = batch_size * world_size`` rows; global batch ``b`` is stream rows ``[b*G, (b+1)*G)``
whatever the world size, and rank ``r`` yields its ``r``-th contiguous slice of ``batch_size``
rows. So every rank yields ``rows // G`` batches, an N-rank run consumes exactly the global batches
of a 1-rank run with the same ``G``, and a data position (global batch index, ``start_batch``)
carries over to any world size. The tail (``rows % G``) is dropped.

Ranks, evaluation (``drop_last=False``, never interleaved): each rank reads a contiguous, disjoint
shard of the split; every row is read once across ranks, and every rank yields the same number of
batches (collectives stay in step), the last ones possibly smaller — except when ``batch_size`` is
1 or the split has fewer rows than ranks.

Shuffling (``shuffle_buffer`` rows > 0; default on for train, off for val/test): the stream (the
whole split when interleaved, else the rank's shard) is cut into blocks of ``shuffle_buffer``
consecutive rows; blocks are visited in a random order and each block's rows are permuted, both
drawn from ``(seed, epoch)`` only, so the order is the same on every rank and world size. The
stream is deterministic, and batch ``b`` is found without reading earlier batches (``start_batch``
skips in O(1)). A rank gathers only its own rows of a block from the memory maps (fancy indexing
inside a block of consecutive rows), so interleaving costs no extra reads; batches are built with
numpy, never one row at a time in Python.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_dist.data.criteo import DEFAULT_CAT_NAMES
from robe_dist.data.layout import MULTI_HOT_PART, SINGLE_FILE_HOLDOUT, SPLITS, DataError, part_path, split_range  # noqa: F401
from robe_dist.data.layout import read_manifest as _read_manifest

DEFAULT_SHUFFLE_BUFFER = 1 << 17


def read_manifest(path: str | os.PathLike) -> dict:
    """Manifest of a dataset directory (``manifest.json`` or a TorchRec-made one), checked
    against the files; see :func:`robe_dist.data.layout.read_manifest`."""
    return _read_manifest(path)


def shard(rows: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """(offset, length) of ``rank``'s contiguous shard of ``rows`` rows."""
    if drop_last:
        per = rows // world_size
        return rank * per, per
    q, r = divmod(rows, world_size)
    return rank * q + min(rank, r), q + (rank < r)


def batch_offsets(rows: int, batch_size: int, drop_last: bool, num_batches: int | None = None) -> np.ndarray:
    """Start offsets of a shard's batches plus the end: [num_batches + 1] int64.

    ``num_batches`` (drop_last=False) forces that many batches; the last ones absorb the shortfall
    (sizes ..., B, B - 1, 1 when the rows run out one batch early)."""
    if drop_last:
        n = rows // batch_size
        return np.arange(n + 1, dtype=np.int64) * batch_size
    n = math.ceil(rows / batch_size) if num_batches is None else num_batches
    if rows == 0 or n == 0:
        return np.zeros(1, dtype=np.int64)
    sizes = np.full(n, batch_size, dtype=np.int64)
    sizes[-1] = rows - batch_size * (n - 1)  # >= 0: rows is at least the largest shard - 1
    if sizes[-1] == 0 and n >= 2 and batch_size >= 2:  # one row short of n batches: split the last full one
        sizes[-2:] = (batch_size - 1, 1)
    sizes = sizes[sizes > 0]
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass
class _Block:
    index: int
    start: int
    """First stream row of the block."""
    perm: np.ndarray
    """The block's row permutation (int64, relative to ``start``)."""


class CriteoIterableDataset(IterableDataset):
    """Batches of a binary Criteo dataset directory (see the module doc for splits, sharding and
    shuffling). Yields ``torchrec.datasets.utils.Batch`` with ``dense_features`` float32 [B, 13],
    ``sparse_features`` a KeyedJaggedTensor keyed ``cat_0..cat_25`` (int64 values, one id per
    sample and key, or the fixed multi-hot bag sizes), ``labels`` float32 [B].

    Args:
        path: dataset directory (``manifest.json``, or TorchRec's ``day_{i}_*.npy`` files).
        split: "train", "val" or "test".
        batch_size: samples per batch (per rank).
        rank, world_size: this rank's share; default from torch.distributed if initialised, else 0, 1.
        shuffle_buffer: rows per shuffle block; None: 131072 for train, 0 (no shuffle) otherwise.
        seed: shuffling seed (with the epoch, see :meth:`set_epoch`).
        start_batch: first batch to yield (resume; interleaved: the global batch index, valid on any
            world size); batches before it are skipped without reading.
        drop_last: drop the incomplete tail (training); False reads every row once (evaluation).
        interleave: global-batch interleaving across ranks (see the module doc); None: ``drop_last``.
            Requires ``drop_last=True``; False gives contiguous per-rank shards.
        holdout_fraction: hold out this share of all rows for val+test instead of the last file.
        max_rows: read only the split's first ``max_rows`` rows (before sharding: the same rows on
            any number of ranks); None: all of them.
        multi_hot: use ``NAME_sparse_multi_hot.npy`` bags; None: if the dataset has them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        batch_size: int = 2048,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int | None = None,
        seed: int = 0,
        start_batch: int = 0,
        drop_last: bool = True,
        *,
        holdout_fraction: float | None = None,
        max_rows: int | None = None,
        multi_hot: bool | None = None,
        interleave: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (shuffle_buffer or 0) < 0 or start_batch < 0:
            raise ValueError(f"shuffle_buffer ({shuffle_buffer}) and start_batch ({start_batch}) must be >= 0")
        self.path = os.fspath(path)
        self.manifest = read_manifest(path)
        if self.manifest.get("complete") is False:
            raise DataError(f"{path}: dataset is incomplete (an ingest or generate run did not finish); rerun it")
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if initialised else 0) if rank is None else rank
            world_size = (dist.get_world_size() if initialised else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        sizes = self.manifest.get("multi_hot_sizes")
        if multi_hot and not sizes:
            raise DataError(f"{path}: multi_hot=True but the dataset has no {MULTI_HOT_PART}.npy files")
        self.bag_sizes: list[int] | None = list(sizes) if (sizes and multi_hot is not False) else None
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.epoch, self.start_batch, self.drop_last = seed, 0, start_batch, drop_last
        self.interleave = drop_last if interleave is None else interleave
        if self.interleave and not drop_last:
            raise ValueError("interleave=True needs drop_last=True (evaluation reads contiguous shards)")
        self.shuffle_buffer = (
            (DEFAULT_SHUFFLE_BUFFER if split == "train" else 0) if shuffle_buffer is None else shuffle_buffer
        )

        self.file_names = [f["name"] for f in self.manifest["files"]]
        file_rows = [f["rows"] for f in self.manifest["files"]]
        self._file_starts = np.concatenate([[0], np.cumsum(file_rows)]).astype(np.int64)
        lo, hi = split_range(file_rows, split, holdout_fraction)
        if max_rows is not None:
            if max_rows < 1:
                raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
            hi = min(hi, lo + max_rows)
        if self.interleave:  # the stream is the whole split; rank r takes slice r of each global batch
            self._first_row, self.rows = lo, hi - lo
            self.num_batches = self.rows // (batch_size * world_size)
            self._offsets = None
        else:
            offset, self.rows = shard(hi - lo, rank, world_size, drop_last)
            self._first_row = lo + offset
            forced = None
            if not drop_last:  # same batch count on every rank: that of the largest shard
                forced = math.ceil(shard(hi - lo, 0, world_size, False)[1] / batch_size)
            self._offsets = batch_offsets(self.rows, batch_size, drop_last, forced)
            self.num_batches = len(self._offsets) - 1
        self._arrays: list[dict[str, np.ndarray]] | None = None
        self._block: _Block | None = None
        self._kjt_cache: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the order is a function of ``(seed, epoch)``)."""
        self.epoch = epoch
        self._block = None

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmaps
        state = self.__dict__.copy()
        state["_arrays"], state["_block"] = None, None
        return state

    # ------------------------------------------------------------------ reading
    def _open(self) -> list[dict[str, np.ndarray]]:
        if self._arrays is None:
            parts = ["dense", "sparse", "labels"] + ([MULTI_HOT_PART] if self.bag_sizes else [])
            self._arrays = [
                {p: np.load(part_path(self.path, name, p), mmap_mode="r") for p in parts} for name in self.file_names
            ]
        return self._arrays

    def _read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Stream rows [lo, hi), as arrays keyed by part (views where possible)."""
        g_lo, g_hi = self._first_row + lo, self._first_row + hi
        arrays = self._open()
        f = int(np.searchsorted(self._file_starts, g_lo, side="right")) - 1
        pieces: list[dict[str, np.ndarray]] = []
        while g_lo < g_hi:
            start = self._file_starts[f]
            stop = min(g_hi, self._file_starts[f + 1])
            pieces.append({p: a[g_lo - start : stop - start] for p, a in arrays[f].items()})
            g_lo, f = stop, f + 1
        if len(pieces) == 1:
            return pieces[0]
        return {p: np.concatenate([pc[p] for pc in pieces]) for p in pieces[0]}

    def _take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Stream rows ``idx`` (int64, in that order), gathered from the memory maps."""
        g = idx + self._first_row
        arrays = self._open()
        f0 = int(np.searchsorted(self._file_starts, g.min(), side="right")) - 1
        f1 = int(np.searchsorted(self._file_starts, g.max(), side="right")) - 1
        if f0 == f1:
            return {p: a[g - self._file_starts[f0]] for p, a in arrays[f0].items()}
        files = np.searchsorted(self._file_starts, g, side="right") - 1
        out = {
            p: np.empty((len(g), *a.shape[1:]), np.result_type(*[arrays[f][p].dtype for f in range(f0, f1 + 1)]))
            for p, a in arrays[f0].items()
        }
        for f in range(f0, f1 + 1):
            m = files == f
            for p, a in arrays[f].items():
                out[p][m] = a[g[m] - self._file_starts[f]]
        return out

    def _blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """(block order, stream offset of each visited block + end) for the current epoch."""
        size = self.shuffle_buffer
        n_blocks = math.ceil(self.rows / size)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n_blocks)
        lengths = np.minimum(size, self.rows - order * size)
        return order, np.concatenate([[0], np.cumsum(lengths)])

    def _load_block(self, index: int) -> _Block:
        if self._block is None or self._block.index != index:
            size = self.shuffle_buffer
            start = index * size
            n = min(start + size, self.rows) - start
            perm = np.random.default_rng([self.seed, self.epoch, index]).permutation(n)
            self._block = _Block(index, start, perm)
        return self._block

    def _batch_range(self, b: int) -> tuple[int, int]:
        """[lo, hi) of this rank's batch ``b`` in the (shuffled) stream."""
        if self._offsets is None:
            lo = (b * self.world_size + self.rank) * self.batch_size
            return lo, lo + self.batch_size
        return int(self._offsets[b]), int(self._offsets[b + 1])

    def _rows_of_batch(self, b: int, blocks: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
        lo, hi = self._batch_range(b)
        if blocks is None:
            return self._read(lo, hi)
        order, starts = blocks
        pieces = []
        k = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            block = self._load_block(int(order[k]))
            j0, j1 = lo - starts[k], min(hi, starts[k + 1]) - starts[k]
            pieces.append(block.perm[j0:j1] + block.start)
            lo, k = starts[k] + j1, k + 1
        return self._take(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))

    # ------------------------------------------------------------------ batches
    def _kjt_meta(self, n: int) -> tuple[torch.Tensor, list[int], list[int]]:
        if n not in self._kjt_cache:
            per_key = [n * s for s in self.bag_sizes] if self.bag_sizes else [n] * len(DEFAULT_CAT_NAMES)
            lengths = np.repeat(np.asarray(self.bag_sizes or [1] * len(DEFAULT_CAT_NAMES), dtype=np.int32), n)
            self._kjt_cache[n] = (
                torch.from_numpy(lengths),
                per_key,
                np.concatenate([[0], np.cumsum(per_key)]).tolist(),
            )
        return self._kjt_cache[n]

    def _to_batch(self, rows: dict[str, np.ndarray]) -> Batch:
        n = len(rows["labels"])
        if self.bag_sizes:
            mh = rows[MULTI_HOT_PART]
            bounds = np.concatenate([[0], np.cumsum(self.bag_sizes)])
            values = np.concatenate([mh[:, a:b].reshape(-1) for a, b in zip(bounds[:-1], bounds[1:])]).astype(np.int64)
        else:
            values = np.array(rows["sparse"].T, dtype=np.int64, order="C").reshape(-1)
        lengths, per_key, offsets = self._kjt_meta(n)
        kjt = KeyedJaggedTensor(
            keys=list(DEFAULT_CAT_NAMES), values=torch.from_numpy(values), lengths=lengths, stride=n,
            length_per_key=per_key, offset_per_key=offsets,
        )  # fmt: skip
        return Batch(  # np.array copies: batches never alias the read-only memory maps
            dense_features=torch.from_numpy(np.array(rows["dense"], dtype=np.float32)),
            sparse_features=kjt,
            labels=torch.from_numpy(np.array(rows["labels"], dtype=np.float32).reshape(-1)),
        )

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        wid, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        blocks = self._blocks() if self.shuffle_buffer > 0 and self.rows > 0 else None
        for b in range(self.start_batch + wid, self.num_batches, n_workers):
            yield self._to_batch(self._rows_of_batch(b, blocks))
