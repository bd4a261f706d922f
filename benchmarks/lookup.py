#!/usr/bin/env python
"""One embedding training step: ROBE (robe_dist) against TorchRec's production path, on CPU.

The step is the embedding part of a DLRM training step: forward of all sparse features, backward
from a fixed upstream gradient ``g`` (``out.values().backward(g)``, the gradient the dense part of
the model would send back), and the SGD update of the embedding weights.

Measured in ONE process, interleaved round by round (the order rotates every round) so that noise
from other processes hits every variant alike; the figures are medians over ``--iters`` rounds:

  robe_dense        RobeEmbeddingBagCollection (fused_sgd_lr=None), torch.optim.SGD on the array's
                    dense gradient, ``zero_grad(set_to_none=True)`` (PyTorch's default).
  robe_dense_keep   the same with ``zero_grad(set_to_none=False)`` (the gradient buffer is kept
                    and zeroed in place every step).
  robe_fused        RobeEmbeddingBagCollection(fused_sgd_lr=lr): the backward applies the SGD update
                    to the array in place; no optimizer step, no dense gradient.
  robe_dmp          what robe-train runs on one process: the same collection sharded by robe_dist's
                    sharder inside DistributedModelParallel (world size 1, gloo), the trainer's
                    optimiser (TrainOptimizer, SGD) with its step on the array fused into the
                    lookup's backward (fuse_robe_updates, robe.fused_update: true), and zero_grad
                    before the forward, as TorchRec's train pipeline calls them.
  robe_dmp_dense    the same with robe.fused_update: false: the dense gradient, then the optimiser
                    (what each rank does with more processes, less the all-reduce).
  torchrec          EmbeddingBagCollection with full tables (MLPerf v1 sizes / --table-scale),
                    sharded by DistributedModelParallel (world size 1, gloo, CPU), TABLE_WISE with
                    the FUSED compute kernel: FBGEMM's TBE with the SGD update fused in its backward.

The headline is robe_dmp against torchrec. The allocator is process-wide, so it is a run option
(``--allocator``): ``glibc`` (the default; large blocks are mmap-ed and returned at every free, so
a fresh 109 MB output pays its page faults every step), ``thp`` (PyTorch's own switch,
THP_MEM_ALLOC_ENABLE=1: blocks of 2 MiB and more are 2 MiB-aligned and advised huge pages, so
they fault in 2 MiB at a time), ``jemalloc`` (the script re-executes itself with
libjemalloc preloaded and freed pages kept: MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1) or
``jemalloc_thp`` (the same, and every arena advised huge pages: MALLOC_CONF=thp:always,...; with
the kernel's THP mode ``madvise`` or ``always``). A MALLOC_CONF set in the environment replaces
these. TorchRec's best setting is the one to compare with (docs/performance.md: jemalloc_thp on
the AMD guest, 2026-12-04).

Also measured: the machine's memory bandwidth (STREAM-like copy and triad over --bw-mb MB arrays,
all threads; best of several repetitions, before and after the steps), and, per variant, the
fraction of that bandwidth its step reaches under a minimal byte model (see ``byte_model``).

Memory: each variant's tensor memory (exact, from the tensors) and, in this process, the resident
set (VmRSS) growth when building it, and the step's transient peak: the kernel's RSS high-water
mark (VmHWM) is reset through /proc/self/clear_refs before one extra step of that variant and read
after it (Linux only; skipped elsewhere).

Before timing: (1) a small-case check that the fused ROBE step and the dense step + SGD give the
same updated array; (2) one step of every variant on the same batch, after which the three ROBE
arrays (same initial values) must agree and must have changed, and every TorchRec row touched by
the batch must equal ``old - lr * sum of its upstream gradients`` (exact SGD), so neither side is
a no-op.

Run::

    python benchmarks/lookup.py                       # the paper's setting, 35-60 s on 2 quiet cores
    python benchmarks/lookup.py --allocator jemalloc_thp  # TorchRec's best case (apt-get install libjemalloc2)
    python benchmarks/lookup.py --hash paper --json /tmp/lookup.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

OMP_POLICIES = ("passive", "active", "inherit")


def _apply_omp_wait_policy(argv: List[str]) -> str:
    """Sets OMP_WAIT_POLICY before torch (and its OpenMP runtime) loads; returns what is in force.

    Default ``passive`` (unless OMP_WAIT_POLICY is already set): on a shared machine, threads that
    spin at OpenMP barriers while other processes want the cores turn every barrier into a
    scheduler time slice, and FBGEMM's CPU TBE backward crosses hundreds of barriers per step
    (docs/performance.md). ``--omp-wait-policy active`` measures the spinning runtime.
    """
    choice = None
    for i, arg in enumerate(argv):
        if arg.startswith("--omp-wait-policy="):
            choice = arg.split("=", 1)[1]
        elif arg == "--omp-wait-policy" and i + 1 < len(argv):
            choice = argv[i + 1]
    if "torch" not in sys.modules and choice in ("passive", "active"):
        os.environ["OMP_WAIT_POLICY"] = choice.upper()
    elif "torch" not in sys.modules and choice is None and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)")


ALLOCATORS = ("glibc", "thp", "jemalloc", "jemalloc_thp")
# jemalloc's settings per --allocator: keep freed pages (no page faults on the next step's
# buffers); jemalloc_thp also advises huge pages for all its memory (opt.thp).
JEMALLOC_CONF = {"jemalloc": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
                 "jemalloc_thp": "thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1"}
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2",
)  # fmt: skip


def _apply_allocator(argv: List[str]) -> str:
    """Puts the ``--allocator`` in force before torch loads (re-executing this script under
    jemalloc); returns a description of what is in force."""
    choice = "glibc"
    for i, arg in enumerate(argv):
        if arg.startswith("--allocator="):
            choice = arg.split("=", 1)[1]
        elif arg == "--allocator" and i + 1 < len(argv):
            choice = argv[i + 1]
    if choice == "thp":
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        return "thp (THP_MEM_ALLOC_ENABLE=1: PyTorch's CPU allocator, 2 MiB-aligned huge pages for >= 2 MiB)"
    if choice in JEMALLOC_CONF:
        if os.environ.get("_ROBE_DIST_LOOKUP_JEMALLOC") == "1":  # this is the re-executed process
            return f"{choice} ({os.environ['LD_PRELOAD']}, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})"
        lib = os.environ.get("ROBE_DIST_JEMALLOC")
        if lib and not os.path.isfile(lib):
            sys.exit(f"benchmarks/lookup.py: --allocator {choice}: ROBE_DIST_JEMALLOC={lib} is not a file; "
                     "expected the path of libjemalloc.so.2 (or unset it to search the usual places)")
        lib = lib or next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
        if lib is None:
            sys.exit(f"benchmarks/lookup.py: --allocator {choice} needs libjemalloc.so.2 (Debian/Ubuntu: apt-get install "
                     f"libjemalloc2), not found in {', '.join(JEMALLOC_PATHS)}; or set ROBE_DIST_JEMALLOC=PATH")
        preload = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
        env = dict(os.environ, LD_PRELOAD=preload, _ROBE_DIST_LOOKUP_JEMALLOC="1",
                   MALLOC_CONF=os.environ.get("MALLOC_CONF", JEMALLOC_CONF[choice]))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return "glibc (default malloc)"


if __name__ == "__main__":
    _OMP_WAIT_POLICY = _apply_omp_wait_policy(sys.argv[1:])
    _ALLOCATOR = _apply_allocator(sys.argv[1:])
else:  # imported: torch may already be loaded; report what the process has
    _OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)")
    _ALLOCATOR = "as the importing process"

import numpy as np  # noqa: E402
import torch  # noqa: E402  (after OMP_WAIT_POLICY is set)

# MLPerf DLRM v0.7 - v2.1 (Criteo 1TB, max_ind_range 40M) table sizes: 187.8M rows, 96 GB at dim 128.
MLPERF_V1_TABLE_SIZES = [
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
]
ROBE_VARIANTS = ("robe_dense", "robe_dense_keep", "robe_fused")
VARIANTS = ROBE_VARIANTS + ("torchrec",)
GB = 1e9
MB = 1e6
SPREAD = 2654435761  # a prime: rank r -> row (r * SPREAD) % n spreads the hot rows of --ids zipf


# ----------------------------------------------------------------------------------- helpers
def table_sizes(features: int, scale: int) -> Tuple[List[int], List[int]]:
    """(full MLPerf sizes, sizes divided by ``scale``, at least 1) for ``features`` tables."""
    full = [MLPERF_V1_TABLE_SIZES[i % len(MLPERF_V1_TABLE_SIZES)] for i in range(features)]
    return full, [max(1, n // scale) for n in full]


def proc_status_kib(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = proc_status_kib("VmRSS")
    return -1 if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------- bandwidth
def measure_bandwidth(size_mb: int, reps: int) -> Dict[str, float]:
    """STREAM-like copy (a = b: 2 arrays moved) and triad (a = b + s * c: 3 arrays) in GB/s.

    Best of ``reps`` (the STREAM convention), all torch threads, fp32 arrays of ``size_mb`` MB.
    Write-allocate traffic is not counted (as in STREAM).
    """
    n = size_mb * 1_000_000 // 4
    a = torch.zeros(n)
    b = torch.rand(n)
    c = torch.rand(n)
    copy_t, triad_t = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.copy_(b)
        t1 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        t2 = time.perf_counter()
        copy_t.append(t1 - t0)
        triad_t.append(t2 - t1)
    nbytes = n * 4
    res = {
        "copy_GBps": 2 * nbytes / min(copy_t) / GB,
        "triad_GBps": 3 * nbytes / min(triad_t) / GB,
        "triad_median_GBps": 3 * nbytes / median(triad_t) / GB,
    }
    del a, b, c
    return res


# ----------------------------------------------------------------------------------- byte model
def byte_model(batch: int, features: int, dim: int, array_size: int) -> Dict[str, Dict[str, int]]:
    """Minimal bytes one step must move between memory and the cores, per variant (one-hot bags).

    N = batch * features ids, every one of dim fp32 elements; m = array size.
      ids read ................................ 8 N           (int64 KJT values)
      forward: embedding elements read ........ 4 N dim       (ROBE: the array's blocks; TBE: rows)
      forward: pooled output written .......... 4 B F dim
      backward: upstream gradient read ........ 4 B F dim
      update: touched elements read + written . 8 N dim       (fused: the array / TBE rows;
                                                              dense: the dense gradient's slots)
    dense path (set_to_none=True): + fresh dense gradient zeroed (4 m), + SGD over the whole array
      (read param, read grad, write param: 12 m).
    dense path (set_to_none=False): + zero_ of the kept gradient (4 m) + AccumulateGrad's
      grad += new (read 2, write 1: 12 m).
    Not counted: bag offsets, ROBE's saved block starts (4 N dim / Z written and read: int32 below 2^31 slots), TBE's
    sort of the ids, cache-line granularity (a 128-byte block at a random float offset spans
    2.94 64-byte lines on average, so real traffic is ~1.5x the element bytes), write-allocate.
    """
    n = batch * features
    common = {
        "ids_read": 8 * n,
        "fwd_elements_read": 4 * n * dim,
        "fwd_output_written": 4 * batch * features * dim,
        "bwd_upstream_grad_read": 4 * batch * features * dim,
        "update_touched_read_write": 8 * n * dim,
    }
    dense = dict(common, dense_grad_zero=4 * array_size, sgd_full_array=12 * array_size)
    keep = dict(dense, zero_grad_inplace=4 * array_size, accumulate_grad=12 * array_size)
    models = {"robe_fused": common, "robe_dense": dense, "robe_dense_keep": keep, "robe_dmp": dict(common),
              "robe_dmp_dense": dict(dense), "torchrec": dict(common)}  # fmt: skip
    for m in models.values():
        m["total"] = sum(v for k, v in m.items() if k != "total")
    return models


# ----------------------------------------------------------------------------------- ROBE
def make_robe_tables(features: int, dim: int, full_sizes: List[int]):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=full_sizes[i], feature_names=[f"f{i}"])
        for i in range(features)
    ]


def check_fused_equals_dense(hash_mode: str, lr: float) -> float:
    """Small case (collisions and repeated ids on purpose): fused step == dense step + SGD."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from robe_dist.config import RobeConfig
    from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

    gen = torch.Generator().manual_seed(7)
    sizes = [50, 7, 1000]
    tables = [
        EmbeddingBagConfig(name=f"s{i}", embedding_dim=64, num_embeddings=n, feature_names=[f"s{i}"])
        for i, n in enumerate(sizes)
    ]
    cfg = RobeConfig(array_size=4099, block_size=32, hash=hash_mode)
    dense = RobeEmbeddingBagCollection(tables, cfg)
    fused = RobeEmbeddingBagCollection(tables, cfg, fused_sgd_lr=lr)
    with torch.no_grad():
        fused.array.copy_(dense.array)
    batch = 96
    values = torch.cat([torch.randint(0, n, (batch,), generator=gen) for n in sizes])
    kjt = KeyedJaggedTensor(keys=[f"s{i}" for i in range(3)], values=values,
                            lengths=torch.ones(3 * batch, dtype=torch.int32))
    g = torch.randn(batch, 3 * 64, generator=gen)
    opt = torch.optim.SGD(dense.parameters(), lr=lr)
    for _ in range(2):  # two steps: the second one reads updated values
        opt.zero_grad(set_to_none=True)
        dense(kjt).values().backward(g)
        opt.step()
        fused(kjt).values().backward(g)
    if fused.array.grad is not None:
        raise AssertionError("fused ROBE path left a dense gradient on the array")
    err = (fused.array - dense.array).abs().max().item()
    if not torch.allclose(fused.array, dense.array, rtol=1e-5, atol=1e-6):
        raise AssertionError(f"fused ROBE step != dense step + SGD (hash={hash_mode}): max |diff| {err:.3g}")
    return err


def build_robe_dmp(tables, cfg, lr: float, array: torch.Tensor, fused_update: bool):
    """The collection as robe-train runs it: on ``meta``, planned by RobeShardingPlanner with
    robe_dist's sharders, wrapped in DistributedModelParallel (world size 1), its array set to
    ``array``; and the trainer's optimiser (SGD at ``lr``) over it, fused into the backward as
    the trainer fuses it (``fused_update``: the config's ``robe.fused_update``)."""
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import Topology

    from robe_dist.distributed import RobeShardingPlanner, ShardedRobeEmbeddingBagCollection, get_default_sharders
    from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
    from robe_dist.train_config import OptimConfig
    from robe_dist.trainer.model import embedding_parameters
    from robe_dist.trainer.optim import TrainOptimizer, fuse_robe_updates, optimizer_spec

    optim_cfg = OptimConfig(name="sgd", lr=lr)
    opt_cls, opt_kwargs = optimizer_spec(optim_cfg)
    sharders = get_default_sharders(optimizer_class=opt_cls, optimizer_kwargs=opt_kwargs)
    ebc = RobeEmbeddingBagCollection(tables, cfg, device=torch.device("meta"))
    planner = RobeShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"))
    plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)
    sharded = [m for m in dmp.modules() if isinstance(m, ShardedRobeEmbeddingBagCollection)]
    if len(sharded) != 1:
        raise AssertionError(f"expected one ShardedRobeEmbeddingBagCollection in the DMP model, found {len(sharded)}")
    with torch.no_grad():
        sharded[0].array.copy_(array)
    opt = TrainOptimizer(dmp, optim_cfg, embedding_parameters(dmp))
    how = fuse_robe_updates(dmp, opt, fused_update, world_size=1)
    if (sharded[0].fused_optimizer_kind is not None) != fused_update:
        raise AssertionError(f"robe_dmp: fused_update={fused_update} but the trainer's rule gave: {how}")
    return dmp, sharded[0], opt


# ----------------------------------------------------------------------------------- TorchRec
def build_torchrec(features: int, dim: int, sizes: List[int], lr: float):
    """DistributedModelParallel(EBC on meta) with TABLE_WISE + FUSED (TBE, EXACT_SGD) at world size 1."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=sizes[i], feature_names=[f"f{i}"])
        for i in range(features)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr})
    constraints = {
        t.name: ParameterConstraints(
            sharding_types=[ShardingType.TABLE_WISE.value],
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
        )
        for t in tables
    }
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(ebc, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=[sharder])

    kernels, shardings = set(), set()
    for module_plan in plan.plan.values():
        for ps in module_plan.values():
            kernels.add(ps.compute_kernel)
            shardings.add(ps.sharding_type)
    if kernels != {EmbeddingComputeKernel.FUSED.value}:
        raise AssertionError(f"TorchRec plan does not use the fused kernel everywhere: {kernels}")
    tbes = []  # ShardedEmbeddingBagCollection keeps its lookups in a plain list: walk it
    for sharded in dmp.modules():
        for lookup in getattr(sharded, "_lookups", None) or []:
            for mod in lookup.modules():
                if type(mod).__name__ == "SplitTableBatchedEmbeddingBagsCodegen":
                    tbes.append(mod)
    if not tbes:
        raise AssertionError("no FBGEMM TBE (SplitTableBatchedEmbeddingBagsCodegen) in the sharded model")
    optim = {str(getattr(t, "optimizer", "?")) for t in tbes}
    if optim != {str(EmbOptimType.EXACT_SGD)}:
        raise AssertionError(f"TorchRec TBE optimizer is {optim}, expected the fused {EmbOptimType.EXACT_SGD}")
    weights = dict(dmp.named_parameters())
    tbe_bytes = sum(int(p.numel()) * p.element_size() for p in weights.values())
    info = {
        "plan": f"{len(tables)} tables, sharding {sorted(shardings)}, compute kernel {sorted(kernels)}",
        "tbe": f"{len(tbes)} x SplitTableBatchedEmbeddingBagsCodegen, optimizer {sorted(optim)}, lr {lr}",
        "weight_bytes": tbe_bytes,
    }
    return dmp, plan, weights, info


def check_torchrec_update(weights, before: Dict[str, Tuple[torch.Tensor, torch.Tensor]], g: torch.Tensor,
                          dim: int, lr: float) -> int:
    """Every touched row moved by exactly -lr * (sum of its upstream gradient rows)."""
    checked = 0
    for f, (uniq, inv, old) in before.items():
        w = weights[f"embedding_bags.t{f}.weight"]
        new = w.detach()[uniq]
        expect = old - lr * torch.zeros_like(old).index_add_(0, inv, g[:, f * dim:(f + 1) * dim])
        if not torch.allclose(new, expect, rtol=1e-4, atol=1e-6):
            err = (new - expect).abs().max().item()
            raise AssertionError(f"TorchRec table t{f}: the step is not old - lr * grad (max |diff| {err:.3g})")
        checked += len(uniq)
    return checked


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--features", type=int, default=26, help="one-hot sparse features (MLPerf tables, cycled)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--array-size", type=int, default=27_000_000, help="ROBE array floats (paper: 27M)")
    p.add_argument("--block-size", type=int, default=32, help="ROBE Z")
    p.add_argument("--block-align", type=int, default=1,
                   help="ROBE block starts on multiples of this (RobeConfig.block_align; 16: a 64-byte line)")
    p.add_argument("--hash", choices=("universal", "paper"), default="universal",
                   help="universal: raw uint32-like ids; paper: ids in [0, MLPerf table size)")
    p.add_argument("--table-scale", type=int, default=20, help="TorchRec tables = MLPerf v1 sizes / this")
    p.add_argument("--iters", type=int, default=20, help="timed rounds (every variant once per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batches", type=int, default=4, help="distinct input batches, cycled")
    p.add_argument("--bw-mb", type=int, default=256, help="MB per array for the bandwidth test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", choices=("uniform", "zipf"), default="uniform",
                   help="uniform ids (the worst case for both caches) or Zipf 1.05 over each (scaled) table, as the "
                        "synthetic data draws them: hot rows stay in cache for TorchRec, hot blocks for ROBE")
    p.add_argument("--skip-torchrec", action="store_true", help="ROBE only")
    p.add_argument("--print-plan", action="store_true", help="print TorchRec's full sharding plan")
    p.add_argument("--omp-wait-policy", choices=OMP_POLICIES, default="passive",
                   help="OMP_WAIT_POLICY for this run, set before torch loads (without the flag: passive unless OMP_WAIT_POLICY is set; inherit keeps the environment's)")
    p.add_argument("--json", type=str, default=None, help="also write the numbers to this path")
    p.add_argument("--allocator", choices=ALLOCATORS, default="glibc",
                   help="memory allocator of the whole process (see the module doc); applied before torch loads")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import fbgemm_gpu  # noqa: F401  (version, and the TBE ops)
    import torchrec
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from robe_dist.config import RobeConfig
    from robe_dist.data.rawtext import raw_ids, zipf_ranks
    from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
    from robe_dist.ops import has_cpp_extension

    B, F, D, m, Z = args.batch, args.features, args.dim, args.array_size, args.block_size
    full_sizes, scaled_sizes = table_sizes(F, args.table_scale)
    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "torchrec": torchrec.__version__,
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
    }
    print("# robe_dist lookup benchmark: one embedding training step (forward, backward, SGD update)")
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; robe_dist._C {'built' if has_cpp_extension() else 'MISSING'}; OMP_WAIT_POLICY {_OMP_WAIT_POLICY}; "
          f"allocator {_ALLOCATOR}")
    print(f"setup: batch {B}, {F} one-hot features, dim {D}, ROBE array {m:,} floats, Z={Z}, align {args.block_align}, hash={args.hash}, "
          f"lr {args.lr}; ids {args.ids}; TorchRec tables = MLPerf v1 / {args.table_scale}; {args.iters} timed rounds "
          f"(+{args.warmup} warm-up), interleaved")
    if not has_cpp_extension():
        print("WARNING: robe_dist._C is not built; ROBE runs the slow PyTorch fallback and fused_sgd_lr fails")

    # ---- correctness guard (small case)
    errs = {h: check_fused_equals_dense(h, args.lr) for h in ("universal", "paper")}
    print("check: fused ROBE step == dense step + SGD on a small case: "
          + ", ".join(f"{h} max|diff| {e:.1e}" for h, e in errs.items()))

    bw_before = measure_bandwidth(args.bw_mb, reps=5)

    # ---- inputs: the same fixed upstream gradient for every variant; ids per side
    gen = torch.Generator().manual_seed(args.seed)
    g = torch.randn(B, F * D, generator=gen) * 1e-2
    lengths = torch.ones(F * B, dtype=torch.int32)
    keys = [f"f{i}" for i in range(F)]
    robe_values, tr_values = [], []
    rng = np.random.default_rng(args.seed)
    for _ in range(args.batches):
        if args.ids == "zipf":  # rank r with probability ~ (r + 1) ** -1.05, hot ranks spread over the table
            ranks = [zipf_ranks(rng, (B,), n, 1.05) for n in scaled_sizes]
            rows = [torch.from_numpy((r * SPREAD) % n) for r, n in zip(ranks, scaled_sizes)]
            tr_values.append(torch.cat(rows))
            robe_values.append(torch.cat([torch.from_numpy(raw_ids(r, i)) for i, r in enumerate(ranks)])
                               if args.hash == "universal" else torch.cat(rows))  # fmt: skip
            continue
        if args.hash == "universal":  # raw, uint32-like ids (Criteo's 8 hex digits)
            robe_values.append(torch.randint(0, 2**32, (F * B,), generator=gen))
        else:
            robe_values.append(torch.cat([torch.randint(0, n, (B,), generator=gen) for n in full_sizes]))
        tr_values.append(torch.cat([torch.randint(0, n, (B,), generator=gen) for n in scaled_sizes]))

    def kjt(values: torch.Tensor) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)

    # ---- build the variants (RSS growth of each)
    mem: Dict[str, Dict[str, float]] = {}
    robe_tables = make_robe_tables(F, D, full_sizes)
    cfg = RobeConfig(array_size=m, block_size=Z, hash=args.hash, block_align=args.block_align)
    modules, optims = {}, {}
    for name in ROBE_VARIANTS:
        gc.collect()
        r0 = rss_bytes()
        torch.manual_seed(args.seed + 1)  # the same initial array in every ROBE variant
        mod = RobeEmbeddingBagCollection(robe_tables, cfg, fused_sgd_lr=args.lr if name == "robe_fused" else None)
        modules[name] = mod
        if name != "robe_fused":
            optims[name] = torch.optim.SGD(mod.parameters(), lr=args.lr)
        mem[name] = {"build_rss_growth": rss_bytes() - r0}
    if not all(torch.equal(modules[n].array, modules["robe_fused"].array) for n in ROBE_VARIANTS):
        raise AssertionError("ROBE variants did not start from the same array")

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    dmps = {}
    for name, fused in (("robe_dmp", True), ("robe_dmp_dense", False)):
        gc.collect()
        r0 = rss_bytes()
        dmps[name] = build_robe_dmp(robe_tables, cfg, args.lr, modules["robe_fused"].array.detach(), fused)
        mem[name] = {"build_rss_growth": rss_bytes() - r0}

    tr = None
    if not args.skip_torchrec:
        gc.collect()
        r0 = rss_bytes()
        t0 = time.perf_counter()
        dmp, plan, tr_weights, tr_info = build_torchrec(F, D, scaled_sizes, args.lr)
        mem["torchrec"] = {"build_rss_growth": rss_bytes() - r0}
        print(f"torchrec: DistributedModelParallel built in {time.perf_counter() - t0:.1f} s; plan: {tr_info['plan']}; "
              f"{tr_info['tbe']}")
        if args.print_plan:
            print(plan)
        tr = dmp

    # ---- steps
    def make_step(model, values: List[torch.Tensor], update: Optional[Callable[[], None]] = None,
                  before: Optional[Callable[[], None]] = None) -> Callable[[int], Dict[str, float]]:
        """One timed step on batch ``i``: ``before()`` and the forward (waiting for a sharded
        model's result), ``backward(g)``, then ``update()`` (none: the update is in the backward)."""

        def step(i: int) -> Dict[str, float]:
            c0 = time.process_time()
            t0 = time.perf_counter()
            if before is not None:
                before()
            out = model(kjt(values[i % args.batches]))
            if hasattr(out, "wait"):
                out = out.wait()
            t1 = time.perf_counter()
            out.values().backward(g)
            t2 = time.perf_counter()
            if update is not None:
                update()
            t3 = time.perf_counter() if update is not None else t2
            return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "step": t3 - t0, "cpu": time.process_time() - c0}

        return step

    def sgd_update(name: str, set_to_none: bool) -> Callable[[], None]:
        opt = optims[name]
        return lambda: (opt.step(), opt.zero_grad(set_to_none=set_to_none))

    steps = {
        "robe_dense": make_step(modules["robe_dense"], robe_values, sgd_update("robe_dense", True)),
        "robe_dense_keep": make_step(modules["robe_dense_keep"], robe_values, sgd_update("robe_dense_keep", False)),
        "robe_fused": make_step(modules["robe_fused"], robe_values),  # the SGD update is in the backward
    }
    for name, (model, _, opt) in dmps.items():  # TorchRec's train pipeline calls zero_grad before the forward
        steps[name] = make_step(model, robe_values, opt.step, before=opt.zero_grad)
    if tr is not None:
        steps["torchrec"] = make_step(tr, tr_values)  # TBE backward applies EXACT_SGD in place
    names = list(steps)

    # ---- training check: one step of every variant on batch 0
    before_arr = modules["robe_fused"].array.detach().clone()
    tr_before = {}
    if tr is not None:
        v0 = tr_values[0]
        for f in range(F):
            uniq, inv = v0[f * B:(f + 1) * B].unique(return_inverse=True)
            tr_before[f] = (uniq, inv, tr_weights[f"embedding_bags.t{f}.weight"].detach()[uniq].clone())
    for name in names:
        steps[name](0)
    arrays = {n: modules[n].array.detach() for n in ROBE_VARIANTS}
    changed = int((arrays["robe_fused"] != before_arr).sum())
    del before_arr
    if changed == 0:
        raise AssertionError("ROBE: the step did not change the array")
    for name, (_, sharded, _) in dmps.items():
        arrays[name] = sharded.array.detach()
    if dmps["robe_dmp"][1].array.grad is not None:
        raise AssertionError("robe_dmp: the trainer's fused path left a dense gradient on the array")
    for n in ("robe_dense", "robe_dense_keep", "robe_dmp", "robe_dmp_dense"):
        if not torch.allclose(arrays[n], arrays["robe_fused"], rtol=1e-5, atol=2e-6):  # (hot blocks: many terms, summed in another order)
            err = (arrays[n] - arrays["robe_fused"]).abs().max().item()
            raise AssertionError(f"ROBE: {n} and robe_fused disagree after one step (max |diff| {err:.3g})")
    msg = f"check: one step changed {changed:,} ROBE slots ({changed / m:.1%} of the array), dense == DMP == fused (allclose)"
    if tr is not None:
        rows = check_torchrec_update(tr_weights, tr_before, g, D, args.lr)
        msg += f"; TorchRec: {rows:,} touched rows == old - lr * grad"
        del tr_before
    print(msg)

    # ---- warm-up + timed rounds, interleaved, rotating the order
    times: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
    for r in range(args.warmup + args.iters):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t = steps[name](r + 1)
            if r >= args.warmup:
                times[name].append(t)

    # ---- peak transient memory of one step of each variant (VmHWM reset before it)
    for name in names:
        gc.collect()
        if not reset_peak_rss():
            break
        r0 = rss_bytes()
        steps[name](0)
        hwm = proc_status_kib("VmHWM")
        mem[name]["step_peak_rss_growth"] = hwm * 1024 - r0 if hwm is not None else -1

    bw_after = measure_bandwidth(args.bw_mb, reps=5)
    bw = {
        "copy_GBps": max(bw_before["copy_GBps"], bw_after["copy_GBps"]),
        "triad_GBps": max(bw_before["triad_GBps"], bw_after["triad_GBps"]),
        "triad_GBps_before": bw_before["triad_GBps"],
        "triad_GBps_after": bw_after["triad_GBps"],
    }

    # ---- results
    for name in ROBE_VARIANTS + tuple(dmps):
        arr = 4 * m
        mem[name]["tensor_bytes"] = arr + (0 if name in ("robe_fused", "robe_dmp") else arr)  # array (+ dense grad; SGD: no state)
    if tr is not None:
        mem["torchrec"]["tensor_bytes"] = tr_info["weight_bytes"]  # TBE weights; EXACT_SGD: no state
    models = byte_model(B, F, D, m)
    res = {}
    for name in names:
        ts = times[name]
        step = median([t["step"] for t in ts])
        res[name] = {
            "step_ms": 1e3 * step,
            "step_ms_min": 1e3 * min(t["step"] for t in ts),
            "fwd_ms": 1e3 * median([t["fwd"] for t in ts]),
            "bwd_ms": 1e3 * median([t["bwd"] for t in ts]),
            "opt_ms": 1e3 * median([t["opt"] for t in ts]),
            "cpu_ms": 1e3 * median([t["cpu"] for t in ts]),
            "samples_per_s": B / step,
            "rounds_ms": {k: [round(1e3 * t[k], 2) for t in ts] for k in ("step", "fwd", "bwd", "opt", "cpu")},
            "model_bytes": models[name]["total"],
            "achieved_GBps": models[name]["total"] / step / GB,
            "bw_fraction": models[name]["total"] / step / GB / bw["triad_GBps"],
        }
        res[name].update(mem[name])

    full_bytes = sum(full_sizes) * D * 4
    scaled_bytes = sum(scaled_sizes) * D * 4
    print()
    print(f"memory bandwidth (all {torch.get_num_threads()} threads, {args.bw_mb} MB arrays, best of 5): "
          f"copy {bw['copy_GBps']:.1f} GB/s, triad {bw['triad_GBps']:.1f} GB/s "
          f"(triad before {bw['triad_GBps_before']:.1f}, after {bw['triad_GBps_after']:.1f})")
    print(f"sizes: ROBE array {4 * m / MB:.1f} MB; full MLPerf v1 tables {sum(full_sizes):,} rows = {full_bytes / GB:.1f} GB "
          f"-> {full_bytes / (4 * m):.0f}x the array; run's TorchRec tables (/{args.table_scale}) "
          f"{sum(scaled_sizes):,} rows = {scaled_bytes / GB:.2f} GB -> {scaled_bytes / (4 * m):.1f}x the array")
    print()
    hdr = (f"{'variant':<16}{'step ms':>9}{'min':>8}{'fwd':>8}{'bwd':>8}{'opt':>8}{'samples/s':>11}"
           f"{'cpu ms':>8}{'vs TR':>7}{'bytes MB':>10}{'GB/s':>7}{'of bw':>7}{'tensors MB':>11}{'build RSS':>10}{'step peak':>10}")
    print(hdr)
    tr_sps = res["torchrec"]["samples_per_s"] if "torchrec" in res else None
    for name in names:
        r = res[name]
        r["vs_torchrec"] = r["samples_per_s"] / tr_sps if tr_sps else None
        r["vs_torchrec_fastest_round"] = res["torchrec"]["step_ms_min"] / r["step_ms_min"] if tr_sps else None
        vs = f"{r['vs_torchrec']:.2f}x" if tr_sps else "-"
        peak = r.get("step_peak_rss_growth")
        print(f"{name:<16}{r['step_ms']:>9.1f}{r['step_ms_min']:>8.1f}{r['fwd_ms']:>8.1f}{r['bwd_ms']:>8.1f}"
              f"{r['opt_ms']:>8.1f}{r['samples_per_s']:>11,.0f}{r['cpu_ms']:>8.0f}{vs:>7}{r['model_bytes'] / MB:>10.0f}"
              f"{r['achieved_GBps']:>7.2f}{r['bw_fraction']:>7.1%}{r['tensor_bytes'] / MB:>11.0f}"
              f"{r['build_rss_growth'] / MB:>10.0f}{(peak / MB if peak is not None else float('nan')):>10.0f}")
    print("(median over rounds; 'min' = fastest round; opt = optimizer step + zero_grad; cpu ms = process CPU "
          "time of the step, all threads; bytes = minimal byte "
          "model; of bw = (bytes / step) / triad; memory in MB: tensors = array + dense grad / TBE weights, "
          "build RSS = RSS growth building it, step peak = RSS high-water growth during one step)")
    if tr_sps:
        print(f"headline, the training path (robe_dmp) against TorchRec under allocator {_ALLOCATOR.split(' ')[0]}: "
              f"{res['robe_dmp']['vs_torchrec']:.2f}x (fastest rounds {res['robe_dmp']['vs_torchrec_fastest_round']:.2f}x); "
              f"with the dense gradient (robe_dmp_dense, as on more processes) {res['robe_dmp_dense']['vs_torchrec']:.2f}x")
        fastest = max(ROBE_VARIANTS, key=lambda n: res[n]["samples_per_s"])
        print(f"ROBE/TorchRec throughput, bare module: dense {res['robe_dense']['vs_torchrec']:.2f}x, "
              f"dense set_to_none=False {res['robe_dense_keep']['vs_torchrec']:.2f}x, "
              f"fused {res['robe_fused']['vs_torchrec']:.2f}x (fastest ROBE variant: {fastest}); "
              f"fastest rounds (least disturbed by other processes): dense "
              f"{res['robe_dense']['vs_torchrec_fastest_round']:.2f}x, set_to_none=False "
              f"{res['robe_dense_keep']['vs_torchrec_fastest_round']:.2f}x, fused "
              f"{res['robe_fused']['vs_torchrec_fastest_round']:.2f}x")
    keep_vs = res["robe_dense"]["step_ms"] / res["robe_dense_keep"]["step_ms"]
    print(f"zero_grad: set_to_none=True step {res['robe_dense']['step_ms']:.1f} ms vs set_to_none=False "
          f"{res['robe_dense_keep']['step_ms']:.1f} ms ({'True' if keep_vs < 1 else 'False'} is faster, ratio {keep_vs:.2f})")
    total = time.perf_counter() - t_start
    load_end = os.getloadavg()[0]
    print(f"total run time {total:.0f} s; 1-min load average at start {load_start:.1f}, at end {load_end:.1f} "
          f"(other processes on the machine; {os.cpu_count()} cpus)")

    out = {
        "args": vars(args), "versions": versions, "omp_wait_policy": _OMP_WAIT_POLICY, "allocator": _ALLOCATOR,
        "threads": torch.get_num_threads(), "bandwidth": bw,
        "sizes": {"robe_array_bytes": 4 * m, "full_tables_bytes": full_bytes, "scaled_tables_bytes": scaled_bytes,
                  "full_over_array": full_bytes / (4 * m), "scaled_over_array": scaled_bytes / (4 * m)},
        "byte_models": models, "results": res, "checks": {"small_case_max_diff": errs, "robe_slots_changed": changed},
        "total_s": total, "load_average": [load_start, load_end],
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"wrote {args.json}")
    dmps = steps = None  # free the models before the process group
    gc.collect()
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
    sys.stdout.flush()
