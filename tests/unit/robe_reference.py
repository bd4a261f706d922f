"""A plain, loop-over-bags ROBE lookup written from the spec in robe_dist/hashing.py, for tests."""

from __future__ import annotations

from typing import List, Optional

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from robe_dist import RobeConfig, hashing


def reference_lookup(
    array: torch.Tensor,
    tables: List[EmbeddingBagConfig],
    robe: RobeConfig,
    kjt: KeyedJaggedTensor,
    weighted: bool = False,
) -> torch.Tensor:
    """[B, sum of dims]: element by element, bag by bag, with the scalar hash functions."""
    z, m, a = robe.block_size, robe.array_size, robe.block_align
    num_starts = hashing.num_block_starts(m, z, a)
    consts = hashing.paper_constants(robe.seed) if robe.hash == "paper" else None
    feats = kjt.to_dict()
    batch = kjt.stride()
    columns = []
    offset = 0
    for t in tables:
        key = hashing.table_key(t.name, robe.seed)
        for name in t.feature_names:
            jt = feats[name]
            out = torch.zeros(batch, t.embedding_dim, dtype=array.dtype)
            lengths = jt.lengths().tolist()
            ids = jt.values().tolist()
            weights: Optional[List[float]] = jt.weights().tolist() if weighted else None
            pos = 0
            for b, n in enumerate(lengths):
                for i in range(pos, pos + n):
                    x = ids[i]
                    w = weights[i] if weights is not None else 1.0
                    for j in range(t.embedding_dim):
                        if robe.hash == "universal":
                            s = a * hashing.universal_start(key, x, j // z, num_starts)
                        else:
                            s = a * hashing.paper_start(x + offset, j // z, num_starts, consts)
                        out[b, j] += w * array[s + j % z]
                if t.pooling == PoolingType.MEAN and n > 0:
                    out[b] /= n
                pos += n
            columns.append(out)
        offset += t.num_embeddings
    return torch.cat(columns, dim=1)


def lookup_args(ebc, kjt: KeyedJaggedTensor):
    """``(values, weights, offsets, meta, batch)``: what ``ebc`` hands the lookup op for ``kjt``."""
    from robe_dist.modules.robe_embedding_bag_collection import _lookup_inputs

    values, weights, offsets, meta, batch = _lookup_inputs(
        kjt, ebc.lookup_meta, ebc._distinct_features, ebc.is_weighted(), ebc.array
    )
    return values, weights, offsets, meta, batch


def torch_lookup(ebc, kjt: KeyedJaggedTensor, array: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's vectorised PyTorch implementation, called directly (so autograd runs through it)."""
    from robe_dist import ops

    array = ebc.array if array is None else array
    values, weights, offsets, meta, batch = lookup_args(ebc, kjt)
    if weights is not None:
        weights = weights.to(array.dtype)  # float64 gradchecks
    return ops.torch_forward(array, values, weights, offsets, meta, batch, *ops._static_args(ebc.lookup_spec))[0]
