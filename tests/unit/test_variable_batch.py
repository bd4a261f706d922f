"""A variable batch per feature (TorchRec's VBE KeyedJaggedTensors) through the ROBE collections.

A VBE input gives each feature its own number of bags (``stride_per_key_per_rank``) and maps
every sample of the output batch to one of them (``inverse_indices``); TorchRec's
``EmbeddingBagCollection`` pools each feature's bags once and expands the pooled rows to the full
batch. The same input with every bag written out per sample must give the same output and the
same gradients.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from robe_dist import RobeConfig, RobeEmbeddingBagCollection
from robe_dist.distributed import RobeEmbeddingBagCollectionSharder
from robe_dist.distributed.robe_embedding_bag_collection import ARRAY_PARAMETER_NAME
from robe_dist.modules.hybrid import RobeHybridEmbeddingBagCollection
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType

OUT_BATCH = 6


def tables(pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=1000, feature_names=["u"], pooling=pooling),
        EmbeddingBagConfig(name="item", embedding_dim=16, num_embeddings=50, feature_names=["i", "shared"],
                           pooling=pooling),
        EmbeddingBagConfig(name="ctx", embedding_dim=8, num_embeddings=40, feature_names=["shared"], pooling=pooling),
    ]  # fmt: skip


def vbe_pair(strides: Dict[str, int], weighted: bool = False, seed: int = 0,
             inverse_keys: Optional[List[str]] = None) -> Tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
    """(a VBE input with ``strides[k]`` bags for key ``k``, the same input with every bag written
    out per sample of the ``OUT_BATCH`` batch)."""
    g = torch.Generator().manual_seed(seed)
    keys = list(strides)
    bags = {k: [torch.randint(0, 40, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
                for _ in range(strides[k])] for k in keys}  # fmt: skip
    inverse = torch.stack([torch.randint(0, max(strides[k], 1), (OUT_BATCH,), generator=g) for k in keys])
    weight = lambda b: torch.arange(1, b.numel() + 1, dtype=torch.float) / 4  # noqa: E731
    vbe_bags = [b for k in keys for b in bags[k]]
    empty = torch.zeros(0, dtype=torch.long)  # (a key with no bags: empty ones in the written-out batch)
    full_bags = [bags[k][int(j)] if strides[k] else empty for r, k in enumerate(keys) for j in inverse[r]]

    def make(bag_list, **batch) -> KeyedJaggedTensor:
        values = torch.cat(bag_list) if bag_list else torch.zeros(0, dtype=torch.long)
        w = torch.cat([weight(b) for b in bag_list]) if weighted and bag_list else None
        return KeyedJaggedTensor(keys=keys, values=values, weights=w,
                                 lengths=torch.tensor([b.numel() for b in bag_list], dtype=torch.long), **batch)  # fmt: skip

    order = inverse_keys or keys
    rows = torch.stack([inverse[keys.index(k)] for k in order])
    vbe = make(vbe_bags, stride_per_key_per_rank=[[strides[k]] for k in keys], inverse_indices=(order, rows))
    return vbe, make(full_bags)


STRIDES = {"shared": 2, "extra": 1, "i": 4, "u": 3}  # any key order, an extra key, batches 1-4 of 6


@pytest.mark.parametrize("pooling,weighted,hash_", [(PoolingType.SUM, False, "universal"),
                                                     (PoolingType.MEAN, False, "paper"),
                                                     (PoolingType.SUM, True, "universal")])  # fmt: skip
def test_a_variable_batch_gives_the_full_batchs_embeddings_and_gradients(pooling, weighted, hash_):
    module = RobeEmbeddingBagCollection(tables(pooling), RobeConfig(array_size=997, block_size=8, hash=hash_),
                                        is_weighted=weighted)  # fmt: skip
    vbe, full = vbe_pair(STRIDES, weighted=weighted, inverse_keys=["u", "i", "extra", "shared"])
    out, expected = module(vbe), module(full)
    assert out.keys() == expected.keys() and out.values().shape == (OUT_BATCH, 48)
    assert torch.equal(out.values(), expected.values())  # each bag pooled once, then copied
    upstream = torch.randn(OUT_BATCH, 48, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((out.values() * upstream).sum(), module.array)
    (expected_grad,) = torch.autograd.grad((expected.values() * upstream).sum(), module.array)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected_grad)  # (summed in another order)


def test_the_fused_update_of_a_variable_batch_equals_the_full_batchs():
    robe = RobeConfig(array_size=997, block_size=8)
    fused = RobeEmbeddingBagCollection(tables(), robe, fused_sgd_lr=0.5)
    reference = copy.deepcopy(fused)
    vbe, full = vbe_pair(STRIDES, seed=3)
    fused(vbe).values().square().sum().backward()
    reference(full).values().square().sum().backward()
    assert not torch.equal(fused.array, RobeEmbeddingBagCollection(tables(), robe).array)
    torch.testing.assert_close(fused.array, reference.array)


def test_a_feature_with_every_bag_an_unread_key_with_none_and_equal_batches():
    module = RobeEmbeddingBagCollection(tables(), RobeConfig(array_size=997, block_size=8))
    for strides in ({"u": OUT_BATCH, "i": 1, "shared": 2, "extra": 0}, {"u": 2, "i": 2, "shared": 2}):
        vbe, full = vbe_pair(strides, seed=5)
        assert torch.equal(module(vbe).values(), module(full).values())


def test_a_variable_batch_through_the_hybrid_with_full_tables_and_hot_rows():
    hybrid = RobeHybridEmbeddingBagCollection(tables(), RobeConfig(array_size=997, block_size=8), robe_tables=["user", "item"],
                                              hot_ids={"user": [1, 7, 30]})  # fmt: skip
    vbe, full = vbe_pair(STRIDES, seed=7)
    out, expected = hybrid(vbe), hybrid(full)
    assert out.keys() == expected.keys()
    assert torch.equal(out.values(), expected.values())
    upstream = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(2))
    params = [hybrid.robe.array, *hybrid.full.parameters(), *hybrid.hot.parameters()]
    grads = torch.autograd.grad((out.values() * upstream).sum(), params)
    expected_grads = torch.autograd.grad((expected.values() * upstream).sum(), params)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["plain", "hybrid_hot"])
def test_compiled_whole_with_a_variable_batch(kind):
    """``torch.compile(fullgraph=True)`` with a fresh VBE input, whose strides dynamo reads from
    the KJT's tensor (unbacked sizes: the padding takes no branch on them); in the hybrid the
    router's KJTs keep the input's VBE metadata in the form TorchRec's constructor takes there."""
    robe = RobeConfig(array_size=997, block_size=8)
    module = (RobeEmbeddingBagCollection(tables(), robe) if kind == "plain" else
              RobeHybridEmbeddingBagCollection(tables(), robe, robe_tables=["user", "item"], hot_ids={"user": [1, 7, 30]}))  # fmt: skip
    vbe, full = vbe_pair(STRIDES, seed=11)
    torch.testing.assert_close(torch.compile(module, backend="aot_eager", fullgraph=True)(vbe).values(), module(full).values())


def test_the_sharded_module_takes_a_variable_batch():
    module = RobeEmbeddingBagCollection(tables(), RobeConfig(array_size=997, block_size=8))
    reference = copy.deepcopy(module)
    plan = {ARRAY_PARAMETER_NAME: ParameterSharding(sharding_type=ShardingType.DATA_PARALLEL.value,
                                                    compute_kernel=EmbeddingComputeKernel.DENSE.value, ranks=[0])}  # fmt: skip
    sharded = RobeEmbeddingBagCollectionSharder().shard(module, plan, ShardingEnv.from_local(1, 0))
    vbe, full = vbe_pair(STRIDES, seed=9)
    assert torch.equal(sharded(vbe).wait().values(), reference(full).values())


def test_malformed_variable_batches_are_named():
    module = RobeEmbeddingBagCollection(tables(), RobeConfig(array_size=997, block_size=8))
    vbe, _ = vbe_pair(STRIDES)
    no_inverse = KeyedJaggedTensor(keys=vbe.keys(), values=vbe.values(), lengths=vbe.lengths(),
                                   stride_per_key_per_rank=vbe.stride_per_key_per_rank())  # fmt: skip
    with pytest.raises(ValueError, match="variable batch per feature .VBE. needs inverse_indices"):
        module(no_inverse)
    keys, rows = vbe.inverse_indices()
    for value, match in [(3, r"inverse_indices of feature 'shared' run over \[\d, 3\], outside its 2 bags"),
                         (-1, r"inverse_indices of feature 'shared' run over \[-1, \d\]")]:  # fmt: skip
        bad = rows.clone()
        bad[keys.index("shared"), 0] = value  # "shared" has 2 bags: 3 would read a padding bag's zeros
        kjt = KeyedJaggedTensor(keys=vbe.keys(), values=vbe.values(), lengths=vbe.lengths(),
                                stride_per_key_per_rank=vbe.stride_per_key_per_rank(), inverse_indices=(keys, bad))  # fmt: skip
        with pytest.raises(ValueError, match=match):
            module(kjt)
    kjt = KeyedJaggedTensor(keys=vbe.keys(), values=vbe.values(), lengths=vbe.lengths(),
                            stride_per_key_per_rank=vbe.stride_per_key_per_rank(),
                            inverse_indices=([k for k in keys if k != "i"], rows[[keys.index(k) for k in keys if k != "i"]]))  # fmt: skip
    with pytest.raises(ValueError, match=r"inverse_indices has no row for feature\(s\) \['i'\]"):
        module(kjt)
    short = KeyedJaggedTensor(keys=vbe.keys(), values=vbe.values(), lengths=vbe.lengths()[:-1],
                              stride_per_key_per_rank=vbe.stride_per_key_per_rank(), inverse_indices=(keys, rows))  # fmt: skip
    with pytest.raises(ValueError, match=r"9 lengths for its keys' batch sizes .* \[2, 1, 4, 3\], which add up to 10"):
        module(short)


@pytest.mark.cuda
def test_a_variable_batch_on_cuda_equals_cpu():
    """The padded offsets and the hybrid's key ends are made on the device from the strides
    (run by the GPU device check; skipped without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = torch.device("cuda")
    hybrid = RobeHybridEmbeddingBagCollection(tables(), RobeConfig(array_size=997, block_size=8), robe_tables=["user", "item"],
                                              hot_ids={"user": [1, 7, 30]})  # fmt: skip
    on_gpu = copy.deepcopy(hybrid).to(cuda)
    for seed in (13, 14):  # two sets of strides
        vbe, full = vbe_pair({**STRIDES, "u": 1 + seed % 5}, seed=seed)
        expected = hybrid(full).values()
        torch.testing.assert_close(on_gpu(vbe.to(cuda)).values().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
