"""Synthetic Criteo-like data: layout, determinism, idempotence, id statistics, planted AUC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from robe_dist.data import synthetic as S
from robe_dist.data.criteo import MLPERF_V1_TABLE_SIZES, MLPERF_V3_MULTI_HOT_SIZES
from robe_dist.data.layout import DataError, write_manifest
from robe_dist.data.planted import auc_from_histograms, score_histograms


def gen(out: Path, rows: int = 20_000, **kw) -> dict:
    return S.generate(out, rows, log=None, **kw)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, gen(out, 20_000, days=3, seed=5)


def test_layout_and_manifest(small: tuple[Path, dict]) -> None:
    out, m = small
    assert m["kind"] == "synthetic" and m["complete"] and m["rows"] == 20_000
    assert [(f["name"], f["rows"]) for f in m["files"]] == [("day_0", 6667), ("day_1", 6667), ("day_2", 6666)]
    assert m["table_sizes"] == S.table_sizes(1e-3) and len(m["table_sizes"]) == 26
    dense = np.load(out / "day_1_dense.npy", mmap_mode="r")
    sparse = np.load(out / "day_1_sparse.npy", mmap_mode="r")
    labels = np.load(out / "day_1_labels.npy", mmap_mode="r")
    assert (dense.dtype, dense.shape) == (np.float32, (6667, 13)) and dense.min() >= 0
    assert (sparse.dtype, sparse.shape) == (np.int64, (6667, 26))
    assert (labels.dtype, labels.shape) == (np.int32, (6667, 1)) and set(np.unique(labels)) == {0, 1}


def test_table_sizes_scale_mlperf_sizes() -> None:
    sizes = S.table_sizes(0.01)
    assert sizes[0] == 398845 and sizes[5] == 3 and sizes[12] == 10 and sizes[8] == 16
    assert S.table_sizes(1.0) == list(MLPERF_V1_TABLE_SIZES)
    with pytest.raises(ValueError):
        S.table_sizes(0)


def test_ids_are_raw_hashed_zipf_within_cardinality(small: tuple[Path, dict]) -> None:
    out, m = small
    sparse = np.concatenate([np.load(out / f"day_{d}_sparse.npy") for d in range(3)])
    for t, size in enumerate(m["table_sizes"]):
        present = sparse[:, t][sparse[:, t] != 0]
        distinct, counts = np.unique(present, return_counts=True)
        assert len(distinct) <= size
        assert present.max() < 2**32 and present.min() > 0
        if size > 10_000:  # big tables: hashed-looking ids and a hot head with a long tail
            assert present.max() > 2**31 and np.median(present) > 2**24
            top = np.sort(counts)[::-1]
            assert top[0] > 50 * np.median(counts)
            assert (counts == 1).sum() > 0.3 * len(distinct)


def test_planted_auc_and_click_rate(small: tuple[Path, dict]) -> None:
    out, m = small
    assert 0.74 < m["planted_auc"] < 0.88
    assert set(m["planted_auc_by_split"]) == {"train", "val", "test"}
    assert all(0.7 < v < 0.9 for v in m["planted_auc_by_split"].values())
    labels = np.concatenate([np.load(out / f"day_{d}_labels.npy") for d in range(3)])
    assert abs(labels.mean() - 0.25) < 0.02
    assert sum(f["positives"] for f in m["files"]) == labels.sum()


def test_deterministic_per_seed_and_idempotent(tmp_path: Path, small: tuple[Path, dict]) -> None:
    out, m = small
    again = gen(tmp_path / "again", 20_000, days=3, seed=5)
    for d in range(3):
        for part in ("dense", "sparse", "labels"):
            assert (tmp_path / "again" / f"day_{d}_{part}.npy").read_bytes() == (
                out / f"day_{d}_{part}.npy"
            ).read_bytes()
    assert again["planted_auc"] == m["planted_auc"]
    other = gen(tmp_path / "other", 20_000, days=3, seed=6)
    assert not np.array_equal(np.load(tmp_path / "other" / "day_0_sparse.npy"), np.load(out / "day_0_sparse.npy"))
    assert other["planted_auc"] != m["planted_auc"]
    mtime = (tmp_path / "again" / "day_0_sparse.npy").stat().st_mtime_ns
    assert gen(tmp_path / "again", 20_000, days=3, seed=5)["planted_auc"] == m["planted_auc"]
    assert (tmp_path / "again" / "day_0_sparse.npy").stat().st_mtime_ns == mtime  # not regenerated
    with pytest.raises(DataError, match="other parameters"):  # not overwritten
        gen(tmp_path / "again", 9_000, days=3, seed=5)
    assert np.load(tmp_path / "again" / "day_0_sparse.npy").shape == (20_000 // 3 + 1, 26)


def test_refuses_to_overwrite_other_datasets(tmp_path: Path) -> None:
    write_manifest(tmp_path, {"format": "robe_dist.criteo-npy", "version": 1, "kind": "criteo", "files": []})
    with pytest.raises(DataError, match="criteo"):
        gen(tmp_path, 100)


def test_multi_hot_bags(tmp_path: Path) -> None:
    m = gen(tmp_path, 1_000, days=2, multi_hot=True)
    assert m["multi_hot_sizes"] == list(MLPERF_V3_MULTI_HOT_SIZES)
    mh = np.load(tmp_path / "day_0_sparse_multi_hot.npy")
    one = np.load(tmp_path / "day_0_sparse.npy")
    offsets = np.concatenate([[0], np.cumsum(MLPERF_V3_MULTI_HOT_SIZES)])
    assert mh.shape == (500, 214) and mh.dtype == np.int64
    np.testing.assert_array_equal(mh[:, offsets[:-1]], one)  # the first id of each bag is the one-hot id
    bag20 = mh[:, offsets[20] : offsets[21]]  # 100 ids per sample
    assert len(np.unique(bag20[bag20 != 0])) > 1000
    assert 0.68 < m["planted_auc"] < 0.9


def test_auc_from_histograms_matches_pairwise_auc() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(3000)
    y = (rng.random(3000) < p).astype(int)
    pos, neg = p[y == 1], p[y == 0]
    exact = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert abs(auc_from_histograms(score_histograms(p, y)) - exact) < 1e-3
    assert auc_from_histograms(score_histograms(p, np.zeros(3000, int))) is None


def test_tenth_of_a_day_is_chunked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Memory is bounded by CHUNK_ROWS, not by the day size: a day of many chunks is written piecewise."""
    monkeypatch.setattr(S, "CHUNK_ROWS", 1000)
    m = gen(tmp_path, 10_500, days=1)
    assert m["files"][0]["rows"] == 10_500
    labels = np.load(tmp_path / "day_0_labels.npy")
    assert labels.shape == (10_500, 1) and m["planted_auc_by_split"]["train"] is None


def test_a_directory_holding_something_else_is_refused(tmp_path):
    """data.kind: synthetic with a data.path that holds other files, or a synthetic dataset of other
    parameters: refused, nothing overwritten or added; an interrupted generation is redone."""
    generate, read_manifest = S.generate, S.read_manifest
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"is not empty \(notes.txt\)"):
        generate(other, 200, days=2, log=None)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    made = tmp_path / "made"
    generate(made, 200, days=2, seed=1, log=None)
    before = {p.name: p.stat().st_mtime_ns for p in made.iterdir()}
    with pytest.raises(DataError, match=r"other parameters \(rows 200 \(asked 300\)"):
        generate(made, 300, days=2, seed=1, log=None)
    assert {p.name: p.stat().st_mtime_ns for p in made.iterdir()} == before

    (made / "manifest.json").unlink()  # as a crash half-way leaves it
    (made / "day_1_dense.npy.partial").write_bytes(b"half")
    generate(made, 300, days=2, seed=1, log=None)
    assert read_manifest(made)["rows"] == 300


def test_directory_lock_makes_a_second_builder_wait(tmp_path):
    """Two runs that build the same cached dataset at once take turns (trainer.data.make_synthetic)."""
    import subprocess
    import sys
    import time

    from robe_dist.data.layout import directory_lock

    cache, marker = tmp_path / "synthetic-x", tmp_path / "second_ran"
    code = (f"from robe_dist.data.layout import directory_lock\n"
            f"with directory_lock({str(cache)!r}): open({str(marker)!r}, 'w').close()")
    with directory_lock(cache):
        other = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(1.5)
        assert not marker.exists() and other.poll() is None  # waits for the holder
    assert other.wait(timeout=60) == 0 and marker.exists()
    assert not cache.exists()  # the lock lives next to the directory, not in it


def test_an_interrupted_generation_is_marked_unfinished_and_rerun(tmp_path: Path) -> None:
    """A generation stopped after its first day left no manifest, which reads as a complete
    TorchRec-made dataset of one day (found by a review: robe-train trained on it)."""
    from robe_dist.data.layout import read_manifest

    out = tmp_path / "s"

    def stop(line: str) -> None:
        if line.startswith("day_1:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.generate(out, 3000, days=3, seed=0, log=stop)
    assert (out / "day_0_sparse.npy").exists() and read_manifest(out)["complete"] is False
    assert S.generate(out, 3000, days=3, seed=0, log=None)["complete"]
