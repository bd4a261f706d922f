"""RobeEmbeddingBagCollection against a loop reference, TorchRec's EBC layout, and its error messages."""

from __future__ import annotations

import pytest
import torch
from robe_reference import lookup_args, reference_lookup, torch_lookup
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from robe_dist import RobeConfig, RobeEmbeddingBagCollection, ops

HASHES = ["universal", "paper"]


def make_tables(pooling=PoolingType.SUM):
    return [
        EmbeddingBagConfig(name="t_big", embedding_dim=32, num_embeddings=5000, feature_names=["f1"], pooling=pooling),
        EmbeddingBagConfig(name="t_two", embedding_dim=16, num_embeddings=300, feature_names=["f2", "f3"], pooling=pooling),
        EmbeddingBagConfig(name="t_one", embedding_dim=8, num_embeddings=7, feature_names=["f4"], pooling=pooling),
    ]


def make_kjt(tables, batch=5, seed=0, max_len=4, weighted=False, extra_key=True):
    """A KJT with multi-hot and empty bags, ids in range for every table, and an unrelated key."""
    g = torch.Generator().manual_seed(seed)
    keys, lengths, values = [], [], []
    for t in tables:
        for f in t.feature_names:
            ls = torch.randint(0, max_len + 1, (batch,), generator=g)
            ls[0] = 0  # always one empty bag
            keys.append(f)
            lengths.append(ls)
            values.append(torch.randint(0, t.num_embeddings, (int(ls.sum()),), generator=g))
    if extra_key:  # extra keys are ignored, as TorchRec does
        keys.insert(1, "unused")
        ls = torch.full((batch,), 2)
        lengths.insert(1, ls)
        values.insert(1, torch.full((2 * batch,), -12345))
    vals = torch.cat(values)
    weights = torch.rand(vals.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor(keys=keys, values=vals, lengths=torch.cat(lengths), weights=weights)


def make_ebc(tables, hash="universal", array_size=2003, block_size=8, block_align=1, **kw):
    torch.manual_seed(0)
    robe = RobeConfig(array_size=array_size, block_size=block_size, hash=hash, block_align=block_align)
    return RobeEmbeddingBagCollection(tables, robe, **kw)


@pytest.mark.parametrize("hash", HASHES)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_forward_matches_loop_reference(hash, pooling):
    tables = make_tables(pooling)
    ebc = make_ebc(tables, hash)
    kjt = make_kjt(tables)
    out = ebc(kjt)
    ref = reference_lookup(ebc.array.detach(), tables, ebc.robe_config, kjt)
    torch.testing.assert_close(out.values(), ref, rtol=1e-5, atol=1e-6)
    # the first bag of every feature is empty: zeros
    assert out.values()[0].abs().sum() == 0


@pytest.mark.parametrize("hash", HASHES)
@pytest.mark.parametrize("align", [2, 4, 8])
def test_aligned_blocks_match_reference(hash, align):
    """``block_align``: every block starts on a multiple of it, within ``[0, m - Z]``, and the C++
    operator, the PyTorch path and the loop reference agree (forward and gradient)."""
    tables = make_tables(PoolingType.MEAN)
    ebc = make_ebc(tables, hash, block_align=align)
    kjt = make_kjt(tables, batch=32, max_len=5)
    out = ebc(kjt).values()
    ref = reference_lookup(ebc.array.detach(), tables, ebc.robe_config, kjt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    spec = ebc._spec
    values, weights, offsets, meta, batch = lookup_args(ebc, kjt)
    _, starts, _ = ops.torch_forward(ebc.array.detach(), values, weights, offsets, meta, batch, *ops._static_args(spec))
    read = starts[starts >= 0].long()
    assert read.numel() > 0 and bool((read % align == 0).all()) and int(read.max()) <= 2003 - 8
    assert len(set(read.tolist())) > 20  # the hash still spreads the blocks
    g = torch.randn_like(out)
    (out * g).sum().backward()
    grad_op = ebc.array.grad.clone()
    ebc.array.grad = None
    (torch_lookup(ebc, kjt) * g).sum().backward()
    torch.testing.assert_close(grad_op, ebc.array.grad, rtol=1e-5, atol=1e-5)
    # aligned blocks tile the array: every slot can be read but the last (m - Z) mod a
    assert (2003 - 8) // align * align + 8 >= 2003 - (2003 - 8) % align


@pytest.mark.parametrize("hash", HASHES)
def test_weighted_bags_match_reference(hash):
    tables = make_tables()
    ebc = make_ebc(tables, hash, is_weighted=True)
    kjt = make_kjt(tables, weighted=True)
    ref = reference_lookup(ebc.array.detach(), tables, ebc.robe_config, kjt, weighted=True)
    torch.testing.assert_close(ebc(kjt).values(), ref, rtol=1e-5, atol=1e-6)
    assert ebc.is_weighted()
    with pytest.raises(ValueError, match="needs a KeyedJaggedTensor with weights"):
        ebc(make_kjt(tables, weighted=False))


def test_layout_matches_torchrec_ebc():
    """Same keys, order, widths as torchrec.EmbeddingBagCollection, shared features keyed feature@table."""
    tables = make_tables() + [
        EmbeddingBagConfig(name="t_shared", embedding_dim=16, num_embeddings=300, feature_names=["f2"])
    ]
    kjt = make_kjt(tables[:3])
    ours = make_ebc(tables)(kjt)
    theirs = EmbeddingBagCollection(tables)(kjt)
    assert ours.keys() == theirs.keys()
    assert ours.length_per_key() == theirs.length_per_key()
    assert ours.values().shape == theirs.values().shape
    assert "f2@t_two" in ours.keys() and "f2@t_shared" in ours.keys()
    assert [c.name for c in make_ebc(tables).embedding_bag_configs()] == [t.name for t in tables]


@pytest.mark.parametrize("hash", HASHES)
@pytest.mark.parametrize("pooling, weighted", [(PoolingType.MEAN, False), (PoolingType.SUM, True)])
def test_cpp_operator_matches_torch_path(hash, pooling, weighted):
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    tables = make_tables(pooling)
    ebc = make_ebc(tables, hash, is_weighted=weighted)
    kjt = make_kjt(tables, batch=64, weighted=weighted, max_len=6)
    out = ebc(kjt).values()
    g = torch.randn_like(out)
    (out * g).sum().backward()
    grad_cpp = ebc.array.grad.clone()
    ebc.array.grad = None
    ref = torch_lookup(ebc, kjt)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_cpp, ebc.array.grad, rtol=1e-5, atol=1e-5)  # summation order differs


@pytest.mark.parametrize("hash", HASHES)
@pytest.mark.parametrize("path", ["op", "torch"])
@pytest.mark.parametrize("pooling, weighted", [(PoolingType.MEAN, False), (PoolingType.SUM, True)])
def test_gradient_is_exact_float64(hash, path, pooling, weighted):
    """gradcheck of d(pooled)/d(array) in float64 (MEAN, or weights, so every scale is exercised)."""
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=50, feature_names=["fa"], pooling=pooling),
        EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=9, feature_names=["fb"]),
    ]
    robe = RobeConfig(array_size=23, block_size=4, hash=hash)
    ebc = RobeEmbeddingBagCollection(tables, robe, is_weighted=weighted)
    kjt = make_kjt(tables, batch=3, weighted=weighted, extra_key=False)
    values, weights, offsets, meta, batch = lookup_args(ebc, kjt)
    weights = weights.double() if weights is not None else None
    array = torch.randn(23, dtype=torch.float64, requires_grad=True)
    if path == "op":
        fn = lambda a: ops.robe_pooled_lookup(a, values, weights, offsets, batch, meta, ebc.lookup_spec)[0]  # noqa: E731
    else:
        fn = lambda a: torch_lookup(ebc, kjt, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (array,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("hash", HASHES)
@pytest.mark.parametrize("path", ["op", "torch"])
def test_weights_gradient_is_exact_float64(hash, path):
    """gradcheck of d(pooled)/d(weights), with the array's: per-sample weights that require a
    gradient (TorchRec's position-weighted features) got none from the op. Feature ``fa`` is read by
    two tables (its weights' gradient sums both), multi-hot and empty bags, an unrelated key."""
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=50, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=60, feature_names=["fb", "fa"]),
    ]
    robe = RobeConfig(array_size=23, block_size=4, hash=hash)
    ebc = RobeEmbeddingBagCollection(tables, robe, is_weighted=True)
    kjt = make_kjt(tables[:1] + [EmbeddingBagConfig(name="x", embedding_dim=4, num_embeddings=50, feature_names=["fb"])],
                   batch=3, weighted=True)  # fmt: skip
    values, weights, offsets, meta, batch = lookup_args(ebc, kjt)
    weights = weights.double().requires_grad_()
    array = torch.randn(23, dtype=torch.float64, requires_grad=True)
    if path == "op":
        fn = lambda a, w: ops.robe_pooled_lookup(a, values, w, offsets, batch, meta, ebc.lookup_spec)[0]  # noqa: E731
    else:
        fn = lambda a, w: ops.torch_forward(a, values, w, offsets, meta, batch, *ops._static_args(ebc.lookup_spec))[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (array, weights), eps=1e-6, atol=1e-8)


def test_weights_gradient_of_the_fused_update_reads_the_array_before_its_step():
    """The fused SGD path returns the same weights' gradient as the dense path (computed before
    the step changes the array), and TorchRec's position-weighted collection trains its weights."""
    from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
    from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

    tables = make_tables()
    kjt = make_kjt(tables, batch=16, weighted=True)
    grads = []
    for fused in (None, 0.5):
        ebc = make_ebc(tables, is_weighted=True, fused_sgd_lr=fused)
        w = kjt.weights().clone().requires_grad_()
        kjt_w = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=w)
        (ebc(kjt_w).values() ** 2).sum().backward()
        grads.append(w.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
    fp = FeatureProcessedEmbeddingBagCollection(make_ebc(tables, is_weighted=True),
                                                PositionWeightedModuleCollection({"f1": 4, "f2": 4, "f3": 4, "f4": 4}))  # fmt: skip
    fp(KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())).values().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fp._feature_processors.position_weights.values())


def test_config_fields_the_array_does_not_use_are_named_in_a_warning():
    """``init_fn`` (other than TorchRec's default), ``weight_init_*`` and ``data_type`` were
    accepted silently; the array has one initialisation (``RobeConfig.init_scale``) and one dtype."""
    import warnings

    from torchrec.modules.embedding_configs import DataType

    robe = RobeConfig(array_size=256, block_size=8)
    plain = EmbeddingBagConfig(name="p", embedding_dim=8, num_embeddings=10, feature_names=["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RobeEmbeddingBagCollection([plain], robe)  # TorchRec's own default init_fn: no warning
    custom = [EmbeddingBagConfig(name="i", embedding_dim=8, num_embeddings=10, feature_names=["b"], init_fn=torch.nn.init.zeros_,
                                 weight_init_max=0.1),
              EmbeddingBagConfig(name="h", embedding_dim=8, num_embeddings=10, feature_names=["c"], data_type=DataType.FP16)]  # fmt: skip
    with pytest.warns(UserWarning, match=r"does not use these EmbeddingBagConfig fields \(i: init_fn, weight_init_max; h: data_type\)"):
        RobeEmbeddingBagCollection([plain] + custom, robe)


def test_a_module_moved_to_meta_gives_the_shapes():
    tables = make_tables()
    out = make_ebc(tables).to("meta")(make_kjt(tables).to(torch.device("meta")))
    assert out.values().is_meta and tuple(out.values().shape) == (5, 32 + 16 + 16 + 8)


def test_mean_pooling_with_weights_is_refused():
    with pytest.raises(ValueError, match="table 't_big': MEAN pooling with per-sample weights"):
        make_ebc(make_tables(PoolingType.MEAN), is_weighted=True)


def test_backward_is_bit_identical_across_thread_counts():
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    tables = make_tables()
    ebc = make_ebc(tables, array_size=100_003, block_size=8)
    kjt = make_kjt(tables, batch=512, max_len=8)
    grads = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ebc.array.grad = None
            out = ebc(kjt).values()
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
            grads.append(ebc.array.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("array_size", [53, 4099])
def test_backward_work_lists_match_the_reference_at_any_thread_count(pooling, array_size):
    """The backward buckets blocks by the thread owning their slots; with 53 floats and up to 7
    threads the ranges are 16 floats, narrower than the 32-float embeddings' blocks, so blocks
    straddle two or three ranges. Gradient and fused update: the same bits at every thread count,
    equal to autograd through the pure-PyTorch lookup."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    tables = make_tables(pooling)
    kjt = make_kjt(tables, batch=64, max_len=6)
    ebc = make_ebc(tables, array_size=array_size)
    g = torch.randn(64, 72, generator=torch.Generator().manual_seed(0))  # inexact sums: the order shows
    array64 = ebc.array.detach().double().requires_grad_()
    reference = torch.autograd.grad(torch_lookup(ebc, kjt, array64), array64, g.double())[0]
    before = torch.get_num_threads()
    grads, updated = [], []
    try:
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)
            ebc.array.grad = None
            ebc(kjt).values().backward(g)
            grads.append(ebc.array.grad.clone())
            fused = make_ebc(tables, array_size=array_size, fused_sgd_lr=0.5)
            fused(kjt).values().backward(g)
            updated.append(fused.array.detach().clone())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(grads[0].double(), reference, rtol=1e-6, atol=1e-4)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
    assert all(torch.equal(updated[0], other) for other in updated[1:])
    torch.testing.assert_close(updated[0].double(), ebc.array.detach().double() - 0.5 * reference, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_refuses_block_starts_outside_the_array(threads):
    """The backward's starts come from the forward; others (another array's, edited) are an error
    before anything is written, never a write out of bounds (serial path and work lists)."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    tables = make_tables()
    ebc = make_ebc(tables, array_size=4099)
    values, weights, offsets, meta, batch = lookup_args(ebc, make_kjt(tables, batch=64))
    spec = ebc.lookup_spec
    out, starts, _ = torch.ops.robe_dist.pooled_lookup(ebc.array.detach(), values, weights, offsets, meta, batch,
                                                       *ops._static_args(spec))  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for bad in (4099 - spec.block_size + 1, -5):
            edited = starts.clone()
            edited[int((starts >= 0).nonzero()[-1])] = bad
            with pytest.raises(ValueError, match=rf"block starts must lie in \[0, {4099 - spec.block_size}\].*found {bad}"):
                torch.ops.robe_dist.pooled_lookup_backward(
                    torch.ones_like(out), weights, offsets, meta, edited, batch, 4099, spec.block_size,
                    spec.max_blocks, spec.occurrences, values.numel(), True,
                )  # fmt: skip
    finally:
        torch.set_num_threads(before)



LIST_ARRAY = 2_100_013  # floats: above the 8 MiB from which the one-hot forward builds work lists


def make_one_hot_kjt(tables, batch, seed=0, weighted=False):
    """At most one id per bag (every tenth bag empty), as Criteo's 26 categorical features."""
    g = torch.Generator().manual_seed(seed)
    keys, lengths, values = [], [], []
    for t in tables:
        for f in t.feature_names:
            ls = (torch.arange(batch) % 10 != 3).long()
            keys.append(f)
            lengths.append(ls)
            values.append(torch.randint(0, t.num_embeddings, (int(ls.sum()),), generator=g))
    vals = torch.cat(values)
    weights = torch.rand(vals.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor(keys=keys, values=vals, lengths=torch.cat(lengths), weights=weights)


@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.SUM, True), (PoolingType.MEAN, False)])
@pytest.mark.parametrize("hash", HASHES)
def test_one_hot_lookups_through_work_lists_match_the_reference_at_any_thread_count(pooling, weighted, hash):
    """One-hot input into an array of at least 8 MiB takes the bucketed forward (the blocks grouped
    by 16384-slot buckets of the array, copied bucket by bucket), which leaves its work list for the
    backward. Forward, gradient and fused update: equal to the loop reference and to autograd
    through the pure-PyTorch lookup, the same bits at 1, 2 and 3 threads, and the backward that
    reuses the forward's list gives the bits of one that builds its own."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    from robe_dist import _C

    tables = make_tables(pooling)
    kjt = make_one_hot_kjt(tables, batch=512, weighted=weighted)
    g = torch.randn(512, 72, generator=torch.Generator().manual_seed(1))
    ebc = make_ebc(tables, hash, array_size=LIST_ARRAY, is_weighted=weighted)  # 129 buckets
    ref = reference_lookup(ebc.array.detach(), tables, ebc.robe_config, kjt, weighted=weighted)
    array64 = ebc.array.detach().double().requires_grad_()
    grad_ref = torch.autograd.grad(torch_lookup(ebc, kjt, array64), array64, g.double())[0]
    before = torch.get_num_threads()
    outs, grads, rebuilt, updated = [], [], [], []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            _C._clear_work_lists()
            ebc.array.grad = None
            out = ebc(kjt).values()
            assert _C._work_lists_ready() == 1, "the one-hot forward left no work list"
            out.backward(g)
            assert _C._work_lists_ready() == 0, "the backward did not take the forward's work list"
            outs.append(out.detach())
            grads.append(ebc.array.grad.clone())
            values, weights, offsets, meta, batch = lookup_args(ebc, kjt)
            _, starts, _ = torch.ops.robe_dist.pooled_lookup(ebc.array.detach(), values, weights, offsets, meta, batch,
                                                             *ops._static_args(ebc.lookup_spec))  # fmt: skip
            _C._clear_work_lists()  # the backward builds its own list
            rebuilt.append(torch.ops.robe_dist.pooled_lookup_backward(
                g, weights, offsets, meta, starts, batch, LIST_ARRAY, 8, ebc.lookup_spec.max_blocks,
                ebc.lookup_spec.occurrences, values.numel(), True,
            ))  # fmt: skip
            fused = make_ebc(tables, hash, array_size=LIST_ARRAY, fused_sgd_lr=0.5, is_weighted=weighted)
            fused(kjt).values().backward(g)
            updated.append(fused.array.detach().clone())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), grad_ref, rtol=1e-6, atol=1e-5)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert all(torch.equal(grads[0], other) for other in grads + rebuilt)
    assert all(torch.equal(updated[0], other) for other in updated[1:])
    torch.testing.assert_close(updated[0].double(), ebc.array.detach().double() - 0.5 * grad_ref, rtol=1e-6, atol=1e-5)


def test_bucketed_and_bag_major_forwards_give_the_same_bits():
    """The same one-hot bags through both forwards: alone (bucketed), and with one bag of two ids
    (which sends the whole lookup bag-major); an array below 8 MiB is always read bag-major."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    from robe_dist import _C

    tables = make_tables()
    ebc = make_ebc(tables, array_size=LIST_ARRAY)
    one_hot = make_one_hot_kjt(tables, batch=512, weighted=False)
    values, weights, offsets, meta, batch = lookup_args(ebc, one_hot)
    _C._clear_work_lists()
    bucketed, _, _ = torch.ops.robe_dist.pooled_lookup(ebc.array.detach(), values, weights, offsets, meta, batch,
                                                       *ops._static_args(ebc.lookup_spec))  # fmt: skip
    assert _C._work_lists_ready() == 1
    # bag 5 of f4 holds its id twice: that bag's output doubles, every other value is unchanged
    lengths = one_hot.lengths().clone()
    vals = one_hot.values()
    f4 = one_hot.keys().index("f4")
    cut = f4 * 512 + 5  # bag 5 of f4: one id more
    start = int(lengths[:cut].sum())
    lengths[cut] += 1
    vals = torch.cat([vals[:start], vals[start:start + 1], vals[start:]])
    multi = KeyedJaggedTensor(keys=one_hot.keys(), values=vals, lengths=lengths)
    _C._clear_work_lists()
    values, weights, offsets, meta, batch = lookup_args(ebc, multi)
    bag_major, _, _ = torch.ops.robe_dist.pooled_lookup(ebc.array.detach(), values, weights, offsets, meta, batch,
                                                        *ops._static_args(ebc.lookup_spec))  # fmt: skip
    assert _C._work_lists_ready() == 0, "a multi-hot bag must send the lookup bag-major"
    small = make_ebc(tables, array_size=20_011)  # 80 KB: stays in the caches, read bag-major
    values, weights, offsets, meta, batch = lookup_args(small, one_hot)
    torch.ops.robe_dist.pooled_lookup(small.array.detach(), values, weights, offsets, meta, batch,
                                      *ops._static_args(small.lookup_spec))  # fmt: skip
    assert _C._work_lists_ready() == 0, "an array below 8 MiB must be read bag-major"
    col = ebc.lookup_spec.out_cols[ebc.lookup_spec.dims.index(8)]
    other = torch.ones(bucketed.shape, dtype=torch.bool)
    other[5, col:col + 8] = False
    assert torch.equal(bucketed[other], bag_major[other])
    torch.testing.assert_close(bag_major[5, col:col + 8], 2 * bucketed[5, col:col + 8])


@pytest.mark.parametrize("edit", ["shared_starts", "overlapping_columns"])
def test_a_hand_made_meta_the_bucketed_forward_cannot_serve_goes_bag_major(edit):
    """Two features reading one (key, occurrence) share their starts, and overlapping output
    columns are written by two features: the bucketed forward would count blocks from starts
    that change under it (writing past its list) or race on the output. The operator takes the
    bag-major forward for such a meta, as before work lists existed."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    from robe_dist import _C

    tables = make_tables()
    ebc = make_ebc(tables, array_size=LIST_ARRAY)
    values, weights, offsets, meta, batch = lookup_args(ebc, make_one_hot_kjt(tables, batch=512))
    meta = meta.clone()
    if edit == "shared_starts":  # feature 1 reads feature 0's key, as its occurrence 0, with its own table key
        meta[1, 5], meta[1, 6] = meta[0, 5], meta[0, 6]
    else:  # feature 2's columns start inside feature 1's
        meta[2, 3] = meta[1, 3] + 4
    _C._clear_work_lists()
    out, starts, _ = torch.ops.robe_dist.pooled_lookup(ebc.array.detach(), values, weights, offsets, meta, batch,
                                                       *ops._static_args(ebc.lookup_spec))  # fmt: skip
    assert _C._work_lists_ready() == 0
    assert torch.isfinite(out).all()


def test_a_backward_on_other_inputs_than_the_forward_builds_its_own_work_list():
    """The forward's list is reused only for byte-identical inputs: a backward given other
    weights, offsets or starts than the forward's computes with those (equal to the PyTorch
    backward), never with the forward's list."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    from robe_dist import _C

    tables = make_tables()
    ebc = make_ebc(tables, array_size=LIST_ARRAY, is_weighted=True)
    kjt = make_one_hot_kjt(tables, batch=512, weighted=True)
    spec, array = ebc.lookup_spec, ebc.array.detach()
    values, weights, offsets, meta, batch = lookup_args(ebc, kjt)
    g = torch.randn(512, 72, generator=torch.Generator().manual_seed(2))
    sizes = (batch, LIST_ARRAY, 8, spec.max_blocks, spec.occurrences, values.numel())

    def forward():
        _C._clear_work_lists()
        _, starts, _ = torch.ops.robe_dist.pooled_lookup(array, values, weights, offsets, meta, batch, *ops._static_args(spec))
        assert _C._work_lists_ready() == 1
        return starts

    starts = forward()
    other_weights = weights * 2
    got = torch.ops.robe_dist.pooled_lookup_backward(g, other_weights, offsets, meta, starts, *sizes, True)
    torch.testing.assert_close(got, ops.torch_backward(g, other_weights, offsets, meta, starts, *sizes), rtol=1e-5, atol=1e-5)
    assert _C._work_lists_ready() == 1  # (the forward's list was not taken)

    starts = forward()
    moved = starts.clone()
    moved[moved >= 0] = (moved[moved >= 0] + 1) % (LIST_ARRAY - 8)
    got = torch.ops.robe_dist.pooled_lookup_backward(g, weights, offsets, meta, moved, *sizes, True)
    torch.testing.assert_close(got, ops.torch_backward(g, weights, offsets, meta, moved, *sizes), rtol=1e-5, atol=1e-5)

    starts = forward()
    got = torch.ops.robe_dist.pooled_lookup_backward(g, weights, offsets, meta, starts, *sizes, True)
    assert _C._work_lists_ready() == 0
    torch.testing.assert_close(got, ops.torch_backward(g, weights, offsets, meta, starts, *sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hash", HASHES)
def test_block_starts_are_32_bit_and_widening_them_changes_no_bit(hash):
    """An array below 2^31 slots keeps its block starts in int32 (C++, PyTorch fallback and the
    fake implementation agree on it); the backward also takes them widened to int64 (the layout
    of arrays past 2^31 slots) and gives the same bits, gradient and fused update, on the serial
    path and the work lists."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    assert ops.starts_dtype(2**31 - 1) == torch.int32 and ops.starts_dtype(2**31) == torch.int64
    tables = make_tables()
    ebc = make_ebc(tables, hash, array_size=4099)
    values, weights, offsets, meta, batch = lookup_args(ebc, make_kjt(tables, batch=64, max_len=6))
    spec, array = ebc.lookup_spec, ebc.array.detach()
    static = ops._static_args(spec)
    out, starts, _ = torch.ops.robe_dist.pooled_lookup(array, values, weights, offsets, meta, batch, *static)
    _, ref_starts, _ = ops.torch_forward(array, values, weights, offsets, meta, batch, *static)
    assert starts.dtype == ref_starts.dtype == torch.int32 and torch.equal(starts, ref_starts)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.robe_dist.pooled_lookup(*(mode.from_tensor(t) for t in (array, values)), weights,
                                                 *(mode.from_tensor(t) for t in (offsets, meta)), batch, *static)  # fmt: skip
    assert fake[1].dtype == torch.int32 and fake[1].shape == starts.shape
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    sizes = (spec.block_size, spec.max_blocks, spec.occurrences, values.numel())
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads = [torch.ops.robe_dist.pooled_lookup_backward(g, weights, offsets, meta, st, batch, 4099, sizes[0],
                                                                *sizes[1:], True)  # fmt: skip
                     for st in (starts, starts.long())]
            assert torch.equal(grads[0], grads[1])
            updated = [array.clone(), array.clone()]
            for a, st in zip(updated, (starts, starts.long())):
                torch.ops.robe_dist.pooled_lookup_fused_update(a, None, g, weights, offsets, meta, st, batch, *sizes,
                                                               ops.OPTIMIZERS["sgd"], 0.5, 0.0, True)  # fmt: skip
            assert torch.equal(updated[0], updated[1]) and not torch.equal(updated[0], array)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match=r"starts must be the forward's contiguous Int \[R \* N \* max_blocks\]"):
        torch.ops.robe_dist.pooled_lookup_backward(g, weights, offsets, meta, starts.short(), batch, 4099, *sizes, True)

def test_fused_sgd_equals_dense_sgd():
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    tables = make_tables()
    kjt = make_kjt(tables, batch=128, max_len=5)
    dense = make_ebc(tables)
    fused = make_ebc(tables, fused_sgd_lr=0.5)
    opt = torch.optim.SGD(dense.parameters(), lr=0.5)
    start = dense.array.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        out_d, out_f = dense(kjt).values(), fused(kjt).values()
        torch.testing.assert_close(out_d, out_f, rtol=1e-4, atol=1e-4)  # rounding: fused adds per item
        (out_d**2).sum().backward()
        (out_f**2).sum().backward()
        opt.step()
    assert fused.array.grad is None
    assert not torch.equal(dense.array.detach(), start)
    torch.testing.assert_close(fused.array.detach(), dense.array.detach(), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="fused_sgd_lr"):
        make_ebc(tables, fused_sgd_lr=-1.0)


@pytest.mark.parametrize("pooling, weighted", [(PoolingType.MEAN, False), (PoolingType.SUM, True)])
def test_pytorch_fallback_trains_as_the_cpp_operator(monkeypatch, pooling, weighted):
    """The PyTorch lookup that runs where the C++ operator is not built (and on CUDA without
    Triton): its forward, dense gradient, per-sample weights' gradient and fused SGD / Adagrad
    steps equal the C++ operator's on MEAN, weighted and empty bags (only its forward had a test:
    a lost 1/length or a flipped SGD sign went unseen)."""
    if not ops.has_cpp_extension():
        pytest.skip("robe_dist._C not built")
    from robe_dist.ops import FusedUpdate

    tables = make_tables(pooling)
    kjt = make_kjt(tables, batch=32, weighted=weighted, max_len=5)

    def run(fused):
        """Two steps of (sum of squares) on each of: dense gradient + SGD, fused SGD, fused Adagrad."""
        dense = make_ebc(tables, is_weighted=weighted)
        opt = torch.optim.SGD(dense.parameters(), lr=0.1)
        fused_modules = {k: make_ebc(tables, is_weighted=weighted, fused_update=FusedUpdate(k, 0.1)) for k in fused}
        # (Adagrad from a zero state moves a slot whose contributions nearly cancel by lr * sign:
        # any summation order is right there, so start from 1, as Adagrad's initial_accumulator_value)
        fused_modules["adagrad"].fused_state.fill_(1.0)
        results = {}
        for _ in range(2):
            opt.zero_grad()
            w = kjt.weights().clone().requires_grad_(True) if weighted else None
            k = KeyedJaggedTensor(kjt.keys(), kjt.values(), w, lengths=kjt.lengths())
            out = dense(k).values()
            (out**2).sum().backward()
            results["dense_grad"] = dense.array.grad.clone()
            if weighted:
                results["weights_grad"] = w.grad.clone()
            opt.step()
            for name, m in fused_modules.items():
                (m(kjt).values() ** 2).sum().backward()
        results["out"] = out.detach()
        results["dense_array"] = dense.array.detach().clone()
        for name, m in fused_modules.items():
            results[name] = m.array.detach().clone()
        return results

    with_cpp = run(["sgd", "adagrad"])
    monkeypatch.setattr(ops, "_C", None)
    with pytest.warns(UserWarning, match="PyTorch lookup on CPU"):
        ops._warned_fallback = False
        fallback = run(["sgd", "adagrad"])
    start = make_ebc(tables).array.detach()
    for name, value in with_cpp.items():
        torch.testing.assert_close(fallback[name], value, rtol=1e-5, atol=1e-6, msg=name)
        if name in ("dense_array", "sgd", "adagrad"):
            assert not torch.allclose(value, start), name  # the step moved the array


def test_default_init_scale_is_that_of_the_largest_table():
    """The paper's init, uniform in +-sqrt(1/n), takes n from the largest table (capped); a mix of
    sizes, as DLRM's, must not take a small table's much wider range."""
    from robe_dist.modules.robe_embedding_bag_collection import _INIT_CAP

    for largest in (10**5, 10**9):
        tables = [EmbeddingBagConfig(name=f"t{n}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{n}"])
                  for n in (10, largest, 300)]
        peak = make_ebc(tables, array_size=50_000).array.abs().max().item()
        bound = (1.0 / min(largest, _INIT_CAP)) ** 0.5
        assert 0.99 * bound < peak <= bound, (largest, peak, bound)


def test_int32_ids_and_device_meta():
    tables = make_tables()
    ebc = make_ebc(tables)
    kjt = make_kjt(tables)
    kjt32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths())
    torch.testing.assert_close(ebc(kjt).values(), ebc(kjt32).values())
    meta = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=10**6, block_size=8), device=torch.device("meta"))
    assert meta.array.is_meta and meta.array.shape == (10**6,)


def test_universal_takes_raw_ids_beyond_num_embeddings():
    tables = [EmbeddingBagConfig(name="raw", embedding_dim=8, num_embeddings=10, feature_names=["f"])]
    ebc = make_ebc(tables, block_size=8)
    ids = torch.tensor([0, 2**40 + 7, -5, 2**63 - 1, -(2**63)])
    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(5, dtype=torch.long))
    ref = reference_lookup(ebc.array.detach(), tables, ebc.robe_config, kjt)
    torch.testing.assert_close(ebc(kjt).values(), ref)


# ---------------------------------------------------------------------------- errors
def test_paper_mapping_rejects_out_of_range_ids():
    tables = make_tables()
    ebc = make_ebc(tables, "paper")
    kjt = KeyedJaggedTensor(
        keys=["f1", "f2", "f3", "f4"], values=torch.tensor([1, 2, 3, 7]), lengths=torch.ones(4, dtype=torch.long)
    )
    with pytest.raises(ValueError, match=r"id 7 of feature 'f4' \(table 't_one'\) is outside \[0, num_embeddings\) = \[0, 7\)"):
        ebc(kjt)
    neg = KeyedJaggedTensor(
        keys=["f1", "f2", "f3", "f4"], values=torch.tensor([-1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.long)
    )
    with pytest.raises(ValueError, match="id -1 of feature 'f1' \\(table 't_big'\\)"):
        ebc(neg)


@pytest.mark.parametrize(
    "offsets, weights, match",
    [
        ([0, 2, 1, 3, 4], None, r"offsets must be non-decreasing .* offsets\[1\] = 2 > offsets\[2\] = 1"),
        ([0, 1, 2, 3, 9], None, r"offsets run from 0 to 9 but the KeyedJaggedTensor has 4 values"),
        ([0, 1, 2, 3, 3], None, r"offsets run from 0 to 3 but the KeyedJaggedTensor has 4 values"),  # one left over
        ([1, 1, 2, 3, 4], None, r"offsets run from 1 to 4 but the KeyedJaggedTensor has 4 values"),  # not from 0
        ([0, 1, 2, 3, 4], [1.0, 2.0], r"weights must be 1-D with one weight per id \(4\)"),
    ],
)
def test_malformed_kjt_is_refused_on_cpu(offsets, weights, match):
    """A KeyedJaggedTensor whose offsets decrease, run past its values or leave some of them in no
    bag, or whose weights do not match its ids, is an error naming the problem (it used to crash
    the process, or drop the values silently)."""
    tables = make_tables()
    ebc = make_ebc(tables, is_weighted=weights is not None)
    kjt = KeyedJaggedTensor(
        keys=["f1", "f2", "f3", "f4"], values=torch.tensor([1, 2, 3, 4]), offsets=torch.tensor(offsets),
        weights=None if weights is None else torch.tensor(weights),
    )
    with pytest.raises(ValueError, match=match):
        ebc(kjt)


def test_dtypes_the_cpu_kernel_does_not_take_are_named():
    ebc = make_ebc(make_tables()).to(torch.bfloat16)
    with pytest.raises(ValueError, match="CPU operator takes float32 or float64 arrays, got torch.bfloat16"):
        ebc(make_kjt(make_tables()))
    # scoring a 16-bit array (robe-export --dtype bf16) reads a float32 copy of it
    reference = make_ebc(make_tables())
    reference.array.data = ebc.array.data.float()
    with torch.no_grad():
        torch.testing.assert_close(ebc(make_kjt(make_tables())).values(), reference(make_kjt(make_tables())).values())


def test_missing_feature_is_named():
    tables = make_tables()
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2]), lengths=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\['f3', 'f4'\] of its tables are missing"):
        make_ebc(tables)(kjt)


def test_non_integer_ids_are_refused():
    tables = make_tables()
    kjt = make_kjt(tables)
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().float(), lengths=kjt.lengths())
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        make_ebc(tables)(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(array_size=7, block_size=8), r"array_size \(7\) must be >= block_size \(8\)"),
        (dict(array_size=0), "array_size must be a positive int"),
        (dict(array_size=100, hash="murmur"), "RobeConfig.hash must be one of"),
        (dict(array_size=100, seed=-1), "RobeConfig.seed"),
        (dict(array_size=100, init_scale=float("nan")), "RobeConfig.init_scale"),
        (dict(array_size=100, block_align=0), "RobeConfig.block_align must be a positive int"),
        (dict(array_size=100, block_size=8, block_align=16), r"block_align \(16\) must divide block_size \(8\)"),
        (dict(array_size=100, block_size=8, block_align=3), r"block_align \(3\) must divide block_size \(8\)"),
    ],
)
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobeConfig(**kwargs)


def test_embedding_dim_must_be_multiple_of_block():
    tables = [EmbeddingBagConfig(name="odd", embedding_dim=12, num_embeddings=10, feature_names=["f"])]
    with pytest.raises(ValueError, match=r"table 'odd': embedding_dim \(12\) must be a multiple of RobeConfig.block_size \(8\)"):
        RobeEmbeddingBagCollection(tables, RobeConfig(array_size=100, block_size=8))


def test_config_sizing_helpers():
    tables = make_tables()
    full = 5000 * 32 + 300 * 16 + 7 * 8
    robe = RobeConfig.from_compression(tables, ratio=10, block_size=8)
    assert robe.array_size == full // 10
    assert RobeConfig.from_bytes(4000).array_size == 1000
    assert RobeConfig(array_size=27_000_000).num_bytes == 108_000_000
    assert RobeConfig(array_size=100, hash="paper").seed == 1024
    assert RobeConfig(array_size=100).seed == 0


# ---------------------------------------------------------------------------- state
def test_state_dict_carries_and_checks_the_hash_signature():
    tables = make_tables()
    ebc = make_ebc(tables)
    sd = ebc.state_dict()
    assert set(sd) == {"array", "hash_signature"}
    other = make_ebc(tables)
    other.load_state_dict(sd)
    assert torch.equal(other.array, ebc.array)
    wrong_seed = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=2003, block_size=8, seed=5))
    with pytest.raises(RuntimeError, match="hash signature does not match.*seed=0.*seed=5"):
        wrong_seed.load_state_dict(sd)
    wrong_mode = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=2003, block_size=8, hash="paper"))
    with pytest.raises(RuntimeError, match="hash=universal"):
        wrong_mode.load_state_dict(sd)
    aligned = make_ebc(tables, block_align=8)
    with pytest.raises(RuntimeError, match="block_size=8 array_size.*module has .*block_size=8 block_align=8"):
        aligned.load_state_dict(sd)
    assert ebc.hash_signature.tolist()[1] == 0  # alignment 1: the signature of modules made before it existed
    # an in-place overwrite (as torch.distributed.checkpoint.load does) is caught at the next forward
    in_place = make_ebc(tables)
    with torch.no_grad():
        in_place.hash_signature.copy_(wrong_seed.hash_signature)
    with pytest.raises(RuntimeError, match="loaded state: the ROBE hash signature"):
        in_place(make_kjt(tables))


def test_built_on_meta_then_to_empty_and_reset_parameters_is_the_module_built_on_cpu():
    """TorchRec's deferred-init pattern: on ``meta``, ``to_empty(device=...)`` (buffers then hold
    arbitrary memory), ``reset_parameters()``."""
    tables = make_tables()
    kjt = make_kjt(tables)
    on_cpu = make_ebc(tables)
    deferred = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=2003, block_size=8), device=torch.device("meta"))
    deferred = deferred.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold
        deferred.lookup_meta.fill_(123456789)
        deferred.hash_signature.fill_(-1)
    torch.manual_seed(0)
    deferred.reset_parameters()
    assert torch.equal(deferred.array, on_cpu.array)
    torch.testing.assert_close(deferred(kjt).values(), on_cpu(kjt).values())
    on_cpu.load_state_dict(deferred.state_dict())  # its signature is the real one


def test_built_under_the_meta_device_context_then_loaded_with_assign():
    """``with torch.device("meta")`` (as for models too big to build twice) used to fail at
    construction ("Cannot copy out of meta tensor"), and ``load_state_dict(..., assign=True)``
    left the derived ``lookup_meta`` on meta, so the forward refused the call."""
    from robe_dist import RobeHybridEmbeddingBagCollection

    tables = make_tables()
    kjt = make_kjt(tables)
    on_cpu = make_ebc(tables)
    with torch.device("meta"):
        deferred = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=2003, block_size=8))
        hybrid = RobeHybridEmbeddingBagCollection(tables, RobeConfig(array_size=2003, block_size=8), robe_tables=["t_big"],
                                                  hot_ids={"t_big": [1, 2]})  # fmt: skip
    assert deferred.array.is_meta and deferred.lookup_meta.is_meta and hybrid.robe.array.is_meta
    deferred.load_state_dict(on_cpu.state_dict(), assign=True)
    torch.testing.assert_close(deferred(kjt).values(), on_cpu(kjt).values())
    hybrid.to_empty(device="cpu")  # (every buffer then holds arbitrary memory, the routing's too)
    hybrid.reset_parameters()
    assert hybrid.device == torch.device("cpu")
    built = RobeHybridEmbeddingBagCollection(tables, RobeConfig(array_size=2003, block_size=8), robe_tables=["t_big"],
                                             hot_ids={"t_big": [1, 2]})  # fmt: skip
    assert [n for n, _ in hybrid.named_buffers()] == [n for n, _ in built.named_buffers()]
    assert all(torch.equal(a, b) for a, b in zip(hybrid.buffers(), built.buffers()))  # routing, columns, signature
    hybrid.load_state_dict(built.state_dict())  # (TorchRec's own EBC child keeps its to_empty() memory: its
    torch.testing.assert_close(hybrid(kjt).values(), built(kjt).values())  # reset_parameters() sees device meta)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tables = make_tables()
    ebc = make_ebc(tables, is_weighted=True)
    kjt = make_kjt(tables, batch=64, weighted=True)
    out = ebc(kjt).values()
    out.sum().backward()
    gpu = make_ebc(tables, is_weighted=True, device=torch.device("cuda"))
    with torch.no_grad():
        gpu.array.copy_(ebc.array)
    out_gpu = gpu(kjt.to(torch.device("cuda"))).values()
    out_gpu.sum().backward()
    torch.testing.assert_close(out_gpu.cpu(), out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.array.grad.cpu(), ebc.array.grad, rtol=1e-5, atol=1e-6)


def test_reused_output_buffers_are_fully_written():
    """Outputs and gradients of >= 2 MiB come from a cache of huge-page buffers: a reused buffer
    holds the previous step's values, so empty bags must still come out as zeros."""
    tables = make_tables()
    ebc = make_ebc(tables, array_size=1 << 20, block_size=8)
    full = make_kjt(tables, batch=8192, max_len=3, seed=1)
    assert ebc(full).values().numel() * 4 >= 2 << 20  # large enough for the huge-page path
    for seed in (2, 3):
        kjt = make_kjt(tables, batch=8192, max_len=3, seed=seed)
        out = ebc(kjt)
        for name, jt in kjt.to_dict().items():
            if name in out.keys():
                empty = jt.lengths() == 0
                assert empty.any() and out[name][empty].abs().sum() == 0
        out.values().sum().backward()
        grad = ebc.array.grad
        ebc.array.grad = None
        ref_out = torch_lookup(ebc, kjt)
        torch.testing.assert_close(out.values(), ref_out.detach(), rtol=1e-5, atol=1e-5)
        ref_out.sum().backward()
        torch.testing.assert_close(grad, ebc.array.grad, rtol=1e-5, atol=1e-4)
        ebc.array.grad = None


@pytest.mark.parametrize("seed", [1024, 1, 5])  # A = R[2] below 2**30 for 1024, above it for 1 and 5
def test_paper_mapping_is_exact_at_the_id_bound(seed):
    """Global ids near 2**62 (the bound on the sum of num_embeddings): g * A overflows int64 for
    every seed here, so the kernels reduce g mod P first; the C++ operator and the PyTorch path must
    give the exact-integer mapping of the scalar spec."""
    from robe_dist import hashing

    a = hashing.paper_constants(seed)[0]
    assert (2**62 - 3000) * a >= 2**63  # the naive product would overflow
    tables = [
        EmbeddingBagConfig(name="huge", embedding_dim=8, num_embeddings=2**62 - 2000, feature_names=["fh"]),
        EmbeddingBagConfig(name="after", embedding_dim=8, num_embeddings=1000, feature_names=["fa"]),
    ]
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=1009, block_size=4, hash="paper", seed=seed))
    ids = torch.tensor([2**62 - 2001, 2**62 - 2500, 0, 999, 500, 1])
    kjt = KeyedJaggedTensor(keys=["fh", "fa"], values=ids, lengths=torch.tensor([1, 1, 1, 1, 1, 1]))
    ref = reference_lookup(ebc.array.detach(), tables, ebc.robe_config, kjt)
    torch.testing.assert_close(ebc(kjt).values(), ref)
    torch.testing.assert_close(torch_lookup(ebc, kjt).detach(), ref)


@pytest.mark.skipif(not ops.has_cpp_extension(), reason="needs the C++ operator")
def test_backward_bucketing_quotient_is_exact():
    """The backward finds a slot's owning thread by a multiply with a precomputed reciprocal
    (below 2^32; a division above): it must equal floor division everywhere, edges included."""
    from robe_dist.ops import _C

    g = torch.Generator().manual_seed(0)
    top = 2**32 - 1
    divisors = [2, 3, 16, 48, 1000, 13_500_016, 2**31 - 1, 2**31, 2**32 - 5] + torch.randint(2, 2**32, (40,), generator=g).tolist()
    for d in divisors:
        edges = [0, 1, d - 1, d, d + 1, top, top - 1] + [k * d + e for k in (1, 2, top // d) for e in (-1, 0, 1)]
        x = torch.cat([torch.tensor([e for e in edges if 0 <= e <= top]), torch.randint(0, 2**32, (2000,), generator=g)])
        assert torch.equal(_C._slot_quotients(d, top, x), x // d), d  # the multiply
        big = x * 2**8 + 255  # above 2^32: the division
        assert torch.equal(_C._slot_quotients(d, int(big.max()), big), big // d), d


def test_streamed_large_outputs_equal_cached_ones():
    """Outputs of >= 32 MiB are pooled in a cached row and written with non-temporal stores
    (robe_cpu.cpp, stream_row): the rows must be those of a small batch, bit for bit, also where
    a feature's row is not a multiple of 4 floats or not 16-byte aligned (plain copies there)."""
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=512, num_embeddings=5000, feature_names=["f1"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="b", embedding_dim=506, num_embeddings=300, feature_names=["f2"], pooling=PoolingType.SUM),
        EmbeddingBagConfig(name="c", embedding_dim=6, num_embeddings=7, feature_names=["f3"], pooling=PoolingType.MEAN),
    ]
    ebc = make_ebc(tables, array_size=1 << 16, block_size=2)
    big = make_kjt(tables, batch=8192, seed=3, extra_key=False)
    out = ebc(big).values().detach()
    assert out.numel() * 4 >= 32 << 20  # the streamed path (kStreamOutputBytes)
    n = 64
    parts = big.to_dict()
    lengths = [parts[k].lengths()[:n] for k in big.keys()]
    values = [parts[k].values()[: int(ls.sum())] for k, ls in zip(big.keys(), lengths)]
    small = KeyedJaggedTensor(keys=big.keys(), values=torch.cat(values), lengths=torch.cat(lengths))
    assert torch.equal(out[:n], ebc(small).values().detach())
    torch.testing.assert_close(out, torch_lookup(ebc, big).detach(), rtol=1e-5, atol=1e-5)
