"""RobeHybridEmbeddingBagCollection(hot_ids=...): exact rows for the hot ids of ROBE tables."""

from __future__ import annotations

import pytest
import torch
from robe_reference import reference_lookup
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from robe_dist import RobeConfig
from robe_dist.modules.hybrid import RobeHybridEmbeddingBagCollection

TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=1000, feature_names=["fa"]),
    EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=50, feature_names=["fb"]),
    EmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=5000, feature_names=["fc"]),
    EmbeddingBagConfig(name="d", embedding_dim=4, num_embeddings=3000, feature_names=["fd"]),
]
HOT = {"a": [999, 3, 5, 5], "c": [0, 17]}  # unsorted, a repeat: taken as the set
ROBE = RobeConfig(array_size=512, block_size=4, seed=3)


def hybrid() -> RobeHybridEmbeddingBagCollection:
    torch.manual_seed(0)
    return RobeHybridEmbeddingBagCollection(TABLES, ROBE, robe_tables=["a", "c", "d"], hot_ids=HOT)


def kjt(ids: dict, batch: int) -> KeyedJaggedTensor:
    """``ids[key]``: one list of ids per sample (any key order; "zz" is a key no table reads)."""
    keys = list(ids)
    lengths = torch.tensor([len(bag) for k in keys for bag in ids[k]])
    values = torch.tensor([x for k in keys for bag in ids[k] for x in bag], dtype=torch.long)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=batch)


BAGS = {  # 3 samples: hot and tail ids, repeats, empty bags
    "zz": [[1], [], [2]],
    "fc": [[0, 17, 4000], [], [17, 17]],
    "fa": [[3], [5, 6, 999], [7, 8]],
    "fd": [[1, 2], [2999], []],
    "fb": [[1], [2, 3], []],
}


def expected(h: RobeHybridEmbeddingBagCollection, bags: dict) -> dict:
    """Per output key, from a loop-over-bags ROBE lookup and the exact tables' weights."""
    batch = len(bags["fa"])
    hot_w = {t: h.hot.embedding_bags[f"{t}@hot"].weight.detach() for t in HOT}
    rows = {t: {x: i for i, x in enumerate(sorted(set(v)))} for t, v in HOT.items()}
    out = {}
    for t in TABLES:
        f = t.feature_names[0]
        if t.name == "b":  # a full table
            w = h.full.embedding_bags["b"].weight.detach()
            out[f] = torch.stack([w[bag].sum(0) if bag else torch.zeros(8) for bag in bags[f]])
            continue
        # the array's share: every id of the bag that is not hot (weights 0 for the hot ones)
        weights = [float(x not in rows.get(t.name, {})) for bag in bags[f] for x in bag]
        one = KeyedJaggedTensor(keys=[f], values=torch.tensor([x for bag in bags[f] for x in bag], dtype=torch.long),
                                lengths=torch.tensor([len(bag) for bag in bags[f]]), weights=torch.tensor(weights), stride=batch)  # fmt: skip
        robe = reference_lookup(h.robe.array.detach(), [t], ROBE, one, weighted=True)
        if t.name in HOT:  # exact rows, and the tail row for every other id
            tail = len(rows[t.name])
            exact = torch.stack([
                sum((hot_w[t.name][rows[t.name].get(x, tail)] for x in bag), torch.zeros(t.embedding_dim)) for bag in bags[f]
            ])  # fmt: skip
            robe = robe + exact
        out[f] = robe
    return out


def test_hot_ids_read_exact_rows_and_the_rest_the_array_plus_a_tail_row():
    h = hybrid()
    assert h.hot_table_names == ["a@hot", "c@hot"]
    assert [t.num_embeddings for t in h.hot.embedding_bag_configs()] == [4, 3]  # 3 and 2 hot ids + a tail row
    out = h(kjt(BAGS, 3))
    assert out.keys() == ["fa", "fb", "fc", "fd"] and out.length_per_key() == [8, 8, 4, 4]
    want = expected(h, BAGS)
    got = out.to_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)



def test_each_key_orders_slots_are_made_once_and_kept():
    """The slot of every key reaches the device once per key order, not at every step (on CUDA a
    tensor built from a list is a blocking copy); another key order gets its own, and is right."""
    h = hybrid()
    h(kjt(BAGS, 3))
    cache = h.hot_router.hot_keys.__dict__["_robe_slots_by_keys"]
    (first,) = cache.values()
    h(kjt(BAGS, 3))
    assert list(cache.values()) == [first] and cache[(-1, 1, 0, -1, -1)] is first
    reordered = {k: BAGS[k] for k in ("fb", "fd", "fa", "zz", "fc")}
    got = h(kjt(reordered, 3)).to_dict()
    assert len(cache) == 2
    for k, want in expected(h, BAGS).items():
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)



def test_a_first_call_under_inference_mode_leaves_training_working():
    """The per-key-order tables kept between calls (the ROBE child's meta, the router's slots)
    are made as normal tensors even when the first call runs under torch.inference_mode()."""
    h = hybrid()
    reordered = {k: BAGS[k] for k in ("fb", "fd", "fa", "zz", "fc")}
    with torch.inference_mode():
        h(kjt(reordered, 3))
    h(kjt(reordered, 3)).values().sum().backward()
    assert h.robe.array.grad is not None and h.robe.array.grad.any()

def test_hot_ids_train_their_rows_and_never_the_array():
    h = hybrid()
    # only hot ids in the split tables, nothing in "d": the array gets no gradient at all
    h(kjt({"fa": [[3, 999], [5]], "fc": [[0], [17, 17]], "fd": [[], []], "fb": [[], []]}, 2)).values().sum().backward()
    assert h.robe.array.grad is None or not h.robe.array.grad.any()
    ga = h.hot.embedding_bags["a@hot"].weight.grad
    assert ga[:3].abs().sum(1).gt(0).all() and not ga[3].any()  # the hot rows, not the tail row
    h.zero_grad(set_to_none=True)
    # only tail ids: the array and the tail rows train, the hot rows do not
    h(kjt({"fa": [[4], [6]], "fc": [[1], []], "fd": [[], []], "fb": [[], []]}, 2)).values().sum().backward()
    assert h.robe.array.grad.any()
    ga = h.hot.embedding_bags["a@hot"].weight.grad
    assert not ga[:3].any() and ga[3].any()


def test_hot_ids_are_refused_where_they_cannot_work():
    with pytest.raises(ValueError, match=r"hot_ids names \['b'\], which are not ROBE tables"):
        RobeHybridEmbeddingBagCollection(TABLES, ROBE, robe_tables=["a", "c", "d"], hot_ids={"b": [1]})
    mean = [EmbeddingBagConfig(name="m", embedding_dim=8, num_embeddings=100, feature_names=["fm"], pooling=PoolingType.MEAN)]
    with pytest.raises(ValueError, match=r"SUM-pooled.*\['m'\]"):
        RobeHybridEmbeddingBagCollection(TABLES + mean, ROBE, robe_tables=["a", "m"], hot_ids={"a": [1]})
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\*\*40\), got \[-1, 3\]"):
        RobeHybridEmbeddingBagCollection(TABLES, ROBE, robe_tables=["a"], hot_ids={"a": [-1, 3]})
    with pytest.raises(ValueError, match="weighted features"):
        RobeHybridEmbeddingBagCollection(TABLES, ROBE, robe_tables=["a"], hot_ids={"a": [1]}, is_weighted=True)
    # a feature another ROBE table reads too: its hot ids' embeddings there were zeros, silently
    shared = [EmbeddingBagConfig(name="s", embedding_dim=8, num_embeddings=100, feature_names=["fa"])]
    for hot in ({"a": [1]}, {"a": [1], "s": [2]}):  # (both: a KeyError at the first call)
        with pytest.raises(ValueError, match=r"table 'a' with hot_ids reads feature 'fa', which the ROBE tables \['s'\]"):
            RobeHybridEmbeddingBagCollection(TABLES + shared, ROBE, robe_tables=["a", "s"], hot_ids=hot)
    RobeHybridEmbeddingBagCollection(TABLES + shared, ROBE, robe_tables=["a"], hot_ids={"a": [1]})  # a full table may
    # no hot ids at all: the plain hybrid
    plain = RobeHybridEmbeddingBagCollection(TABLES, ROBE, robe_tables=["a"], hot_ids={"a": []})
    assert plain.hot is None and not plain.robe.is_weighted()
