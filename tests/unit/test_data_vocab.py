"""Dense per-table vocabularies: modulo cap, frequency threshold, cardinalities, remapped dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robe_dist.data import vocab as V
from robe_dist.data.cli import main as cli_main
from robe_dist.data.dataset import CriteoIterableDataset, read_manifest
from robe_dist.data.layout import DataError
from robe_dist.data.synthetic import generate


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vsrc")
    generate(out, 6000, days=3, seed=1, log=None)
    return out


def expected_map(ids: np.ndarray, cap: int, min_count: int) -> tuple[dict[int, int], int]:
    """Reference: value -> index (1.., ascending value) for values seen >= min_count times."""
    vals = ids % cap if cap > 0 else ids
    u, c = np.unique(vals, return_counts=True)
    kept = [int(v) for v, n in zip(u, c) if n >= min_count]
    return {v: i + 1 for i, v in enumerate(kept)}, len(kept) + 1


@pytest.mark.parametrize("cap, min_count", [(40_000_000, 1), (1000, 1), (0, 3), (1000, 2)])
def test_remap_matches_reference(src: Path, tmp_path: Path, cap: int, min_count: int) -> None:
    m = V.build_vocab(src, tmp_path, max_ind_range=cap, min_count=min_count, log=None)
    raw = np.concatenate([np.load(src / f"day_{d}_sparse.npy") for d in range(3)])
    new = np.concatenate([np.load(tmp_path / f"day_{d}_sparse.npy") for d in range(3)])
    assert new.dtype == np.int32 and new.shape == raw.shape
    for t in (0, 5, 9, 19, 25):
        mapping, size = expected_map(raw[:, t], cap, min_count)
        vals = raw[:, t] % cap if cap > 0 else raw[:, t]
        assert new[:, t].tolist() == [mapping.get(int(v), 0) for v in vals]
        assert m["table_sizes"][t] == size and new[:, t].max() < size
    cards = json.loads((tmp_path / "cardinalities.json").read_text())
    assert cards["table_sizes"] == m["table_sizes"] and cards["feature_names"][0] == "cat_0"
    assert cards["max_ind_range"] == cap and cards["min_count"] == min_count and cards["oov_index"] == 0


def test_cap_and_threshold_shrink_tables(src: Path, tmp_path: Path) -> None:
    full = V.build_vocab(src, tmp_path / "a", max_ind_range=0, log=None)["table_sizes"]
    capped = V.build_vocab(src, tmp_path / "b", max_ind_range=100, log=None)["table_sizes"]
    frequent = V.build_vocab(src, tmp_path / "c", max_ind_range=0, min_count=5, log=None)["table_sizes"]
    assert max(capped) <= 101 and capped[0] < full[0]
    assert frequent[0] < full[0] // 2 and frequent[5] == full[5]  # the 3-value table keeps all


def test_output_is_a_complete_dataset_with_same_dense_and_labels(src: Path, tmp_path: Path) -> None:
    V.build_vocab(src, tmp_path, min_count=2, log=None)
    m = read_manifest(tmp_path)
    assert m["kind"] == "vocab" and m["complete"] and m["rows"] == 6000 and m["planted_auc"] > 0.7
    for d in range(3):
        for part in ("dense", "labels"):
            np.testing.assert_array_equal(
                np.load(tmp_path / f"day_{d}_{part}.npy"), np.load(src / f"day_{d}_{part}.npy")
            )
    b = next(iter(CriteoIterableDataset(tmp_path, "train", batch_size=32)))
    assert b.sparse_features.values().dtype == torch.int64
    assert int(b.sparse_features["cat_0"].values().max()) < m["table_sizes"][0]


def test_train_only_maps_unseen_eval_values_to_zero(src: Path, tmp_path: Path) -> None:
    m = V.build_vocab(src, tmp_path, max_ind_range=0, train_only=True, log=None)
    train_vals = set(np.concatenate([np.load(src / f"day_{d}_sparse.npy")[:, 0] for d in range(2)]).tolist())
    raw = np.load(src / "day_2_sparse.npy")[:, 0]
    new = np.load(tmp_path / "day_2_sparse.npy")[:, 0]
    unseen = np.array([v not in train_vals for v in raw.tolist()])
    assert unseen.any() and (new[unseen] == 0).all() and (new[~unseen] > 0).all()
    assert m["table_sizes"][0] == len(train_vals) + 1


def test_dense_lookup_and_dense_counts_agree_with_sparse_paths(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = V.build_vocab(src, tmp_path / "a", max_ind_range=5000, log=None)
    monkeypatch.setattr(V, "DENSE_LUT_MIN_KEPT", 1)  # every table through the dense lookup array
    counter = V._TableCounter(5000)
    counter.add(np.arange(400) % 5000)  # 400 distinct > 5000 / 16: switches to dense counts
    assert counter.dense is not None and counter.kept(1).tolist() == list(range(400))
    b = V.build_vocab(src, tmp_path / "b", max_ind_range=5000, log=None)
    assert a["table_sizes"] == b["table_sizes"]
    for d in range(3):
        np.testing.assert_array_equal(
            np.load(tmp_path / "a" / f"day_{d}_sparse.npy"), np.load(tmp_path / "b" / f"day_{d}_sparse.npy")
        )


def test_refuses_in_place_and_foreign_outputs(src: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="must differ"):
        V.build_vocab(src, src, log=None)
    other = tmp_path / "other"
    generate(other, 100, days=1, log=None)
    with pytest.raises(DataError, match="synthetic"):
        V.build_vocab(src, other, log=None)


@pytest.mark.parametrize("cap, min_count", [(1000, 1), (0, 2)])
def test_stored_vocabulary_maps_raw_ids_as_the_remapped_files(src: Path, tmp_path: Path, cap: int, min_count: int) -> None:
    V.build_vocab(src, tmp_path, max_ind_range=cap, min_count=min_count, train_only=True, log=None)
    vocab = V.Vocabulary.load(tmp_path)
    for d in range(3):  # day 2 was not counted: its unseen values map to 0 there too
        raw = np.load(src / f"day_{d}_sparse.npy")
        assert np.array_equal(vocab.apply(raw), np.load(tmp_path / f"day_{d}_sparse.npy"))
    other = V.build_vocab(src, tmp_path / "other", max_ind_range=cap, min_count=min_count + 1, log=None)
    assert other["vocab"]["fingerprint"] != read_manifest(tmp_path)["vocab"]["fingerprint"]


def test_vocabulary_without_or_with_damaged_values_is_refused(src: Path, tmp_path: Path) -> None:
    V.build_vocab(src, tmp_path, max_ind_range=0, log=None)
    values = tmp_path / V.VALUES_NAME
    with np.load(values) as npz:
        kept = {k: npz[k] for k in npz.files}
    kept["cat_3"] = kept["cat_3"][:-1]
    np.savez(values, **kept)
    with pytest.raises(DataError, match="does not match the manifest"):
        V.Vocabulary.load(tmp_path)
    manifest = read_manifest(tmp_path)
    del manifest["vocab"]["fingerprint"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="before robe_dist stored its values"):
        V.Vocabulary.load(tmp_path)
    with pytest.raises(DataError, match="not a robe-data vocab directory"):
        V.Vocabulary.load(src)


class _Interrupted(Exception):
    """Stands for a kill at the moment a log line is printed."""


def _stop_at(text: str):
    def log(line: str) -> None:
        if text in line:
            raise _Interrupted(line)

    return log


def test_an_interrupted_vocab_is_never_taken_for_a_dataset(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a review: the manifest was deleted first and written last, and a directory without
    one reads as a complete TorchRec-made dataset, here of mixed old and new vocabularies."""
    out = tmp_path / "v"
    V.build_vocab(src, out, log=None)
    for first in (out, tmp_path / "fresh"):  # a rerun over a complete vocabulary, and a first run
        with pytest.raises(_Interrupted):
            V.build_vocab(src, first, min_count=2, log=_stop_at("remapped day_0"))
        m = read_manifest(first)
        assert m["complete"] is False and m["kind"] == "vocab" and m["files"] == []
        with pytest.raises(DataError, match="incomplete"):
            CriteoIterableDataset(first, "train", batch_size=10)
        # robe-data plan said "no table sizes; run robe-data vocab first", not why
        assert cli_main(["plan", "--data", str(first), "--budget", "10x"]) == 2
        assert "dataset is incomplete (INCOMPLETE in robe-data info); finish the command" in capsys.readouterr().err
        assert V.build_vocab(src, first, min_count=2, log=None)["complete"]  # the rerun finishes it
        assert not list(first.glob("*.partial"))  # (rename between two links of one file left them)
    # an option out of range is refused before the good vocabulary is touched
    for bad in (-5, 2**64):
        with pytest.raises(DataError, match=r"--max-ind-range must be a whole number in \[0, 2\*\*63\)"):
            V.build_vocab(src, out, max_ind_range=bad, log=None)
    assert read_manifest(out)["complete"]


def test_a_leftover_temporary_link_to_the_source_is_not_written_through(src: Path, tmp_path: Path) -> None:
    """The unchanged parts are hard links to the source: a temporary name left linked to a source
    file was truncated by the next writer of that name, rewriting the source dataset."""
    from robe_dist.data.npy import NpyAppender

    source = tmp_path / "source.npy"
    np.save(source, np.arange(10))
    left = tmp_path / "day_0_dense.npy.partial"
    left.hardlink_to(source)
    with NpyAppender(left, np.float32, (2,)) as w:
        w.append(np.zeros((3, 2), dtype=np.float32))
    assert np.load(source).tolist() == list(range(10))


def test_single_file_train_split_is_its_first_six_sevenths(tmp_path: Path) -> None:
    """--train-only and the table statistics counted every row of a single-file dataset (Kaggle),
    its held-out val/test rows too."""
    from robe_dist.data.layout import split_range
    from robe_dist.data.stats import compute_table_stats, ensure_table_stats

    one = tmp_path / "one"
    generate(one, 700, days=1, seed=3, log=None)
    train = split_range([700], "train")[1]
    assert train == 600
    assert compute_table_stats(one, log=None)[0].rows == train
    assert ensure_table_stats(one, log=None)[0].rows == train
    m = V.build_vocab(one, tmp_path / "v", max_ind_range=0, train_only=True, log=None)
    ids = np.load(one / "day_0_sparse.npy")
    assert m["table_sizes"][0] == len(np.unique(ids[:train, 0])) + 1
