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
