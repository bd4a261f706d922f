"""CriteoIterableDataset: batch contents, splits, rank interleaving and shards, shuffling, resume, workers, TorchRec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_dist.data.criteo import DEFAULT_CAT_NAMES, MLPERF_V3_MULTI_HOT_SIZES
from robe_dist.data.dataset import CriteoIterableDataset, batch_offsets, read_manifest, shard, split_range
from robe_dist.data.layout import DataError
from robe_dist.data.synthetic import generate

DAYS = (1000, 700, 555)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Three days of distinct, recognisable rows: sparse[:, 0] is the global row index."""
    out = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    start = 0
    for d, n in enumerate(DAYS):
        rows = np.arange(start, start + n)
        sparse = (rows[:, None] * 100 + np.arange(26)[None, :]).astype(np.int64)
        np.save(out / f"day_{d}_sparse.npy", sparse)
        np.save(out / f"day_{d}_dense.npy", rng.random((n, 13), dtype=np.float32))
        np.save(out / f"day_{d}_labels.npy", (rows % 3 == 0).astype(np.int32)[:, None])
        start += n
    full = {
        p: np.concatenate([np.load(out / f"day_{d}_{p}.npy") for d in range(3)]) for p in ("dense", "sparse", "labels")
    }
    return out, full


def row_ids(batch: Batch) -> np.ndarray:
    return batch.sparse_features["cat_0"].values().numpy() // 100


def all_ids(ds: CriteoIterableDataset) -> list[int]:
    return [int(i) for b in ds for i in row_ids(b)]


def test_batch_contents_types_and_kjt(data: tuple[Path, dict]) -> None:
    path, full = data
    ds = CriteoIterableDataset(path, "train", batch_size=64, shuffle_buffer=0)
    b = next(iter(ds))
    assert isinstance(b, Batch) and isinstance(b.sparse_features, KeyedJaggedTensor)
    assert b.dense_features.dtype == torch.float32 and b.dense_features.shape == (64, 13)
    assert b.labels.dtype == torch.float32 and b.labels.shape == (64,)
    kjt = b.sparse_features
    assert kjt.keys() == list(DEFAULT_CAT_NAMES) and kjt.stride() == 64
    assert kjt.values().dtype == torch.int64 and kjt.lengths().tolist() == [1] * (26 * 64)
    for t in (0, 7, 25):
        assert kjt[f"cat_{t}"].values().tolist() == full["sparse"][:64, t].tolist()
    np.testing.assert_array_equal(b.dense_features.numpy(), full["dense"][:64])
    np.testing.assert_array_equal(b.labels.numpy(), full["labels"][:64, 0])
    assert b.dense_features.numpy().flags.writeable  # a copy, not the read-only memory map


def test_mlperf_day_split(data: tuple[Path, dict]) -> None:
    path, _ = data
    assert split_range(list(DAYS), "train") == (0, 1700)
    assert split_range(list(DAYS), "val") == (1700, 1978) and split_range(list(DAYS), "test") == (1978, 2255)
    assert split_range([700], "train") == (0, 600) and split_range([700], "test") == (650, 700)
    assert split_range(list(DAYS), "val", holdout_fraction=0.2) == (1804, 2030)
    with pytest.raises(ValueError, match="split 'dev'"):
        split_range(list(DAYS), "dev")
    for split, (lo, hi) in [("val", (1700, 1978)), ("test", (1978, 2255))]:
        ids = all_ids(CriteoIterableDataset(path, split, batch_size=100, drop_last=False))
        assert ids == list(range(lo, hi))


def test_rank_shards_are_disjoint_and_eval_covers_every_row_once(data: tuple[Path, dict]) -> None:
    path, _ = data
    seen, counts = [], []
    for rank in range(3):
        ds = CriteoIterableDataset(path, "test", batch_size=40, rank=rank, world_size=3, drop_last=False)
        batches = list(ds)
        counts.append(len(batches))
        assert len(batches) == len(ds)
        seen += [int(i) for b in batches for i in row_ids(b)]
    assert sorted(seen) == list(range(1978, 2255)) and len(seen) == len(set(seen))
    assert len(set(counts)) == 1  # same number of batches on every rank
    train = [
        set(all_ids(CriteoIterableDataset(path, "train", batch_size=50, rank=r, world_size=2, seed=1)))
        for r in range(2)
    ]
    assert not train[0] & train[1] and len(train[0]) == len(train[1]) == 850


def test_max_rows_caps_the_split_before_sharding(data: tuple[Path, dict]) -> None:
    """eval.max_batches reads the split's first rows: the same rows on any number of ranks (a cap
    per rank took the first rows of each rank's shard, other rows on every world size)."""
    path, _ = data
    for world in (1, 2, 3):
        shards = [all_ids(CriteoIterableDataset(path, "val", batch_size=40 // world, rank=r, world_size=world, drop_last=False,
                                                max_rows=120)) for r in range(world)]  # fmt: skip
        assert sorted(sum(shards, [])) == list(range(1700, 1820)), world
        assert len({len(s) for s in shards}) == 1
    assert all_ids(CriteoIterableDataset(path, "val", batch_size=64, drop_last=False, max_rows=10**6)) == list(range(1700, 1978))
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        CriteoIterableDataset(path, "val", max_rows=0)


@pytest.mark.parametrize("rows, world, batch", [(277, 3, 40), (10, 3, 3), (9, 3, 3), (7, 2, 3), (8, 3, 2), (2, 3, 4)])
def test_eval_batch_counts_are_equal_across_ranks(rows: int, world: int, batch: int) -> None:
    counts = set()
    total = 0
    for rank in range(world):
        _, n = shard(rows, rank, world, drop_last=False)
        offsets = batch_offsets(n, batch, False, -(-shard(rows, 0, world, False)[1] // batch))
        assert offsets[-1] == n and (np.diff(offsets) > 0).all() and (np.diff(offsets) <= batch).all()
        counts.add(len(offsets) - 1)
        total += n
    assert total == rows
    assert len(counts) == 1 or rows < world


@pytest.mark.parametrize("world, batch", [(3, 7), (3, 92), (4, 69)])  # (278 val rows: shards of 93/92, 70/69 rows)
def test_evaluation_datasets_yield_equal_batch_counts_on_every_rank(data: tuple[Path, dict], world: int, batch: int) -> None:
    """What the evaluation's lockstep relies on, from the datasets the trainer builds (the test
    above checks the formula): every rank yields as many batches, and the ranks read every row of
    the split once."""
    path, _ = data
    datasets = [CriteoIterableDataset(path, "val", batch_size=batch, rank=r, world_size=world, shuffle_buffer=0,
                                      drop_last=False) for r in range(world)]  # fmt: skip
    batches = [[row_ids(b).tolist() for b in ds] for ds in datasets]
    assert len({len(ds) for ds in datasets}) == 1 and [len(b) for b in batches] == [len(datasets[0])] * world
    ids = sorted(i for rank in batches for batch in rank for i in batch)
    single = all_ids(CriteoIterableDataset(path, "val", batch_size=7, rank=0, world_size=1, shuffle_buffer=0,
                                           drop_last=False))  # fmt: skip
    assert ids == sorted(single) and len(single) % world != 0


def test_shuffle_is_a_seeded_permutation(data: tuple[Path, dict]) -> None:
    path, _ = data
    ds = CriteoIterableDataset(path, "train", batch_size=100, shuffle_buffer=256, seed=3)
    ids = all_ids(ds)
    assert sorted(ids) == list(range(1700)) and ids != list(range(1700))
    assert all_ids(CriteoIterableDataset(path, "train", batch_size=100, shuffle_buffer=256, seed=3)) == ids
    assert all_ids(CriteoIterableDataset(path, "train", batch_size=100, shuffle_buffer=256, seed=4)) != ids
    ds.set_epoch(1)
    assert sorted(all_ids(ds)) == list(range(1700)) and all_ids(ds) != ids
    # each epoch draws both the order of the blocks and the order inside each block anew
    block_order = lambda ids: list(dict.fromkeys(i // 256 for i in ids))  # noqa: E731
    assert block_order(all_ids(ds)) != block_order(ids)
    one_block = CriteoIterableDataset(path, "train", batch_size=100, shuffle_buffer=2048, seed=3)
    epoch0 = all_ids(one_block)
    one_block.set_epoch(1)
    assert all_ids(one_block) != epoch0
    # the buffer bounds how far a row moves: every batch comes from at most two blocks of 256 rows
    first = row_ids(next(iter(CriteoIterableDataset(path, "train", batch_size=100, shuffle_buffer=256, seed=3))))
    assert len(set(first // 256)) <= 2


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2), (3, 4)])
def test_start_batch_resumes_exactly(data: tuple[Path, dict], rank: int, world: int) -> None:
    path, _ = data
    kw = dict(batch_size=64 // world, rank=rank, world_size=world, shuffle_buffer=300, seed=9)  # batches straddle blocks
    full = [row_ids(b).tolist() for b in CriteoIterableDataset(path, "train", **kw)]
    resumed = CriteoIterableDataset(path, "train", start_batch=11, **kw)
    assert len(resumed) == len(full) - 11 == 15
    assert [row_ids(b).tolist() for b in resumed] == full[11:]


@pytest.mark.parametrize("shuffle_buffer", [0, 300])
def test_global_batches_do_not_depend_on_the_world_size(data: tuple[Path, dict], shuffle_buffer: int) -> None:
    """Global batch b is the same rows on 1, 2 and 4 ranks; rank r holds its r-th slice."""
    path, full = data
    G = 96
    one = list(CriteoIterableDataset(path, "train", batch_size=G, shuffle_buffer=shuffle_buffer, seed=5))
    assert len(one) == 1700 // G
    for world in (1, 2, 4):
        ranks = [
            list(CriteoIterableDataset(path, "train", batch_size=G // world, rank=r, world_size=world,
                                       shuffle_buffer=shuffle_buffer, seed=5))
            for r in range(world)
        ]  # fmt: skip
        assert all(len(batches) == len(one) for batches in ranks)
        for b, ref in enumerate(one):
            assert np.concatenate([row_ids(batches[b]) for batches in ranks]).tolist() == row_ids(ref).tolist()
            dense = torch.cat([batches[b].dense_features for batches in ranks])
            assert torch.equal(dense, ref.dense_features)
    ids = np.concatenate([row_ids(b) for b in one])  # shuffled across the day boundary at row 1000, contents intact
    np.testing.assert_array_equal(torch.cat([b.dense_features for b in one]).numpy(), full["dense"][ids])
    np.testing.assert_array_equal(torch.cat([b.labels for b in one]).numpy(), full["labels"][ids, 0])


def test_contiguous_train_shards_on_request(data: tuple[Path, dict]) -> None:
    path, _ = data
    ds = CriteoIterableDataset(path, "train", batch_size=50, rank=1, world_size=2, shuffle_buffer=0, interleave=False)
    assert all_ids(ds) == list(range(850, 1700))
    with pytest.raises(ValueError, match="drop_last"):
        CriteoIterableDataset(path, "val", batch_size=10, drop_last=False, interleave=True)


def test_dataloader_workers_reproduce_the_single_process_order(data: tuple[Path, dict]) -> None:
    path, _ = data
    ds = CriteoIterableDataset(path, "train", batch_size=100, shuffle_buffer=500, seed=2)
    single = [row_ids(b).tolist() for b in ds]
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert [row_ids(b).tolist() for b in loader] == single


def test_rank_defaults_and_argument_errors(data: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = data
    ds = CriteoIterableDataset(path, "val", batch_size=10)
    assert (ds.rank, ds.world_size, ds.shuffle_buffer) == (0, 1, 0)
    with pytest.raises(ValueError, match="rank 2"):
        CriteoIterableDataset(path, rank=2, world_size=2)
    with pytest.raises(DataError, match="not found"):
        CriteoIterableDataset(tmp_path / "missing")
    (tmp_path / "day_0_dense.npy").write_bytes((path / "day_0_dense.npy").read_bytes())
    with pytest.raises(DataError, match="day_0_sparse.npy: missing"):
        read_manifest(tmp_path)


def test_incomplete_dataset_is_refused(tmp_path: Path) -> None:
    generate(tmp_path, 300, days=2, log=None)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="incomplete"):
        CriteoIterableDataset(tmp_path)


def test_multi_hot_batches(tmp_path: Path) -> None:
    generate(tmp_path, 600, days=2, multi_hot=True, log=None)
    mh = np.load(tmp_path / "day_0_sparse_multi_hot.npy")
    b = next(iter(CriteoIterableDataset(tmp_path, "train", batch_size=8, shuffle_buffer=0)))
    kjt = b.sparse_features
    assert kjt.length_per_key() == [8 * s for s in MLPERF_V3_MULTI_HOT_SIZES]
    off = np.concatenate([[0], np.cumsum(MLPERF_V3_MULTI_HOT_SIZES)])
    assert kjt["cat_20"].values().tolist() == mh[:8, off[20] : off[21]].reshape(-1).tolist()
    assert kjt["cat_20"].lengths().tolist() == [100] * 8
    one = next(iter(CriteoIterableDataset(tmp_path, "train", batch_size=8, shuffle_buffer=0, multi_hot=False)))
    assert one.sparse_features.values().shape == (26 * 8,)


def test_matches_torchrec_binary_loader(tmp_path: Path) -> None:
    pytest.importorskip("iopath")
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    generate(tmp_path, 3000, days=3, log=None)
    last = [str(tmp_path / f"day_2_{p}.npy") for p in ("dense", "sparse", "labels")]
    for split in ("val", "test"):
        theirs = list(
            # hashes: no cap (ids are far below it); torchrec 1.6 needs the argument, 1.8 defaults it
            InMemoryBinaryCriteoIterDataPipe(split, *[[p] for p in last], batch_size=128, rank=0, world_size=1,
                                             hashes=[2**62] * 26)  # fmt: skip
        )
        ours = list(CriteoIterableDataset(tmp_path, split, batch_size=128, drop_last=False))
        assert len(theirs) == len(ours) == 4
        for a, b in zip(theirs, ours):
            assert torch.equal(a.dense_features, b.dense_features)
            assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
            assert torch.equal(a.labels.float(), b.labels)
