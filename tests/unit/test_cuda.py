"""The CUDA path (Triton kernels through the custom ops): needs a GPU, skipped without one.

Run on the lent GPU by launch/gpu_check.sh. Speed is measured there by benchmarks/gpu_check.py,
not asserted here.
"""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType

from robe_dist import RobeConfig, RobeEmbeddingBagCollection, ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def tables(pooling=PoolingType.SUM):
    return [
        EmbeddingBagConfig(name="a", embedding_dim=64, num_embeddings=100_000, feature_names=["fa"], pooling=pooling),
        EmbeddingBagConfig(name="b", embedding_dim=32, num_embeddings=1000, feature_names=["fb", "fc"], pooling=pooling),
    ]


def kjt(batch=512, seed=0, device=CUDA, id_dtype=torch.int64, weighted=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (3 * batch,), generator=g)
    values = torch.randint(0, 1000, (int(lengths.sum()),), generator=g).to(id_dtype)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=["fa", "fb", "fc"], values=values, lengths=lengths, weights=weights).to(device)


def pair(hash="universal", **kw):
    """The same collection on CPU (C++ operator) and on CUDA (Triton), same array."""
    torch.manual_seed(0)
    cpu = RobeEmbeddingBagCollection(tables(kw.pop("pooling", PoolingType.SUM)), RobeConfig(50_021, block_size=16, hash=hash), **kw)
    gpu = RobeEmbeddingBagCollection(cpu.embedding_bag_configs(), cpu.robe_config, device=CUDA, **kw)
    with torch.no_grad():
        gpu.array.copy_(cpu.array)
    return cpu, gpu


@pytest.mark.parametrize("hash", ["universal", "paper"])
@pytest.mark.parametrize("pooling, weighted, id_dtype", [
    (PoolingType.SUM, False, torch.int64), (PoolingType.MEAN, False, torch.int32), (PoolingType.SUM, True, torch.int64),
])  # fmt: skip
def test_triton_op_equals_cpp_op(hash, pooling, weighted, id_dtype):
    cpu, gpu = pair(hash, pooling=pooling, is_weighted=weighted)
    batch = kjt(id_dtype=id_dtype, weighted=weighted)
    out_c, out_g = cpu(batch.to(torch.device("cpu"))).values(), gpu(batch).values()
    torch.testing.assert_close(out_g.cpu(), out_c.detach(), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out_c)
    out_c.backward(g)
    out_g.backward(g.to(CUDA))
    torch.testing.assert_close(gpu.array.grad.cpu(), cpu.array.grad, rtol=1e-4, atol=1e-5)


def test_weights_gradient_equals_cpu():
    """Per-sample weights that require a gradient (position-weighted features) get the same one
    from the CUDA path as from the C++ path."""
    cpu, gpu = pair(is_weighted=True)
    batch = kjt(weighted=True)
    grads = []
    for module, device in ((cpu, torch.device("cpu")), (gpu, CUDA)):
        b = batch.to(device)
        w = b.weights().clone().requires_grad_()
        module(KeyedJaggedTensor(keys=b.keys(), values=b.values(), lengths=b.lengths(), weights=w)).values().pow(2).sum().backward()
        grads.append(w.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_deterministic_mode_gives_the_same_bits():
    _, gpu = pair()
    batch = kjt(batch=4096)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            gpu.array.grad = None
            gpu(batch).values().square().sum().backward()
            grads.append(gpu.array.grad.clone())
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_update_equals_dense_optimiser(optimizer):
    torch.manual_seed(0)
    fused = RobeEmbeddingBagCollection(tables(), RobeConfig(50_021, block_size=16), device=CUDA,
                                       fused_update=ops.FusedUpdate(optimizer, 0.05))  # fmt: skip
    dense = RobeEmbeddingBagCollection(tables(), RobeConfig(50_021, block_size=16), device=CUDA)
    with torch.no_grad():
        dense.array.copy_(fused.array)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adagrad)(dense.parameters(), lr=0.05)
    for step in range(3):
        batch = kjt(seed=step)
        fused(batch).values().square().sum().backward()
        # the dense gradient summed in the fused kernels' order (the sorted backward): where a
        # slot's contributions nearly cancel, Adagrad's first step lr * g / |g| takes the sign of
        # whatever the summation order leaves
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            dense(batch).values().square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        opt.step()
        opt.zero_grad()
    assert fused.array.grad is None
    torch.testing.assert_close(fused.array, dense.array, rtol=1e-4, atol=1e-5)


def test_cuda_graph_replays_a_training_step():
    """Forward, backward and optimiser step captured once and replayed: no host synchronisation
    anywhere in the lookup."""
    _, gpu = pair()
    opt = torch.optim.SGD(gpu.parameters(), lr=0.1)
    reference = RobeEmbeddingBagCollection(gpu.embedding_bag_configs(), gpu.robe_config, device=CUDA)
    with torch.no_grad():
        reference.array.copy_(gpu.array)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    batch = kjt(batch=1024)

    def step(module, optimizer):
        optimizer.zero_grad(set_to_none=False)
        module(batch).values().square().mean().backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(gpu, opt)  # warm-up: Triton compiles, allocators settle
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(gpu, opt)
    for _ in range(2):
        step(reference, ref_opt)
    for _ in range(3):
        graph.replay()
        step(reference, ref_opt)
    torch.testing.assert_close(gpu.array, reference.array, rtol=1e-4, atol=1e-6)


def test_bf16_array_trains_close_to_fp32():
    cpu, gpu = pair()
    half = RobeEmbeddingBagCollection(gpu.embedding_bag_configs(), gpu.robe_config, device=CUDA).to(torch.bfloat16)
    with torch.no_grad():
        half.array.copy_(gpu.array)
    batch = kjt()
    out32, out16 = gpu(batch).values(), half(batch).values()
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=2e-3)
    out16.float().square().sum().backward()
    assert half.array.grad.dtype == torch.bfloat16 and half.array.grad.abs().sum() > 0


def test_malformed_input_raises_one_call_later_or_when_checked():
    _, gpu = pair("paper")
    good = kjt()
    bad = KeyedJaggedTensor(keys=["fa", "fb", "fc"], values=torch.tensor([5, 10**6, 3], device=CUDA),
                            lengths=torch.ones(3, dtype=torch.long, device=CUDA))  # fmt: skip
    gpu(bad)  # does not synchronise: the kernel records the id and reads nothing for it
    with pytest.raises(ValueError, match=r"id 1000000 of feature 'fb' \(table 'b'\) is outside \[0, num_embeddings\) = \[0, 1000\)"):
        gpu.check_input_errors()
    gpu(good)
    gpu.check_input_errors()  # the good call left no error
    # a bad call followed by good ones before anything is checked: its status is not dropped (it
    # raises in a later forward, once its copy has landed, or in the check at the end)
    with pytest.raises(ValueError, match=r"id 1000000 of feature 'fb'"):
        gpu(bad)
        for _ in range(3):
            gpu(good)
        gpu.check_input_errors()
    gpu.check_input_errors()  # reported once
    with pytest.raises(ValueError, match="is on cpu but the array is on cuda"):
        torch.ops.robe_dist.pooled_lookup(gpu.array, good.values().cpu(), None, good.offsets(), gpu.lookup_meta, 512,
                                          *ops._static_args(gpu.lookup_spec))  # fmt: skip


def test_inductor_compiles_a_dlrm_on_cuda():
    _, gpu = pair()
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=gpu, dense_in_features=4, dense_arch_layer_sizes=[16, 64],
                 over_arch_layer_sizes=[16, 1]).to(CUDA)  # fmt: skip
    dense = torch.randn(512, 4, device=CUDA)
    batch = kjt()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(dense, batch), model(dense, batch), rtol=1e-4, atol=1e-5)
