"""ROBE in torchrec.models.dlrm.DLRM under TrainPipelineSparseDist (and the trained model under
EvalPipelineSparseDist), alone and beside table-wise tables."""

from __future__ import annotations

import copy
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.train_pipelines import EvalPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_dist import RobeConfig, RobeEmbeddingBagCollection
from robe_dist.distributed import RobeEmbeddingBagCollectionSharder, ShardedRobeEmbeddingBagCollection
from robe_dist.modules.hybrid import RobeHybridEmbeddingBagCollection

pytestmark = pytest.mark.integration

DIM, DENSE_IN, B = 16, 4, 16
TABLES = [
    EmbeddingBagConfig(name="big0", embedding_dim=DIM, num_embeddings=10**8, feature_names=["b0"]),
    EmbeddingBagConfig(name="small0", embedding_dim=DIM, num_embeddings=100, feature_names=["s0"]),
    EmbeddingBagConfig(name="big1", embedding_dim=DIM, num_embeddings=10**8, feature_names=["b1"]),
    EmbeddingBagConfig(name="small1", embedding_dim=DIM, num_embeddings=100, feature_names=["s1"]),
]
KEYS = ["b0", "s0", "b1", "s1"]


def make_dlrm(kind: str, seed: int = 0) -> DLRMTrain:
    torch.manual_seed(seed)
    robe = RobeConfig(array_size=1 << 13, block_size=16)
    if kind == "robe_alone":
        ebc = RobeEmbeddingBagCollection(TABLES, robe)
    elif kind == "hybrid":  # the two big tables in the ROBE array, the small ones as full (table-wise) tables
        ebc = RobeHybridEmbeddingBagCollection(TABLES, robe, max_full_rows=1000)
    else:  # "hybrid_hot": and exact rows for some ids of the big tables (child "hot", sharded by TorchRec)
        ebc = RobeHybridEmbeddingBagCollection(TABLES, robe, max_full_rows=1000, hot_ids={"big0": range(0, 100, 3), "big1": [7, 50]})
    return DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE_IN,
                          dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1]))


def make_batch(step: int, rank: int, variable: bool = False) -> Batch:
    """A batch of ``B`` samples; ``variable``: as a VBE KeyedJaggedTensor, key ``k`` with
    ``1 + (k + step) % B`` bags and ``inverse_indices`` that give each sample one of them."""
    g = torch.Generator().manual_seed(100 * step + rank)
    strides = [1 + (k + step) % B if variable else B for k in range(len(KEYS))]
    lengths = torch.randint(0, 4, (sum(strides),), generator=g)
    values = torch.randint(0, 100, (int(lengths.sum()),), generator=g)
    if variable:
        inverse = torch.stack([torch.randint(0, s, (B,), generator=g) for s in strides])
        kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, stride_per_key_per_rank=[[s] for s in strides],
                                inverse_indices=(KEYS, inverse))  # fmt: skip
    else:
        kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths)
    return Batch(dense_features=torch.rand(B, DENSE_IN, generator=g), sparse_features=kjt,
                 labels=torch.randint(0, 2, (B,), generator=g).float())


def wrap(model: DLRMTrain, plan, sharders, table_optimizer=torch.optim.Adagrad,
         whole_sparse_arch: bool = False) -> DistributedModelParallel:
    """``whole_sparse_arch``: the in-backward optimiser over every parameter of the sparse arch, the
    ROBE array's included, as TorchRec's DLRM example applies it."""
    initial = copy.deepcopy(model.state_dict())
    if whole_sparse_arch:
        apply_optimizer_in_backward(table_optimizer, model.model.sparse_arch.parameters(), {"lr": 0.05})
    for m in model.modules():
        if type(m).__name__ == "EmbeddingBagCollection" and not whole_sparse_arch:
            apply_optimizer_in_backward(table_optimizer, m.parameters(), {"lr": 0.05})
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
    dmp.load_state_dict(initial)  # same start for both copies (TorchRec re-initialises CPU tables)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def find_sharded_robe(dmp) -> ShardedRobeEmbeddingBagCollection:
    (m,) = [m for m in dmp.module.modules() if isinstance(m, ShardedRobeEmbeddingBagCollection)]
    return m


def _rank_pipeline(rank: int, world_size: int, kind: str, gradient_sync: str, steps: int, variable: bool = False) -> Dict:
    gradient_sync, _, in_backward = gradient_sync.partition("+")
    sharders = [RobeEmbeddingBagCollectionSharder(gradient_sync=gradient_sync), EmbeddingBagCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu")).collective_plan(
        make_dlrm(kind), sharders, dist.GroupMember.WORLD)
    batches = [make_batch(step, rank, variable) for step in range(steps)]
    # (FBGEMM's TBE takes variable batches with SGD or row-wise Adagrad, not with full Adagrad)
    table_optimizer = torch.optim.SGD if variable else torch.optim.Adagrad

    piped, piped_opt = wrap(make_dlrm(kind), plan, sharders, table_optimizer, bool(in_backward))
    pipeline = TrainPipelineSparseDist(piped, piped_opt, device=torch.device("cpu"), pipeline_postproc=True)
    it = iter(batches)
    piped_losses: List[float] = []
    while True:
        try:
            loss, _, _ = pipeline.progress(it)[0], None, None
        except StopIteration:
            break
        piped_losses.append(float(loss))
    pipelined_names = [m.forward.name for m in pipeline._pipelined_modules]
    postprocs = sorted(m.fqn for m in pipeline._pipelined_postprocs)

    loop, loop_opt = wrap(make_dlrm(kind), plan, sharders, table_optimizer, bool(in_backward))
    loop_losses = []
    for batch in batches:
        loss, _ = loop(batch)
        loop_opt.zero_grad()
        loss.backward()
        loop_opt.step()
        loop_losses.append(float(loss.detach()))

    a_piped, a_loop = find_sharded_robe(piped).array.detach(), find_sharded_robe(loop).array.detach()
    other = [torch.empty_like(a_piped) for _ in range(world_size)]
    dist.all_gather(other, a_piped)

    # the trained model scored by TorchRec's evaluation pipeline (input dist a batch ahead) and by
    # plain forward calls: the same logits
    loop.eval()
    with torch.no_grad():
        plain_logits = [loop(batch)[1][1] for batch in batches]
        evaluation = EvalPipelineSparseDist(loop, loop_opt, device=torch.device("cpu"), pipeline_postproc=True)
        it, eval_logits = iter(batches), []
        while True:
            try:
                eval_logits.append(evaluation.progress(it)[1])
            except StopIteration:
                break
    return {
        "plan": {path: {k: v.sharding_type for k, v in p.items()} for path, p in plan.plan.items()},
        "pipelined": pipelined_names,
        "postprocs": postprocs,
        "piped_losses": piped_losses,
        "loop_losses": loop_losses,
        "piped_vs_loop": (a_piped - a_loop).abs().max().item(),
        "replica_diff": (other[0] - other[1]).abs().max().item(),
        "array_in_fused_optimizer": [k for k in loop.fused_optimizer.params if k.endswith(".array")],
        "eval_pipelined": [m.forward.name for m in evaluation._pipelined_modules],
        "eval_equal": len(eval_logits) == len(plain_logits) and all(map(torch.equal, eval_logits, plain_logits)),
    }


@pytest.mark.parametrize("kind,gradient_sync,variable", [
    ("robe_alone", "hook", False), ("hybrid", "hook", False), ("hybrid", "ddp", False), ("hybrid_hot", "hook", False),
    # apply_optimizer_in_backward over the whole sparse arch (TorchRec's DLRM example): the array too
    ("hybrid", "hook+in_backward", False),
    # a variable batch per feature (VBE inputs); not "hybrid_hot": its tiny exact tables are planned
    # data-parallel, and TorchRec's data-parallel EBC fails on VBE inputs (torchrec 1.8.0)
    ("robe_alone", "hook", True), ("hybrid", "hook", True),
])  # fmt: skip
def test_train_pipeline_sparse_dist_matches_plain_loop(pg2, kind, gradient_sync, variable):
    steps = 6
    for r in pg2.run(_rank_pipeline, kind=kind, gradient_sync=gradient_sync, steps=steps, variable=variable):
        robe_path = ("model.sparse_arch.embedding_bag_collection" if kind == "robe_alone"
                     else "model.sparse_arch.embedding_bag_collection.robe")
        assert r["plan"][robe_path] == {"array": "data_parallel"}
        if kind != "robe_alone":
            full = r["plan"]["model.sparse_arch.embedding_bag_collection.full"]
            assert set(full) == {"small0", "small1"} and set(full.values()) == {"table_wise"}
            assert "model.sparse_arch.embedding_bag_collection.full" in r["pipelined"]
        if kind == "hybrid_hot":  # the exact tables are TorchRec's to shard
            assert set(r["plan"]["model.sparse_arch.embedding_bag_collection.hot"]) == {"big0@hot", "big1@hot"}
            # the router runs a batch ahead as a postproc module, so the children it feeds are pipelined too
            assert "model.sparse_arch.embedding_bag_collection.hot" in r["pipelined"]
            assert r["postprocs"] == ["model.sparse_arch.embedding_bag_collection.hot_router"]
        assert robe_path in r["pipelined"]  # the pipeline runs the ROBE module's input_dist ahead
        assert len(r["piped_losses"]) == steps
        # same operations in the same order: the pipelined run equals the plain loop exactly
        assert r["piped_losses"] == r["loop_losses"]
        assert r["piped_vs_loop"] == 0.0
        assert r["replica_diff"] == 0.0
        assert r["array_in_fused_optimizer"] == ([robe_path + ".array"] if gradient_sync.endswith("in_backward") else [])
        assert robe_path in r["eval_pipelined"] and r["eval_equal"]  # TorchRec's EvalPipelineSparseDist too


def _rank_uneven_evaluation(rank: int, world_size: int) -> Dict:
    """robe-train's evaluate() when one rank runs out of batches first: that rank repeats its last
    batch so that the sharded tables' collectives stay in step, and the repeats are left out of the
    metrics (the split of the real batches decides them)."""
    from torchmetrics.classification import BinaryAUROC

    from robe_dist.trainer.env import DistEnv
    from robe_dist.trainer.evaluate import evaluate

    sharders = [RobeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu")).collective_plan(
        make_dlrm("hybrid"), sharders, dist.GroupMember.WORLD)
    dmp, opt = wrap(make_dlrm("hybrid"), plan, sharders)
    batches = [make_batch(step, rank) for step in range(3 - rank)]  # rank 0: 3 batches, rank 1: 2
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    # (the trainer's pipeline, which evaluates with the model in eval mode)
    pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), execute_all_batches=True, pipeline_postproc=True)
    result = evaluate(pipeline, dmp, batches, env)
    pipeline.detach()
    dmp.eval()
    mine = []
    with torch.no_grad():  # the real batches' scores, by plain forward calls in step (rank 1 repeats its last)
        for i in range(3):
            scores = dmp(batches[min(i, len(batches) - 1)])[1][1]
            if i < len(batches):
                mine.append((scores, batches[i].labels))
    everyone: List = [None] * world_size
    dist.all_gather_object(everyone, mine)
    logits = torch.cat([l for rank_scores in everyone for l, _ in rank_scores])
    labels = torch.cat([y for rank_scores in everyone for _, y in rank_scores])
    return {"result": result, "samples": labels.numel(),
            "auc": float(BinaryAUROC()(torch.sigmoid(logits), labels.long()))}


def test_evaluation_leaves_a_ranks_repeated_batches_out_of_the_metrics(pg2):
    r0, r1 = pg2.run(_rank_uneven_evaluation)
    assert r0["result"] == r1["result"]
    assert r0["result"]["eval_samples"] == r0["samples"] == 5 * B
    assert abs(r0["result"]["auc"] - r0["auc"]) < 1e-6
