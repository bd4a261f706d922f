"""Where a training step's time goes: ``torch.profiler`` over a window of steps.

``logging.profile_steps: [first, last]`` profiles global steps ``first..last`` (1-based, both
included) on every rank, with TorchRec's train pipeline labelling its phases
(``## forward ##``, ``## backward ##``, ``## optimizer ##``, the input dist, the next batch).
Each rank writes ``RUN/profile/rank<r>.trace.json`` (open it in chrome://tracing or Perfetto) and
``RUN/profile/rank<r>.txt`` (the operators by CPU time), and rank 0 logs a ``profile`` record to
``metrics.jsonl``: milliseconds per step of each phase and of the operators inside them that
matter for recommendation models (the embedding lookups, the collectives, the dense layers)::

    python -m robe_dist.train --set logging.profile_steps=[20,29] --set train.max_steps=30

A window cut short by an evaluation, a checkpoint or the end of training ends there (the record
says how many steps it covers). Times are CPU times of the calls on the host (on a GPU, the operators' kernel time is the
``device_ms`` of the same record), so an asynchronous collective counts its launch;
its wait shows up where the result is needed (``wait_sparse_data_dist``, the backward).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

#: The phases of one TrainPipelineSparseDist step (its top-level record_function labels, batch
#: index removed; "## next_batch ##" is inside "## copy_batch_to_gpu ##", so not counted again).
PHASES = {
    "zero_grad": "zero_grad",
    "copy_batch_to_gpu": "data: next batch (load, to device)",
    "wait_for_batch": "data: next batch (load, to device)",
    "start_sparse_data_dist": "input dist (ids all-to-all)",
    "wait_sparse_data_dist": "input dist (ids all-to-all)",
    "forward": "forward",
    "backward": "backward",
    "optimizer": "optimizer",
}

#: Operators worth a line of their own: (label, test on the operator's name).
OPERATORS = [
    ("ROBE lookup (forward)", lambda n: n == "robe_dist::pooled_lookup"),
    ("ROBE lookup (backward)", lambda n: n in ("robe_dist::pooled_lookup_backward", "robe_dist::pooled_lookup_fused_update")),
    # the forward's outermost op, and the backward's autograd node (its fbgemm ops are nested in
    # it); sharded tables (split_...) and data-parallel ones (dense_...)
    ("FBGEMM TBE (full tables, forward + fused backward)",
     lambda n: n.startswith(("fbgemm::split_embedding_codegen_lookup_", "fbgemm::dense_embedding_codegen_lookup_"))
     or (n.startswith("torch::autograd::CppNode<") and "SplitLookupFunction" in n)),
    ("all-reduce (launch)", lambda n: n.startswith("c10d::") and "allreduce" in n),
    ("all-to-all (launch)", lambda n: n.startswith("c10d::") and "alltoall" in n),
    ("dense layers (addmm/mm/bmm, self)", lambda n: n in ("aten::addmm", "aten::mm", "aten::bmm")),
]

_INDEX = re.compile(r"^## ([a-z_]+)(?: \d+)? ##$")


class StepProfiler:
    """Starts ``torch.profiler`` before step ``first`` and stops it after step ``last``."""

    def __init__(self, steps: Optional[List[int]], run_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.dir, self.rank, self.device = run_dir / "profile", rank, device
        self._prof: Optional[profile] = None
        self._steps = 0
        self.record: Optional[Dict] = None
        """The summary of the finished window (``None`` before)."""

    def before_step(self, step: int) -> None:
        """Call before global step ``step`` (1-based)."""
        if self.first is not None and self._prof is None and self.record is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities, record_shapes=False)
            self._prof.__enter__()
            self._start = step

    def after_step(self, step: int) -> Optional[Dict]:
        """Call after global step ``step``; returns the summary when the window closes."""
        if self._prof is None:
            return None
        self._steps += 1
        return self.stop() if step >= self.last else None

    def stop(self) -> Optional[Dict]:
        """Closes the window now (end of a chunk of steps, an error); writes the files and returns
        the summary, unless no step ran in it (then the window opens again at the next step)."""
        if self._prof is None:
            return None
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.__exit__(None, None, None)
        if self._steps == 0:  # the chunk ended before its first step: nothing to report
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json"))
        averages = prof.key_averages()
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        (self.dir / f"rank{self.rank}.txt").write_text(averages.table(sort_by=sort, row_limit=60) + "\n")
        steps = max(self._steps, 1)
        phases: Dict[str, float] = {}
        operators: Dict[str, float] = {label: 0.0 for label, _ in OPERATORS}
        device_ms: Dict[str, float] = {}
        for e in averages:
            m = _INDEX.match(e.key)
            if m and m.group(1) in PHASES:
                label = PHASES[m.group(1)]
                phases[label] = phases.get(label, 0.0) + e.cpu_time_total / 1e3 / steps
            for label, test in OPERATORS:
                if test(e.key):
                    us = e.self_cpu_time_total if label.endswith("self)") else e.cpu_time_total
                    operators[label] = operators.get(label, 0.0) + us / 1e3 / steps
                    if self.device.type == "cuda":
                        dev = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
                        device_ms[label] = device_ms.get(label, 0.0) + dev / 1e3 / steps
        self.record = {
            "first_step": self._start, "steps": self._steps,
            "phases_ms": {k: round(v, 3) for k, v in phases.items()},
            "step_ms": round(sum(phases.values()), 3),
            "operators_ms": {k: round(v, 3) for k, v in operators.items()},
            "trace": str(self.dir / f"rank{self.rank}.trace.json"),
        }  # fmt: skip
        if device_ms:
            self.record["device_ms"] = {k: round(v, 3) for k, v in device_ms.items()}
        return self.record

    @staticmethod
    def describe(record: Dict) -> str:
        """Lines for the log: the phases and operators, ms per step."""
        lines = [f"profile of steps {record['first_step']}..{record['first_step'] + record['steps'] - 1} "
                 f"(ms per step, CPU time of the calls; {record['trace']}):"]  # fmt: skip
        lines += [f"  {k:<40} {v:8.2f}" for k, v in record["phases_ms"].items()]
        lines += [f"  {'= sum of the phases':<40} {record['step_ms']:8.2f}", "  of which:"]
        lines += [f"    {k:<50} {v:8.2f}" for k, v in record["operators_ms"].items()]
        return "\n".join(lines)
