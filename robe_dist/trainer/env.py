"""Process group, device and per-rank logging for a training run (torchrun or a single process)."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from robe_dist.train_config import ConfigError, DistConfig

logger = logging.getLogger("robe_dist.train")


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: rank, world size, device and the backend of the default group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DistConfig) -> DistEnv:
    """Joins torchrun's process group (RANK, WORLD_SIZE, ... in the environment) or, run as a
    plain ``python -m``, makes a one-process group. Device and backend follow ``cfg``."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:  # RANK and WORLD_SIZE left in the shell by hand, not a launcher
            raise ConfigError(
                f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                "start several processes with torchrun (python -m robe_dist.torchrun), or unset RANK and WORLD_SIZE "
                "for one process"
            )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_type = cfg.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("dist.device is 'cuda' but torch sees no GPU (torch.cuda.is_available() is False)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "run at most that many processes per node (torchrun --nproc_per_node)",
                this_rank_only=True,
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"dist.backend 'nccl' needs a CUDA device; this run is on {device.type} (use 'gloo' or 'auto')")
    if not dist.is_initialized():
        if under_torchrun:
            # joining waits for every rank; should one never come (RANK, WORLD_SIZE, MASTER_ADDR/PORT
            # set by hand, a node that did not start), say so instead of waiting without a word
            waiting = threading.Timer(JOIN_NOTICE_S, _say_waiting)
            waiting.daemon = True
            waiting.start()
            try:
                dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
            finally:
                waiting.cancel()
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


JOIN_NOTICE_S = 30.0
"""After this long joining the process group, a rank says it is still waiting for the others."""


def _say_waiting() -> None:
    e = os.environ
    print(f"robe-train: rank {e.get('RANK')} of {e.get('WORLD_SIZE')} has waited {JOIN_NOTICE_S:.0f} s for the other "
          f"ranks at {e.get('MASTER_ADDR')}:{e.get('MASTER_PORT')}; it waits until they join or the process group's "
          "time-out (start every rank, e.g. with torchrun; see docs/training.md)", file=sys.stderr, flush=True)  # fmt: skip


_NOISE = (
    "known issue with TorchRec's dense tensor size calculation",  # planner, every run
    "Sharding spec not found for",  # DMP, for data-parallel modules such as the ROBE array
    "caching params will be ignored",  # TorchRec, once per data-parallel table
    "[TBE=",  # FBGEMM: its arguments (a screenful) and optimiser choice, per sharded table group
)


def _drop_known_noise(record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in _NOISE)


def setup_logging(env: DistEnv, all_ranks: bool) -> None:
    """INFO messages from rank 0 (and from every rank with ``all_ranks``), prefixed by the rank;
    Python warnings and TorchRec's chatter only where they help."""
    loud = env.is_main or all_ranks
    logging.basicConfig(
        level=logging.INFO if loud else logging.ERROR,
        format=f"[rank{env.rank}] %(asctime)s %(levelname)s %(message)s" if env.world_size > 1 else "%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    logger.setLevel(logging.INFO if loud else logging.ERROR)
    for name in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.WARNING if loud else logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # "is_fx_tracing will return true ..."
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_known_noise)
    if not loud:
        warnings.filterwarnings("ignore")
    # harmless, repeated on every run: FX's notice and TorchRec's optional-kernel notices
    warnings.filterwarnings("ignore", message=".*is_fx_tracing will return true.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchmetrics")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # FBGEMM's dense (data-parallel) table kernel, on every backward
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")


def share_failure(
    env: DistEnv, fn: Callable[[], None], errors: Tuple[type, ...], *, main_only: bool = False
) -> Optional[Tuple[int, BaseException]]:
    """Runs ``fn`` on rank 0 only (``main_only``: making data, checking the run dir) or on every
    rank (writing a checkpoint's files), and shares an expected failure (an exception of one of
    ``errors``): every rank returns ``(rank, exception)`` of the lowest failing rank, the exception
    rebuilt with the same message as the first type of ``errors`` it is an instance of, or None. So a failure on one rank can be raised
    on all, not left to the others as a hang or a broken connection in the next collective.
    Synchronises the ranks like a barrier (a broadcast or an all-gather)."""
    failure = None
    if env.is_main or not main_only:
        try:
            fn()
        except errors as e:
            failure = (env.rank, next(i for i, t in enumerate(errors) if isinstance(e, t)), str(e))
    if env.world_size > 1:
        if main_only:
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
        else:
            every = [None] * env.world_size
            dist.all_gather_object(every, failure)
            failure = next((f for f in every if f is not None), None)
    if failure is None:
        return None
    rank, kind, message = failure
    return rank, errors[kind](message)


def on_rank0(env: DistEnv, fn: Callable[[], None], errors: Tuple[type, ...]) -> None:
    """Runs ``fn`` on rank 0 only; an error of ``errors`` there is raised on every rank
    (``share_failure``)."""
    failure = share_failure(env, fn, errors, main_only=True)
    if failure is not None:
        raise failure[1]


SHUTDOWN_WAIT_S = 60.0
"""How long a rank that stops on an error or a stop it expects the others to meet too (config,
data, checkpoint, a NaN loss, a signal) waits for them at the end before it says its error itself
and leaves."""

_shutdowns = itertools.count()  # one barrier key per shutdown, the same sequence on every rank


def _barrier_key() -> str:
    """A key no earlier barrier used: torchrun's store outlives a restart of the workers
    (``--max-restarts``), whose counters start again at 0, so the attempt is part of the key."""
    return f"robe_dist/shutdown/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_shutdowns)}"


def _all_ranks_arrive(timeout_s: float) -> bool:
    """A barrier through the default group's store, with a time limit: True when every rank
    reached it within ``timeout_s``. Unlike ``dist.barrier`` it needs no collective of the backend
    (``monitored_barrier`` is gloo's only), so it also ends where the other ranks are inside a
    collective that will never complete, under NCCL too."""
    key = _barrier_key()
    deadline = time.monotonic() + timeout_s
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.add(key, 1) == world:
            store.set(f"{key}/all", "1")
        while not store.check([f"{key}/all"]):  # (store.wait's time-out logs a C++ warning per rank)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        # rank 0 may host the store (without torchrun's agent): it leaves once the others have
        # seen the barrier end, so that none of them finds the store gone and thinks itself alone
        if rank != 0:
            store.add(f"{key}/seen", 1)
        else:
            until = time.monotonic() + 10.0
            while store.add(f"{key}/seen", 0) < world - 1 and time.monotonic() < until:
                time.sleep(0.05)
        return True
    except Exception:  # the store's host has left (rank 0 without torchrun)
        return False


_PEER_GONE = (
    "Connection closed by peer",  # gloo: the other end of a pair exited
    "Connection reset by peer",
    "remote process exit",  # NCCL (ncclRemoteError): "... a remote process exiting prematurely"
    "ncclRemoteError",
)


def lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank has gone (it crashed or stopped on an
    error of its own, and its own output says why), not because of anything on this rank: by the
    words gloo and NCCL use for it. Other backend errors (a CUDA fault here, a network set-up
    error, a time-out) keep their traceback."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_GONE)


def shutdown(wait_for_all: bool = True, timeout_s: Optional[float] = None, alone: Optional[str] = None) -> bool:
    """Waits for every rank (unless ``wait_for_all`` is False), then leaves the process group.
    Returns False when the ranks were to wait for each other and did not all arrive within
    ``timeout_s`` (None: no limit); ``alone`` is then printed to stderr before this rank leaves
    the group (which ends the others' collectives).

    A rank that leaves because of an error only it met (a bug, out of memory) must not wait: the
    other ranks are inside some other collective, which a barrier would never match, and the job
    would hang until the collective timeout with the error still unprinted. It leaves at once,
    its traceback is printed, and torchrun stops the other ranks (whose collectives then fail as
    their peer is gone). A rank that stops on an error every rank should meet (``timeout_s``)
    waits, so that rank 0 says it before torchrun stops the rest, but only so long: should the
    error be its alone after all, the caller learns it and says the error itself."""
    arrived = True
    if dist.is_initialized():
        if wait_for_all and dist.get_world_size() > 1:
            if timeout_s is None:
                dist.barrier()
            else:
                arrived = _all_ranks_arrive(timeout_s)
                if not arrived and alone:
                    print(alone, file=sys.stderr, flush=True)
        dist.destroy_process_group()
    return arrived
