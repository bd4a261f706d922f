"""A short look at ROBE (about 10 s on 2 CPU cores): a TorchRec DLRM whose 26 tables live in one small array.

    bash launch/setup.sh && .venv/bin/python -m robe_dist.demo      # or: .venv/bin/robe-demo

Builds ``torchrec.models.dlrm.DLRM`` with a ``RobeEmbeddingBagCollection`` in place of its
``EmbeddingBagCollection`` (26 Criteo-like tables, 10x compressed by default), trains it on clicks drawn
from a planted model over in-memory synthetic ids, and prints loss and AUC against the planted
model's own AUC (the best any model can reach on that data).
"""

from __future__ import annotations

import argparse
import time

import torch
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

from robe_dist import RobeConfig, RobeEmbeddingBagCollection, full_table_bytes


def planted_batch(effects: torch.Tensor, batch: int, g: torch.Generator):
    """One batch: Zipf-like raw ids per table, labels from a per-id logistic planted model."""
    features, vocab = effects.shape
    ranks = torch.rand(features, batch, generator=g).pow(3).mul(vocab).long()  # a few hot ids
    logits = effects.gather(1, ranks).sum(0) - 1.0
    labels = (torch.rand(batch, generator=g) < torch.sigmoid(logits)).float()
    raw_ids = ranks * 2654435761 % (2**32)  # look like Criteo's hashed 32-bit values
    kjt = KeyedJaggedTensor(
        keys=[f"cat_{i}" for i in range(features)],
        values=raw_ids.reshape(-1),
        lengths=torch.ones(features * batch, dtype=torch.long),
    )
    return torch.ones(batch, 13), kjt, labels, logits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch", type=int, default=1024, help="batch size (default 1024)")
    parser.add_argument("--compression", type=float, default=10.0, help="full tables / ROBE array (default 10)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dim, vocab = 32, 2000
    tables = [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=vocab, feature_names=[f"cat_{i}"])
        for i in range(26)
    ]
    robe = RobeConfig.from_compression(tables, ratio=args.compression, block_size=16)
    ebc = RobeEmbeddingBagCollection(tables, robe)
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=13,
        dense_arch_layer_sizes=[64, dim],
        over_arch_layer_sizes=[128, 64, 1],
    )
    print(
        f"ROBE array: {robe.array_size:,} floats ({robe.num_bytes / 2**20:.2f} MiB) for 26 tables "
        f"that would take {full_table_bytes(tables) / 2**20:.1f} MiB in full ({args.compression:g}x)"
    )
    effects = torch.randn(26, vocab, generator=g) * 0.5
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        dense, kjt, labels, _ = planted_batch(effects, args.batch, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(-1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            rate = step * args.batch / (time.perf_counter() - t0)
            print(f"step {step:4d}  loss {loss.item():.4f}  {rate:,.0f} samples/s")

    auc_model, auc_planted = BinaryAUROC(), BinaryAUROC()
    with torch.no_grad():
        for _ in range(10):
            dense, kjt, labels, logits = planted_batch(effects, 4096, g)
            auc_model.update(torch.sigmoid(model(dense, kjt).squeeze(-1)), labels.long())
            auc_planted.update(torch.sigmoid(logits), labels.long())
    print(f"held-out AUC: model {auc_model.compute():.4f}, planted model (best reachable) {auc_planted.compute():.4f}")


if __name__ == "__main__":
    main()
