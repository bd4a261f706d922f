"""RobeEmbeddingBagCollectionSharder, the planner's view of ROBE, and single-process sharding."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.sharding_plan import get_default_sharders as torchrec_default_sharders
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_dist import RobeConfig, RobeEmbeddingBagCollection
from robe_dist.distributed import (
    ARRAY_PARAMETER_NAME,
    RobeEmbeddingBagCollectionSharder,
    RobeShardingPlanner,
    ShardedRobeEmbeddingBagCollection,
    check_robe_constraints,
    get_default_sharders,
    optimizer_state_slots,
    planning_shape,
)

M = 1 << 15  # array elements
DP, TW, DENSE = ShardingType.DATA_PARALLEL.value, ShardingType.TABLE_WISE.value, EmbeddingComputeKernel.DENSE.value


def robe_tables(dim: int = 64, n: int = 3):
    return [EmbeddingBagConfig(name=f"r{i}", embedding_dim=dim, num_embeddings=10**9, feature_names=[f"rf{i}"])
            for i in range(n)]


def full_tables():
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=500, feature_names=[f"f{i}"])
            for i in range(2)]


class Mixed(nn.Module):
    def __init__(self, array_size: int = M) -> None:
        super().__init__()
        self.robe = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=array_size, block_size=32))
        self.ebc = EmbeddingBagCollection(full_tables())
        self.dense = nn.Linear(4, 4)


def kjt(batch: int = 4, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = ["rf0", "rf1", "rf2", "f0", "f1"]
    lengths = torch.randint(0, 3, (len(keys) * batch,), generator=g)
    return KeyedJaggedTensor(keys=keys, values=torch.randint(0, 500, (int(lengths.sum()),), generator=g), lengths=lengths)


def dp_plan(ranks=None):
    return {ARRAY_PARAMETER_NAME: ParameterSharding(sharding_type=DP, compute_kernel=DENSE, ranks=ranks)}


def plan(model, world_size=2, sharders=None, constraints=None, planner_cls=EmbeddingShardingPlanner):
    sharders = sharders or [RobeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    planner = planner_cls(topology=Topology(world_size=world_size, compute_device="cpu"), constraints=constraints)
    return planner.plan(model, sharders)


def robe_storage(model, world_size, sharder, constraints=None):
    """(per-rank ddr the planner charges for the array, the io part of it, planning tensor)."""
    topology = Topology(world_size=world_size, compute_device="cpu")
    options = EmbeddingEnumerator(topology=topology, batch_size=BATCH_SIZE, constraints=constraints).enumerate(
        model, [sharder, EmbeddingBagCollectionSharder()])
    (so,) = [o for o in options if o.path == "robe"]
    pf = so.input_lengths
    io = math.ceil(sum(pf) * BATCH_SIZE * 8) + math.ceil(
        sum(min(1.0, p) for p in pf) * BATCH_SIZE * so.tensor.shape[1] * 4)
    return [s.storage.ddr for s in so.shards], io, so


# ------------------------------------------------------------------------------ sharder surface
def test_sharder_offers_only_data_parallel_dense():
    s = RobeEmbeddingBagCollectionSharder()
    assert s.module_type is RobeEmbeddingBagCollection
    assert s.sharded_module_type is ShardedRobeEmbeddingBagCollection
    for device in ("cpu", "cuda"):
        assert s.sharding_types(device) == [DP]
        assert s.compute_kernels(DP, device) == [DENSE]
        assert s.compute_kernels(TW, device) == []


def test_shardable_parameters_is_a_2d_meta_view_of_the_array():
    module = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=27_000_000, block_size=32))
    (name, t), = RobeEmbeddingBagCollectionSharder().shardable_parameters(module).items()
    assert name == "array" and t.device.type == "meta" and t.dim() == 2
    assert t.numel() == 27_000_000 and t.dtype == torch.float32
    assert tuple(t.shape) == (27_000_000 // 64, 64)  # gcd(27e6, 64): the common embedding dim divides m
    assert not hasattr(t, "_optimizer_classes")
    odd = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=1001, block_size=32))
    assert planning_shape(odd) == torch.Size([1001, 1])


def test_optimizer_state_slots():
    assert optimizer_state_slots(torch.optim.SGD) == 0
    assert optimizer_state_slots(torch.optim.SGD, {"momentum": 0.9}) == 1
    assert optimizer_state_slots(torch.optim.Adagrad) == 1
    assert optimizer_state_slots(torch.optim.Adam) == 2
    with pytest.raises(ValueError, match="unknown optimizer class 'LBFGS'"):
        optimizer_state_slots(torch.optim.LBFGS)
    with pytest.raises(ValueError, match="can budget 0, 1 or 2"):
        RobeEmbeddingBagCollectionSharder(optimizer_class=torch.optim.Adam, optimizer_kwargs={"amsgrad": True})
    with pytest.raises(ValueError, match="gradient_sync must be one of"):
        RobeEmbeddingBagCollectionSharder(gradient_sync="allreduce")


def test_get_default_sharders_extends_torchrecs():
    ours = get_default_sharders(optimizer_class=torch.optim.Adagrad)
    theirs = torchrec_default_sharders()
    # TorchRec's, in order, with the feature-processed collections' sharder replaced by ours (a subclass)
    assert [s.module_type for s in ours[:-1]] == [s.module_type for s in theirs]
    assert all(isinstance(a, type(b)) for a, b in zip(ours, theirs))
    assert isinstance(ours[-1], RobeEmbeddingBagCollectionSharder) and ours[-1].optimizer_state_slots == 1
    from robe_dist.distributed import FeatureProcessedEmbeddingBagCollectionSharder

    fp = [s for s in ours if isinstance(s, FeatureProcessedEmbeddingBagCollectionSharder)]
    assert len(fp) == 1 and fp[0]._robe_sharder is ours[-1]  # same optimiser budget, same gradient_sync


# ------------------------------------------------------------------------------ planner
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_plan_lists_robe_as_data_parallel_next_to_table_wise_tables(world_size):
    p = plan(Mixed(), world_size)
    robe = p.plan["robe"]
    assert list(robe) == ["array"]
    assert robe["array"].sharding_type == DP and robe["array"].compute_kernel == DENSE
    assert robe["array"].ranks == list(range(world_size))
    assert {ps.sharding_type for ps in p.plan["ebc"].values()} == {TW}
    printed = str(p)
    assert "module: robe" in printed and "data_parallel" in printed and "dense" in printed


@pytest.mark.parametrize(
    "opt,kwargs,slots",
    [(None, None, 0), (torch.optim.SGD, {}, 0), (torch.optim.SGD, {"momentum": 0.9}, 1),
     (torch.optim.Adagrad, {}, 1), (torch.optim.Adam, {}, 2)],
)
def test_planner_charges_array_bytes_plus_optimizer_state(opt, kwargs, slots):
    model = Mixed()
    storages, io, so = robe_storage(model, 2, RobeEmbeddingBagCollectionSharder(opt, kwargs))
    assert storages == [M * 4 * (1 + slots) + io] * 2  # every rank holds the whole array
    full = sum(t.num_embeddings * t.embedding_dim * 4 for t in robe_tables())
    assert storages[0] < full / 1000  # not num_embeddings x dim


@pytest.mark.parametrize(
    "opt,kwargs",
    [(torch.optim.SGD, {}), (torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adagrad, {}), (torch.optim.Adam, {})],
)
def test_planner_budget_matches_what_training_allocates(opt, kwargs):
    """One process: the array and the optimiser state created by real steps = the planner's charge."""
    model = Mixed()
    storages, io, _ = robe_storage(model, 1, RobeEmbeddingBagCollectionSharder(opt, kwargs))
    optimizer = opt([model.robe.array], lr=0.01, **kwargs)
    for seed in range(2):
        model.robe(kjt(seed=seed)).values().sum().backward()
        optimizer.step()
    state = optimizer.state[model.robe.array]
    held = model.robe.array.numel() * 4 + sum(v.numel() * v.element_size() for v in state.values() if v.dim() > 0)
    assert storages[0] - io == held


def test_pooling_factor_constraints_on_array_are_honoured():
    model = Mixed()
    base, _, _ = robe_storage(model, 2, RobeEmbeddingBagCollectionSharder())
    c = {"array": ParameterConstraints(sharding_types=[DP], pooling_factors=[3.0, 3.0, 3.0])}
    more, io, so = robe_storage(model, 2, RobeEmbeddingBagCollectionSharder(), constraints=c)
    assert so.input_lengths == [3.0, 3.0, 3.0]
    assert more[0] == M * 4 + io and more[0] > base[0]


def test_constraints_refused_with_clear_messages():
    model = Mixed()
    with pytest.raises(ValueError, match=r"'r1' is a table of the ROBE collection at 'robe'.*constraints\['array'\]"):
        check_robe_constraints(model, {"r1": ParameterConstraints(sharding_types=[TW])})
    with pytest.raises(ValueError, match="only sharding type is 'data_parallel'"):
        check_robe_constraints(model, {"array": ParameterConstraints(sharding_types=[TW])})
    with pytest.raises(ValueError, match="'dense' kernel only"):
        check_robe_constraints(model, {"array": ParameterConstraints(compute_kernels=["fused"])})
    with pytest.raises(ValueError, match="enforce_hbm=True cannot apply"):
        check_robe_constraints(model, {"array": ParameterConstraints(enforce_hbm=True)})
    with pytest.raises(ValueError, match=r"pooling_factors has 2 entries; it takes one per feature.*'robe' has 3"):
        check_robe_constraints(model, {"array": ParameterConstraints(pooling_factors=[2.0, 2.0])})
    # num_poolings / batch_sizes: one per entry of pooling_factors, as TorchRec asserts (its default: 1)
    with pytest.raises(ValueError, match=r"batch_sizes has 1 entries; it takes one per entry of pooling_factors \(3\)"):
        check_robe_constraints(model, {"array": ParameterConstraints(pooling_factors=[2.0] * 3, batch_sizes=[64])})
    with pytest.raises(ValueError, match=r"num_poolings has 3 entries; it takes one per entry of pooling_factors \(1\)"):
        check_robe_constraints(model, {"array": ParameterConstraints(num_poolings=[1.0] * 3)})
    check_robe_constraints(model, {"array": ParameterConstraints(pooling_factors=[2.0] * 3, num_poolings=[1.0] * 3)})
    check_robe_constraints(model, {"array": ParameterConstraints(num_poolings=[2.0])})
    # constraints on ordinary tables and allowed ones pass
    check_robe_constraints(model, {"t0": ParameterConstraints(sharding_types=[TW]),
                                   "array": ParameterConstraints(sharding_types=[DP, TW], pooling_factors=[2.0] * 3)})
    # RobeShardingPlanner runs the check; TorchRec's planner alone refuses an impossible one too
    with pytest.raises(ValueError, match="is a table of the ROBE collection"):
        plan(model, 2, constraints={"r0": ParameterConstraints(sharding_types=[DP])}, planner_cls=RobeShardingPlanner)
    with pytest.raises(RuntimeError, match="No available sharding type.*array"):
        plan(model, 2, constraints={"array": ParameterConstraints(sharding_types=[TW])})
    p = plan(model, 2, constraints={"t0": ParameterConstraints(sharding_types=[DP])}, planner_cls=RobeShardingPlanner)
    assert p.plan["ebc"]["t0"].sharding_type == DP and p.plan["robe"]["array"].sharding_type == DP


def test_array_constraint_refused_when_an_ordinary_table_is_named_array():
    """TorchRec keys constraints by tensor name: ``constraints["array"]`` would bind both the ROBE
    array and an ordinary table called "array" (a ROBE table of that name has no tensor: fine)."""
    model = Mixed()
    model.ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="array", embedding_dim=8, num_embeddings=100,
                                                           feature_names=["f0"])])
    c = {"array": ParameterConstraints(sharding_types=[DP])}
    with pytest.raises(ValueError, match=r"constraints\['array'\] is ambiguous.*table named 'array' in \['ebc'\]"):
        check_robe_constraints(model, c)
    check_robe_constraints(model, {"t0": ParameterConstraints(sharding_types=[TW])})  # no "array" key: fine
    robe_named_array = Mixed()
    robe_named_array.robe = RobeEmbeddingBagCollection(
        [EmbeddingBagConfig(name="array", embedding_dim=8, num_embeddings=100, feature_names=["rf0"])],
        RobeConfig(array_size=M, block_size=4))
    check_robe_constraints(robe_named_array, c)


def position_weighted(inner=None):
    from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
    from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

    model = nn.Module()
    inner = inner or RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=M, block_size=32), is_weighted=True)
    model.fp = FeatureProcessedEmbeddingBagCollection(inner, PositionWeightedModuleCollection({f"rf{i}": 4 for i in range(3)}))
    return model


def test_position_weighted_robe_is_planned_replicated_and_refused_otherwise():
    """The sharder of every FeatureProcessedEmbeddingBagCollection offers table-wise too: RobeShardingPlanner
    constrains the array to data_parallel (and leaves its constraints as given); a table-wise plan
    from another planner is refused by the shard step with the way out."""
    from robe_dist.distributed import FeatureProcessedEmbeddingBagCollectionSharder

    model = position_weighted()
    sharders = get_default_sharders()
    assert sum(type(s) is FeatureProcessedEmbeddingBagCollectionSharder for s in sharders) == 1
    user = {"t0": ParameterConstraints(sharding_types=[TW])}
    planner = RobeShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints=user)
    assert planner.plan(model, sharders).plan["fp"]["array"].sharding_type == DP
    assert list(planner._constraints) == ["t0"] and list(user) == ["t0"]
    # a constraint given for the array is narrowed too (pooling_factors alone would let table-wise in)
    given = {"array": ParameterConstraints(pooling_factors=[2.0] * 3)}
    planner = RobeShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints=given)
    assert planner.plan(model, sharders).plan["fp"]["array"].sharding_type == DP
    assert planner._constraints["array"] == given["array"] and given["array"].sharding_types is None
    # an enumerator of the user's keeps its own constraints: the plan is checked, the way out named
    mine = EmbeddingEnumerator(topology=Topology(world_size=2, compute_device="cpu"), batch_size=512)
    with pytest.raises(PlannerError, match=r"planned other than 'data_parallel'.*constraints\['array'\] = ParameterConstraints"):
        RobeShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), enumerator=mine).plan(model, sharders)
    clash = position_weighted()
    clash.ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="array", embedding_dim=8, num_embeddings=100,
                                                           feature_names=["f0"])])
    with pytest.raises(PlannerError, match=r"table named 'array' in \['ebc'\].*rename that table"):
        RobeShardingPlanner(topology=Topology(world_size=2, compute_device="cpu")).plan(clash, sharders)
    tw_plan = plan(model, 2, sharders)  # TorchRec's own planner picks table-wise here
    params = tw_plan.plan["fp"]
    assert params["array"].sharding_type == TW
    fp_sharder = [s for s in sharders if type(s) is FeatureProcessedEmbeddingBagCollectionSharder][0]
    with pytest.raises(ValueError, match=r"ROBE array was planned 'table_wise'.*RobeShardingPlanner.*constraints\['array'\]"):
        fp_sharder.shard(model.fp, params, ShardingEnv.from_local(2, 0), torch.device("cpu"), "fp")
    # a collection it cannot shard inside: said plainly (TorchRec's sharder raised AttributeError)
    from robe_dist.modules.qr import QREmbeddingBagCollection

    qr = QREmbeddingBagCollection(full_tables(), max_rows=100, is_weighted=True)
    with pytest.raises(ValueError, match="around a QREmbeddingBagCollection: its sharder takes an EmbeddingBagCollection"):
        fp_sharder.shardable_parameters(position_weighted(qr).fp)


# ------------------------------------------------------------------------------ sharding, one process
def shard_local(module, params=None, **kw):
    return RobeEmbeddingBagCollectionSharder(**kw).shard(module, params or dp_plan([0]), ShardingEnv.from_local(1, 0))


def test_sharded_module_matches_unsharded_and_keeps_state_names():
    module = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=M, block_size=32))
    reference = copy.deepcopy(module)
    sharded = shard_local(module)
    features = kjt()
    out = sharded(features)
    pooled = out.wait() if hasattr(out, "wait") else out
    expected = reference(features)
    assert pooled.keys() == expected.keys()
    assert torch.equal(pooled.values(), expected.values())
    assert list(sharded.state_dict()) == list(reference.state_dict()) == ["array", "hash_signature"]
    assert [n for n, _ in sharded.named_parameters()] == ["array"]
    # TorchRec's composable shard_modules() refuses a sharded module whose buffer names or their
    # order differ from the unsharded one's (lookup_meta was missing)
    assert [n for n, _ in sharded.named_buffers()] == [n for n, _ in reference.named_buffers()]
    assert sharded.gradient_sync == "hook"  # default: the module averages the gradient, DDP must skip it
    assert list(sharded.sharded_parameter_names("m")) == ["m.array"]
    assert list(shard_local(copy.deepcopy(reference), gradient_sync="ddp").sharded_parameter_names()) == []
    # the array is a copy: training the sharded module leaves the caller's tensor alone
    sharded(features).wait().values().sum().backward()
    assert sharded.array.grad is not None and reference.array.grad is None


def test_the_trainer_fuses_the_arrays_step_only_where_it_takes_the_same_steps():
    """robe-train's fusing of the array's step (one process): not under gradient clipping, which
    needs the whole gradient first; the arrays are among the clipped parameters."""
    from robe_dist.train_config import OptimConfig
    from robe_dist.trainer.optim import TrainOptimizer, fuse_robe_updates

    for clip, fused in ((None, "adagrad"), (1.0, None)):
        model = nn.Module()
        model.robe = shard_local(RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=M, block_size=32)))
        model.mlp = nn.Linear(4, 1)
        opt = TrainOptimizer(model, OptimConfig(name="adagrad", lr=0.1, grad_clip_norm=clip), [model.robe.array])
        line = fuse_robe_updates(model, opt, True, 1)
        assert model.robe.fused_optimizer_kind == fused, line
        assert any(p is model.robe.array for p in opt.clip_params)
        if clip is not None:
            assert line.endswith("(optim.grad_clip_norm clips it)")


def test_sharded_module_refuses_a_mismatched_checkpoint():
    sharded = shard_local(RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=M, block_size=32)))
    other = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=M, block_size=32, seed=3))
    with pytest.raises(RuntimeError, match="ROBE hash signature does not match"):
        sharded.load_state_dict(other.state_dict())
    # in-place writes (torch.distributed.checkpoint.load) are caught at the next forward
    with torch.no_grad():
        sharded.hash_signature.copy_(other.hash_signature)
    with pytest.raises(RuntimeError, match="ROBE hash signature does not match"):
        sharded(kjt())


def test_meta_module_is_materialised_and_initialised():
    module = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=M, block_size=32), device=torch.device("meta"))
    sharded = shard_local(module)
    assert sharded.array.device.type == "cpu" and sharded.hash_signature.device.type == "cpu"
    bound = math.sqrt(1 / 10**9)  # the module's default init: sqrt(1 / largest num_embeddings)
    assert 0.5 * bound < sharded.array.abs().max().item() <= bound
    assert sharded(kjt()).wait().values().shape == (4, 3 * 64)


def test_shard_refusals_name_the_problem():
    cfg = RobeConfig(array_size=M, block_size=32)
    with pytest.raises(ValueError, match="exactly one entry, 'array'"):
        shard_local(RobeEmbeddingBagCollection(robe_tables(), cfg),
                    {"r0": ParameterSharding(sharding_type=DP, compute_kernel=DENSE)})
    with pytest.raises(ValueError, match="can only be replicated"):
        shard_local(RobeEmbeddingBagCollection(robe_tables(), cfg),
                    {"array": ParameterSharding(sharding_type=TW, compute_kernel=DENSE, ranks=[0])})
    with pytest.raises(ValueError, match="needs a process group"):
        RobeEmbeddingBagCollectionSharder().shard(RobeEmbeddingBagCollection(robe_tables(), cfg), dp_plan(),
                                                  ShardingEnv.from_local(2, 0))
    with pytest.raises(ValueError, match="fused_sgd_lr=0.1"):
        shard_local(RobeEmbeddingBagCollection(robe_tables(), cfg, fused_sgd_lr=0.1))
    module = RobeEmbeddingBagCollection(robe_tables(), cfg)
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match="in-backward optimiser.*gradient_sync='ddp'.*use gradient_sync='hook'"):
        shard_local(module, gradient_sync="ddp")
    apply_optimizer_in_backward(torch.optim.Adagrad, module.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match="carries 2 in-backward optimisers"):
        shard_local(module)
    # TorchRec's placeholders (they configure the fused kernels of sharded tables) cannot train it
    from torchrec.optim import optimizers as trec_optim

    for cls in (trec_optim.SGD, trec_optim.Adagrad):
        module = RobeEmbeddingBagCollection(robe_tables(), cfg)
        apply_optimizer_in_backward(cls, module.parameters(), {"lr": 0.1})
        with pytest.raises(ValueError, match=rf"optimiser torchrec.optim.optimizers.{cls.__name__}.*cannot train it.*"
                                             r"NotImplementedError.*torch.optim"):
            plan(module, world_size=1)
        with pytest.raises(ValueError, match=rf"{cls.__name__}.*cannot train it"):
            shard_local(module)
    module = RobeEmbeddingBagCollection(robe_tables(), cfg)
    apply_optimizer_in_backward(torch.optim.Adam, module.parameters(), {"lr": 0.1, "amsgrad": True})
    with pytest.raises(ValueError, match="keeps 3 array-sized states"):
        plan(module, world_size=1)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_in_backward_optimiser_of_the_array_steps_it_as_the_dense_optimiser_would(optimizer):
    # apply_optimizer_in_backward over the embeddings, as TorchRec's DLRM example does it: the
    # sharded array then steps inside each backward (fused into the kernels for SGD and Adagrad)
    # with that optimiser, which DMP's fused_optimizer holds; the dense optimiser leaves it alone
    cls, kwargs = {"sgd": (torch.optim.SGD, {"lr": 0.5}), "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
                   "adam": (torch.optim.Adam, {"lr": 0.01})}[optimizer]
    cfg = RobeConfig(array_size=M, block_size=32)
    torch.manual_seed(0)
    module = RobeEmbeddingBagCollection(robe_tables(), cfg)
    reference = shard_local(copy.deepcopy(module))
    reference_opt = cls([reference.array], **kwargs)
    apply_optimizer_in_backward(cls, module.parameters(), dict(kwargs))
    sharded = shard_local(module)
    assert sharded.fused_optimizer_kind == {"sgd": "sgd", "adagrad": "adagrad", "adam": None}[optimizer]
    assert list(sharded.fused_optimizer.params) == ["array"]
    assert [n for n, _ in in_backward_optimizer_filter(sharded.named_parameters())] == []
    for step in range(4):
        features = kjt(batch=8, seed=step)
        for m in (sharded, reference):
            if step == 2:  # gradient accumulation: one backward under no_sync(), then a synced one
                with m.no_sync():
                    m(features).wait().values().square().sum().backward()
                with torch.no_grad():  # (an evaluation in between changes nothing)
                    m(features).wait()
            m(features).wait().values().square().sum().backward()
        assert sharded.array.grad is None  # stepped in the backward, nothing left for optimizer.step()
        reference_opt.step()
        reference_opt.zero_grad()
        # the kernels' fused SGD sums a slot's contributions in another order; the others are exact
        tol = 1e-6 if optimizer == "sgd" else 0.0
        torch.testing.assert_close(sharded.array, reference.array, rtol=0, atol=tol)
    assert not torch.equal(sharded.array, module.array.new_zeros(()).expand_as(sharded.array))
    state = sharded.fused_optimizer.state_dict()["state"]
    if optimizer != "sgd":
        assert set(state) == {"array"}
        torch.testing.assert_close(next(iter(state["array"].values())), next(iter(reference_opt.state[reference.array].values())))
    # saved and loaded as TorchRec's fused optimisers are: a resumed copy takes the same next step
    saved = copy.deepcopy((sharded.state_dict(), CombinedOptimizer([("ebc", sharded.fused_optimizer)]).state_dict()))
    resumed_module = RobeEmbeddingBagCollection(robe_tables(), cfg)
    apply_optimizer_in_backward(cls, resumed_module.parameters(), dict(kwargs))
    resumed = shard_local(resumed_module)
    resumed.load_state_dict(saved[0])
    combined = CombinedOptimizer([("ebc", resumed.fused_optimizer)])
    combined.init_state()  # (TorchRec's KeyedOptimizer loads into a state that exists: Adam's is made at its first step)
    combined.load_state_dict(saved[1])
    for m in (sharded, resumed):
        m(kjt(batch=8, seed=9)).wait().values().square().sum().backward()
    assert torch.equal(sharded.array, resumed.array)
    # a copy steps its own array as the original steps its
    copied = copy.deepcopy(sharded)
    assert [n for n, _ in in_backward_optimizer_filter(copied.named_parameters())] == []
    for m in (sharded, copied):
        m(kjt(batch=8, seed=10)).wait().values().square().sum().backward()
    assert copied.array.grad is None and torch.equal(sharded.array, copied.array)
    # the caller's array, replaced when sharding, is not kept alive by apply_optimizer_in_backward's hook
    dropped = RobeEmbeddingBagCollection(robe_tables(), cfg)
    apply_optimizer_in_backward(cls, dropped.parameters(), dict(kwargs))
    original = weakref.ref(dropped.array)
    kept = shard_local(dropped)
    gc.collect()
    assert original() is None and kept.array is dropped.array
    # the planner budgets the array's optimiser state as for TorchRec's in-backward tables
    planned = RobeEmbeddingBagCollectionSharder().shardable_parameters(module)["array"]
    assert planned._optimizer_classes == [{"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
                                           "adam": torch.optim.Adam}[optimizer]]


def test_load_state_dict_assign_relinks_the_lookup():
    cfg = RobeConfig(array_size=M, block_size=32)
    torch.manual_seed(0)
    sharded = shard_local(RobeEmbeddingBagCollection(robe_tables(), cfg))
    torch.manual_seed(1)
    other = RobeEmbeddingBagCollection(robe_tables(), cfg)
    features = kjt()
    assert not torch.equal(sharded(features).wait().values(), other(features).values())
    sharded.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    assert torch.equal(sharded(features).wait().values(), other(features).values())


# ------------------------------------------------------------------------------ fused update, world size 1
def _train(sharded, opt, steps=3, lrs=(0.1, 0.05, 0.2)):
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[step]  # a schedule: the fused update must follow it
        opt.zero_grad(set_to_none=True)
        sharded(kjt(batch=8, seed=step)).wait().values().pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adagrad])
def test_fused_optimizer_takes_the_optimizers_steps(opt_cls):
    cfg = RobeConfig(array_size=M, block_size=32)
    dense = shard_local(RobeEmbeddingBagCollection(robe_tables(), cfg))
    fused = shard_local(copy.deepcopy(dense.robe_module))
    initial = dense.array.detach().clone()
    dense_opt, fused_opt = opt_cls([dense.array], lr=0.1), opt_cls([fused.array], lr=0.1)
    fused.fuse_optimizer(fused_opt)
    assert fused.fused_optimizer_kind == ("sgd" if opt_cls is torch.optim.SGD else "adagrad")
    _train(dense, dense_opt)
    _train(fused, fused_opt)
    assert fused.array.grad is None  # never materialised
    assert (fused.array != initial).sum() > 1000  # trained
    if opt_cls is torch.optim.Adagrad:
        # Adagrad on CPU: the optimiser's own arithmetic on the same gradient, bit for bit, state included
        assert torch.equal(fused.array, dense.array)
        for key in ("sum", "step"):
            assert torch.equal(fused_opt.state[fused.array][key], dense_opt.state[dense.array][key])
    else:  # SGD adds a slot's contributions one by one
        torch.testing.assert_close(fused.array, dense.array, rtol=1e-5, atol=1e-10)
    assert list(fused_opt.state_dict()["state"]) == list(dense_opt.state_dict()["state"])
    # evaluation (no grad) does not update; unfusing goes back to a dense gradient
    before = fused.array.detach().clone()
    with torch.no_grad():
        fused(kjt(batch=8, seed=9)).wait()
    assert torch.equal(fused.array, before)
    fused.unfuse_optimizer()
    fused(kjt(batch=8, seed=9)).wait().values().sum().backward()
    assert fused.array.grad is not None and torch.equal(fused.array, before)


def test_fused_optimizer_refusals_name_the_setting():
    cfg = RobeConfig(array_size=M, block_size=32)
    sharded = shard_local(RobeEmbeddingBagCollection(robe_tables(), cfg))
    for opt, match in [
        (torch.optim.SGD([sharded.array], lr=0.1, momentum=0.9), "momentum=0.9"),
        (torch.optim.Adagrad([sharded.array], lr=0.1, weight_decay=1e-4), "weight_decay=0.0001"),
        (torch.optim.Adam([sharded.array], lr=0.1), "Adam cannot be fused"),
        (torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), "does not hold the ROBE array"),
    ]:
        with pytest.raises(ValueError, match=match):
            sharded.fuse_optimizer(opt)
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer holding the ROBE array, got str"):
        sharded.fuse_optimizer("sgd")
    ddp = shard_local(RobeEmbeddingBagCollection(robe_tables(), cfg), gradient_sync="ddp")
    with pytest.raises(ValueError, match="gradient_sync='ddp'"):
        ddp.fuse_optimizer(torch.optim.SGD([ddp.array], lr=0.1))
