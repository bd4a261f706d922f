"""Evaluation over all ranks: AUC, log-loss and accuracy with torchmetrics."""

from __future__ import annotations

import itertools
import signal
from collections import deque
from typing import Callable, Deque, Dict, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchrec.datasets.utils import Batch

from robe_dist.trainer.env import DistEnv


class EvalMetrics:
    """Exact AUC (every prediction kept), mean log-loss and accuracy at 0.5; ``compute()``
    gathers them over all ranks, so the result does not depend on how the data was split."""

    def __init__(self, device: torch.device) -> None:
        self.auc = BinaryAUROC().to(device)
        self.accuracy = BinaryAccuracy().to(device)
        # float64 sums: a float32 one holds integers only up to 2^24, and CriteoTB's val split has
        # 89,137,319 rows (its count came out as 89,137,320)
        self.logloss = MeanMetric().set_dtype(torch.float64).to(device)
        self.samples = SumMetric().set_dtype(torch.float64).to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.float(), labels.float()
        probs = torch.sigmoid(logits)
        self.auc.update(probs, labels.long())
        self.accuracy.update(probs, labels.long())
        self.logloss.update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        self.samples.update(torch.tensor(float(labels.numel()), device=labels.device))

    def compute(self) -> Dict[str, float]:
        return {
            "auc": float(self.auc.compute()),
            "logloss": float(self.logloss.compute()),
            "accuracy": float(self.accuracy.compute()),
            "eval_samples": int(self.samples.compute()),
        }


class EvalStopped(RuntimeError):
    """A stop signal (SIGTERM, SIGINT) cut the evaluation short, at the same batch on every rank."""

    def __init__(self, signame: str) -> None:
        super().__init__(f"evaluation stopped by {signame}")
        self.signame = signame


StopCheck = Callable[[], Optional[str]]
"""Returns the name of a stop signal this rank received (``StopRequest.signame``), else None."""


def _in_lockstep(batches: Iterable[Batch], env: DistEnv, is_filler: Deque[bool], stop: Optional[StopCheck] = None) -> Iterator[Batch]:
    """Yields this rank's batches while ANY rank has some left, so every rank runs the same number
    of forward passes (sharded tables exchange data in each). A rank that ran out repeats its last
    batch; ``is_filler`` records, in order, which yielded batches are such repeats.

    The same all-reduce carries ``stop()``'s signal: when any rank has one, every rank raises
    ``EvalStopped`` before the same batch."""
    last: Optional[Batch] = None
    it = iter(batches)
    while True:
        batch = next(it, None)
        signame = stop() if stop is not None else None
        flags = torch.tensor([0 if batch is None else 1, signal.Signals[signame].value if signame else 0], device=env.device)
        if env.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        more, code = (int(v) for v in flags.tolist())
        if code:
            raise EvalStopped(signal.Signals(code).name)
        if not more:
            return
        if batch is None:
            if last is None:
                raise RuntimeError(
                    f"rank {env.rank} got no evaluation batch while other ranks did: the split is too small "
                    f"for {env.world_size} ranks at this eval.batch_size"
                )
            is_filler.append(True)
            yield last
        else:
            last = batch
            is_filler.append(False)
            yield batch


@torch.no_grad()
def evaluate(
    pipeline,
    model: torch.nn.Module,
    batches: Iterable[Batch],
    env: DistEnv,
    max_batches: Optional[int] = None,
    stop: Optional[StopCheck] = None,
) -> Dict[str, float]:
    """Runs ``batches`` (this rank's share of a split) through ``pipeline`` in eval mode.

    Returns ``{"auc", "logloss", "accuracy", "eval_samples"}`` over all ranks. Raises
    ``EvalStopped`` on every rank when ``stop()`` names a signal on any rank (checked before each
    batch, in the all-reduce the ranks' lockstep already makes)."""
    metrics = EvalMetrics(env.device)
    is_filler: Deque[bool] = deque()
    it = _in_lockstep(itertools.islice(batches, max_batches), env, is_filler, stop)
    was_training = model.training
    model.eval()
    pipeline.reset()
    try:
        while True:
            try:
                _, logits, labels = pipeline.progress(it)
            except StopIteration:
                break
            if not is_filler.popleft():
                metrics.update(logits, labels)
    finally:
        model.train(was_training)
    return metrics.compute()
