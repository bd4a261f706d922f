#!/usr/bin/env python
"""The GPU device check's measurements (launch/gpu_check.sh runs this after the CUDA tests).

1. ``compare``: the Triton op (CUDA) against the C++ op (CPU) on the same inputs: forward, dense
   gradient (fast and deterministic backward), fused SGD and Adagrad, both mappings, a weighted and a MEAN
   case; max differences and whether the deterministic backward repeats bit for bit.
2. ``bandwidth``: the device's copy bandwidth (``dst.copy_(src)`` over 1 GiB, best of 20), the
   yardstick of the byte model.
3. ``steps``: one embedding training step (forward of 26 one-hot features, ``backward(g)`` from a
   fixed upstream gradient, SGD update) at batch 8192 and 65536, dim 128, ROBE array of 27M
   floats, Z=32: ROBE fp32 and bf16, dense SGD (``torch.optim.SGD(fused=True)``) and fused SGD,
   against TorchRec's unsharded ``EmbeddingBagCollection`` on CUDA (one ``nn.EmbeddingBag`` per
   table, dense gradients, ``SGD(fused=True)``; the MLPerf v1 tables divided by the smallest
   factor that fits weights + gradient) and against plain ``nn.EmbeddingBag(sparse=True)`` with
   the full MLPerf v1 tables (96 GB; sparse gradients, ``torch.optim.SGD``), each timed with CUDA
   events: median step, steps/s, achieved GB/s by the byte model and its share of the copy
   bandwidth, peak memory. TorchRec's sharded FBGEMM CUDA kernels are NOT in this comparison: the
   lent machine's image has no fbgemm-gpu CUDA build (465 MB, too large to carry).
4. ``l2``: forward-only time of the fp32 (108 MB) and bf16 (54 MB: against the L2 size the card reports)
   arrays at batch 65536, against the HBM bound of the byte model.

Writes ``OUT/gpu_check.json``. ``--smoke`` runs every part at toy sizes on any device (CPU: the
Triton kernels under the interpreter), to test this script where there is no GPU::

    python benchmarks/gpu_check.py --out /tmp/gpu_check            # on a GPU: about 2-3 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check     # anywhere: seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from robe_dist import RobeConfig, RobeEmbeddingBagCollection, ops  # noqa: E402

MLPERF_V1_TABLE_SIZES = [
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
]  # fmt: skip
GB = 1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="toy sizes, any device: tests the script")
    p.add_argument("--batches", type=int, nargs="+", default=[8192, 65536])
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--array-size", type=int, default=27_000_000)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--skip", nargs="*", default=[], choices=["compare", "bandwidth", "steps", "l2"])
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.features, args.dim, args.array_size = [64], 4, 64, 20_011
        args.iters, args.warmup = 2, 1
    return args


# ------------------------------------------------------------------------------------ utilities
class Timer:
    """Wall time of a callable: CUDA events on a GPU, perf_counter elsewhere (seconds)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, base: int) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def machine(device: torch.device) -> Dict:
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        cpp_operator=ops.has_cpp_extension(), device=str(device), cpus=os.cpu_count(),
    )  # fmt: skip
    for name in ("triton", "torchrec", "fbgemm_gpu"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is a fact to report
            info[name] = f"not available ({type(e).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                    l2_bytes=getattr(p, "L2_cache_size", None), cuda=torch.version.cuda)  # fmt: skip
    return info


def tables(features: int, dim: int, sizes: List[int]):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=sizes[i % len(sizes)],
                               feature_names=[f"f{i}"]) for i in range(features)]  # fmt: skip


def one_hot_kjt(batch: int, features: int, sizes: List[int], device: torch.device, seed: int):
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, sizes[i % len(sizes)], (batch,), generator=g) for i in range(features)])
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(features)], values=values,
                             lengths=torch.ones(batch * features, dtype=torch.int64)).to(device)  # fmt: skip


def array_dtypes(device: torch.device) -> tuple:
    """fp32 everywhere; bf16 on CUDA (the CPU operator takes fp32/fp64 arrays)."""
    return (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)


# ------------------------------------------------------------------------------------- compare
def compare(args, device: torch.device) -> Dict:
    """Triton on ``device`` against the C++ operator on CPU, same inputs; max |differences|."""
    from torchrec import KeyedJaggedTensor
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    from robe_dist.kernels import triton_lookup
    from robe_dist.modules.robe_embedding_bag_collection import _lookup_inputs

    if not ops.has_cpp_extension():
        return {"skipped": "robe_dist._C is not built: nothing to compare the Triton kernels with"}
    batch = 64 if args.smoke else 4096
    results = {}
    for name, hash_mode, pooling, weighted in [
        ("universal_sum", "universal", PoolingType.SUM, False), ("paper_sum_weighted", "paper", PoolingType.SUM, True),
        ("universal_mean", "universal", PoolingType.MEAN, False),
        ("universal_sum_align16", "universal", PoolingType.SUM, False),
    ]:  # fmt: skip
        tbl = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=MLPERF_V1_TABLE_SIZES[i],
                                  feature_names=[f"f{i}"], pooling=pooling) for i in range(args.features)]  # fmt: skip
        torch.manual_seed(0)
        robe = RobeConfig(min(args.array_size, 1_000_003), args.block_size, hash=hash_mode,
                          block_align=16 if name.endswith("align16") else 1)  # fmt: skip
        ebc = RobeEmbeddingBagCollection(tbl, robe, is_weighted=weighted)
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(0, 4, (args.features * batch,), generator=g)
        keys = [f"f{i}" for i in range(args.features)]
        values = torch.cat([torch.randint(0, MLPERF_V1_TABLE_SIZES[i], (int(lengths[i * batch:(i + 1) * batch].sum()),), generator=g)
                            for i in range(args.features)])  # fmt: skip
        kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths,
                                weights=torch.rand(values.numel(), generator=g) if weighted else None)  # fmt: skip
        v, w, off, meta, b = _lookup_inputs(kjt, ebc.lookup_meta, ebc._distinct_features, weighted, ebc.array)
        static = ops._static_args(ebc.lookup_spec)
        out_c, starts_c, _ = torch.ops.robe_dist.pooled_lookup(ebc.array.detach(), v, w, off, meta, b, *static)
        grad_out = torch.randn(out_c.shape, generator=g)
        spec = ebc.lookup_spec
        bsizes = (spec.block_size, spec.max_blocks, spec.occurrences, v.numel())
        grad_c = torch.ops.robe_dist.pooled_lookup_backward(grad_out, w, off, meta, starts_c, b, spec.array_size, *bsizes, True)
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        t_args = (to(v), to(w), to(off), to(meta), b)
        t0 = time.perf_counter()
        out_t, starts_t, status = triton_lookup.forward(ebc.array.detach().to(device), *t_args, *static)
        bw = dict(grad_out=grad_out.to(device), weights=to(w), offsets=to(off), meta=to(meta), starts=starts_t, batch=b,
                  block_size=spec.block_size, max_blocks=spec.max_blocks, num_values=v.numel())  # fmt: skip
        fast = triton_lookup.backward(array_size=spec.array_size, deterministic=False, **bw)
        det = [triton_lookup.backward(array_size=spec.array_size, deterministic=True, **bw) for _ in range(2)]
        sgd_c = ebc.array.detach().clone()
        torch.ops.robe_dist.pooled_lookup_fused_update(sgd_c, None, grad_out, w, off, meta, starts_c, b, *bsizes,
                                                      ops.OPTIMIZERS["sgd"], args.lr, 0.0, False)  # fmt: skip
        sgd_t = ebc.array.detach().to(device, copy=True)  # (a copy on CPU too: --smoke)
        triton_lookup.fused_update(sgd_t, None, optimizer=ops.OPTIMIZERS["sgd"], lr=args.lr, eps=0.0, deterministic=False, **bw)
        # fused Adagrad (the trainer's default on one process), from a state already holding steps:
        # at a zero state a slot whose contributions nearly cancel moves by lr * g / |g|, whose
        # sign is whatever the summation order leaves (a review measured 3e-4 between two valid
        # fp32 orders), which would fail the comparison without any fault
        state0 = grad_c.square() * 0.5 + 1.0
        ada_c, ada_sc = ebc.array.detach().clone(), state0.clone()
        torch.ops.robe_dist.pooled_lookup_fused_update(ada_c, ada_sc, grad_out, w, off, meta, starts_c, b, *bsizes,
                                                      ops.OPTIMIZERS["adagrad"], args.lr, 1e-10, False)  # fmt: skip
        ada_t, ada_st = ebc.array.detach().to(device, copy=True), state0.to(device, copy=True)
        triton_lookup.fused_update(ada_t, ada_st, optimizer=ops.OPTIMIZERS["adagrad"], lr=args.lr, eps=1e-10, deterministic=False, **bw)
        sync(device)
        diff = lambda a, c: float((a.detach().cpu().double() - c.detach().double()).abs().max())  # noqa: E731
        results[name] = dict(
            values=v.numel(), starts_equal=bool(torch.equal(starts_t.cpu(), starts_c)), status_ok=status.cpu().tolist() == [ops.STATUS_OK] * 2,
            forward_max_abs_diff=diff(out_t, out_c), grad_fast_max_abs_diff=diff(fast, grad_c),
            grad_deterministic_max_abs_diff=diff(det[0], grad_c), deterministic_repeats_bitwise=bool(torch.equal(det[0], det[1])),
            fused_sgd_max_abs_diff=diff(sgd_t, sgd_c), grad_max_abs=float(grad_c.abs().max()),
            fused_adagrad_max_abs_diff=diff(ada_t, ada_c), fused_adagrad_state_max_rel_diff=diff(ada_st, ada_sc) / max(float(ada_sc.abs().max()), 1e-30),
            triton_seconds_incl_compile=round(time.perf_counter() - t0, 3),
        )  # fmt: skip
    results["all_match"] = all(
        r["starts_equal"] and r["status_ok"] and r["deterministic_repeats_bitwise"] and r["forward_max_abs_diff"] < 1e-4
        and r["grad_fast_max_abs_diff"] < 1e-3 and r["grad_deterministic_max_abs_diff"] < 1e-3 and r["fused_sgd_max_abs_diff"] < 1e-4
        and r["fused_adagrad_max_abs_diff"] < 1e-4 and r["fused_adagrad_state_max_rel_diff"] < 1e-4
        for r in results.values()
    )  # fmt: skip
    return results


# ----------------------------------------------------------------------------------- bandwidth
def bandwidth(args, device: torch.device) -> Dict:
    n = (1 << 20 if args.smoke else 1 << 28)  # floats: 1 GiB on the GPU
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    times = [timer(lambda: dst.copy_(src)) for _ in range(20)]
    return {"copy_GBps": 2 * 4 * n / min(times) / GB, "bytes_per_copy": 4 * n}


# ---------------------------------------------------------------------------------- byte model
def byte_model(batch: int, features: int, dim: int, array_size: int, elem: int, dense_update: bool) -> int:
    """Minimal bytes a one-hot step moves (docs/performance.md): ids 8N, embedding elements read
    elem*N*D, output written and upstream gradient read elem*B*F*D each, touched elements read and
    written 2*elem*N*D; a dense update adds the fresh gradient (zeroed: 4m) and SGD over the array
    (read p, read g, write p: 3*elem*m)."""
    n = batch * features
    total = 8 * n + elem * n * dim + 2 * elem * batch * features * dim + 2 * elem * n * dim
    if dense_update:
        total += 4 * array_size + 3 * elem * array_size
    return total


# --------------------------------------------------------------------------------------- steps
def _time(step: Callable[[], None], args, device: torch.device) -> Dict:
    timer = Timer(device)
    for _ in range(args.warmup):
        step()
    base = peak_reset(device)
    times = [timer(step) for _ in range(args.iters)]
    result = {"step_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak_step_bytes": peak_since(device, base)}
    # (each step above is timed alone, synchronised: its latency, host launches included; steps
    # queued back to back, as a training loop runs them, overlap the host's work with the GPU's)
    result["pipelined_step_ms"] = 1e3 * timer(lambda: [step() for _ in range(args.iters)]) / args.iters
    return result


def robe_steps(args, device: torch.device, batch: int, kjts, grad: torch.Tensor) -> Dict:
    out = {}
    tbl = tables(args.features, args.dim, MLPERF_V1_TABLE_SIZES)
    variants = [(dtype, fused, 1) for dtype in array_dtypes(device) for fused in (False, True)] + [(torch.float32, True, 16)]
    for dtype, fused, align in variants:
        elem = torch.finfo(dtype).bits // 8
        name = f"robe_{'fp32' if dtype == torch.float32 else 'bf16'}_{'fused' if fused else 'dense'}"
        name += f"_align{align}" if align != 1 else ""
        try:
            torch.manual_seed(0)
            robe = RobeConfig(args.array_size, args.block_size, block_align=align)
            mod = RobeEmbeddingBagCollection(tbl, robe, device=device, fused_sgd_lr=args.lr if fused else None).to(dtype)
            opt = None if fused else torch.optim.SGD(mod.parameters(), lr=args.lr, **({"fused": True} if device.type == "cuda" else {}))
            g = grad.to(dtype)
            it = [0]

            def step():
                kjt = kjts[it[0] % len(kjts)]
                it[0] += 1
                mod(kjt).values().backward(g)
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            r = _time(step, args, device)
            r["bytes"] = byte_model(batch, args.features, args.dim, args.array_size, elem, dense_update=not fused)
            r["tensor_bytes"] = mod.array.numel() * elem * (1 if fused else 2)
            out[name] = r
            mod = opt = None  # frees them (a del would leave step() a dangling name)
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def fit_scale(device: torch.device, bytes_per_row: int, share: float) -> int:
    """Smallest divisor of the MLPerf v1 tables whose rows x ``bytes_per_row`` fit ``share`` of the free memory."""
    rows = sum(MLPERF_V1_TABLE_SIZES)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 4 * GB
    scale = 1
    while rows // scale * bytes_per_row > share * free:
        scale += 1
    return scale


def baseline_steps(args, device: torch.device, batch: int, grad: torch.Tensor, seeds: List[int]) -> Dict:
    from torch import nn
    from torchrec import EmbeddingBagCollection

    out = {}
    # TorchRec's unsharded EmbeddingBagCollection: weights + dense gradient must fit
    scale = 10_000 if args.smoke else fit_scale(device, 2 * 4 * args.dim, 0.8)
    sizes = [max(1, n // scale) for n in MLPERF_V1_TABLE_SIZES]
    name = f"torchrec_ebc_tables_div{scale}"
    try:
        ebc = EmbeddingBagCollection(tables(args.features, args.dim, sizes), device=torch.device("meta"))
        ebc = ebc.to_empty(device=device)
        for p in ebc.parameters():
            nn.init.uniform_(p, -0.01, 0.01)
        opt = torch.optim.SGD(ebc.parameters(), lr=args.lr, **({"fused": True} if device.type == "cuda" else {}))
        kjts = [one_hot_kjt(batch, args.features, sizes, device, s) for s in seeds]
        it = [0]

        def step():
            kjt = kjts[it[0] % len(kjts)]
            it[0] += 1
            ebc(kjt).values().backward(grad)
            opt.step()
            opt.zero_grad(set_to_none=True)

        r = _time(step, args, device)
        rows = sum(sizes)
        r.update(bytes=byte_model(batch, args.features, args.dim, rows * args.dim, 4, dense_update=True),
                 tensor_bytes=rows * args.dim * 4 * 2, table_rows=rows, table_divisor=scale)  # fmt: skip
        out[name] = r
        ebc = opt = None
    except Exception as e:  # noqa: BLE001
        out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # nn.EmbeddingBag(sparse=True) per table: the full tables when they fit (sparse gradients)
    scale = 10_000 if args.smoke else fit_scale(device, 4 * args.dim, 0.85)
    sizes = [max(1, n // scale) for n in MLPERF_V1_TABLE_SIZES]
    name = "embbag_sparse_full_tables" if scale == 1 else f"embbag_sparse_tables_div{scale}"
    try:
        bags = nn.ModuleList(
            nn.EmbeddingBag(sizes[i % len(sizes)], args.dim, mode="sum", sparse=True, device=device)
            for i in range(args.features)
        )
        opt = torch.optim.SGD(bags.parameters(), lr=args.lr)
        inputs = []
        for s in seeds:
            kjt = one_hot_kjt(batch, args.features, sizes, device, s)
            offsets = torch.arange(batch, device=device)
            inputs.append([(kjt.values()[i * batch:(i + 1) * batch], offsets) for i in range(args.features)])
        it = [0]

        def step():
            feats = inputs[it[0] % len(inputs)]
            it[0] += 1
            torch.cat([bag(v, o) for bag, (v, o) in zip(bags, feats)], dim=1).backward(grad)
            opt.step()
            opt.zero_grad(set_to_none=True)

        r = _time(step, args, device)
        r.update(bytes=byte_model(batch, args.features, args.dim, 0, 4, dense_update=False),
                 tensor_bytes=sum(sizes) * args.dim * 4, table_rows=sum(sizes), table_divisor=scale)  # fmt: skip
        out[name] = r
        bags = opt = None
    except Exception as e:  # noqa: BLE001
        out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def steps(args, device: torch.device, copy_gbps: Optional[float]) -> Dict:
    result = {}
    for batch in args.batches:
        seeds = [1, 2, 3, 4]
        kjts = [one_hot_kjt(batch, args.features, MLPERF_V1_TABLE_SIZES, device, s) for s in seeds]
        grad = torch.randn(batch, args.features * args.dim, device=device)
        rows = robe_steps(args, device, batch, kjts, grad)
        rows.update(baseline_steps(args, device, batch, grad, seeds))
        best_baseline = min((r["step_ms"] for k, r in rows.items() if not k.startswith("robe") and "step_ms" in r), default=None)
        for r in rows.values():
            if "step_ms" not in r:
                continue
            r["steps_per_s"] = 1e3 / r["step_ms"]
            r["samples_per_s"] = batch * r["steps_per_s"]
            r["GBps"] = r["bytes"] / (r["step_ms"] / 1e3) / GB
            if copy_gbps:
                r["share_of_copy_bw"] = r["GBps"] / copy_gbps
            if best_baseline:
                r["speedup_vs_best_baseline"] = best_baseline / r["step_ms"]
        result[str(batch)] = rows
        del kjts, grad
    return result


def l2(args, device: torch.device, copy_gbps: Optional[float]) -> Dict:
    """Forward only at the largest batch: does a bf16 array that fits L2 beat the HBM bound?"""
    batch = max(args.batches)
    tbl = tables(args.features, args.dim, MLPERF_V1_TABLE_SIZES)
    kjts = [one_hot_kjt(batch, args.features, MLPERF_V1_TABLE_SIZES, device, s) for s in (1, 2)]
    out = {}
    for dtype in array_dtypes(device):
        elem = torch.finfo(dtype).bits // 8
        mod = RobeEmbeddingBagCollection(tbl, RobeConfig(args.array_size, args.block_size), device=device).to(dtype)
        it = [0]

        def fwd():
            with torch.no_grad():
                mod(kjts[it[0] % 2])
            it[0] += 1

        r = _time(fwd, args, device)
        n = batch * args.features
        r["bytes"] = 8 * n + elem * n * args.dim + elem * n * args.dim  # ids, elements read, output written
        r["GBps"] = r["bytes"] / (r["step_ms"] / 1e3) / GB
        r["array_bytes"] = args.array_size * elem
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) if device.type == "cuda" else None
        r["fits_l2"] = None if not l2_bytes else r["array_bytes"] <= l2_bytes  # (the issue assumed 60 MB; H100 SXM has 50)
        if copy_gbps:
            r["share_of_copy_bw"] = r["GBps"] / copy_gbps
        out["fp32" if dtype == torch.float32 else "bf16"] = r
        mod = None
    return out


def main(argv=None) -> Dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report: Dict = {"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()}}
    path = args.out / "gpu_check.json"

    def save():
        path.write_text(json.dumps(report, indent=1, default=str))

    copy_gbps = None
    for part in ("compare", "bandwidth", "steps", "l2"):
        if part in args.skip:
            continue
        t0 = time.time()
        print(f"gpu_check: {part} ...", flush=True)
        try:
            if part == "compare":
                report[part] = compare(args, device)
            elif part == "bandwidth":
                report[part] = bandwidth(args, device)
                copy_gbps = report[part]["copy_GBps"]
            elif part == "steps":
                report[part] = steps(args, device, copy_gbps)
            else:
                report[part] = l2(args, device, copy_gbps)
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
            report[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        report.setdefault("seconds", {})[part] = round(time.time() - t0, 1)
        save()
        print(f"gpu_check: {part} done in {report['seconds'][part]} s", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1, default=str)[:6000])
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    result = main()
    failed = [p for p in ("compare", "bandwidth", "steps", "l2") if "error" in result.get(p, {})]
    if result.get("compare", {}).get("all_match") is False:
        failed.append("compare (Triton != C++ op)")
    if failed:  # every figure is written; the step's exit status says something is wrong
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
