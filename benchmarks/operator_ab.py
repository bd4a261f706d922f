"""A/B of two builds of the CPU operator (``robe_dist._C``) in one process, steps interleaved.

Machine noise on a shared 2-core VM moves a step by 20% between runs of ``benchmarks/lookup.py``,
far more than most kernel changes do; loading both builds into one process and alternating
their steps (the order flipping every step) lets the noise hit both alike. Each side trains its
own copy of the same array with the fused SGD step (``robe_forward`` + ``robe_backward_sgd``, as
``robe.fused_update`` runs it) on the same batches; the arrays must end equal bit for bit unless
the change is meant to alter results (``--allow-different``).

Build the old side from a clone, then compare (the current build is the default new side)::

    git clone -q . /tmp/old && git -C /tmp/old checkout <commit>
    (cd /tmp/old && .venv/bin/python setup.py build_ext --inplace)   # or /work/main/.venv/bin/python
    .venv/bin/python benchmarks/operator_ab.py --old /tmp/old/robe_dist/_C*.so

Shapes default to ``benchmarks/lookup.py``'s: batch 8192, 26 one-hot features, dim 128, array
27M floats, Z=32, universal hash, uniform ids. ``--old-align`` / ``--new-align`` set each side's
``block_align`` (the same build on both sides with ``--new-align 16`` measures the alignment alone)::

    .venv/bin/python benchmarks/operator_ab.py --old robe_dist/_C*.so --new-align 16 --allow-different
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import statistics
import time
from typing import Tuple

import torch


class FusedSgdProblem:
    """The inputs of ``benchmarks/lookup.py``'s step for the operator itself: ``features``
    one-hot features of raw 32-bit ids (four batches, cycled), a fixed upstream gradient, and the
    array's starting values; ``step`` runs the fused SGD step (``robe_forward`` +
    ``robe_backward_sgd``, as ``robe.fused_update`` runs it) of any build of ``robe_dist._C``."""

    def __init__(self, batch: int, features: int, dim: int, block_size: int, array_size: int) -> None:
        self.batch, self.features, self.dim, self.z = batch, features, dim, block_size
        g = torch.Generator().manual_seed(0)
        self.start = torch.randn(array_size, generator=g) * 0.01
        # meta columns: table key, num_embeddings, dim, output column, pooling, key index, occurrence
        self.meta = torch.tensor([[f * 7919 + 1, 0, dim, f * dim, 0, f, 0] for f in range(features)], dtype=torch.long)
        self.offsets = torch.arange(batch * features + 1, dtype=torch.long)
        self.batches = [torch.randint(0, 2**32, (batch * features,), generator=g) for _ in range(4)]
        self.grad = torch.randn(batch, features * dim, generator=g)
        self.none = torch.empty(0)

    @staticmethod
    def add_shape_arguments(p: argparse.ArgumentParser) -> None:
        """``--batch --features --dim --block-size --array-size``, defaulting to lookup.py's shape."""
        p.add_argument("--batch", type=int, default=8192)
        p.add_argument("--features", type=int, default=26)
        p.add_argument("--dim", type=int, default=128)
        p.add_argument("--block-size", type=int, default=32)
        p.add_argument("--array-size", type=int, default=27_000_000)

    def step(self, op, array: torch.Tensor, it: int, block_align: int = 1) -> Tuple[float, float, torch.dtype]:
        """One step of batch ``it`` on ``array`` (in place): (forward s, backward s, starts dtype).
        ``block_align`` needs a build of ABI 4 or later (older ones have no such argument)."""
        values, B, F, D, Z = self.batches[it % len(self.batches)], self.batch, self.features, self.dim, self.z
        align = [block_align] if getattr(op, "ABI_VERSION", 1) >= 4 else []
        if block_align != 1 and not align:
            raise SystemExit(f"operator_ab: a build of ABI {getattr(op, 'ABI_VERSION', 1)} has no block_align")
        t0 = time.perf_counter()
        _, starts = op.robe_forward(array, values, self.none, self.offsets, B, self.meta, F * D, D // Z, 1, 0, Z,
                                    [1, 1, 1, 2**31 - 1], *align)  # fmt: skip
        t1 = time.perf_counter()
        op.robe_backward_sgd(array, self.grad, self.none, self.offsets, B, self.meta, starts, Z, D // Z, 1, values.numel(), 0.01)
        return t1 - t0, time.perf_counter() - t1, starts.dtype


def load(path: str, name: str):
    """The extension at ``path`` as a module of its own (two builds can coexist)."""
    loader = importlib.machinery.ExtensionFileLoader(f"{name}._C", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"{name}._C", loader))
    loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--old", required=True, help="the old build's _C*.so")
    p.add_argument("--new", default=None, help="the new build's _C*.so (default: robe_dist's)")
    FusedSgdProblem.add_shape_arguments(p)
    p.add_argument("--steps", type=int, default=80, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--old-align", type=int, default=1, help="the old side's block_align")
    p.add_argument("--new-align", type=int, default=1, help="the new side's block_align")
    p.add_argument("--allow-different", action="store_true", help="the change alters results: do not require equal arrays")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    new_path = args.new or glob.glob(str(__import__("pathlib").Path(__file__).parents[1] / "robe_dist" / "_C*.so"))[0]
    sides = {"old": load(glob.glob(args.old)[0], "old"), "new": load(new_path, "new")}
    B, F, D, Z, m = args.batch, args.features, args.dim, args.block_size, args.array_size
    problem = FusedSgdProblem(B, F, D, Z, m)
    arrays = {k: problem.start.clone() for k in sides}
    times = {k: {"step": [], "forward": [], "backward": []} for k in sides}
    dtypes, aligns = {}, {"old": args.old_align, "new": args.new_align}
    for it in range(args.warmup + args.steps):
        order = ("old", "new") if it % 2 == 0 else ("new", "old")
        for name in order:
            forward_s, backward_s, dtypes[name] = problem.step(sides[name], arrays[name], it, aligns[name])
            if it >= args.warmup:
                for key, t in (("step", forward_s + backward_s), ("forward", forward_s), ("backward", backward_s)):
                    times[name][key].append(1e3 * t)
    same = torch.equal(arrays["old"], arrays["new"])
    print(f"# operator A/B: batch {B}, {F} one-hot features, dim {D}, array {m:,} floats, Z={Z}, "
          f"{args.threads} threads, {args.steps} interleaved steps per side (+{args.warmup} warm-up)")  # fmt: skip
    print(f"{'side':<5}{'ABI':>4}{'align':>6}{'starts':>13}{'step ms':>9}{'min':>7}{'fwd':>7}{'bwd':>7}")
    for name, op in sides.items():
        t = times[name]
        print(f"{name:<5}{getattr(op, 'ABI_VERSION', 1):>4}{aligns[name]:>6}{str(dtypes[name]):>13}{statistics.median(t['step']):>9.1f}"
              f"{min(t['step']):>7.1f}{statistics.median(t['forward']):>7.1f}{statistics.median(t['backward']):>7.1f}")  # fmt: skip
    ratio = statistics.median(times["old"]["step"]) / statistics.median(times["new"]["step"])
    print(f"new / old speed: {ratio:.3f}x (median steps); arrays after training: {'equal bit for bit' if same else 'DIFFERENT'}")
    if not same and not args.allow_different:
        raise SystemExit("operator_ab: the two builds trained the array differently (pass --allow-different if meant)")


if __name__ == "__main__":
    main()
