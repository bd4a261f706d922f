"""torchrun with one-line endings: ``python -m robe_dist.torchrun [torchrun arguments]``.

The same launcher as ``torchrun`` (``torch.distributed.run``, same arguments), used by
``launch/run_local.sh`` and ``launch/slurm.sbatch``. What differs is how a run that did not finish
ends: torchrun prints a traceback and a failure table when a worker exits non-zero
(``ChildFailedError``) or when it receives SIGTERM / SIGINT itself (``SignalException``, after
forwarding the signal to its workers). robe-train's workers already said why in one line from rank
0 (a config or data error: exit 2; a NaN loss: 3; stopped by a signal after checkpointing: 128 +
signal), so this launcher exits with that status and prints nothing more; for any other failure
(a crash: the workers printed their tracebacks) it adds one line naming the ranks and statuses::

    python -m robe_dist.torchrun --standalone --nproc_per_node=2 -m robe_dist.train --config configs/tiny_synthetic.yaml
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import List, Optional

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

EXPLAINED = {2, 3} | {128 + s.value for s in (signal.SIGTERM, signal.SIGINT)}
"""Exit statuses whose reason robe-train's rank 0 has already printed."""


def main(argv: Optional[List[str]] = None) -> int:
    # the agent's own log of a worker's failure and of stopping the others repeats what the
    # workers said (ROBE_DIST_TORCHRUN_VERBOSE=1 keeps it)
    if os.environ.get("ROBE_DIST_TORCHRUN_VERBOSE", "0") != "1":
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        first = next(iter(codes.values()))
        if first in EXPLAINED:
            return first
        listed = ", ".join(f"rank {r} status {c}" for r, c in codes.items())
        print(f"torchrun: workers failed ({listed}); their output above says why", file=sys.stderr)
        return first if 0 < first < 256 else 1
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: received {name} and passed it to the workers (see their last line)", file=sys.stderr)
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
