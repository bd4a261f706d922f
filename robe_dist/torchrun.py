"""torchrun with one-line endings: ``python -m robe_dist.torchrun [torchrun arguments]``.

The same launcher as ``torchrun`` (``torch.distributed.run``, same arguments), used by
``launch/run_local.sh`` and ``launch/slurm.sbatch``. What differs is how a run that did not finish
ends: torchrun prints a traceback and a failure table when a worker exits non-zero
(``ChildFailedError``) or when it receives SIGTERM / SIGINT itself (``SignalException``, after
forwarding the signal to its workers). robe-train's workers already said why in one line from rank
0 (a config or data error: exit 2; a NaN loss: 3; stopped by a signal after checkpointing: 128 +
signal), so this launcher exits with that status and prints nothing more (also when torchrun
stopped rank 0 while it was leaving, or a rank's collective failed (4), because another rank had
exited first: ``exit_status``); for any other failure (a crash: the workers printed their
tracebacks; a rank killed from outside) it adds one line naming the ranks and statuses::

    python -m robe_dist.torchrun --standalone --nproc_per_node=2 -m robe_dist.train --config configs/tiny_synthetic.yaml
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Dict, List, Optional, Tuple

# On several nodes, the agent whose node hosts the c10d rendezvous store leaves as soon as its
# workers have failed; the other agents, closing the rendezvous, then find the store gone and
# torch's C++ TCPStore logs a warning with 30 lines of C++ frames ("recvVector failed ... Did the
# remote server shutdown or crash?"): noise after a failure the workers already explained. C++
# logging reads its level once, when torch loads, so this agent loads torch at ERROR and its
# workers (started from os.environ) inherit the user's setting again.
_VERBOSE = os.environ.get("ROBE_DIST_TORCHRUN_VERBOSE", "0") == "1"
_USER_CPP_LEVEL = os.environ.get("TORCH_CPP_LOG_LEVEL")
if not _VERBOSE and _USER_CPP_LEVEL is None:
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
import torch  # noqa: E402,F401  (after the log level)

if not _VERBOSE and _USER_CPP_LEVEL is None:
    del os.environ["TORCH_CPP_LOG_LEVEL"]

from torch.distributed import DistError  # noqa: E402
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

EXPLAINED = {2, 3} | {128 + s.value for s in (signal.SIGTERM, signal.SIGINT)}
"""Exit statuses whose reason robe-train's rank 0 has already printed."""

STOPPED_BY_AGENT = {-signal.SIGTERM.value, -signal.SIGKILL.value}
"""Statuses of workers that torchrun itself stopped (SIGTERM, then SIGKILL after a grace period)
because another worker had exited: consequences, not causes."""

PEER_LOST = 4
"""robe-train's status when a collective failed because another worker had exited first (it says
so in one line): a consequence too (``robe_dist.train.EXIT_PEER_LOST``)."""


def exit_status(codes: Dict[int, int]) -> Tuple[int, Optional[str]]:
    """The launcher's exit status and the line it prints (``None``: the workers said why), from
    the failed workers' statuses by rank.

    After a user error every rank exits 2 once rank 0 has said why, but the first rank to exit
    makes torchrun stop the others: rank 0, still leaving the process group, can end as -15. So the
    status is the lowest rank's explained one when every other failure is explained or was stopped
    by the agent (or lost its peer: ``PEER_LOST``); anything else (a crash, a segfault) is listed.
    When nothing but consequences is left, no rank said why: a rank was killed from outside
    (the kernel's OOM killer: SIGKILL) or stopped before it could speak."""
    causes = [c for _, c in sorted(codes.items()) if c not in STOPPED_BY_AGENT and c != PEER_LOST]
    if causes and all(c in EXPLAINED for c in causes):
        return causes[0], None
    listed = ", ".join(f"rank {r} status {c}{_signal_name(c)}" for r, c in sorted(codes.items()))
    if not causes:
        return 1, (f"torchrun: workers failed ({listed}); none said why: a worker was killed or stopped from outside "
                   "(out of memory? the kernel log says)")  # fmt: skip
    first = causes[0]
    if all(c < 0 for c in causes):  # killed by a signal (SIGSEGV, ...): no output
        if -signal.SIGBUS.value in causes:  # (robe-train says which data it was reading: ops.set_bus_error_message)
            return 1, (f"torchrun: workers failed ({listed}): killed by a signal; SIGBUS is a memory-mapped file cut "
                       "short under the run, most often a data file (robe-train names it above where it could)")
        return 1, f"torchrun: workers failed ({listed}): killed by a signal, with nothing printed"
    return (first if 0 < first < 256 else 1), f"torchrun: workers failed ({listed}); their output above says why"


def _signal_name(status: int) -> str:
    try:
        return f" ({signal.Signals(-status).name})" if status < 0 else ""
    except ValueError:
        return ""


def main(argv: Optional[List[str]] = None) -> int:
    # the agent's own log of a worker's failure and of stopping the others repeats what the
    # workers said (ROBE_DIST_TORCHRUN_VERBOSE=1 keeps it)
    if not _VERBOSE:
        # (torch's elastic get_logger gives each module's logger its own level: set them all)
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(argv)
    if str(args.nproc_per_node).isdigit() and int(args.nproc_per_node) < 1:  # torch's launcher: a bare assert
        print(f"torchrun: --nproc_per_node must be at least 1 (or auto, gpu, cpu), got {args.nproc_per_node}", file=sys.stderr)
        return 2
    try:
        run(args)
    except ChildFailedError as e:
        status, line = exit_status({rank: f.exitcode for rank, f in e.failures.items()})
        if line is not None:
            print(line, file=sys.stderr)
        return status
    except DistError as e:  # the rendezvous: a port in use, an unreachable --rdzv_endpoint
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        print(f"torchrun: the rendezvous failed ({type(e).__name__}: {first}); check --master_port / --rdzv_endpoint", file=sys.stderr)
        return 2
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: received {name} and passed it to the workers (see their last line)", file=sys.stderr)
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
