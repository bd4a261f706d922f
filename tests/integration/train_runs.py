"""robe-train's ``main()`` (the console script's code) run on the ranks of a ``ProcessGroupPool``.

A fresh ``python -m robe_dist.train`` spends ~6 s of a CI core importing torch, TorchRec and
torchmetrics before its first step, and a 2-rank ``torchrun`` three times that: most of what the
integration tests cost. The tests that check a run's results (resume, refusals, numerics on 1 and
2 ranks) run ``main(argv)`` on ranks that imported them once; the tests of what the launchers
themselves do (``python -m``, ``torchrun``: signals, exit statuses, one line from rank 0) still
start them (test_faults.py, the end-to-end and torchrun tests of test_train.py).

Each run has a process group of its own, as under its launcher: the pool's group is left before
``main()`` and joined again after it (``own_group``).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from robe_dist.distributed.test_utils import ProcessGroupPool

REPO = Path(__file__).resolve().parents[2]


class PoolHandle:
    """Runs functions on a pool of ``world_size`` gloo ranks, starting a fresh pool after a failure."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._pool: Optional[ProcessGroupPool] = None

    def run(self, fn: Callable[..., Any], **kwargs: Any) -> List[Any]:
        if self._pool is None or self._pool.closed:
            self._pool = ProcessGroupPool(world_size=self.world_size, collective_timeout_s=30.0)
        return self._pool.run(fn, **kwargs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


_POOLS: Dict[int, PoolHandle] = {}


def pool(world_size: int) -> PoolHandle:
    """This process's pool of ``world_size`` ranks (``close_pools()`` ends them)."""
    return _POOLS.setdefault(world_size, PoolHandle(world_size))


def close_pools() -> None:
    for handle in _POOLS.values():
        handle.close()


_RUN_TIMEOUT_S = 60.0
"""A rank left waiting in a collective by its peer's failure raises after this long."""
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def own_group(rank: int, world_size: int, store: str) -> Iterator[None]:
    """On a pool's rank: leaves the pool's process group, so that what runs inside has one of its
    own, and joins the pool's again after. One rank runs as ``python -m robe_dist.train`` does (no
    launcher's variables: robe-train makes its group, its backend by the device); several join a
    gloo group first, as torchrun's workers join theirs (robe-train then takes it)."""
    from datetime import timedelta

    import torch.distributed as dist

    def join(name: str, timeout_s: float) -> None:
        dist.init_process_group("gloo", store=dist.FileStore(f"{store}.{name}", world_size), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))  # fmt: skip

    if dist.is_initialized():
        dist.destroy_process_group()
    launcher_env = {k: os.environ.pop(k) for k in _LAUNCHER_ENV if k in os.environ} if world_size == 1 else {}
    if world_size > 1:
        join("run", _RUN_TIMEOUT_S)
    try:
        yield
    finally:
        os.environ.update(launcher_env)
        if dist.is_initialized():  # robe-train's main() leaves its group unless a bug ended it
            dist.destroy_process_group()
        join("pool", 300.0)  # (a rank may still be at work: robe-export after a run, say)


def call_main(argv: List[str]) -> Dict[str, object]:
    """``robe_dist.train.main(argv)`` from the repository root: its exit status and what it
    printed; a traceback (a bug) is printed into its stderr, as the interpreter would, status 1."""
    import io
    import traceback

    from robe_dist import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported as the interpreter would
            traceback.print_exc()
            code = 1
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run_main(rank: int, world_size: int, argv: List[str], store: str) -> Dict[str, object]:
    """On every rank of a pool: ``call_main(argv)`` in a process group of its own."""
    with own_group(rank, world_size, store):
        return call_main(argv)


_counter = itertools.count()
_stores: Optional[str] = None


def new_store() -> str:
    """A fresh file-store path (for ``own_group``), in a directory removed when this process ends."""
    global _stores
    if _stores is None:
        _stores = tempfile.mkdtemp(prefix="robe_train_stores_")
        atexit.register(shutil.rmtree, _stores, True)
    return os.path.join(_stores, str(next(_counter)))


def robe_train(argv: List[str], nproc: int = 1, runner: Callable[..., Dict[str, object]] = run_main,
               timeout_s: float = 300.0, **kwargs: Any) -> subprocess.CompletedProcess:  # fmt: skip
    """``main(argv)`` on every rank of the pool of ``nproc`` ranks (or ``runner``, a function
    like ``run_main``, given ``kwargs`` too): the first non-zero exit status of the ranks (as
    torchrun reports a failed rank's), and their stdout and stderr joined in rank order."""
    results = pool(nproc).run(runner, timeout_s=timeout_s, argv=[str(a) for a in argv], store=new_store(), **kwargs)
    code = next((r["returncode"] for r in results if r["returncode"] != 0), 0)
    return subprocess.CompletedProcess(["robe-train", *argv], code, "".join(r["stdout"] for r in results),
                                       "".join(r["stderr"] for r in results))  # fmt: skip
