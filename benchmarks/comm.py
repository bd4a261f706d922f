#!/usr/bin/env python
"""Bytes communicated per training step: a replicated ROBE array vs TorchRec-sharded full tables.

The same sparse features (``--features`` tables of ``--dim`` columns, ``--pooling`` ids per bag)
are trained under ``DistributedModelParallel`` on ``--world-size`` gloo ranks (CPU), two ways:

  robe         RobeEmbeddingBagCollection of ``--array-size`` floats, DATA_PARALLEL (replicated,
               robe_dist's sharder): the only traffic is the all-reduce of the array's dense
               gradient, whatever the batch.
  table_wise   EmbeddingBagCollection of full tables (``--rows`` rows each), TABLE_WISE with the
               fused kernel (TorchRec's sharder): all-to-alls of the ids (input dist), of the pooled
               embeddings (forward output dist) and of their gradients (backward).

Measured, not modelled: on every rank every ``torch.distributed`` collective TorchRec and robe_dist
call (``all_to_all_single``, ``all_reduce``, ...) is wrapped to count the bytes this rank sends to
OTHER ranks, and DDP's gradient buckets are counted through a DDP communication hook (with DDP's
default all-reduce behind it). An all-reduce of ``n`` bytes is counted as ring all-reduce traffic,
``2 (W - 1) / W * n`` per rank (what gloo's and NCCL's ring algorithms send); an all-to-all as the
bytes of the splits addressed to the other ranks. Figures are per rank and per step, averaged over
``--steps`` steps after ``--warmup`` steps (set-up collectives excluded).

The byte model the measurements are checked against (per rank, per step, W ranks, local batch b,
F features of dim d, p ids per bag, m array floats)::

    robe        2 (W-1)/W * 4 m                                     (independent of b)
    table_wise  (W-1)/W * b F (8 p + 4 + 2 * 4 d)     ids + lengths, pooled fwd + grad bwd
                + small split/length exchanges

so replication moves fewer bytes than sharding once  b > 8 m / (F (8 p + 4 + 8 d))  (the
crossover local batch; it does not depend on W for W >= 2). ``--sweep`` measures both sides over a
range of batch sizes and prints the measured crossover.

Run::

    python benchmarks/comm.py                                   # defaults, ~1 min on 2 cores
    python benchmarks/comm.py --array-size 1000000 --sweep 64,256,1024,4096
    python benchmarks/comm.py --json /tmp/comm.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ counting
# robe_dist.distributed.comm_counter.CommCounter wraps torch.distributed's collectives on each rank.


def ddp_counting_hook(counter, world_size: int):
    """DDP communication hook: counts each bucket's ring all-reduce bytes, then DDP's default all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        buffer = bucket.buffer()
        counter.add("ddp_all_reduce", 2 * (world_size - 1) / world_size * buffer.numel() * buffer.element_size())
        active, counter.active = counter.active, False  # the default hook calls dist.all_reduce: count once
        try:
            return default_hooks.allreduce_hook(state, bucket)
        finally:
            counter.active = active

    return hook


# ------------------------------------------------------------------------------ one rank
def _tables(features: int, dim: int, rows: int):
    from torchrec import EmbeddingBagConfig

    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
            for i in range(features)]


def _batch(step: int, rank: int, batch: int, features: int, pooling: int, rows: int):
    import torch
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(step * 1000 + rank)
    lengths = torch.full((features * batch,), pooling, dtype=torch.long)
    values = torch.randint(0, rows, (features * batch * pooling,), generator=g)
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(features)], values=values, lengths=lengths)


def _rank_measure(rank: int, world_size: int, variant: str, batch: int, features: int, dim: int, pooling: int,
                  rows: int, array_size: int, steps: int, warmup: int, gradient_sync: str) -> Dict:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torch.nn.parallel import DistributedDataParallel

    from robe_dist import RobeConfig, RobeEmbeddingBagCollection
    from robe_dist.distributed import RobeEmbeddingBagCollectionSharder

    from robe_dist.distributed.comm_counter import CommCounter

    counter = CommCounter._installed or CommCounter().install()  # once per rank process
    counter.active = False

    class Model(nn.Module):
        def __init__(self, ebc: nn.Module) -> None:
            super().__init__()
            self.ebc = ebc

        def forward(self, kjt):
            return self.ebc(kjt).values()

    tables = _tables(features, dim, rows)
    constraints = None
    if variant == "robe":
        model = Model(RobeEmbeddingBagCollection(tables, RobeConfig(array_size=array_size, block_size=min(dim, 32))))
        sharders = [RobeEmbeddingBagCollectionSharder(gradient_sync=gradient_sync)]
    else:
        model = Model(EmbeddingBagCollection(tables))
        apply_optimizer_in_backward(torch.optim.SGD, model.ebc.parameters(), {"lr": 0.01})
        sharders = [EmbeddingBagCollectionSharder()]
        constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for t in tables}
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"),
                                    constraints=constraints).collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
    inner = dmp._dmp_wrapped_module
    if isinstance(inner, DistributedDataParallel):
        inner.register_comm_hook(None, ddp_counting_hook(counter, world_size))
    dense = [p for n, p in dmp.named_parameters() if not hasattr(p, "_in_backward_optimizers")]
    opt = torch.optim.SGD(dense, lr=0.01) if dense else None
    upstream = torch.randn(batch, features * dim, generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            counter.reset()
            counter.active = True
        kjt = _batch(step, rank, batch, features, pooling, rows)
        t0 = time.perf_counter()
        out = dmp(kjt)
        out.backward(upstream)
        if opt is not None:
            opt.step()
            opt.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    counter.active = False
    dist.barrier()
    per_step = {k: v / steps for k, v in counter.bytes.items()}
    calls = {k: v / steps for k, v in counter.calls.items()}
    if "all_reduce_payload" in per_step:  # ring all-reduce: each rank sends 2 (W-1)/W of the tensor
        per_step["all_reduce"] = 2 * (world_size - 1) / world_size * per_step.pop("all_reduce_payload")
        calls["all_reduce"] = calls.pop("all_reduce_payload")
    kinds = {path: {k: v.sharding_type for k, v in p.items()} for path, p in plan.plan.items()}
    return {"bytes": per_step, "calls": calls, "plan": kinds, "step_ms": 1000 * sorted(times)[len(times) // 2]}


# ------------------------------------------------------------------------------ driver
def model_bytes(variant: str, world_size: int, batch: int, features: int, dim: int, pooling: int, array_size: int) -> float:
    frac = (world_size - 1) / world_size
    if variant == "robe":
        return 2 * frac * 4 * array_size
    return frac * batch * features * (8 * pooling + 4 + 2 * 4 * dim)


def crossover_batch(features: int, dim: int, pooling: int, array_size: int) -> float:
    """Local batch above which the replicated array's all-reduce moves fewer bytes than the a2as."""
    return 8 * array_size / (features * (8 * pooling + 4 + 8 * dim))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512, help="local batch per rank")
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--pooling", type=int, default=2, help="ids per bag")
    p.add_argument("--rows", type=int, default=10_000, help="rows of each full table (no effect on traffic)")
    p.add_argument("--array-size", type=int, default=1 << 18, help="ROBE array floats")
    p.add_argument("--gradient-sync", choices=["hook", "ddp"], default="hook")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sweep", type=str, default="", help="comma-separated local batch sizes to measure")
    p.add_argument("--json", type=str, default="", help="write the results here")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    from robe_dist.distributed.test_utils import ProcessGroupPool

    batches = [int(b) for b in args.sweep.split(",")] if args.sweep else [args.batch_size]
    common = dict(features=args.features, dim=args.dim, pooling=args.pooling, rows=args.rows,
                  array_size=args.array_size, steps=args.steps, warmup=args.warmup, gradient_sync=args.gradient_sync)
    rows = []
    with ProcessGroupPool(world_size=args.world_size, collective_timeout_s=300) as pool:
        for b in batches:
            row = {"local_batch": b}
            for variant in ("robe", "table_wise"):
                res = pool.run(_rank_measure, variant=variant, batch=b, **common)
                measured = sum(sum(r["bytes"].values()) for r in res) / len(res)
                row[variant] = {
                    "measured_bytes_per_rank_step": measured,
                    "model_bytes": model_bytes(variant, args.world_size, b, args.features, args.dim, args.pooling,
                                               args.array_size),
                    "by_collective": res[0]["bytes"],
                    "calls_per_step": res[0]["calls"],
                    "step_ms_rank0": res[0]["step_ms"],
                    "plan": res[0]["plan"],
                }
            rows.append(row)
    cross = crossover_batch(args.features, args.dim, args.pooling, args.array_size)
    print(f"world_size={args.world_size} features={args.features} dim={args.dim} pooling={args.pooling} "
          f"array_size={args.array_size} ({args.array_size * 4 / 2**20:.1f} MiB) gradient_sync={args.gradient_sync}")
    print(f"{'local batch':>11} | {'robe MB/step':>12} {'(model)':>9} | {'table_wise MB/step':>18} {'(model)':>9} | "
          f"{'cheaper':>10} | {'robe ms':>8} {'tw ms':>8}")
    for row in rows:
        r, t = row["robe"], row["table_wise"]
        cheaper = "robe" if r["measured_bytes_per_rank_step"] < t["measured_bytes_per_rank_step"] else "table_wise"
        print(f"{row['local_batch']:>11} | {r['measured_bytes_per_rank_step'] / 1e6:>12.3f} {r['model_bytes'] / 1e6:>9.3f} | "
              f"{t['measured_bytes_per_rank_step'] / 1e6:>18.3f} {t['model_bytes'] / 1e6:>9.3f} | {cheaper:>10} | "
              f"{r['step_ms_rank0']:>8.1f} {t['step_ms_rank0']:>8.1f}")
    measured_cross = None
    for lo, hi in zip(rows, rows[1:]):
        dlo = lo["robe"]["measured_bytes_per_rank_step"] - lo["table_wise"]["measured_bytes_per_rank_step"]
        dhi = hi["robe"]["measured_bytes_per_rank_step"] - hi["table_wise"]["measured_bytes_per_rank_step"]
        if dlo > 0 >= dhi:  # table_wise grows linearly in b: interpolate
            measured_cross = lo["local_batch"] + dlo / (dlo - dhi) * (hi["local_batch"] - lo["local_batch"])
    print(f"crossover local batch (model): {cross:.0f}" +
          (f"; measured (interpolated): {measured_cross:.0f}" if measured_cross else ""))
    print("per collective, rank 0, last batch: robe", rows[-1]["robe"]["by_collective"],
          "| table_wise", rows[-1]["table_wise"]["by_collective"])
    result = {"args": vars(args), "rows": rows, "crossover_model": cross, "crossover_measured": measured_cross}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
