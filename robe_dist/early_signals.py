"""A SIGTERM or Ctrl-C in robe-train's first seconds, while torch and TorchRec are imported,
ends the process with the usual one line instead of silently (before any handler of the trainer
exists, there is nothing to save).

Light on purpose: it imports nothing heavy, so it can run before torch is imported. ``robe-train``
starts here (``robe_train``); ``python -m robe_dist.train`` calls ``install`` before its imports.
The trainer replaces the handler with its own at the top of ``main()``.
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop(signum: int, frame) -> None:
    if os.environ.get("RANK", "0") == "0":  # (under torchrun every rank gets it: rank 0 says it)
        print(f"robe-train: interrupted by {signal.Signals(signum).name} while starting or leaving, outside any "
              "training step; nothing to save: rerun the same command", file=sys.stderr, flush=True)  # fmt: skip
    os._exit(128 + signum)


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _stop)


def robe_train() -> None:
    """The ``robe-train`` console script: ``robe_dist.train.cli`` with the early handler."""
    install()
    from robe_dist.train import cli

    cli()
