"""QREmbeddingBagCollection: the quotient-remainder split, its sizes and budgets, and its output."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

from robe_dist.modules import QREmbeddingBagCollection
from robe_dist.modules.qr import qr_collisions, qr_max_rows_for_budget, qr_rows

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=10_000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_small", embedding_dim=8, num_embeddings=30, feature_names=["small"]),
    EmbeddingBagConfig(name="t_mid", embedding_dim=8, num_embeddings=900, feature_names=["mid"]),
]


@pytest.mark.parametrize("n", [17, 100, 901, 10_000, 123_457])
def test_collisions_fit_the_cap_and_are_the_smallest_that_do(n):
    best = math.ceil(n / math.isqrt(n)) + math.isqrt(n)
    for cap in (best + 1, best + 10, 3 * best, n - 1):
        if cap >= n or cap < best:
            continue
        c = qr_collisions(n, cap)
        assert math.ceil(n / c) + c <= cap
        assert c == 2 or math.ceil(n / (c - 1)) + (c - 1) > cap  # the smallest that fits
    assert qr_collisions(n, n) is None and qr_rows(n, n) == n
    with pytest.raises(ValueError, match="needs at least"):
        qr_collisions(n, max(1, best - 2 if n > 20 else 3))


def test_budget_gives_the_largest_cap_that_fits():
    sizes, dim = [t.num_embeddings for t in TABLES], 8
    for budget in (3_400, 5_000, 40_000, 100_000):
        m = qr_max_rows_for_budget(sizes, dim, budget)
        assert sum(qr_rows(n, m) for n in sizes) * dim <= budget
        if m < max(sizes):
            try:
                bigger = sum(qr_rows(n, m + 1) for n in sizes) * dim
            except ValueError:
                bigger = None
            assert bigger is None or bigger > budget
    assert qr_max_rows_for_budget(sizes, dim, 10**9) == max(sizes)
    with pytest.raises(ValueError, match="cannot fit"):
        qr_max_rows_for_budget(sizes, dim, 100)


def features(batch: int = 5, weighted: bool = False) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(0)
    keys, values, lengths = ["small", "big", "mid", "extra"], [], []
    sizes = {"small": 30, "big": 10_000, "mid": 900, "extra": 7}
    for k in keys:
        ln = torch.randint(0, 4, (batch,), generator=g)
        lengths.append(ln)
        values.append(torch.randint(0, sizes[k], (int(ln.sum()),), generator=g))
    v = torch.cat(values)
    w = torch.rand(v.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=v, lengths=torch.cat(lengths), weights=w)


@pytest.mark.parametrize("operation", ["mult", "add"])
@pytest.mark.parametrize("weighted", [False, True])
def test_output_is_the_pooled_quotient_bag_combined_with_the_pooled_remainder_bag(operation, weighted):
    qr = QREmbeddingBagCollection(TABLES, max_rows=300, operation=operation, is_weighted=weighted)
    kjt = features(weighted=weighted)
    out = qr(kjt)
    assert out.keys() == ["big", "small", "mid"] and out.length_per_key() == [8, 8, 8]
    bags = qr.ebc.embedding_bags
    assert set(bags) == {"t_big@q", "t_big@r", "t_small", "t_mid@q", "t_mid@r"}  # 30 ids stay whole
    d = kjt.to_dict()
    for f, t in (("big", "t_big"), ("mid", "t_mid")):
        n = 10_000 if f == "big" else 900
        c = qr_collisions(n, 300)
        assert bags[f"{t}@q"].weight.shape[0] == math.ceil(n / c) and bags[f"{t}@r"].weight.shape[0] == c
        for i, ids in enumerate(d[f].to_dense()):
            w = d[f].to_dense_weights()[i] if weighted else torch.ones(len(ids))
            q = (bags[f"{t}@q"].weight[ids // c] * w[:, None]).sum(0)
            r = (bags[f"{t}@r"].weight[ids % c] * w[:, None]).sum(0)
            expected = q * r if operation == "mult" else q + r
            torch.testing.assert_close(out[f][i], expected)
    for i, ids in enumerate(d["small"].to_dense()):
        w = d["small"].to_dense_weights()[i] if weighted else torch.ones(len(ids))
        torch.testing.assert_close(out["small"][i], (bags["t_small"].weight[ids] * w[:, None]).sum(0))


def test_initialised_as_the_reference_and_refuses_what_it_cannot_build():
    qr = QREmbeddingBagCollection(TABLES, max_rows=300)
    w = qr.ebc.embedding_bags["t_big@q"].weight
    assert w.min() >= math.sqrt(1 / 10_000) and w.max() <= 1.0  # facebookresearch/dlrm QREmbeddingBag
    assert qr.num_rows() == sum(qr_rows(t.num_embeddings, 300) for t in TABLES)
    with pytest.raises(ValueError, match="t_big: a quotient-remainder split of 10,000 ids needs at least"):
        QREmbeddingBagCollection(TABLES, max_rows=50)
    with pytest.raises(ValueError, match="operation"):
        QREmbeddingBagCollection(TABLES, max_rows=300, operation="concat")


def test_dlrm_drop_in_trains():
    dlrm = DLRM(embedding_bag_collection=QREmbeddingBagCollection(TABLES, max_rows=300), dense_in_features=4,
                dense_arch_layer_sizes=[8], over_arch_layer_sizes=[8, 1])  # fmt: skip
    kjt = features()
    logits = dlrm(torch.randn(5, 4), KeyedJaggedTensor(keys=kjt.keys()[:3], values=kjt.values()[: kjt.offset_per_key()[3]],
                                                       lengths=kjt.lengths()[:15]))  # fmt: skip
    logits.sum().backward()
    assert logits.shape == (5, 1)
    assert qr.ebc.embedding_bags["t_big@r"].weight.grad is not None if (qr := dlrm.sparse_arch.embedding_bag_collection) else False


def test_infeasible_budget_names_the_smallest_split():
    sizes = [t.num_embeddings for t in TABLES]
    m = 200  # the 10,000-id table cannot take fewer rows; the others split under the same cap
    floor = sum(qr_rows(n, m) for n in sizes) * 8
    with pytest.raises(ValueError, match=f"at most 200 rows\\) takes {floor:,}"):
        qr_max_rows_for_budget(sizes, 8, floor - 1)
    assert qr_max_rows_for_budget(sizes, 8, floor) == m


@pytest.mark.parametrize("ids,table", [([5, 10_000], "t_big"), ([-1], "t_big"), ([0], None)])
def test_ids_outside_a_table_are_refused_naming_it(ids, table):
    # 10,000 ids split at c = 39 have 257 quotient rows: id 10,000 (10,000 // 39 = 256) would read one
    qr = QREmbeddingBagCollection(TABLES, max_rows=300)
    kjt = KeyedJaggedTensor(keys=["big", "small", "mid"], values=torch.tensor([*ids, 29, 899]),
                            lengths=torch.tensor([len(ids), 1, 1]))  # fmt: skip
    if table is None:
        assert qr(kjt).values().shape == (1, 24)
        return
    with pytest.raises(ValueError, match=rf"feature 'big' \(table '{table}'\) must lie in \[0, 10000\), got \[{min(ids)}, {max(ids)}\]"):
        qr(kjt)


def test_traced_as_torchrecs_pipelines_trace_it():
    """TrainPipelineSparseDist traces the model: every argument of the wrapped calls must be one
    FX can record (an EmbeddingBagConfig is not)."""
    from torchrec.fx import symbolic_trace

    qr = QREmbeddingBagCollection(TABLES, max_rows=300)
    traced = symbolic_trace(qr)
    kjt = KeyedJaggedTensor(keys=["big", "small", "mid"], values=torch.tensor([9_999, 5, 29, 899]),
                            lengths=torch.tensor([2, 1, 1]))  # fmt: skip
    assert torch.equal(traced(kjt).values(), qr(kjt).values())
