"""RobeHybridEmbeddingBagCollection: routing, output layout, DLRM drop-in, planning of its children."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline.tracing import Tracer
from torchrec.models.dlrm import DLRM

from robe_dist import RobeConfig
from robe_dist.distributed import RobeEmbeddingBagCollectionSharder
from robe_dist.modules.hybrid import RobeHybridEmbeddingBagCollection

TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=32, num_embeddings=10**6, feature_names=["fa", "shared"]),
    EmbeddingBagConfig(name="b", embedding_dim=32, num_embeddings=100, feature_names=["fb"]),
    EmbeddingBagConfig(name="c", embedding_dim=64, num_embeddings=10**6, feature_names=["fc"]),
    EmbeddingBagConfig(name="d", embedding_dim=32, num_embeddings=100, feature_names=["shared"]),
]


def features(batch: int = 3) -> KeyedJaggedTensor:
    keys = ["fb", "extra", "fc", "shared", "fa"]  # any order, an extra key
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 3, (len(keys) * batch,), generator=g)
    return KeyedJaggedTensor(keys=keys, values=torch.randint(0, 100, (int(lengths.sum()),), generator=g), lengths=lengths)


def test_routes_tables_and_returns_table_order():
    h = RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(array_size=4096), max_full_rows=1000)
    assert h.robe_table_names == ["a", "c"] and h.full_table_names == ["b", "d"]
    kjt = features()
    out, r, f = h(kjt), h.robe(kjt), h.full(kjt)
    # same keys and widths as an EmbeddingBagCollection of TABLES (shared feature -> feature@table)
    assert out.keys() == ["fa", "shared@a", "fb", "fc", "shared@d"]
    assert out.length_per_key() == [32, 32, 32, 64, 32]
    d = out.to_dict()
    assert torch.equal(d["fa"], r["fa"]) and torch.equal(d["shared@a"], r["shared"]) and torch.equal(d["fc"], r["fc"])
    assert torch.equal(d["fb"], f["fb"]) and torch.equal(d["shared@d"], f["shared"])
    assert out.values().shape == (3, 192)


def test_all_robe_or_explicit_tables():
    all_robe = RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(array_size=4096))
    assert all_robe.full is None and all_robe.full_table_names == []
    kjt = features()
    assert torch.equal(all_robe(kjt).values(), all_robe.robe(kjt).values())
    explicit = RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(array_size=4096), robe_tables=["c"])
    assert explicit.robe_table_names == ["c"] and explicit.full_table_names == ["a", "b", "d"]
    with pytest.raises(ValueError, match=r"robe_tables \['zz'\] are not among the tables"):
        RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(array_size=4096), robe_tables=["zz"])
    with pytest.raises(ValueError, match="not both"):
        RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(array_size=4096), robe_tables=["a"], max_full_rows=5)


def test_dlrm_drop_in_and_traceable():
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate([10**8, 50, 10**7])]
    h = RobeHybridEmbeddingBagCollection(tables, RobeConfig(array_size=2048, block_size=16), max_full_rows=1000)
    dlrm = DLRM(embedding_bag_collection=h, dense_in_features=4, dense_arch_layer_sizes=[8, 16],
                over_arch_layer_sizes=[8, 1])
    kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([1, 2, 3, 4, 5]),
                            lengths=torch.tensor([1, 1, 0, 2, 1, 0]))
    logits = dlrm(torch.rand(2, 4), kjt)
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert h.robe.array.grad is not None and h.full.embedding_bags["t1"].weight.grad is not None
    # TorchRec's pipelines FX-trace the model down to the sharded modules: the merge is one call
    graph = Tracer(leaf_modules=["robe", "full"]).trace(h)
    targets = [n.target for n in graph.nodes if n.op in ("call_module", "call_function")]
    assert "robe" in targets and "full" in targets
    assert any(getattr(t, "__name__", "") == "_merge_pooled" for t in targets)


def test_planner_shards_the_children():
    h = RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(array_size=4096), max_full_rows=1000)
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu")).plan(
        h, [RobeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()])
    assert {k: v.sharding_type for k, v in plan.plan["robe"].items()} == {"array": "data_parallel"}
    assert set(plan.plan["full"]) == {"b", "d"}


def test_children_are_read_by_name_whatever_their_output_order():
    """A sharded child returns its embeddings grouped by sharding type (TorchRec puts a
    data-parallel table after the table-wise ones): the merge must follow names, not positions."""
    h = RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(array_size=4096), max_full_rows=1000)
    kjt = features()
    expected = h(kjt)
    full = h.full(kjt)
    order = [1, 0]  # the full child's two embeddings, swapped
    names = [full.keys()[i] for i in order]
    cols = [full.values()[:, full.offset_per_key()[i] : full.offset_per_key()[i + 1]] for i in order]
    swapped = KeyedTensor(keys=names, length_per_key=[c.shape[1] for c in cols], values=torch.cat(cols, dim=1))
    h.full.forward = lambda features: swapped
    out = h(kjt)
    assert out.keys() == expected.keys() and torch.equal(out.values(), expected.values())
