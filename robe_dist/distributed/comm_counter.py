"""Counting the bytes a rank sends, where it sends them: wrapped ``torch.distributed`` collectives.

TorchRec looks its collectives up on the ``torch.distributed`` module at call time
(``dist.all_to_all_single(...)`` in ``torchrec.distributed.dist_data`` / ``comm_ops``), and so
does robe_dist. ``CommCounter.install()`` replaces those functions by wrappers that add, on this
rank, the bytes each call hands to the network, then call the original:

  all_to_all_single / all_to_all   the splits addressed to the OTHER ranks (what leaves this rank)
  all_reduce                       the tensor's bytes as ``all_reduce_payload``; the ring algorithm
                                   (gloo's and NCCL's) then sends ``2 (W - 1) / W`` of it
  all_gather / all_gather_into_tensor   ``(W - 1)`` times the local tensor
  reduce_scatter_tensor            ``(W - 1) / W`` of the input

DDP's bucketed gradient all-reduce runs in C++ and is not seen here: the trainer counts it with a
DDP communication hook (``trainer/model.py``), and robe_dist's own array all-reduce is counted by
the sharded module (``ShardedRobeEmbeddingBagCollection.allreduce_bytes``).

Example::

    counter = CommCounter().install()
    ...                                    # train
    counter.bytes["all_to_all"]            # bytes this rank sent in all-to-alls so far
    with counter.paused():                 # evaluation traffic not counted
        ...
    counter.uninstall()
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.distributed as dist

_WRAPPED = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    """Bytes (and calls) this rank sends to other ranks, by kind, while ``active``.

    Kinds: ``all_to_all``, ``all_reduce_payload``, ``all_gather``, ``reduce_scatter`` (see the
    module docstring for what is counted of each). One counter can be installed at a time.
    """

    _installed: Optional["CommCounter"] = None

    def __init__(self) -> None:
        self.bytes: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self.active = True
        self._originals: Dict[str, Callable] = {}

    def add(self, kind: str, nbytes: float) -> None:
        if self.active:
            self.bytes[kind] += nbytes
            self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is counted inside (e.g. evaluation, checkpoints)."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    def install(self) -> "CommCounter":
        """Wraps the collectives of ``torch.distributed``; returns ``self``."""
        if CommCounter._installed is not None:
            raise RuntimeError("a CommCounter is already installed: uninstall() it first")
        self._originals = {name: getattr(dist, name) for name in _WRAPPED}
        o = self._originals

        def size_rank(group):
            return dist.get_world_size(group), dist.get_rank(group)

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            w, r = size_rank(group)
            rows = input.shape[0] if input.dim() > 0 else 0
            row_bytes = _nbytes(input) // rows if rows else 0
            splits = list(input_split_sizes) if input_split_sizes else [rows // w] * w
            self.add("all_to_all", sum(s for j, s in enumerate(splits) if j != r) * row_bytes)
            return o["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
            _, r = size_rank(group)
            self.add("all_to_all", sum(_nbytes(t) for j, t in enumerate(input_tensor_list) if j != r))
            return o["all_to_all"](output_tensor_list, input_tensor_list, group=group, async_op=async_op)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.add("all_reduce_payload", _nbytes(tensor))
            return o["all_reduce"](tensor, op=op, group=group, async_op=async_op)

        def all_gather(tensor_list, tensor, group=None, async_op=False):
            w, _ = size_rank(group)
            self.add("all_gather", (w - 1) * _nbytes(tensor))
            return o["all_gather"](tensor_list, tensor, group=group, async_op=async_op)

        def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
            w, _ = size_rank(group)
            self.add("all_gather", (w - 1) * _nbytes(input_tensor))
            return o["all_gather_into_tensor"](output_tensor, input_tensor, group=group, async_op=async_op)

        def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            w, _ = size_rank(group)
            self.add("reduce_scatter", (w - 1) / w * _nbytes(input))
            return o["reduce_scatter_tensor"](output, input, op=op, group=group, async_op=async_op)

        wrappers = dict(
            all_to_all_single=all_to_all_single, all_to_all=all_to_all, all_reduce=all_reduce, all_gather=all_gather,
            all_gather_into_tensor=all_gather_into_tensor, reduce_scatter_tensor=reduce_scatter_tensor,
        )  # fmt: skip
        for name, fn in wrappers.items():
            fn.__wrapped__ = o[name]
            setattr(dist, name, fn)
        CommCounter._installed = self
        return self

    def uninstall(self) -> None:
        """Puts the original collectives back."""
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals = {}
        if CommCounter._installed is self:
            CommCounter._installed = None
