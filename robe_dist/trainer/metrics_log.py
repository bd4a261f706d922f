"""What the user sees: ``metrics.jsonl`` in the run dir and a tqdm progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from robe_dist.trainer.env import DistEnv


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: GPU memory allocated by torch on CUDA, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class RunningLoss:
    """Sum and count of the per-step losses since the last ``reduce()``, kept on the device (no
    host sync per step); ``reduce()`` averages them over all ranks."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.total = torch.zeros(2, dtype=torch.float64, device=env.device)  # [sum, steps]

    def add(self, loss: torch.Tensor) -> None:
        self.total[0] += loss.detach().to(torch.float64)
        self.total[1] += 1

    def reduce(self) -> Optional[float]:
        """Mean loss over the steps since the last call and over ranks (``nan`` if any was not
        finite, on every rank alike); ``None`` when no step was added."""
        if self.env.world_size > 1:
            dist.all_reduce(self.total)
        total, steps = self.total.tolist()
        self.total.zero_()
        if steps == 0:
            return None
        mean = total / steps
        return mean if math.isfinite(mean) else float("nan")


def max_over_ranks(value: int, env: DistEnv) -> int:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class MetricsLog:
    """Appends one JSON object per line to ``<run dir>/metrics.jsonl`` and shows progress: a tqdm
    bar when stderr is a terminal, else one plain line per train record (logs, CI). Rank 0 only
    (other ranks get no-ops)."""

    def __init__(self, run_dir: Path, env: DistEnv, total_steps: int, start_step: int, progress_bar: bool) -> None:
        self.enabled = env.is_main
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1) if self.enabled else None
        self.start_time = time.time()
        self._bar = None
        self._total = total_steps
        self._quiet = not progress_bar
        if self.enabled and progress_bar and sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **fields, "time_s": round(time.time() - self.start_time, 3)}
        self._file.write(json.dumps(record) + "\n")

    def progress(self, steps: int, step: int, **postfix: Any) -> None:
        """``steps`` more steps done (now at ``step``); ``postfix``: what to show next to the count."""
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(postfix, refresh=False)
        elif self.enabled and not self._quiet:
            shown = "  ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"step {step}/{self._total}  {shown}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
