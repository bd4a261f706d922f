"""Fixtures for the multi-process (gloo, CPU) tests: one pool of 2 ranks shared by the session."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import pytest

from robe_dist.distributed.test_utils import ProcessGroupPool


class _PoolHandle:
    """Runs functions on a 2-rank gloo pool, starting a fresh pool after a failure."""

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


@pytest.fixture(scope="session")
def pg2():
    """``pg2.run(fn, **kwargs)`` runs ``fn(rank=, world_size=2, **kwargs)`` on 2 gloo ranks."""
    handle = _PoolHandle(world_size=2)
    yield handle
    handle.close()
