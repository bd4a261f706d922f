"""Fixtures for the multi-process (gloo, CPU) tests: pools of ranks shared by the session (by each
pytest-xdist worker), started on first use (train_runs.py): ``pg2`` runs the tests' functions on 2
ranks; ``train_runs.robe_train`` runs robe-train's ``main()`` on 1 or 2."""

from __future__ import annotations

import pytest
from train_runs import PoolHandle, close_pools, pool


@pytest.fixture(scope="session", autouse=True)
def _close_pools():
    yield
    close_pools()


@pytest.fixture(scope="session")
def pg2() -> PoolHandle:
    """``pg2.run(fn, **kwargs)`` runs ``fn(rank=, world_size=2, **kwargs)`` on 2 gloo ranks."""
    return pool(2)
