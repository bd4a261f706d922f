"""The placement planner (robe_dist.placement), its budget and the table statistics it reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from robe_dist import RobeEmbeddingBagCollection, RobeHybridEmbeddingBagCollection
from robe_dist.data.criteo import DEFAULT_CAT_NAMES
from robe_dist.data.layout import part_path, read_manifest
from robe_dist.data.stats import TableStats, compute_table_stats, read_table_stats, write_table_stats
from robe_dist.data.synthetic import generate
from robe_dist.data.vocab import build_vocab
from robe_dist.placement import Budget, evaluate_placement, plan_placement
from robe_dist.train_config import load_config


@pytest.mark.parametrize(
    "text, expected",
    [("100x", Budget(ratio=100.0)), ("1e3x", Budget(ratio=1000.0)), ("64MB", Budget(bytes=64_000_000)),
     ("1.5GiB", Budget(bytes=3 * 2**29)), (4096, Budget(bytes=4096)), ("4_096", Budget(bytes=4096))],
)  # fmt: skip
def test_budget_parses_bytes_and_ratios(text, expected):
    assert Budget.parse(text) == expected


@pytest.mark.parametrize("bad", ["-5x", "0x", "abc", "10 apples", 0, -1, True, "0.5b", 1.5])
def test_malformed_budget_is_named(bad):
    with pytest.raises(ValueError, match="robe.budget"):
        Budget.parse(bad)


def test_table_stats_histogram_from_counts():
    s = TableStats.from_counts("cat_0", rows=15, counts=np.array([1, 1, 2, 3, 8, 0]))
    assert (s.distinct, s.occurrences) == (5, 15)
    assert s.bin_ids == [2, 2, 0, 1] and s.bin_counts == [2, 5, 0, 8]
    ids, mean = s.histogram()
    assert ids.tolist() == [2, 2, 1] and mean.tolist() == [1.0, 2.5, 8.0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small synthetic dataset (3 days: train = days 0-1) and its vocabulary."""
    root = tmp_path_factory.mktemp("placement")
    generate(root / "raw", 6000, days=3, seed=1, scale=1e-4, log=None)
    build_vocab(root / "raw", root / "vocab", max_ind_range=0, train_only=True, log=None)
    return root


def test_stats_count_the_train_split(dataset):
    raw = dataset / "raw"
    stats = compute_table_stats(raw, log=None)
    ids = np.concatenate([np.load(part_path(raw, f"day_{d}", "sparse")) for d in (0, 1)])
    assert [s.name for s in stats] == list(DEFAULT_CAT_NAMES)
    for t, s in enumerate(stats):
        _, counts = np.unique(ids[:, t], return_counts=True)
        assert s.rows == len(ids) == s.occurrences
        assert s == TableStats.from_counts(s.name, len(ids), counts)
        # the most frequent ids as the dataset stores them: count descending, then id
        values, counts = np.unique(ids[:, t], return_counts=True)
        order = np.lexsort((values, -counts))
        assert s.top_ids.tolist() == values[order].tolist() and s.top_counts.tolist() == counts[order].tolist()
    # robe-data vocab wrote the same statistics of the same split, and they round-trip
    vocab_stats = read_table_stats(dataset / "vocab")
    assert vocab_stats == stats
    write_table_stats(dataset, stats, ["day_0", "day_1"])
    again = read_table_stats(dataset)
    assert again == stats and all(np.array_equal(a.top_ids, b.top_ids) for a, b in zip(again, stats))
    assert compute_table_stats(dataset / "vocab", log=None) == stats  # dense ids: the same counts
    # the vocabulary's most frequent ids are its indices, as its train split stores them
    remapped = np.concatenate([np.load(part_path(dataset / "vocab", f"day_{d}", "sparse")) for d in (0, 1)])
    for t, s in enumerate(vocab_stats):
        values, counts = np.unique(remapped[:, t], return_counts=True)
        order = np.lexsort((values, -counts))
        assert s.top_ids.tolist() == values[order].tolist() and s.top_counts.tolist() == counts[order].tolist()
    # statistics written before the most frequent ids were kept still read, without them
    (dataset / "table_top_ids.npz").unlink()
    assert all(s.top_ids is None for s in read_table_stats(dataset))


def mlperf_tables(dataset):
    sizes = read_manifest(dataset / "vocab")["table_sizes"]
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=int(n), feature_names=[f])
        for f, n in zip(DEFAULT_CAT_NAMES, sizes)
    ]


def test_planner_keeps_small_frequent_tables_whole_and_beats_both_extremes(dataset):
    tables = mlperf_tables(dataset)
    stats = read_table_stats(dataset / "vocab")
    full_bytes = sum(t.num_embeddings * 16 * 4 for t in tables)
    for ratio in (10, 100):
        p = plan_placement(tables, f"{ratio}x", stats, block_size=16)
        assert p.used_bytes <= full_bytes / ratio + 4 and p.array_size > 0
        all_robe = evaluate_placement(tables, f"{ratio}x", [t.name for t in tables], stats, block_size=16)
        assert p.expected_error <= all_robe.expected_error
        if ratio != 10:
            continue
        sizes = {t.name: t.num_embeddings for t in tables}
        # one-hot tables carry equal mass: the cheap (small) ones are the ones worth full rows
        assert p.full_tables and max(sizes[n] for n in p.full_tables) < max(sizes[n] for n in p.robe_tables)
        assert sum(sizes[n] for n in p.full_tables) / len(p.full_tables) < sum(sizes[n] for n in p.robe_tables) / len(p.robe_tables)
    text = p.describe()
    assert "t_cat_0" in text and "ROBE array" in text and "expected signal lost" in text
    json.dumps(p.to_dict())


def test_planner_gives_hot_ids_exact_rows_within_the_budget(dataset):
    """With the statistics' most frequent ids, the planner may give the hottest ids of tables it
    keeps in the array exact rows: always its most frequent ones, within the budget, for a lower
    expected loss than whole tables alone; the collection it builds routes exactly those ids."""
    tables = mlperf_tables(dataset)
    stats = read_table_stats(dataset / "vocab")
    by_feature = {s.name: s for s in stats}
    full_bytes = sum(t.num_embeddings * 16 * 4 for t in tables)
    with_hot = []
    for ratio in (10, 100, 1000):
        whole = plan_placement(tables, f"{ratio}x", stats, block_size=16, hot_rows=False)
        hot = plan_placement(tables, f"{ratio}x", stats, block_size=16, hot_rows=True)
        assert not whole.hot_ids and hot.used_bytes <= full_bytes / ratio + 4 and hot.array_size >= 16
        assert hot.expected_error <= whole.expected_error
        for t in hot.tables:
            if t.placement == "robe" and t.hot_rows:
                top = by_feature[t.features[0]].top_ids
                assert hot.hot_ids[t.name].tolist() == top[: t.hot_rows].tolist()
                assert t.bytes == (t.hot_rows + 1) * 16 * 4  # its rows and a tail row
            else:
                assert t.name not in hot.hot_ids
        with_hot += [hot] if hot.hot_ids else []
    assert with_hot, "the planner gives some hot ids exact rows on this data"
    hot = with_hot[0]
    ebc = hot.build_collection(tables)
    assert isinstance(ebc, RobeHybridEmbeddingBagCollection)
    assert ebc.hot_table_names == [f"{n}@hot" for n in hot.hot_ids]
    assert [c.num_embeddings for c in ebc.hot.embedding_bag_configs()] == [len(v) + 1 for v in hot.hot_ids.values()]
    assert "exact rows for" in hot.describe() and json.dumps(hot.to_dict())
    # statistics without the most frequent ids: whole tables only, as before
    bare = [TableStats(**{k: getattr(s, k) for k in ("name", "rows", "distinct", "occurrences", "bin_ids", "bin_counts")})
            for s in stats]  # fmt: skip
    assert not plan_placement(tables, "10x", bare, block_size=16, hot_rows=True).hot_ids


def test_planner_without_statistics_uses_sizes():
    """Without statistics each table's ids are taken as equally frequent: the tiny tables' ids are
    hot, so they are the first worth full rows; the plan never expects more loss than all-ROBE."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate([3, 10, 50_000, 80_000])]  # fmt: skip
    crowded = plan_placement(tables, 20_000, None, block_size=8)  # bytes: 5,000 floats for 1,040,104 full
    assert crowded.full_tables == ["t0", "t1"] and crowded.array_size == 5_000 - 13 * 8 and not crowded.used_stats
    for budget in (400, 20_000, 200_000, 2_000_000):
        planned = plan_placement(tables, budget, None, block_size=8)
        all_robe = evaluate_placement(tables, budget, ["t0", "t1", "t2", "t3"], None, block_size=8)
        assert planned.expected_error <= all_robe.expected_error


def test_budget_of_exactly_the_full_tables_and_of_less_than_one_embedding():
    """Found by a mutation audit: a budget equal to the full tables' bytes must keep every table
    whole (not one table in an array as large as itself), and the smallest usable array is one
    embedding (dim floats), not one block."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate([100, 2_000, 10_000])]  # fmt: skip
    exact = plan_placement(tables, sum(t.num_embeddings * 64 * 4 for t in tables), None, block_size=32)
    assert exact.full_tables == ["t0", "t1", "t2"] and exact.array_size == 0
    with pytest.raises(ValueError, match=r"below the smallest usable array \(64 floats = 256 bytes: one embedding\)"):
        plan_placement(tables, 48 * 4, None, block_size=32)  # 48 floats: a block and a half, not an embedding


def test_expected_error_is_the_module_docs_formula_on_a_hand_computed_case():
    """E = sum over the array's ids x of c_x * lambda_x / (1 + lambda_x), with lambda_x =
    gamma * sum over the OTHER ids y of d_y c_y / (c_x + c_y) / m (the planner's choices rest on it)."""
    from robe_dist.placement import COLLISION_WEIGHT as gamma

    tables = [EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=10, feature_names=[f"f{n}"]) for n in "ab"]
    stats = [TableStats.from_counts("fa", 10, np.array([8, 8])), TableStats.from_counts("fb", 10, np.array([2, 2, 2]))]
    placed = evaluate_placement(tables, 40 * 4, ["a", "b"], stats, block_size=4)
    m = placed.array_size
    lam_a = gamma * (4 * 8 / 16 + 3 * 4 * 2 / 10) / m  # the other id of a, the three of b
    lam_b = gamma * (2 * 4 * 2 / 4 + 2 * 4 * 8 / 10) / m  # the two others of b, the two of a
    lost_a, lost_b = 2 * 8 * lam_a / (1 + lam_a), 3 * 2 * lam_b / (1 + lam_b)
    assert m == 40
    assert placed.expected_error == pytest.approx((lost_a + lost_b) / 22, rel=1e-12)
    by_table = {t.name: t.expected_error for t in placed.tables}
    assert by_table == pytest.approx({"a": lost_a / 16, "b": lost_b / 6}, rel=1e-12)


def test_budget_edges_are_said_plainly(dataset):
    tables = mlperf_tables(dataset)
    full_bytes = sum(t.num_embeddings * 16 * 4 for t in tables)
    everything = plan_placement(tables, full_bytes + 1000)
    assert everything.robe_tables == [] and everything.array_size == 0
    assert "covers every table as a full table" in everything.notes[0]
    with pytest.raises(ValueError, match=r"robe.budget 20 bytes leaves 20 bytes for the ROBE array with every table in it, below the smallest usable array"):
        plan_placement(tables, 20)
    other = [TableStats.from_counts(f"x{i}", 10, np.array([10])) for i in range(26)]
    with pytest.raises(ValueError, match="statistics of another dataset"):
        plan_placement(tables, "100x", other)
    with pytest.raises(ValueError, match="leaves .* next to the 25 full tables"):
        evaluate_placement(tables, "10000x", ["t_cat_0"])


def test_build_collection_follows_the_placement(dataset):
    tables = mlperf_tables(dataset)
    stats = read_table_stats(dataset / "vocab")
    hybrid = plan_placement(tables, "10x", stats, block_size=16).build_collection(tables)
    assert isinstance(hybrid, RobeHybridEmbeddingBagCollection) and hybrid.full_table_names
    robe = evaluate_placement(tables, "10x", [t.name for t in tables], block_size=16).build_collection(tables)
    assert isinstance(robe, RobeEmbeddingBagCollection)
    full = plan_placement(tables, 10**12).build_collection(tables)
    assert isinstance(full, EmbeddingBagCollection)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["robe.features=auto", "robe.budget=null"], "robe.features 'auto' needs robe.budget"),
        (["robe.budget=100x", "robe.array_size=1000"], "set robe.budget or robe.array_size, not both"),
        (["robe.budget=lots"], "robe.budget must be bytes"),
        (["robe.budget=-3x"], "robe.budget must be"),
        (["robe.features=none", "robe.budget=100x"], "robe.budget needs ROBE tables"),
    ],
)
def test_config_refuses_bad_budgets(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny_synthetic.yaml", overrides)


def test_statistics_of_an_unfinished_or_changed_dataset_are_refused_or_recomputed(tmp_path):
    """Found by a review: statistics were computed over a dataset still marked INCOMPLETE, and
    kept after days were added to it, so the planner read rows other than the train split's."""
    from robe_dist.data.layout import DataError, write_manifest
    from robe_dist.data.stats import ensure_table_stats

    data = tmp_path / "d"
    generate(data, 3000, days=3, seed=0, log=None)
    manifest = json.loads((data / "manifest.json").read_text())
    write_manifest(data, {**manifest, "complete": False})
    with pytest.raises(DataError, match="dataset is incomplete"):
        ensure_table_stats(data, log=None)
    write_manifest(data, manifest)
    assert ensure_table_stats(data, log=None)[0].rows == 2000  # days 0 and 1
    # the train split changes (here: its first day is dropped from the manifest, as a redone ingest can)
    write_manifest(data, {**manifest, "files": manifest["files"][1:], "rows": 2000})
    said = []
    assert ensure_table_stats(data, log=said.append)[0].rows == 1000
    assert "counted other rows than the train split now has" in said[0]
    assert read_table_stats(data)[0].rows == 1000
