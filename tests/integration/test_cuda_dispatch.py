"""Every operator outside ATen that a ROBE run calls must have a CUDA kernel where it will run.

The lent GPU machine's image has the CPU-only build of fbgemm-gpu (docs/performance.md, the GPU
section): its ops have CPU and Meta kernels only, so one FBGEMM op called on CUDA tensors stops a
GPU run with ``NotImplementedError``, which no CPU test sees. This test records, with a
``TorchDispatchMode``, every operator that training (1 and 2 processes: the fused update and the
all-reduced dense gradient), evaluation, robe-export and robe-predict dispatch on CPU, and checks
that each one outside ``aten`` has a CUDA kernel (or a composite one) in this environment, which
has the same fbgemm-gpu-cpu build: robe_dist's own ops (the Triton kernels), c10d's collectives,
and FBGEMM's ``asynchronous_complete_cumsum`` through ``robe_dist.fbgemm_compat``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import List

import pytest
import torch
from test_train import SMALL
from torch.utils._python_dispatch import TorchDispatchMode
from train_runs import REPO, call_main, own_group, robe_train

class _Record(TorchDispatchMode):
    """Counts every operator dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def _record(rank: int, world_size: int, argv: List[str], store: str, out: str) -> dict:
    """robe-train's ``main(argv)`` (train_runs.py), then on rank 0 robe-export and robe-predict
    of its last checkpoint, under ``_Record``; the operators go to ``out/ops_rank<rank>.json``."""
    import robe_dist.ops  # noqa: F401  (the custom ops and the complete-cumsum shim)
    from robe_dist.inference import export, predict

    with own_group(rank, world_size, store), _Record() as rec:
        result = call_main(argv)
        if result["returncode"] == 0 and rank == 0:  # (robe-train has left its process group, as it does)
            ckpt = sorted((Path(argv[argv.index("--run-dir") + 1]) / "checkpoints").glob("step_*"))[-1]
            model = Path(out) / "model.pt2"
            data = [a.split("=", 1)[1] for a in argv if a.startswith("data.path=")][0]
            with contextlib.chdir(REPO), contextlib.redirect_stdout(io.StringIO()):
                code = export.main(["--checkpoint", str(ckpt), "--out", str(model)])
                result["returncode"] = code or predict.main(["--model", str(model), "--data", data, "--split", "test"])
    (Path(out) / f"ops_rank{rank}.json").write_text(json.dumps(rec.ops))
    return result


def runs_on_cuda(op: str) -> bool:
    keys = ("CUDA", "CompositeImplicitAutograd", "CompositeExplicitAutograd")
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in keys)


@pytest.mark.integration
@pytest.mark.parametrize("nproc", [1, 2])
def test_every_non_aten_op_of_a_robe_run_has_a_cuda_kernel(tmp_path, nproc):
    import robe_dist.ops  # noqa: F401

    args = ["--run-dir", str(tmp_path / "run")]
    # two ranks on the CPU (a GPU machine lent here has one GPU); one on the GPU where there is one,
    # where an op without a CUDA kernel would also stop the run itself
    device = "cpu" if nproc > 1 else "auto"
    for o in [*SMALL, f"data.path={tmp_path / 'data'}", "train.max_steps=3", "eval.max_batches=1", "optim.name=adagrad",
              f"dist.device={device}"]:  # fmt: skip
        args += ["--set", o]
    p = robe_train(args, nproc, runner=_record, out=str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    ops = set()
    for rank in range(nproc):
        ops |= set(json.loads((tmp_path / f"ops_rank{rank}.json").read_text()))
    outside_aten = sorted(op for op in ops if not op.startswith(("aten::", "prim::")))  # prim: shape queries
    # the lookup (forward, backward or fused update) and FBGEMM's cumsum were seen: the check is not empty
    assert "robe_dist::pooled_lookup" in outside_aten and "fbgemm::asynchronous_complete_cumsum" in outside_aten, outside_aten
    if nproc == 2:
        assert "c10d::allreduce_" in outside_aten
    missing = [op for op in outside_aten if not runs_on_cuda(op)]
    assert not missing, f"called in a ROBE run, but no CUDA kernel here (the lent GPU image would stop there): {missing}"
