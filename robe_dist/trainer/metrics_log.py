"""What the user sees: ``metrics.jsonl`` in the run dir and a tqdm progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from robe_dist.trainer.env import DistEnv


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: GPU memory allocated by torch on CUDA, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def held_bytes(state: Any) -> int:
    """Bytes of the tensors this rank holds in ``state`` (a ``state_dict()``, nested dicts and
    lists allowed): a ShardedTensor counts its local shards, a DTensor its local tensor, a tensor
    itself; a storage reached twice counts once. Measured on the objects, not from the config."""
    seen = set()

    def tensors(obj: Any):
        if isinstance(obj, ShardedTensor):
            for shard in obj.local_shards():
                yield shard.tensor
        elif isinstance(obj, DTensor):
            yield obj.to_local()
        elif isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    total = 0
    for t in tensors(state):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


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


def sum_over_ranks(value: int, env: DistEnv) -> int:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(t)
    return int(t.item())


class MetricsError(RuntimeError):
    """``metrics.jsonl`` cannot be opened or written (a full disk, a file size limit, ...)."""


def _open_log(path: Path) -> int:
    """An append-only descriptor of ``path``; a last line a failed write left unfinished (no
    newline) is cut off first, so that every line stays one JSON object."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    if size:
        with open(path, "rb") as f:
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
        if not tail.endswith(b"\n") and (b"\n" in tail or size <= len(tail)):
            os.ftruncate(fd, size - len(tail) + tail.rfind(b"\n") + 1)
    return fd


class MetricsLog:
    """Appends one JSON object per line to ``<run dir>/metrics.jsonl`` and shows progress: a tqdm
    bar when stderr is a terminal, else one plain line per train record (logs, CI). Rank 0 only
    (other ranks get no-ops). A record is one ``write``; one that fails (``MetricsError``) leaves
    the file as it was."""

    def __init__(self, run_dir: Path, env: DistEnv, total_steps: int, start_step: int, progress_bar: bool) -> None:
        self.enabled = env.is_main
        self.path = run_dir / "metrics.jsonl"
        self._fd: Optional[int] = None
        self._dir_fd: Optional[int] = None
        self._dir_id: Optional[tuple] = None
        self._bar = None
        if self.enabled:
            try:
                self._fd = _open_log(self.path)
            except OSError as e:
                raise MetricsError(f"{self.path}: cannot be opened for writing ({e.strerror or e})") from None
            # held open: while it is, no new directory at the path can take its inode number
            # (O_PATH: needs no read permission on the directory)
            try:
                self._dir_fd = os.open(run_dir, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY)
            except OSError as e:
                self.close()
                raise MetricsError(f"--run-dir {run_dir}: cannot be opened ({e.strerror or e})") from None
            st = os.fstat(self._dir_fd)
            self._dir_id = st.st_dev, st.st_ino
        self.start_time = time.time()
        self._total = total_steps
        self._quiet = not progress_bar
        if self.enabled and progress_bar and sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled or self._fd is None:  # (None: closed, or lost with an error already raised)
            return
        record = {"kind": kind, **fields, "time_s": round(time.time() - self.start_time, 3)}
        data = (json.dumps(record) + "\n").encode()
        before = None
        try:
            st = os.stat(self.path.parent)
            found: Optional[tuple] = st.st_dev, st.st_ino
        except OSError:  # gone, or a path through a file, a permission or a stale NFS handle now
            found = None
        if found != self._dir_id:  # (the checkpoints may already be in a new directory at the path)
            raise MetricsError(
                f"--run-dir {self.path.parent} was {'replaced' if found else 'deleted or moved'} while the run was "
                "going, with its config.yaml and metrics.jsonl; the run stops"
            )
        try:
            st = os.fstat(self._fd)
            if st.st_nlink == 0:  # deleted while the run lives: write to the path again, not to the void
                os.close(self._fd)
                self._fd = None
                self._fd = _open_log(self.path)
                st = os.fstat(self._fd)
            before = st.st_size
            view = memoryview(data)
            while view:  # (a short write, then the one that says why: a full disk, a size limit)
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            if before is not None:
                try:  # no half record left behind
                    os.ftruncate(self._fd, before)
                except OSError:
                    pass
            raise MetricsError(f"{self.path}: cannot be written ({e.strerror or e}); the run stops, and --resume "
                               "continues from its last checkpoint") from None  # fmt: skip

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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
