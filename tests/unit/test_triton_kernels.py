"""The Triton kernels (CUDA implementation of the custom ops) against the C++ operator.

Without a GPU they run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before anything imports triton); with one, compiled, on the GPU. Cases are small: the interpreter
executes every program in numpy.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)
triton_lookup = pytest.importorskip("robe_dist.kernels.triton_lookup", reason="triton is not installed")

from robe_reference import lookup_args  # noqa: E402
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.modules.embedding_configs import PoolingType  # noqa: E402

from robe_dist import RobeConfig, RobeEmbeddingBagCollection, ops  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
pytestmark = pytest.mark.skipif(not ops.has_cpp_extension(), reason="robe_dist._C not built: nothing to compare with")


def tables_for(block_size: int, pooling: PoolingType):
    """Three features of two dims (one table read by two features: collisions across features)."""
    return [
        EmbeddingBagConfig(name="big", embedding_dim=4 * block_size, num_embeddings=500, feature_names=["f1"], pooling=pooling),
        EmbeddingBagConfig(name="two", embedding_dim=2 * block_size, num_embeddings=40, feature_names=["f2", "f3"], pooling=pooling),
        EmbeddingBagConfig(name="tiny", embedding_dim=block_size, num_embeddings=3, feature_names=["f4"], pooling=pooling),
    ]  # fmt: skip


def case(hash="universal", pooling=PoolingType.SUM, weighted=False, block_size=4, array_size=211, batch=6,
         id_dtype=torch.int64, offsets_dtype=torch.int64, seed=0, shared=False, block_align=1):  # fmt: skip
    """A collection (tiny array: many collisions) and a KJT with multi-hot, empty and repeated ids."""
    tables = tables_for(block_size, pooling)
    if shared:  # a feature read by two tables
        tables.append(EmbeddingBagConfig(name="again", embedding_dim=block_size, num_embeddings=500, feature_names=["f1"]))
    torch.manual_seed(seed)
    robe = RobeConfig(array_size, block_size=block_size, hash=hash, block_align=block_align)
    ebc = RobeEmbeddingBagCollection(tables, robe, is_weighted=weighted)
    g = torch.Generator().manual_seed(seed)
    keys, lengths, values = [], [], []
    for name, n in [("f4", 3), ("unused", 10**6), ("f1", 500), ("f2", 40), ("f3", 40)]:  # not in table order
        ls = torch.randint(0, 4, (batch,), generator=g)
        ls[0] = 0
        keys.append(name)
        lengths.append(ls)
        ids = torch.randint(0, n, (int(ls.sum()),), generator=g)
        if len(ids) > 2:
            ids[1] = ids[0]  # a repeated id
        values.append(ids)
    vals = torch.cat(values).to(id_dtype)
    weights = torch.rand(vals.numel(), generator=g) + 0.5 if weighted else None
    kjt = KeyedJaggedTensor(keys=keys, values=vals, lengths=torch.cat(lengths), weights=weights)
    values, weights, offsets, meta, batch = lookup_args(ebc, kjt)
    return ebc, (values, weights, offsets.to(offsets_dtype), meta, batch)


def run_triton_forward(ebc, args):
    values, weights, offsets, meta, batch = args
    array = ebc.array.detach().to(DEVICE)
    out, starts, status = triton_lookup.forward(
        array, values.to(DEVICE), None if weights is None else weights.to(DEVICE), offsets.to(DEVICE), meta.to(DEVICE),
        batch, *ops._static_args(ebc.lookup_spec),
    )  # fmt: skip
    return out.cpu(), starts.cpu(), status.cpu()


def run_cpp_forward(ebc, args):
    values, weights, offsets, meta, batch = args
    return torch.ops.robe_dist.pooled_lookup(ebc.array.detach(), values, weights, offsets, meta, batch,
                                             *ops._static_args(ebc.lookup_spec))  # fmt: skip


def backward_args(ebc, args, starts, grad_out):
    values, weights, offsets, meta, batch = args
    spec = ebc.lookup_spec
    return dict(
        grad_out=grad_out.to(DEVICE), weights=None if weights is None else weights.to(DEVICE), offsets=offsets.to(DEVICE),
        meta=meta.to(DEVICE), starts=starts.to(DEVICE), batch=batch, block_size=spec.block_size,
        max_blocks=spec.max_blocks, num_values=values.numel(),
    )  # fmt: skip


CASES = [
    dict(hash="universal"),
    dict(hash="paper"),
    dict(hash="universal", pooling=PoolingType.MEAN),
    dict(hash="paper", weighted=True),
    dict(hash="universal", block_size=1, id_dtype=torch.int32, offsets_dtype=torch.int32),
    dict(hash="paper", block_size=3, array_size=50, shared=True),
    dict(hash="universal", block_align=4),
    dict(hash="paper", block_size=6, block_align=3, weighted=True),
    dict(hash="paper", block_size=32, array_size=4099, block_align=16),  # the CriteoTB shape: dim 128, 4 blocks of a line
    dict(hash="universal", block_size=32, array_size=4099, pooling=PoolingType.MEAN, id_dtype=torch.int32),
    dict(hash="universal", block_size=16, array_size=4099, weighted=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_forward_and_backward_equal_the_cpp_operator(kw):
    ebc, args = case(**kw)
    out_c, starts_c, _ = run_cpp_forward(ebc, args)
    out_t, starts_t, status = run_triton_forward(ebc, args)
    assert torch.equal(starts_t, starts_c)  # the same hash, bit for bit, and -1 where no feature reads
    torch.testing.assert_close(out_t, out_c, rtol=1e-6, atol=1e-6)
    assert status.tolist() == [ops.STATUS_OK, ops.STATUS_OK]

    grad_out = torch.randn_like(out_c)
    grad_c = torch.ops.robe_dist.pooled_lookup_backward(
        grad_out, args[1], args[2], args[3], starts_c, args[4], ebc.robe_config.array_size, ebc.lookup_spec.block_size,
        ebc.lookup_spec.max_blocks, ebc.lookup_spec.occurrences, args[0].numel(), True,
    )  # fmt: skip
    bw = backward_args(ebc, args, starts_t, grad_out)
    fast = triton_lookup.backward(array_size=ebc.robe_config.array_size, deterministic=False, **bw).cpu()
    sorted1 = triton_lookup.backward(array_size=ebc.robe_config.array_size, deterministic=True, **bw).cpu()
    sorted2 = triton_lookup.backward(array_size=ebc.robe_config.array_size, deterministic=True, **bw).cpu()
    torch.testing.assert_close(fast, grad_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sorted1, grad_c, rtol=1e-5, atol=1e-5)
    assert torch.equal(sorted1, sorted2)
    assert grad_c.abs().sum() > 0


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("hash,block_size", [("universal", 4), ("paper", 4), ("paper", 32)])
def test_fused_sgd_equals_the_cpp_fused_sgd(hash, block_size, deterministic):
    ebc, args = case(hash=hash, weighted=True, batch=8, block_size=block_size, array_size=211 if block_size == 4 else 4099)
    out, starts, _ = run_cpp_forward(ebc, args)
    grad_out = torch.randn_like(out)
    values, weights, offsets, meta, batch = args
    spec = ebc.lookup_spec
    cpp = ebc.array.detach().clone()
    torch.ops.robe_dist.pooled_lookup_fused_update(
        cpp, None, grad_out, weights, offsets, meta, starts, batch, spec.block_size, spec.max_blocks, spec.occurrences,
        values.numel(), ops.OPTIMIZERS["sgd"], 0.5, 0.0, False,
    )  # fmt: skip
    tri = ebc.array.detach().clone().to(DEVICE)
    triton_lookup.fused_update(tri, None, optimizer=ops.OPTIMIZERS["sgd"], lr=0.5, eps=0.0, deterministic=deterministic,
                               **backward_args(ebc, args, starts, grad_out))  # fmt: skip
    assert not torch.equal(cpp, ebc.array.detach())
    torch.testing.assert_close(tri.cpu(), cpp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size,array_size", [(4, 300), (32, 3000)])
def test_fused_adagrad_equals_torch_adagrad_on_the_exact_gradient(block_size, array_size):
    ebc, args = case(hash="universal", batch=8, array_size=array_size, block_size=block_size)
    values, weights, offsets, meta, batch = args
    array, state = ebc.array.detach().clone().to(DEVICE), torch.zeros(array_size, device=DEVICE)
    reference = torch.nn.Parameter(ebc.array.detach().clone())
    opt = torch.optim.Adagrad([reference], lr=0.1, eps=1e-10)
    for step in range(2):  # the second step starts from a non-zero state
        out, starts, _ = run_cpp_forward(ebc, args)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
        reference.grad = torch.ops.robe_dist.pooled_lookup_backward(
            grad_out, weights, offsets, meta, starts, batch, array_size, ebc.lookup_spec.block_size,
            ebc.lookup_spec.max_blocks, ebc.lookup_spec.occurrences, values.numel(), True,
        )  # fmt: skip
        opt.step()
        triton_lookup.fused_update(array, state, optimizer=ops.OPTIMIZERS["adagrad"], lr=0.1, eps=1e-10,
                                   deterministic=True, **backward_args(ebc, args, starts, grad_out))  # fmt: skip
    untouched = reference.grad == 0
    assert untouched.any() and (~untouched).any()
    torch.testing.assert_close(array.cpu(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.cpu(), opt.state[reference]["sum"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deterministic", [False, True])
def test_bf16_array_equals_the_cpp_operator_on_its_fp32_copy(deterministic):
    """A bf16 array (54 MB for CriteoTB's 27M floats: inside an H200's L2) is read in bf16,
    accumulated in fp32 and written in bf16; its gradient goes through an fp32 buffer."""
    ebc, args = case(hash="paper", block_size=32, array_size=4099, weighted=True)
    values, weights, offsets, meta, batch = args
    half = ebc.array.detach().to(torch.bfloat16)
    ref, starts_c, _ = torch.ops.robe_dist.pooled_lookup(half.float(), values, weights, offsets, meta, batch,
                                                         *ops._static_args(ebc.lookup_spec))  # fmt: skip
    out, starts, status = triton_lookup.forward(
        half.to(DEVICE), values.to(DEVICE), weights.to(DEVICE), offsets.to(DEVICE), meta.to(DEVICE), batch,
        *ops._static_args(ebc.lookup_spec),
    )  # fmt: skip
    assert out.dtype == torch.bfloat16 and torch.equal(starts.cpu(), starts_c)
    torch.testing.assert_close(out.cpu(), ref.to(torch.bfloat16))  # fp32 sums, rounded once
    grad_out = torch.randn(ref.shape).to(torch.bfloat16)
    grad_c = torch.ops.robe_dist.pooled_lookup_backward(
        grad_out.float(), weights, offsets, meta, starts_c, batch, 4099, ebc.lookup_spec.block_size,
        ebc.lookup_spec.max_blocks, ebc.lookup_spec.occurrences, values.numel(), True,
    )  # fmt: skip
    grad = triton_lookup.backward(array_size=4099, deterministic=deterministic, **backward_args(ebc, args, starts, grad_out))
    assert grad.dtype == torch.bfloat16 and grad_c.abs().sum() > 0
    torch.testing.assert_close(grad.cpu(), grad_c.to(torch.bfloat16))
    # the fused SGD step (bf16 takes the sorted tiles either way): p - lr * g in fp32, rounded once
    cpp = half.float()
    torch.ops.robe_dist.pooled_lookup_fused_update(
        cpp, None, grad_out.float(), weights, offsets, meta, starts_c, batch, ebc.lookup_spec.block_size,
        ebc.lookup_spec.max_blocks, ebc.lookup_spec.occurrences, values.numel(), ops.OPTIMIZERS["sgd"], 0.5, 0.0, False,
    )  # fmt: skip
    tri = half.clone().to(DEVICE)
    triton_lookup.fused_update(tri, None, optimizer=ops.OPTIMIZERS["sgd"], lr=0.5, eps=0.0, deterministic=deterministic,
                               **backward_args(ebc, args, starts, grad_out))  # fmt: skip
    assert not torch.equal(tri.cpu(), half)
    torch.testing.assert_close(tri.cpu(), cpp.to(torch.bfloat16))


def test_malformed_input_is_reported_and_never_read_out_of_bounds():
    ebc, args = case(hash="paper")
    values, weights, offsets, meta, batch = args
    bad_ids = values.clone()
    f1 = ebc._distinct_features.index("f1")
    first_f1 = int(offsets[int(meta[f1, 5]) * batch])
    bad_ids[first_f1] = 10**9  # past num_embeddings of table "big"
    out, starts, status = run_triton_forward(ebc, (bad_ids, weights, offsets, meta, batch))
    assert status[0] == first_f1 and status[1] == ops.STATUS_OK
    assert (starts.view(-1, ebc.lookup_spec.max_blocks)[first_f1] == -1).all()  # no block was read for it
    bad_offsets = offsets.clone()
    bad_offsets[-1] = values.numel() + 1000  # runs past the values
    bad_offsets[3] = bad_offsets[2] - 1  # a negative length
    _, _, status = run_triton_forward(ebc, (values, weights, bad_offsets, meta, batch))
    assert status[1] != ops.STATUS_OK
    # values that no bag holds (TorchRec's EBC refuses them): past every bag, described as such
    short = offsets.clone()
    short[-1] -= 1
    _, _, status = run_triton_forward(ebc, (values, weights, short, meta, batch))
    assert status[0] == ops.STATUS_OK and status[1] == offsets.numel() - 1
    describe = ebc._describe_status(values, short, meta, batch)
    assert f"the offsets run from 0 to {values.numel() - 1} but the KeyedJaggedTensor has {values.numel()} values" in (
        describe(ops.STATUS_OK, int(status[1]))
    )


def test_every_kernel_variant_compiles_for_the_h200():
    """Every kernel, in every variant the launchers use, lowers to a cubin for sm_90 (H100/H200):
    Triton compiles without a GPU, which the interpreter above never does."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "robe_dist.kernels.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("ok   sm_90") >= 100, run.stdout[-2000:]



def test_tile_bounds_of_an_array_just_under_2_to_the_31_slots():
    """The deterministic backward's tiles find their blocks with searchsorted over the sorted
    starts, int32 below 2^31 slots: the last tile's end query (2^31 here) must not wrap."""
    m, z = 2**31 - 1, 32
    starts = torch.tensor([-1, -1, 5, 1000, m - z - 40, m - z], dtype=torch.int32)
    num_tiles = (m + triton_lookup.TILE - 1) // triton_lookup.TILE
    first = torch.tensor([0, (num_tiles - 2) * triton_lookup.TILE, (num_tiles - 1) * triton_lookup.TILE])
    got = triton_lookup.tile_bounds(starts, first, z, m)
    want = triton_lookup.tile_bounds(starts.long(), first, z, m)  # no int32 anywhere
    assert torch.equal(got, want)
    assert got[:, 0].tolist() == [2, 3] and got[1, -1] == 6  # the last tile reaches the last start

def test_paper_mapping_at_the_id_bound_equals_the_cpp_operator():
    """Global ids near 2**62: the Triton kernel reduces g mod P first, as the C++ operator does."""
    tables = [
        EmbeddingBagConfig(name="huge", embedding_dim=8, num_embeddings=2**62 - 2000, feature_names=["fh"]),
        EmbeddingBagConfig(name="after", embedding_dim=8, num_embeddings=1000, feature_names=["fa"]),
    ]
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=1009, block_size=4, hash="paper", seed=5))
    ids = torch.tensor([2**62 - 2001, 2**62 - 2500, 0, 999])
    kjt = KeyedJaggedTensor(keys=["fh", "fa"], values=ids, lengths=torch.ones(4, dtype=torch.long))
    args = lookup_args(ebc, kjt)
    out_c, starts_c, _ = run_cpp_forward(ebc, args)
    out_t, starts_t, status = run_triton_forward(ebc, args)
    assert torch.equal(starts_t, starts_c) and status.tolist() == [ops.STATUS_OK, ops.STATUS_OK]
    torch.testing.assert_close(out_t, out_c)


def test_the_cuda_entry_checks_what_the_cpp_operator_checks_and_reads_strided_inputs():
    """The op's CUDA kernel (``ops._pooled_lookup_cuda``, called here on this machine's device)
    launched the Triton forward with an array smaller than a block (a negative number of starts:
    an illegal address on a GPU) and with strided views the kernels read as dense (a review)."""
    ebc, (values, weights, offsets, meta, batch) = case(weighted=True)
    static = list(ops._static_args(ebc.lookup_spec))
    array = ebc.array.detach().to(DEVICE)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    dense = ops._pooled_lookup_cuda(array, to(values), to(weights), to(offsets), to(meta), batch, *static)
    strided = lambda t: torch.stack([t, torch.zeros_like(t)], dim=1)[:, 0].to(DEVICE)  # noqa: E731  (a view, stride 2)
    assert not strided(values).is_contiguous()
    again = ops._pooled_lookup_cuda(array, strided(values), strided(weights), to(offsets), to(meta), batch, *static)
    assert torch.equal(again[0], dense[0]) and torch.equal(again[1], dense[1])
    spec = ebc.lookup_spec  # the backward gets the forward's inputs as they were given (saved for it)
    grads = [ops._pooled_lookup_backward_cuda(torch.ones_like(dense[0]), w, to(offsets), to(meta), dense[1], batch, spec.array_size,
                                              spec.block_size, spec.max_blocks, spec.occurrences, values.numel(), True)
             for w in (to(weights), strided(weights))]  # fmt: skip
    assert torch.equal(grads[0], grads[1])
    small = static.copy()
    small[4] = array.numel() + 1  # block_size above the array's size
    with pytest.raises(ValueError, match=r"array_size \(211\) must be >= block_size \(212\)"):
        ops._pooled_lookup_cuda(array, to(values), to(weights), to(offsets), to(meta), batch, *small)
    with pytest.raises(ValueError, match="block_align must be >= 1"):
        ops._pooled_lookup_cuda(array, to(values), to(weights), to(offsets), to(meta), batch, *static[:6], 0)
    paper = static.copy()
    paper[3], paper[5] = ops.HASH_MODE_IDS["paper"], [1, 2, 3, 2**31]
    with pytest.raises(ValueError, match="paper constants must satisfy"):
        ops._pooled_lookup_cuda(array, to(values), to(weights), to(offsets), to(meta), batch, *paper)
