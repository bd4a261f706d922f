"""How the CPU operator's training step scales with threads, and that its bits do not change.

The fused SGD step as ``robe.fused_update`` runs it (``robe_forward`` + ``robe_backward_sgd`` of
``robe_dist._C``, the shapes of ``benchmarks/lookup.py``: batch 8192, 26 one-hot features, dim
128, 27M-float array, Z=32) at each thread count, from the same array on the same batches. The
backward partitions the array's slots between threads and sums every slot in a fixed order, so
the trained arrays must be equal bit for bit at every thread count (the script fails otherwise).
Machines with many cores (the GPU machine's 16, in the device check) show whether the design
scales; on the 2-core CI machine only 1 and 2 mean anything::

    .venv/bin/python benchmarks/cpu_threads.py --threads 1 2 4 8 16 --json /tmp/cpu_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from operator_ab import FusedSgdProblem  # benchmarks/, the script's own folder

from robe_dist import ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    FusedSgdProblem.add_shape_arguments(p)
    p.add_argument("--block-align", type=int, default=1, help="block starts on multiples of this (16: a cache line)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per thread count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    op = ops._C
    if op is None:
        raise SystemExit(f"cpu_threads: the C++ operator is not available ({ops.cpp_extension_problem()})")
    B, F, D, Z, m = args.batch, args.features, args.dim, args.block_size, args.array_size
    problem = FusedSgdProblem(B, F, D, Z, m)
    before = torch.get_num_threads()
    rows, reference = [], None
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            array = problem.start.clone()
            times = {"step": [], "forward": [], "backward": []}
            for it in range(args.warmup + args.steps):
                forward_s, backward_s, _ = problem.step(op, array, it, args.block_align)
                if it >= args.warmup:
                    for key, t in (("step", forward_s + backward_s), ("forward", forward_s), ("backward", backward_s)):
                        times[key].append(1e3 * t)
            same = reference is None or torch.equal(array, reference)
            reference = array if reference is None else reference
            rows.append({"threads": threads, **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                         "min_step_ms": min(times["step"]), "same_bits_as_first": same})  # fmt: skip
    finally:
        torch.set_num_threads(before)
    first = rows[0]["step_ms"]
    print(f"# CPU operator, fused SGD step: batch {B}, {F} one-hot features, dim {D}, array {m:,} floats, Z={Z}, align {args.block_align}; "
          f"{os.cpu_count()} cpus; {args.steps} steps per thread count (+{args.warmup} warm-up)")  # fmt: skip
    print(f"{'threads':>7}{'step ms':>9}{'min':>7}{'fwd':>7}{'bwd':>7}{'speed-up':>10}  same bits")
    for r in rows:
        r["speedup"] = first / r["step_ms"]
        print(f"{r['threads']:>7}{r['step_ms']:>9.1f}{r['min_step_ms']:>7.1f}{r['forward_ms']:>7.1f}{r['backward_ms']:>7.1f}"
              f"{r['speedup']:>9.2f}x  {'yes' if r['same_bits_as_first'] else 'NO'}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "args": vars(args), "rows": rows}, f, indent=1)
    if not all(r["same_bits_as_first"] for r in rows):
        raise SystemExit("cpu_threads: the trained array depends on the thread count")


if __name__ == "__main__":
    main()
