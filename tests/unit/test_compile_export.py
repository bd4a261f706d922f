"""The lookup as one custom op: registration (opcheck), torch.compile without graph breaks,
torch.export (save, load, run), and TorchRec's FX tracer."""

from __future__ import annotations

import pytest
import torch
import torchrec.fx
from robe_reference import lookup_args
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN

from robe_dist import RobeConfig, RobeEmbeddingBagCollection, RobeHybridEmbeddingBagCollection, ops

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=50 * (i + 1), feature_names=[f"f{i}"])
    for i in range(3)
]


def dlrm(ebc, dcn=False):
    torch.manual_seed(0)
    if dcn:
        return DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 16],
                        over_arch_layer_sizes=[8, 1], dcn_num_layers=2, dcn_low_rank_dim=4)  # fmt: skip
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 16],
                over_arch_layer_sizes=[8, 1])  # fmt: skip


def robe(hash="universal"):
    torch.manual_seed(0)
    return RobeEmbeddingBagCollection(TABLES, RobeConfig(997, block_size=8, hash=hash))


def batch(keys=("f0", "f1", "f2"), b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (len(keys) * b,), generator=g)
    values = torch.randint(0, 50, (int(lengths.sum()),), generator=g)
    return torch.randn(b, 4, generator=g), KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths)


def test_opcheck_of_the_three_ops():
    ebc = robe("paper")
    _, kjt = batch(keys=("f2", "extra", "f0", "f1"))
    values, weights, offsets, meta, b = lookup_args(ebc, kjt)
    spec = ebc.lookup_spec
    array = ebc.array.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.robe_dist.pooled_lookup, (array, values, weights, offsets, meta, b, *ops._static_args(spec)))
    out, starts, _ = torch.ops.robe_dist.pooled_lookup(array, values, weights, offsets, meta, b, *ops._static_args(spec))
    grad_out = torch.randn_like(out)
    sizes = (spec.block_size, spec.max_blocks, spec.occurrences, values.numel())
    torch.library.opcheck(
        torch.ops.robe_dist.pooled_lookup_backward,
        (grad_out, weights, offsets, meta, starts, b, spec.array_size, *sizes, True),
    )
    for optimizer, state in (("sgd", None), ("adagrad", torch.zeros(spec.array_size))):
        torch.library.opcheck(
            torch.ops.robe_dist.pooled_lookup_fused_update,
            (array.detach().clone(), state, grad_out, weights, offsets, meta, starts, b, *sizes,
             ops.OPTIMIZERS[optimizer], 0.1, 1e-10, False),
        )  # fmt: skip


@pytest.mark.parametrize("model_kind", ["dlrm", "dcn", "hybrid", "hybrid_hot"])
def test_torch_compile_fullgraph_matches_eager(model_kind):
    """No graph break anywhere in the model (fullgraph=True), also for a key order other than the
    tables' and keys the collection does not read; outputs and gradients equal eager's."""
    if model_kind.startswith("hybrid"):
        torch.manual_seed(0)
        hot = {"t1": [0, 3, 7], "t2": range(0, 150, 2)} if model_kind == "hybrid_hot" else None
        ebc = RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(997, block_size=8), max_full_rows=60, hot_ids=hot)
    else:
        ebc = robe()
    model = dlrm(ebc, dcn=model_kind == "dcn")
    dense, kjt = batch(keys=("f2", "extra", "f0", "f1"))
    ref = model(dense, kjt)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(dense, kjt)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], msg=name)
    # a second batch of another size reuses or recompiles; either way the values are right
    dense2, kjt2 = batch(keys=("f2", "extra", "f0", "f1"), b=6, seed=1)
    torch.testing.assert_close(compiled(dense2, kjt2), model(dense2, kjt2))


@pytest.mark.parametrize("model_kind", ["robe", "hybrid_hot"])
def test_torch_export_save_load_run(tmp_path, model_kind):
    """``torch.export`` captures the lookup as ``robe_dist::pooled_lookup``; the saved program runs
    after ``torch.export.load`` with the op registered by importing robe_dist.ops (also with exact
    rows for hot ids, routed by their buffers)."""
    if model_kind == "robe":
        ebc = robe("paper")
    else:
        torch.manual_seed(0)
        ebc = RobeHybridEmbeddingBagCollection(TABLES, RobeConfig(997, block_size=8), max_full_rows=60,
                                               hot_ids={"t1": [0, 3, 7], "t2": range(0, 150, 2)})  # fmt: skip
    model = dlrm(ebc).eval()
    dense, kjt = batch()
    ep = torch.export.export(model, (dense, kjt), strict=False)
    ops_in_graph = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "robe_dist.pooled_lookup.default" in ops_in_graph
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    with torch.serialization.safe_globals([KeyedJaggedTensor]):  # the example inputs saved with the program
        loaded = torch.export.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(dense, kjt), model(dense, kjt))


def test_torchrec_fx_symbolic_trace_matches_eager():
    model = dlrm(robe())
    gm = torchrec.fx.symbolic_trace(model)
    assert "torch.ops.robe_dist.pooled_lookup" in gm.code
    for keys in [("f0", "f1", "f2"), ("f1", "extra", "f2", "f0")]:
        dense, kjt = batch(keys=keys)
        torch.testing.assert_close(gm(dense, kjt), model(dense, kjt))
