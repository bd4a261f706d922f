#!/usr/bin/env python
"""Scoring throughput: the exported ROBE DLRM against the same DLRM with full tables, in one process.

The model is MLPerf v1's DLRM (embedding dim 128, bottom MLP 512-256-128, top MLP
1024-1024-512-256-1, dot interaction) over 26 one-hot features whose tables have MLPerf v1's
sizes divided by ``--table-scale`` (the full tables must fit in memory). Variants, all in eval
mode under ``torch.no_grad``:

  robe_fp32     ROBE array of (full tables' floats / --compression), Z = 32, captured with
                robe-export's ScoringModel + torch.export, saved and loaded back (what robe-predict runs)
  robe_bf16     the same artifact with the array stored in bf16 (on CPU widened to fp32 per call)
  full_fbgemm   the full tables in TorchRec's DistributedModelParallel (world size 1, gloo),
                TABLE_WISE with the FUSED kernel: FBGEMM's batched TBE, fp32 (TorchRec's training path)
  full_int8     TorchRec's inference path: the full tables quantized to int8 rows
                (torchrec.inference.modules.quantize_embeddings -> QuantEmbeddingBagCollection,
                FBGEMM's IntN TBE)
  full_ebc      the full tables in TorchRec's unsharded EmbeddingBagCollection (nn.EmbeddingBag per
                table; no FBGEMM: the baseline where FBGEMM has no kernel for the device, e.g. a GPU
                machine with fbgemm-gpu-cpu)

A variant that cannot be built or run on the device is reported as such and left out.

Inputs are prepared before timing (ids uniform over each table, a fixed set of batches per batch
size). Per batch size, rounds run every variant once, in a rotating order (noise hits all alike);
figures are the median samples/s and the p50 / p99 latency of one call over ``--iters`` rounds.
Weights are random: scoring speed does not depend on their values.

Run::

    python benchmarks/inference.py                                   # ~3 minutes on 2 cores, ~4 GB
    python benchmarks/inference.py --table-scale 20 --batches 2048 --json /tmp/inference.json
    python benchmarks/inference.py --device cuda --table-scale 4     # on a GPU (launch/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-scale", type=int, default=40, help="MLPerf v1 table sizes divided by this")
    p.add_argument("--compression", type=float, default=1000.0, help="ROBE array = full tables' floats / this")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 2048, 16384])
    p.add_argument("--iters", type=int, default=30, help="timed rounds per batch size (fewer for large batches)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available (the GPU device check)")
    p.add_argument("--variants", nargs="+", default=["robe_fp32", "robe_bf16", "full_fbgemm", "full_int8", "full_ebc"])
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def mlperf_dlrm(collection):
    from torchrec.models.dlrm import DLRM

    return DLRM(embedding_bag_collection=collection, dense_in_features=13, dense_arch_layer_sizes=[512, 256, 128],
                over_arch_layer_sizes=[1024, 1024, 512, 256, 1])  # fmt: skip


def tables(scale: int):
    from torchrec import EmbeddingBagConfig

    from robe_dist.data.criteo import DEFAULT_CAT_NAMES, MLPERF_V1_TABLE_SIZES

    return [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=128, num_embeddings=max(1, n // scale), feature_names=[f])
            for f, n in zip(DEFAULT_CAT_NAMES, MLPERF_V1_TABLE_SIZES)]  # fmt: skip


def build_robe(tbls, compression: float, dtype: str, workdir: Path, device):
    import torch

    from robe_dist import RobeConfig, RobeEmbeddingBagCollection
    from robe_dist.data.criteo import DEFAULT_CAT_NAMES
    from robe_dist.inference.export import ScoringModel, export_model
    from robe_dist.inference.predict import load_artifact

    full = sum(t.num_embeddings for t in tbls) * 128
    array = max(1024, int(full / compression))
    torch.manual_seed(0)
    scoring = ScoringModel(mlperf_dlrm(RobeEmbeddingBagCollection(tbls, RobeConfig(array_size=array, block_size=32))),
                           list(DEFAULT_CAT_NAMES), {}).eval().to(device)  # fmt: skip
    path = workdir / f"robe_{dtype}.pt2"
    meta = export_model(scoring, {"format_version": 1, "multi_hot": False}, path, dtype, device=device)
    model, _ = load_artifact(path)
    return (lambda d, v, l, kjt: model(d, v, l)), {"array_floats": array, "artifact_bytes": meta["bytes"]}


def build_full_fbgemm(tbls, device):
    import torch
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    model = mlperf_dlrm(EmbeddingBagCollection(tbls, device=torch.device("meta")))
    sharder = EmbeddingBagCollectionSharder()
    constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=["fused"])
                   for t in tbls}  # fmt: skip
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device=device.type), constraints=constraints).plan(model, [sharder])
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder]).eval()
    return (lambda d, v, l, kjt: torch.sigmoid(dmp(d, kjt))), {"table_bytes": sum(t.num_embeddings for t in tbls) * 128 * 4}


def build_full_ebc(tbls, device):
    import torch
    from torchrec import EmbeddingBagCollection

    model = mlperf_dlrm(EmbeddingBagCollection(tbls, device=device)).eval()
    return (lambda d, v, l, kjt: torch.sigmoid(model(d, kjt))), {"table_bytes": sum(t.num_embeddings for t in tbls) * 128 * 4}


def build_full_int8(tbls, device):
    import torch
    from torchrec import EmbeddingBagCollection
    from torchrec.inference.modules import quantize_embeddings

    model = mlperf_dlrm(EmbeddingBagCollection(tbls, device=device)).eval().to(device)
    model = quantize_embeddings(model, dtype=torch.qint8, inplace=True)
    return (lambda d, v, l, kjt: torch.sigmoid(model(d, kjt))), {"table_bytes": sum(t.num_embeddings for t in tbls) * (128 + 8)}


def inputs(tbls, batch: int, n: int, device):
    import torch
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(batch)
    out = []
    for _ in range(n):
        values = torch.cat([torch.randint(0, t.num_embeddings, (batch,), generator=g) for t in tbls])
        lengths = torch.ones(len(tbls) * batch, dtype=torch.int64)
        kjt = KeyedJaggedTensor(keys=[t.feature_names[0] for t in tbls], values=values, lengths=lengths)
        out.append((torch.randn(batch, 13, generator=g).to(device), values.to(device), lengths.to(device), kjt.to(device)))
    return out


def main(argv=None) -> Dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tbls = tables(args.table_scale)
    full_floats = sum(t.num_embeddings for t in tbls) * 128
    print(f"DLRM MLPerf v1 shape, 26 tables of MLPerf v1 / {args.table_scale}: {full_floats:,} floats "
          f"({full_floats * 4 / 1e9:.2f} GB fp32); {device}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}")  # fmt: skip
    builders: Dict[str, Callable] = {
        "robe_fp32": lambda: build_robe(tbls, args.compression, "fp32", workdir, device),
        "robe_bf16": lambda: build_robe(tbls, args.compression, "bf16", workdir, device),
        "full_fbgemm": lambda: build_full_fbgemm(tbls, device),
        "full_int8": lambda: build_full_int8(tbls, device),
        "full_ebc": lambda: build_full_ebc(tbls, device),
    }
    models, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.variants:
            t0 = time.perf_counter()
            try:
                models[name], info[name] = builders[name]()
            except Exception as e:  # a variant that does not run here is reported, not fatal
                info[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
                print(f"{name}: does not run here: {info[name]['error']}")
                continue
            print(f"{name}: built in {time.perf_counter() - t0:.1f} s {info[name]}")
        results: Dict[str, Dict] = {n: {} for n in models}
        with torch.no_grad():  # not inference_mode: FBGEMM's CPU TBE is registered for Autograd only
            for batch in args.batches:
                iters = max(5, min(args.iters, int(args.iters * 2048 / max(batch, 2048))))
                data = inputs(tbls, batch, 4, device)
                for name in list(models):  # warm-up (first calls compile / allocate); a failure drops the variant
                    try:
                        for d in data[:2]:
                            models[name](*d)
                        sync()
                    except Exception as e:
                        info[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
                        print(f"{name}: fails at batch {batch}: {info[name]['error']}")
                        del models[name], results[name]
                times: Dict[str, List[float]] = {n: [] for n in models}
                names = list(models)
                for i in range(iters):
                    for k in range(len(names)):
                        name = names[(i + k) % len(names)]
                        d = data[i % len(data)]
                        sync()
                        t0 = time.perf_counter()
                        models[name](*d)
                        sync()
                        times[name].append(time.perf_counter() - t0)
                for name, ts in times.items():
                    ts.sort()
                    results[name][batch] = {
                        "samples_per_s": batch / statistics.median(ts), "p50_ms": 1e3 * statistics.median(ts),
                        "p99_ms": 1e3 * ts[min(len(ts) - 1, int(0.99 * len(ts)))], "calls": len(ts),
                    }  # fmt: skip
    base = next((b for b in ("full_fbgemm", "full_ebc") if b in results), None)
    print(f"\n{'variant':<12} {'batch':>6} {'samples/s':>12} {'p50 ms':>9} {'p99 ms':>9}" + (f" {'vs ' + base:>15}" if base else ""))
    for name, per in results.items():
        for batch, r in per.items():
            ratio = f" {r['samples_per_s'] / results[base][batch]['samples_per_s']:>14.2f}x" if base else ""
            print(f"{name:<12} {batch:>6} {r['samples_per_s']:>12,.0f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f}{ratio}")
    sizes = {n: i.get("artifact_bytes") or i.get("table_bytes") for n, i in info.items() if "error" not in i}
    print("embedding storage: " + ", ".join(f"{n} {b:,} bytes" for n, b in sizes.items() if b))
    out = {"args": vars(args), "device": str(device), "full_floats": full_floats, "info": info, "results": results,
           "threads": torch.get_num_threads()}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
