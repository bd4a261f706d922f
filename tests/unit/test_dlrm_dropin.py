"""RobeEmbeddingBagCollection in place of EmbeddingBagCollection inside TorchRec's DLRM models."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN

from robe_dist import RobeConfig, RobeEmbeddingBagCollection

DIM = 16


def planted_batches(num_batches=30, batch=256, features=4, vocab=50, seed=0):
    """Click labels that depend on which ids appear: a model that learns the ids can fit them."""
    g = torch.Generator().manual_seed(seed)
    id_effect = torch.randn(features, vocab, generator=g) * 2
    for _ in range(num_batches):
        ids = torch.randint(0, vocab, (features, batch), generator=g)
        logit = id_effect.gather(1, ids).sum(0)
        labels = (torch.rand(batch, generator=g) < torch.sigmoid(logit)).float()
        kjt = KeyedJaggedTensor(
            keys=[f"f{i}" for i in range(features)],
            values=ids.reshape(-1),
            lengths=torch.ones(features * batch, dtype=torch.long),
        )
        # constant dense input: the dense arch then gives a learned bias vector d, and e_id . d
        # in the interaction acts as a learned per-id effect
        yield torch.ones(batch, 13), kjt, labels


@pytest.mark.parametrize("model_cls", [DLRM, DLRM_DCN])
@pytest.mark.parametrize("hash", ["universal", "paper"])
def test_dlrm_trains_with_robe(model_cls, hash):
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=50, feature_names=[f"f{i}"])
        for i in range(4)
    ]
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=4096, block_size=8, hash=hash))
    kwargs = dict(dense_in_features=13, dense_arch_layer_sizes=[32, DIM], over_arch_layer_sizes=[32, 1])
    if model_cls is DLRM_DCN:
        kwargs.update(dcn_num_layers=2, dcn_low_rank_dim=8)
    model = model_cls(embedding_bag_collection=ebc, **kwargs)
    assert model.sparse_arch.embedding_bag_collection is ebc
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    losses = []
    start = ebc.array.detach().clone()
    for epoch in range(3):
        for dense, kjt, labels in planted_batches():
            logits = model(dense, kjt).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert not torch.equal(start, ebc.array.detach()), "the ROBE array was not trained"
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.2, (first, last)


def test_a_tensordict_input_is_read_as_torchrecs_collection_reads_it():
    """TorchRec's EmbeddingBagCollection (and its sharded form) also take a TensorDict of jagged
    tensors, one per key; the ROBE collections, plain, hybrid and sharded, read it the same way."""
    tensordict = pytest.importorskip("tensordict")
    import copy

    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType

    from robe_dist.distributed import ARRAY_PARAMETER_NAME, RobeEmbeddingBagCollectionSharder
    from robe_dist.modules.hybrid import RobeHybridEmbeddingBagCollection

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=100, feature_names=[f"f{i}"])
              for i in range(2)]  # fmt: skip
    values = {"f0": torch.tensor([1, 2, 3]), "f1": torch.tensor([4, 5, 6, 7])}
    lengths = {"f0": torch.tensor([1, 0, 2]), "f1": torch.tensor([2, 1, 1])}
    td = tensordict.TensorDict(
        source={k: torch.nested.nested_tensor_from_jagged(values=values[k], lengths=lengths[k]) for k in values}
    )
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.cat(list(values.values())),
                            lengths=torch.cat(list(lengths.values())))  # fmt: skip
    robe = RobeConfig(array_size=997, block_size=8)
    plain = RobeEmbeddingBagCollection(tables, robe)
    hybrid = RobeHybridEmbeddingBagCollection(tables, robe, robe_tables=["t0"], hot_ids={"t0": [1]})
    for module in (plain, hybrid):
        assert torch.equal(module(td).values(), module(kjt).values())
    plan = {ARRAY_PARAMETER_NAME: ParameterSharding(sharding_type=ShardingType.DATA_PARALLEL.value,
                                                    compute_kernel=EmbeddingComputeKernel.DENSE.value, ranks=[0])}  # fmt: skip
    sharded = RobeEmbeddingBagCollectionSharder().shard(copy.deepcopy(plain), plan, ShardingEnv.from_local(1, 0))
    assert torch.equal(sharded(td).wait().values(), plain(kjt).values())
