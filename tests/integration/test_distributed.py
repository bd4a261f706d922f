"""ROBE under TorchRec's planner and DistributedModelParallel, on 2 gloo ranks (CPU).

Every ``_rank_*`` function runs on both ranks of the session's process-group pool (conftest
``pg2``) and returns plain Python data that the test asserts on.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_dist import RobeConfig, RobeEmbeddingBagCollection
from robe_dist.distributed import (
    RobeEmbeddingBagCollectionSharder,
    RobeShardingPlanner,
    get_default_sharders,
)

pytestmark = pytest.mark.integration

DIM = 32
ARRAY = 1 << 14
N_ROBE, N_FULL = 3, 2
ROBE_FEATURES = [f"rf{i}" for i in range(N_ROBE)]
FULL_FEATURES = [f"f{i}" for i in range(N_FULL)]
FEATURES = ROBE_FEATURES + FULL_FEATURES
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.5}), "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
              "adam": (torch.optim.Adam, {"lr": 0.01})}
# fused (in-backward) optimisers of the TorchRec-sharded tables: FBGEMM's CPU kernels have no Adam
TABLE_OPTIMIZERS = {"sgd": OPTIMIZERS["sgd"], "adagrad": OPTIMIZERS["adagrad"], "adam": OPTIMIZERS["adagrad"]}


# ---------------------------------------------------------------------------------------------
# models and data shared by the rank functions
def robe_tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"r{i}", embedding_dim=DIM, num_embeddings=10**9, feature_names=[f])
            for i, f in enumerate(ROBE_FEATURES)]


def full_tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=200, feature_names=[f])
            for i, f in enumerate(FULL_FEATURES)]


class MixedModel(nn.Module):
    """A ROBE collection (3 tables) + an EmbeddingBagCollection (2 tables) + a linear head."""

    def __init__(self, seed: int = 0, with_full: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.robe = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=ARRAY, block_size=16))
        self.ebc = EmbeddingBagCollection(full_tables()) if with_full else None
        width = DIM * (N_ROBE + (N_FULL if with_full else 0))
        self.head = nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, 1))  # smooth: no ReLU kinks to amplify float noise

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        parts = [self.robe(kjt).values()]
        if self.ebc is not None:
            parts.append(self.ebc(kjt).values())
        return self.head(torch.cat(parts, dim=1)).squeeze(1)


def global_batch(step: int, batch_size: int) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
    """lengths [F, B], per-feature values, labels [B] of a global batch (same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(0, 4, (len(FEATURES), batch_size), generator=g)
    values = [torch.randint(0, 200, (int(lengths[f].sum()),), generator=g) for f in range(len(FEATURES))]
    labels = torch.randint(0, 2, (batch_size,), generator=g).float()
    return lengths, values, labels


def batch_slice(step: int, batch_size: int, lo: int, hi: int) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
    """Samples ``[lo, hi)`` of global batch ``step`` as (KeyedJaggedTensor, labels)."""
    lengths, values, labels = global_batch(step, batch_size)
    vals, lens = [], []
    for f in range(len(FEATURES)):
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths[f].cumsum(0)])
        vals.append(values[f][offsets[lo]:offsets[hi]])
        lens.append(lengths[f, lo:hi])
    return KeyedJaggedTensor(keys=FEATURES, values=torch.cat(vals), lengths=torch.cat(lens)), labels[lo:hi]


def local_batch(step: int, global_size: int, rank: int, world_size: int) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
    per = global_size // world_size
    return batch_slice(step, global_size, rank * per, (rank + 1) * per)


def plan_and_wrap(model: nn.Module, world_size: int, pg=None, robe_sharder=None, table_optimizer=None,
                  load_initial: bool = True, compression: Optional[str] = None):
    """Plans with TorchRec's planner (ROBE + TorchRec sharders) and wraps with DMP; the wrapped
    model starts from ``model``'s weights (TorchRec re-initialises CPU tables when sharding)."""
    initial = copy.deepcopy(model.state_dict())
    if table_optimizer is not None and getattr(model, "ebc", None) is not None:
        cls, kwargs = table_optimizer
        apply_optimizer_in_backward(cls, model.ebc.parameters(), dict(kwargs))
    sharders = [robe_sharder or RobeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    pg = pg or dist.GroupMember.WORLD
    topology = Topology(world_size=world_size, compute_device="cpu")
    # the options the planner chooses from, with its storage estimates (same estimator, every rank)
    options = EmbeddingEnumerator(topology=topology, batch_size=BATCH_SIZE).enumerate(model, sharders)
    plan = EmbeddingShardingPlanner(topology=topology).collective_plan(model, sharders, pg)
    wrapper = DefaultDataParallelWrapper(allreduce_comm_precision=compression)  # DDP comm hook when set
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), plan=plan, sharders=sharders,
                                   data_parallel_wrapper=wrapper)
    if load_initial:
        dmp.load_state_dict(initial)
    return dmp, plan, options


def make_optimizer(dmp: DistributedModelParallel, dense: Tuple[type, Dict]) -> CombinedOptimizer:
    cls, kwargs = dense
    dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda params: cls(params, **dict(kwargs)))
    return CombinedOptimizer([dmp.fused_optimizer, dense_opt])


def gather(t: torch.Tensor) -> List[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


# ---------------------------------------------------------------------------------------------
# rank functions
def _rank_replicas(rank: int, world_size: int, gradient_sync: str, optimizer: str, steps: int,
                   compression: Optional[str] = None) -> Dict:
    model = MixedModel(seed=rank)  # every rank initialises differently: the wrap must broadcast rank 0's array
    before = model.robe.array.detach().clone()
    opt_cls, opt_kwargs = OPTIMIZERS[optimizer]
    sharder = RobeEmbeddingBagCollectionSharder(optimizer_class=opt_cls, optimizer_kwargs=opt_kwargs,
                                                gradient_sync=gradient_sync)
    dmp, plan, options = plan_and_wrap(model, world_size, robe_sharder=sharder,
                                        table_optimizer=TABLE_OPTIMIZERS[optimizer], load_initial=False,
                                        compression=compression)
    sharded = dmp.module.robe
    opt = make_optimizer(dmp, OPTIMIZERS[optimizer])
    in_dense = [k for k in opt.params if k.endswith("robe.array")]
    in_fused = [k for k in dmp.fused_optimizer.params if "robe" in k]
    after_wrap = [t.clone() for t in gather(sharded.array.detach())]
    losses = []
    for step in range(steps):
        kjt, labels = local_batch(step, 32, rank, world_size)
        loss = nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    arrays = gather(sharded.array.detach())
    heads = gather(torch.cat([p.detach().flatten() for p in dmp.module.head.parameters()]))
    # memory: what the planner charged each rank for the array vs what this process holds for it
    robe_option = [so for so in options if so.path == "robe"][0]
    io = _planner_io_bytes(robe_option)
    array_param = sharded.array
    state = opt.state[array_param] if array_param in opt.state else {}
    state_bytes = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return {
        "plan_robe": {k: (v.sharding_type, v.compute_kernel, v.ranks) for k, v in plan.plan["robe"].items()},
        "plan_ebc": {k: (v.sharding_type, v.compute_kernel) for k, v in plan.plan["ebc"].items()},
        "inits_differed": not torch.equal(before, gather(before)[1 - rank]),
        "wrap_identical": torch.equal(after_wrap[0], after_wrap[1]),
        "wrap_is_rank0": torch.equal(after_wrap[rank], after_wrap[0]),
        "array_max_diff": (arrays[0] - arrays[1]).abs().max().item(),
        "array_moved": not torch.equal(arrays[0], after_wrap[0]),
        "head_max_diff": (heads[0] - heads[1]).abs().max().item(),
        "losses_finite": all(l == l for l in losses),
        "array_in_dense_optimizer": in_dense,
        "robe_in_fused_optimizer": in_fused,
        "in_backward_attr": hasattr(array_param, "_in_backward_optimizers"),
        "planner_storage": [s.storage.ddr for s in robe_option.shards],
        "planner_io": io,
        "held_bytes": array_param.numel() * array_param.element_size() + state_bytes,
        "sharded_type": type(sharded).__name__,
    }


def _planner_io_bytes(option) -> int:
    """Input + output buffer bytes TorchRec's storage estimator adds to a data-parallel shard on CPU."""
    import math
    pf, bs = option.input_lengths, [option.batch_size] * len(option.input_lengths)
    inputs = sum(p * b for p, b in zip(pf, bs))
    outputs = sum(min(1.0, p) * b for p, b in zip(pf, bs))
    return math.ceil(inputs * 8) + math.ceil(outputs * option.tensor.shape[1] * option.tensor.element_size())


@pytest.mark.parametrize(
    "gradient_sync,optimizer",
    [("hook", "sgd"), ("hook", "adagrad"), ("hook", "adam"), ("ddp", "sgd"), ("ddp", "adagrad"), ("ddp", "adam"),
     ("ddp+fp16", "adagrad"), ("ddp+fp16", "sgd")],  # bf16_compress_hook needs NCCL (CUDA)
)
def test_replicas_stay_bit_identical_and_planner_budget_matches(pg2, gradient_sync, optimizer):
    # "ddp+fp16": the array in DDP's buckets with PyTorch's fp16_compress_hook (half the bytes)
    gradient_sync, _, compression = gradient_sync.partition("+")
    r0, r1 = pg2.run(_rank_replicas, gradient_sync=gradient_sync, optimizer=optimizer, steps=50,
                     compression=compression or None)
    for r in (r0, r1):
        assert r["sharded_type"] == "ShardedRobeEmbeddingBagCollection"
        assert r["plan_robe"] == {"array": ("data_parallel", "dense", [0, 1])}
        assert set(r["plan_ebc"]) == {"t0", "t1"}
        assert all(st == "table_wise" for st, _ in r["plan_ebc"].values())
        assert r["inits_differed"] and r["wrap_identical"] and r["wrap_is_rank0"]
        assert r["array_moved"] and r["losses_finite"]
        assert r["array_max_diff"] == 0.0  # exact: same averaged gradient, same update, every rank
        assert r["head_max_diff"] == 0.0
        assert r["array_in_dense_optimizer"] == ["robe.array"]
        assert r["robe_in_fused_optimizer"] == [] and not r["in_backward_attr"]
        # the planner charged (array + optimiser state) + its io estimate, and that is what we hold
        assert r["planner_storage"][0] == r["planner_storage"][1]
        assert r["planner_storage"][0] - r["planner_io"] == r["held_bytes"]
    slots = {"sgd": 0, "adagrad": 1, "adam": 2}[optimizer]
    assert r0["held_bytes"] == ARRAY * 4 * (1 + slots)


def _rank_one_vs_two(rank: int, world_size: int, steps: int, batch_size: int) -> Dict:
    lr = 0.3
    # two processes, each half of every global batch
    dmp2, _, _ = plan_and_wrap(MixedModel(seed=7), world_size, table_optimizer=(torch.optim.SGD, {"lr": lr}))
    opt2 = make_optimizer(dmp2, (torch.optim.SGD, {"lr": lr}))
    # one process (rank 0, in a process group of its own), the whole global batch
    solo = dist.new_group(ranks=[0])
    if rank == 0:
        dmp1, _, _ = plan_and_wrap(MixedModel(seed=7), 1, pg=solo, table_optimizer=(torch.optim.SGD, {"lr": lr}))
        opt1 = make_optimizer(dmp1, (torch.optim.SGD, {"lr": lr}))
    for step in range(steps):
        kjt, labels = local_batch(step, batch_size, rank, world_size)
        loss = nn.functional.binary_cross_entropy_with_logits(dmp2(kjt), labels)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        if rank == 0:
            kjt, labels = batch_slice(step, batch_size, 0, batch_size)
            loss = nn.functional.binary_cross_entropy_with_logits(dmp1(kjt), labels)
            opt1.zero_grad()
            loss.backward()
            opt1.step()
    kjt, _ = local_batch(999, batch_size, rank, world_size)
    with torch.no_grad():
        out2 = torch.cat(gather(dmp2(kjt)))
    result = {}
    if rank == 0:
        kjt, _ = batch_slice(999, batch_size, 0, batch_size)
        with torch.no_grad():
            out1 = dmp1(kjt)
        result = {
            "array_diff": (dmp1.module.robe.array - dmp2.module.robe.array).abs().max().item(),
            "array_change": (dmp2.module.robe.array - MixedModel(seed=7).robe.array).abs().max().item(),
            "out_diff": (out1 - out2).abs().max().item(),
            "out_scale": out1.abs().max().item(),
        }
    dist.barrier()
    return result


def test_one_process_equals_two_processes_on_the_same_global_batch(pg2):
    r0, _ = pg2.run(_rank_one_vs_two, steps=10, batch_size=32)
    assert r0["array_change"] > 1e-3  # training moved the array
    assert r0["array_diff"] < 1e-6
    assert r0["out_diff"] < 1e-5 * max(1.0, r0["out_scale"])


def _rank_default_sharders_and_refusals(rank: int, world_size: int) -> Dict:
    model = MixedModel(seed=0)
    sharders = get_default_sharders()
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu")).collective_plan(
        model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
    kjt, _ = local_batch(0, 8, rank, world_size)
    out = dmp(kjt)
    # a rank built with another RobeConfig is refused when the module is sharded, on every rank
    bad = MixedModel(seed=0)
    if rank == 1:
        bad.robe = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=ARRAY, block_size=16, seed=5))
    try:
        DistributedModelParallel(bad, plan=plan, sharders=sharders)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    return {"types": type(dmp.module.robe).__name__, "out_shape": list(out.shape), "refused": refused}


def test_default_sharders_and_config_mismatch_between_ranks(pg2):
    for r in pg2.run(_rank_default_sharders_and_refusals):
        assert r["types"] == "ShardedRobeEmbeddingBagCollection"
        assert r["out_shape"] == [4]
        assert "another configuration" in r["refused"] and "seed=5" in r["refused"]


def _rank_no_sync(rank: int, world_size: int) -> Dict:
    """Gradient accumulation in "hook" mode: a backward inside ``no_sync()`` keeps the local gradient
    (no all-reduce), the next one outside averages what was accumulated."""
    bce = nn.functional.binary_cross_entropy_with_logits
    batches = [local_batch(step, 16, rank, world_size) for step in range(2)]
    grads = {}
    for accumulate in (True, False):
        dmp, _, _ = plan_and_wrap(MixedModel(seed=0, with_full=False), world_size)
        sharded = dmp.module.robe
        (kjt, y), (kjt2, y2) = batches
        with sharded.no_sync() if accumulate else contextlib.nullcontext():
            bce(dmp(kjt), y).backward()
        if accumulate:
            grads["local"] = gather(sharded.array.grad)
            grads["bytes_inside"] = sharded.allreduce_bytes
        bce(dmp(kjt2), y2).backward()
        grads["accumulated" if accumulate else "synced"] = gather(sharded.array.grad)
        grads["bytes_after" if accumulate else "bytes_synced"] = sharded.allreduce_bytes
    return grads


def test_no_sync_accumulates_the_local_gradient_then_averages_it(pg2):
    r, _ = pg2.run(_rank_no_sync)
    assert r["bytes_inside"] == 0 and r["bytes_after"] == ARRAY * 4 and r["bytes_synced"] == 2 * ARRAY * 4
    assert not torch.allclose(r["local"][0], r["local"][1])  # each rank kept its own
    assert torch.equal(r["accumulated"][0], r["accumulated"][1])
    # averaging once the sum of two steps equals averaging each step (the gradient is linear)
    torch.testing.assert_close(r["accumulated"][0], r["synced"][0], rtol=1e-5, atol=1e-7)


def _rank_in_backward(rank: int, world_size: int, optimizer: str, steps: int) -> Dict:
    """TorchRec's DLRM example: ``apply_optimizer_in_backward`` over every embedding parameter,
    the array's included; against the same model whose array the dense optimiser trains."""
    cls, kwargs = OPTIMIZERS[optimizer]
    runs = {}
    for in_backward in (True, False):
        model = MixedModel(seed=rank)
        if in_backward:
            apply_optimizer_in_backward(cls, model.robe.parameters(), dict(kwargs))
        dmp, _, options = plan_and_wrap(model, world_size, table_optimizer=TABLE_OPTIMIZERS[optimizer], load_initial=False)
        opt = make_optimizer(dmp, OPTIMIZERS[optimizer])
        sharded = dmp.module.robe
        for step in range(steps):
            kjt, labels = local_batch(step, 32, rank, world_size)
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels).backward()
            opt.step()
        robe_option = [so for so in options if so.path == "robe"][0]
        runs[in_backward] = {
            "arrays": gather(sharded.array.detach()),
            "in_dense": [k for k, _ in in_backward_optimizer_filter(dmp.named_parameters()) if k.endswith("robe.array")],
            "in_fused": [k for k in dmp.fused_optimizer.params if "robe" in k],
            "fused_state": sorted(dmp.fused_optimizer.state_dict()["state"].get("robe.array", {})),
            "planned": robe_option.shards[0].storage.ddr - _planner_io_bytes(robe_option),
        }
    return runs


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_in_backward_optimiser_of_the_array_steps_the_averaged_gradient(pg2, optimizer):
    r0, r1 = pg2.run(_rank_in_backward, optimizer=optimizer, steps=8)
    fused, dense = r0[True], r0[False]
    assert fused["arrays"][0].equal(fused["arrays"][1])  # replicas stepped the same averaged gradient
    assert fused["in_dense"] == [] and fused["in_fused"] == ["robe.array"]
    assert dense["in_dense"] == ["robe.array"] and dense["in_fused"] == []
    assert fused["fused_state"] == ({"sgd": [], "adam": ["exp_avg", "exp_avg_sq", "step"]}[optimizer])
    slots = {"sgd": 0, "adam": 2}[optimizer]
    assert fused["planned"] == dense["planned"] + slots * ARRAY * 4  # budgeted as TorchRec budgets its tables'
    moved = (fused["arrays"][0] - MixedModel(seed=0).robe.array).abs().max().item()
    assert moved > 1e-3
    assert torch.equal(fused["arrays"][0], dense["arrays"][0])


class PositionWeighted(nn.Module):
    """TorchRec's position-weighted features around a ROBE collection (per-sample weights learnt)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
        from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

        torch.manual_seed(seed)
        robe = RobeEmbeddingBagCollection(robe_tables(), RobeConfig(array_size=ARRAY, block_size=16), is_weighted=True)
        self.fp = FeatureProcessedEmbeddingBagCollection(robe, PositionWeightedModuleCollection({f: 4 for f in ROBE_FEATURES}))
        with torch.no_grad():  # (TorchRec starts the position weights at 1: give them something to learn)
            for p in self.fp._feature_processors.parameters():
                p.uniform_(0.5, 1.5)
        self.head = nn.Linear(DIM * N_ROBE, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.fp(kjt).values()).squeeze(1)


def _rank_feature_processed(rank: int, world_size: int, steps: int, batch_size: int) -> Dict:
    """FeatureProcessedEmbeddingBagCollection(ROBE) under DMP with get_default_sharders() (TorchRec's
    sharder of it failed on a ROBE collection inside) against the unsharded model on the global batch."""

    def step(model, kjt, labels, opt):
        loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    result: Dict = {}
    reference = PositionWeighted(seed=3)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for sync in ("hook", "ddp"):
        model = PositionWeighted(seed=3)
        sharders = get_default_sharders(gradient_sync=sync)
        plan = RobeShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu")).collective_plan(
            model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
        opt = torch.optim.SGD(dmp.parameters(), lr=0.5)
        for s in range(steps):
            step(dmp, *local_batch(s, batch_size, rank, world_size), opt)
        fp = dmp.module.fp
        array = fp._embedding_bag_collection.array.detach()
        weights = torch.cat([p.detach().flatten() for p in fp._feature_processors.parameters()])
        result[sync] = {"type": type(fp).__name__, "plan": {k: v.sharding_type for k, v in plan.plan["fp"].items()},
                        "array": gather(array), "weights": gather(weights)}
    for s in range(steps):
        step(reference, *batch_slice(s, batch_size, 0, batch_size), ref_opt)
    result["reference"] = {
        "array": reference.fp._embedding_bag_collection.array.detach(),
        "weights": torch.cat([p.detach().flatten() for p in reference.fp._feature_processors.parameters()]),
        "initial_weights": torch.cat([p.detach().flatten() for p in PositionWeighted(seed=3).fp._feature_processors.parameters()]),
    }
    return result


def test_position_weighted_robe_features_shard_and_train_as_unsharded(pg2):
    r0, _ = pg2.run(_rank_feature_processed, steps=4, batch_size=16)
    ref = r0["reference"]
    assert not torch.allclose(ref["weights"], ref["initial_weights"])  # the position weights trained
    for sync in ("hook", "ddp"):
        r = r0[sync]
        assert r["type"] == "ShardedFeatureProcessedRobeEmbeddingBagCollection"
        assert r["plan"] == {"array": "data_parallel"}
        for name in ("array", "weights"):
            assert torch.equal(r[name][0], r[name][1]), (sync, name)  # replicas identical
            assert torch.allclose(r[name][0], ref[name], atol=1e-6, rtol=1e-5), (sync, name)


def _rank_share_failure(rank: int, world_size: int) -> Dict:
    from robe_dist.trainer.env import DistEnv, share_failure

    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    ran = []

    def fail_on(ranks):
        def fn():
            ran.append(rank)
            if rank in ranks:
                raise NotADirectoryError(f"disk of rank {rank}")
        return fn

    got = {}
    for name, ranks, main_only in [("none", (), False), ("rank1", (1,), False), ("both", (0, 1), False),
                                   ("main_only", (0,), True)]:
        failure = share_failure(env, fail_on(ranks), (ValueError, OSError), main_only=main_only)
        got[name] = None if failure is None else (failure[0], type(failure[1]).__name__, str(failure[1]))
    return {"got": got, "ran": ran}


def test_a_failure_on_one_rank_is_shared_with_every_rank(pg2):
    """``share_failure`` (the trainer's data, run-dir and checkpoint phases): the lowest failing
    rank's error reaches every rank as the same type and message; ``main_only`` runs on rank 0 only."""
    r0, r1 = pg2.run(_rank_share_failure)
    for r in (r0, r1):
        assert r["got"]["none"] is None
        assert r["got"]["rank1"] == (1, "OSError", "disk of rank 1")  # rebuilt from the first listed type
        assert r["got"]["both"] == (0, "OSError", "disk of rank 0")
        assert r["got"]["main_only"] == (0, "OSError", "disk of rank 0")
    assert r0["ran"] == [0, 0, 0, 0] and r1["ran"] == [1, 1, 1]  # main_only: rank 1 did not run it


def _rank_shared_dir(rank: int, world_size: int, root: str) -> Dict:
    from robe_dist.trainer.checkpoint import CheckpointError, check_shared_dir
    from robe_dist.trainer.env import DistEnv

    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    shared = Path(root) / "shared"
    check_shared_dir(shared, env)  # one directory for both ranks: passes
    local = Path(root) / f"node{rank}"  # as node-local disks: each rank its own directory
    try:
        check_shared_dir(local, env)
        refused = None
    except CheckpointError as e:
        refused = str(e)
    return {"refused": refused, "left": sorted(p.name for p in shared.iterdir())}


def test_a_checkpoint_dir_the_ranks_do_not_share_is_refused_on_every_rank(pg2, tmp_path):
    """A DCP checkpoint is written by every rank into one directory: a checkpoint dir on
    node-local disks (simulated by a different directory per rank) is refused on every rank,
    naming the ranks that cannot see it; a shared one passes and keeps no trace of the check."""
    r0, r1 = pg2.run(_rank_shared_dir, root=str(tmp_path))
    assert r0["left"] == r1["left"] == []
    for r in (r0, r1):
        assert r["refused"] is not None and "is not shared by the ranks: rank 1 cannot see a file rank 0 wrote" in r["refused"]


def variable_batch(step: int, batch_size: int, rank: int) -> Tuple[KeyedJaggedTensor, KeyedJaggedTensor, torch.Tensor]:
    """(a VBE input of ``batch_size`` samples: feature ``f`` with its own number of bags and
    ``inverse_indices`` to expand them, the same input with every bag written out per sample,
    labels)."""
    g = torch.Generator().manual_seed(5000 + 10 * step + rank)
    strides = [1 + (f + step) % batch_size for f in range(len(FEATURES))]
    bags = [[torch.randint(0, 200, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g) for _ in range(s)]
            for s in strides]
    inverse = torch.stack([torch.randint(0, s, (batch_size,), generator=g) for s in strides])
    flat = [b for per in bags for b in per]
    full = [bags[f][int(j)] for f in range(len(FEATURES)) for j in inverse[f]]
    lengths = lambda bag_list: torch.tensor([b.numel() for b in bag_list], dtype=torch.long)  # noqa: E731
    vbe = KeyedJaggedTensor(keys=FEATURES, values=torch.cat(flat), lengths=lengths(flat),
                            stride_per_key_per_rank=[[s] for s in strides], inverse_indices=(FEATURES, inverse))
    expanded = KeyedJaggedTensor(keys=FEATURES, values=torch.cat(full), lengths=lengths(full))
    return vbe, expanded, torch.randint(0, 2, (batch_size,), generator=g).float()


def _rank_variable_batch(rank: int, world_size: int, steps: int) -> Dict:
    sgd = (torch.optim.SGD, {"lr": 0.3})
    models = {}
    for name in ("vbe", "expanded"):
        dmp, _, _ = plan_and_wrap(MixedModel(seed=3), world_size, table_optimizer=sgd)
        models[name] = (dmp, make_optimizer(dmp, sgd))
    outputs = {"vbe": [], "expanded": []}
    for step in range(steps):
        inputs = dict(zip(("vbe", "expanded"), variable_batch(step, 8, rank)))
        labels = variable_batch(step, 8, rank)[2]
        for name, (dmp, opt) in models.items():
            logits = dmp(inputs[name])
            outputs[name].append(logits.detach().clone())
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    (vbe, _), (expanded, _) = models["vbe"], models["expanded"]
    tables = [n for n, p in expanded.named_parameters() if "ebc" in n and p.numel()]  # (this rank's tables)
    return {
        "out_diff": max((a - b).abs().max().item() for a, b in zip(outputs["vbe"], outputs["expanded"])),
        "array_diff": (vbe.module.robe.array - expanded.module.robe.array).abs().max().item(),
        "array_change": (vbe.module.robe.array - MixedModel(seed=3).robe.array).abs().max().item(),
        "tables_diff": max((dict(vbe.named_parameters())[n] - p).abs().max().item()
                           for n, p in expanded.named_parameters() if n in tables) if tables else None,  # fmt: skip
        "tables": tables,
    }


def test_a_variable_batch_per_feature_trains_as_its_expanded_batch(pg2):
    """TorchRec's VBE inputs (``stride_per_key_per_rank``, ``inverse_indices``) through DMP with
    ROBE data-parallel and full tables table-wise: the same steps as the bags written out."""
    for r in pg2.run(_rank_variable_batch, steps=4):
        assert r["array_change"] > 1e-3
        assert r["out_diff"] < 1e-5 and r["array_diff"] < 1e-6
        assert len(r["tables"]) == 1 and r["tables_diff"] < 1e-6  # the rank's table-wise table
