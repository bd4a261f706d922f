"""A persistent pool of gloo ranks for multi-process tests and benchmarks on CPU.

Starting a rank costs seconds (importing torch and TorchRec); ``ProcessGroupPool`` starts
``world_size`` processes once, joins them in one gloo process group, and then runs any number of
functions on all ranks, returning each rank's result. A function is named by its file and name, so
it can live in a test module::

    def _train(rank: int, world_size: int, steps: int) -> float:
        ...                       # runs on every rank, torch.distributed is initialised
        return loss

    with ProcessGroupPool(world_size=2) as pool:
        losses = pool.run(_train, steps=10)     # [loss on rank 0, loss on rank 1]

A failure on any rank raises ``RankFailure`` with every failing rank's traceback; the pool is then
closed (a rank may be stuck in a collective) and a new one must be started.

It stays in the package (not under tests/) because a user-facing script needs it too:
``benchmarks/comm.py`` measures the communication of replicated and sharded embeddings on it.
"""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing
import os
import queue
import socket
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

_LOADED: Dict[str, Any] = {}


class RankFailure(RuntimeError):
    """A function run by ``ProcessGroupPool`` raised on at least one rank."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: str) -> Any:
    if path not in _LOADED:
        folder = os.path.dirname(path)
        if folder not in sys.path:  # sibling modules of the file import as they do under pytest
            sys.path.insert(0, folder)
        name = f"_robe_pool_{len(_LOADED)}_{os.path.splitext(os.path.basename(path))[0]}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _LOADED[path] = module
    return _LOADED[path]


def _worker(rank: int, world_size: int, port: int, threads: int, timeout_s: float, tasks, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # 2 ranks on 2 cores: more threads oversubscribe badly
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    while True:
        task = tasks.get()
        if task is None:
            break
        path, name, kwargs = task
        try:
            fn = getattr(_load(path), name)
            results.put((rank, True, fn(rank=rank, world_size=world_size, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class ProcessGroupPool:
    """``world_size`` CPU processes in one gloo process group, reused across calls of ``run``.

    Args:
        world_size (int): number of ranks.
        threads_per_rank (int): ``torch.set_num_threads`` in each rank.
        collective_timeout_s (float): gloo timeout: a rank blocked in a collective whose peer failed
            raises after this long.
    """

    def __init__(self, world_size: int = 2, threads_per_rank: int = 1, collective_timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self._timeout_s = collective_timeout_s
        ctx = multiprocessing.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, threads_per_rank, collective_timeout_s, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.closed = False

    def run(self, fn: Callable[..., Any], timeout_s: Optional[float] = None, **kwargs: Any) -> List[Any]:
        """Runs ``fn(rank=r, world_size=n, **kwargs)`` on every rank; returns the results by rank.

        ``fn`` must be a module-level function of an importable file; ``kwargs`` and the results
        must pickle.
        """
        if self.closed:
            raise RuntimeError("ProcessGroupPool is closed (a previous run failed); start a new one")
        path = os.path.abspath(inspect.getsourcefile(fn) or "")
        for q in self._tasks:
            q.put((path, fn.__name__, kwargs))
        wait_s = timeout_s if timeout_s is not None else self._timeout_s * 3 + 60
        out: List[Tuple[int, bool, Any]] = []
        try:
            for _ in range(self.world_size):
                out.append(self._results.get(timeout=wait_s))
        except queue.Empty:
            self.close()
            raise RankFailure(f"{fn.__name__}: no result from every rank within {wait_s:.0f} s") from None
        failures = sorted((r, v) for r, ok, v in out if not ok)
        if failures:
            self.close()
            raise RankFailure("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failures))
        by_rank = dict((r, v) for r, _, v in out)
        return [by_rank[r] for r in range(self.world_size)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def __enter__(self) -> "ProcessGroupPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
