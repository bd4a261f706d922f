"""Sharding of ``RobeEmbeddingBagCollection``: one replicated array, planned and wrapped by TorchRec.

Mirrors ``torchrec.distributed.embeddingbag``: the sharder is what the planner enumerates and what
``DistributedModelParallel`` calls; the sharded module is what runs afterwards.

A ROBE collection has a single parameter, the shared 1-D ``array`` (every table of the collection
reads from it), so there is nothing to cut: the only sharding is ``DATA_PARALLEL`` with the
``dense`` compute kernel. Every rank holds the whole array, looks up its own part of the batch (no
input or output all-to-all), and the array's gradient is averaged over ranks every step. The array
is broadcast from rank 0 when the module is sharded, so replicas start identical and, since every
rank then applies the same optimiser update to the same averaged gradient, stay bit-identical.

Gradient averaging (``gradient_sync``), both exact (replicas stay bit-identical):

* ``"hook"`` (default): the module averages its own gradient: a post-accumulate-grad hook on the
  array launches an asynchronous all-reduce as soon as the array's gradient is complete (the rest
  of the backward, e.g. the dense layers and TorchRec's all-to-alls, runs meanwhile) and the
  autograd engine waits for it at the end of the backward, before ``optimizer.step()``. The array
  is listed in ``sharded_parameter_names()`` so DMP's DDP leaves it alone. Works with any
  data-parallel wrapper, or none (``sharder.shard()`` called directly). ``no_sync()`` skips the
  all-reduce for gradient accumulation (all-reducing every micro-step is also correct, only
  slower: the already-averaged part is identical on every rank).
* ``"ddp"``: the array is NOT listed in ``sharded_parameter_names()``, so
  ``DistributedModelParallel``'s data-parallel wrapper (DDP) all-reduces it in its buckets with
  the dense parameters: DDP's ``no_sync()``, communication hooks (fp16/bf16 compression halve the
  bytes) and static-graph optimisations apply. Needs DMP's default data-parallel wrapper.

Measured (benchmarks/comm.py, 2 gloo ranks on CPU, 16 MB array): the step takes ~25-40 ms with
``"hook"`` against ~55-65 ms with ``"ddp"``: DDP copies the fresh dense gradient into its bucket
and keeps that bucket (one more array-sized buffer per rank), the hook reduces the gradient where
the backward wrote it. Both move the same bytes.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim.apply_optimizer_in_backward import param_to_acc_grad_map, param_to_optim_hook_handle_map
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, EmbeddingComputeKernel, KJTList
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    LazyNoWait,
    NoWait,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
    ShardingType,
    compute_storage_usage,
    StorageUsageType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection, as_kjt
from robe_dist.ops import FusedUpdate, new_array

ARRAY_PARAMETER_NAME = "array"
"""Name under which the planner sees a ROBE collection's array (plan key, constraints key)."""

GRADIENT_SYNC_MODES = ("ddp", "hook")

# Optimiser state kept per array element, in units of the array's size (what the planner budgets).
_OPTIMIZER_STATE_SLOTS: Dict[str, int] = {
    "SGD": 0,  # +1 with momentum (see optimizer_state_slots)
    "Adagrad": 1,
    "RMSprop": 1,  # +1 with momentum, +1 when centered
    "Adam": 2,
    "AdamW": 2,
    "Adamax": 2,
    "NAdam": 2,
    "RAdam": 2,
    "Adadelta": 2,
    "Rprop": 2,
}
# Classes the planner's estimator maps to a multiplier of 0, 1 and 2 (shard_estimators._get_optimizer_multipler).
_PLANNER_CLASS_FOR_SLOTS: Dict[int, Type[torch.optim.Optimizer]] = {
    0: torch.optim.SGD,
    1: torch.optim.Adagrad,
    2: torch.optim.Adam,
}


def optimizer_state_slots(optimizer_class: Type[torch.optim.Optimizer], optimizer_kwargs: Optional[Dict[str, Any]] = None) -> int:
    """Number of array-sized state tensors ``optimizer_class`` keeps for a dense parameter.

    Example::

        optimizer_state_slots(torch.optim.Adagrad)                      # 1
        optimizer_state_slots(torch.optim.SGD, {"momentum": 0.9})       # 1
        optimizer_state_slots(torch.optim.Adam)                         # 2
    """
    kwargs = optimizer_kwargs or {}
    name = getattr(optimizer_class, "__name__", repr(optimizer_class))
    if name not in _OPTIMIZER_STATE_SLOTS:
        raise ValueError(
            f"RobeEmbeddingBagCollectionSharder: unknown optimizer class {name!r} for the ROBE array's memory "
            f"budget; known: {sorted(_OPTIMIZER_STATE_SLOTS)} (or pass optimizer_class=None to budget no state)"
        )
    slots = _OPTIMIZER_STATE_SLOTS[name]
    if name == "SGD" and kwargs.get("momentum", 0):
        slots += 1
    if name == "RMSprop":
        slots += int(bool(kwargs.get("momentum", 0))) + int(bool(kwargs.get("centered", False)))
    if name in ("Adam", "AdamW") and kwargs.get("amsgrad", False):
        slots += 1
    return slots


def planning_shape(robe_module: RobeEmbeddingBagCollection) -> torch.Size:
    """2-D shape ``[array_size / c, c]`` under which the planner sees the array (same element count).

    ``c = gcd(array_size, embedding_dim)`` when all tables share one ``embedding_dim`` (the planner
    reads ``shape[1]`` as the output width of a lookup), else ``gcd(array_size, block_size)``.
    """
    m = robe_module.robe_config.array_size
    dims = {t.embedding_dim for t in robe_module.embedding_bag_configs()}
    width = dims.pop() if len(dims) == 1 else robe_module.robe_config.block_size
    c = math.gcd(m, width)
    return torch.Size([m // c, c])


@dataclass
class RobeEmbeddingBagCollectionContext(Multistreamable):
    """Per-batch context of ``ShardedRobeEmbeddingBagCollection`` (nothing to carry: data-parallel)."""

    sharding_contexts: List[Any] = field(default_factory=list)

    def record_stream(self, stream: torch.Stream) -> None:
        pass


def _check_plan(params: Dict[str, ParameterSharding], world_size: int, where: str) -> None:
    if set(params) != {ARRAY_PARAMETER_NAME}:
        raise ValueError(
            f"{where}: the plan of a RobeEmbeddingBagCollection must have exactly one entry, "
            f"{ARRAY_PARAMETER_NAME!r} (its tables share one array and are not planned one by one), got {sorted(params)}"
        )
    ps = params[ARRAY_PARAMETER_NAME]
    if ps.sharding_type != ShardingType.DATA_PARALLEL.value:
        raise ValueError(
            f"{where}: the ROBE array can only be replicated: sharding_type must be "
            f"{ShardingType.DATA_PARALLEL.value!r}, got {ps.sharding_type!r}"
        )
    if ps.compute_kernel != EmbeddingComputeKernel.DENSE.value:
        raise ValueError(
            f"{where}: the ROBE array runs on the {EmbeddingComputeKernel.DENSE.value!r} compute kernel, "
            f"got {ps.compute_kernel!r}"
        )
    if ps.ranks is not None and sorted(ps.ranks) != list(range(world_size)):
        raise ValueError(
            f"{where}: a data-parallel ROBE array lives on every rank: ranks must be {list(range(world_size))}, "
            f"got {ps.ranks}"
        )


class ShardedRobeEmbeddingBagCollection(
    ShardedModule[KJTList, KeyedTensor, KeyedTensor, RobeEmbeddingBagCollectionContext], FusedOptimizerModule
):
    """``RobeEmbeddingBagCollection`` replicated on every rank of ``env`` (DATA_PARALLEL, dense kernel).

    Built by ``RobeEmbeddingBagCollectionSharder.shard`` (``DistributedModelParallel`` calls it).
    Holds the same state as the unsharded module, under the same names: ``array`` (1-D
    ``[array_size]`` float32 parameter, identical on every rank) and ``hash_signature`` (checked
    when a state dict or a ``torch.distributed.checkpoint`` is loaded).

    Args:
        module (RobeEmbeddingBagCollection): the module to replicate; its array is copied (or
            materialised and initialised, if on ``meta``) on ``device`` and broadcast from rank 0.
        table_name_to_parameter_sharding (Dict[str, ParameterSharding]): the module's plan:
            ``{"array": ParameterSharding(sharding_type="data_parallel", compute_kernel="dense")}``.
        env (ShardingEnv): process group of the replicas.
        device (Optional[torch.device]): where the array lives (default CPU).
        gradient_sync (str): ``"hook"`` or ``"ddp"`` (module docstring).

    Call args (as TorchRec's sharded collections): ``features`` (KeyedJaggedTensor) of the local
    batch ``B``; returns ``LazyAwaitable[KeyedTensor]`` of values ``[B, sum of embedding dims]``.

    An array given an optimiser by ``apply_optimizer_in_backward`` (TorchRec's DLRM example applies
    one to the whole sparse arch) is stepped inside the backward once its gradient is averaged,
    and that optimiser is ``fused_optimizer`` (``{"array": ...}``), as for TorchRec's fused tables;
    otherwise ``fused_optimizer`` is empty and the dense optimiser trains the array.

    Example::

        model = DistributedModelParallel(DLRM(embedding_bag_collection=robe_ebc, ...), plan=plan,
                                         sharders=get_default_sharders())
        sharded = model.module.sparse_arch.embedding_bag_collection   # ShardedRobeEmbeddingBagCollection
        pooled = sharded(kjt).wait()                 # KeyedTensor [B_local, sum of dims]

    (Inside ``DLRMTrain`` the path starts ``model.module.model``; for a hybrid collection add
    ``.robe``. After a ``TrainPipelineSparseDist`` has run the model, call ``pipeline.detach()``
    before calling the module directly, as for TorchRec's own sharded modules.)
    """

    def __init__(
        self,
        module: RobeEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        gradient_sync: str = "hook",
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        where = f"ShardedRobeEmbeddingBagCollection({module_fqn or ''!s})"
        if not isinstance(module, RobeEmbeddingBagCollection):
            raise TypeError(f"{where}: expected a RobeEmbeddingBagCollection, got {type(module).__name__}")
        if gradient_sync not in GRADIENT_SYNC_MODES:
            raise ValueError(f"{where}: gradient_sync must be one of {GRADIENT_SYNC_MODES}, got {gradient_sync!r}")
        if module.fused_update is not None:
            fused = module.fused_update
            given = f"fused_sgd_lr={fused.lr}" if fused.optimizer == "sgd" else f"fused_update={fused}"
            raise ValueError(
                f"{where}: the module was built with {given}, which updates the array "
                "inside the backward from the LOCAL gradient: replicas would diverge. Build it without a fused "
                "update and train the array with a dense optimiser (e.g. torch.optim.SGD); at world size 1, "
                "fuse_optimizer(optimizer) on the sharded module applies that optimiser inside the backward."
            )
        in_backward = _in_backward_optimizer_spec(module.array, where)
        if in_backward is not None and gradient_sync != "hook":
            raise ValueError(
                f"{where}: the ROBE array carries an in-backward optimiser (apply_optimizer_in_backward) and "
                f"gradient_sync={gradient_sync!r} hands its gradient to DDP, whose own in-backward optimisers need "
                "an accelerator stream; use gradient_sync='hook' (the default), which steps it after the average"
            )
        self._env = env
        self._pg = env.process_group
        self._world_size = env.world_size
        if self._pg is None and self._world_size > 1:
            raise ValueError(
                f"{where}: world_size={self._world_size} needs a process group to broadcast and average the "
                "array (ShardingEnv.from_process_group), got a ShardingEnv without one"
            )
        _check_plan(table_name_to_parameter_sharding, self._world_size, where)
        self._parameter_sharding = dict(table_name_to_parameter_sharding)
        self._gradient_sync = gradient_sync
        self._module_fqn = module_fqn
        self._require_grad_sync = True
        self._accumulating = False  # the last training lookup ran under no_sync()
        if device is None:
            device = torch.device("cpu")
        self._device = torch.device(device)

        if in_backward is not None:
            # apply_optimizer_in_backward's hook on the caller's array (replaced below) holds it,
            # and its optimiser and state, for as long as the process lives: let it go, as DDP does
            for handle in param_to_optim_hook_handle_map.pop(module.array, []):
                handle.remove()
            param_to_acc_grad_map.pop(module.array, None)
        # The unsharded module runs the lookup; it is kept out of the module tree (state keys stay
        # "array" and "hash_signature", as unsharded) and shares its array and buffer with us.
        object.__setattr__(self, "_robe", module)
        self._materialize(module)
        self.array: nn.Parameter = module.array
        # (derived from the config, not saved; registered so that the module keeps the unsharded
        # one's buffer names in their order, which TorchRec's composable shard_modules() checks)
        self.register_buffer("lookup_meta", module.lookup_meta, persistent=False)
        self.register_buffer("hash_signature", module.hash_signature)
        self._register_load_state_dict_pre_hook(self._check_loaded_signature, with_module=False)

        if self._pg is not None and self._world_size > 1:
            self._check_same_config_on_all_ranks(where)
            with torch.no_grad():
                dist.broadcast(self.array.data, src=dist.get_global_rank(self._pg, 0), group=self._pg)
        self._fused_optimizer: Optional[torch.optim.Optimizer] = None
        self._hooked_array_id: Optional[int] = None  # id(), not the tensor: a Parameter attribute would register
        self._lookups: List[nn.Module] = []  # (no TorchRec lookup kernels: TorchRec's walks over them find none)
        self.allreduce_bytes = 0
        """Bytes of gradient this rank has handed to its all-reduces ("hook" mode), counted at each call."""
        self._optim: KeyedOptimizer = CombinedOptimizer([])
        if in_backward is not None:
            self._set_in_backward_optimizer(*in_backward)
        self._install_grad_hook()

    # ------------------------------------------------------------------ construction
    def _materialize(self, module: RobeEmbeddingBagCollection) -> None:
        """Gives the module a fresh array on ``self._device`` (a copy: hooks and attributes of the
        caller's parameter are dropped) and a signature buffer there."""
        old = module.array
        # new_array: on CPU, the same huge-page backed buffer as an unsharded module's
        module.array = nn.Parameter(new_array(old.numel(), self._device, old.dtype))
        if old.device.type == "meta":
            module.reset_parameters()
        else:
            with torch.no_grad():
                module.array.copy_(old.detach())
        module.lookup_meta = module._lookup_meta_checked = module.lookup_meta_for(self._device)
        if module.hash_signature.device.type == "meta":
            sig = torch.tensor(module.expected_signature(), dtype=torch.long, device=self._device)
        else:
            sig = module.hash_signature.detach().to(self._device, copy=True)
        module.hash_signature = sig
        module.check_signature_unchanged()

    def _check_same_config_on_all_ranks(self, where: str) -> None:
        # on the array's device: an NCCL-only group takes no CPU tensor (docs/distributed.md)
        sig = self.hash_signature.detach().to(self._device)
        gathered = [torch.empty_like(sig) for _ in range(self._world_size)]
        dist.all_gather(gathered, sig, group=self._pg)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, sig):
                raise RuntimeError(
                    f"{where}: rank {rank} built its ROBE collection with another configuration "
                    f"([{self._robe.describe_signature(other.tolist())}] vs "
                    f"[{self._robe.describe_signature(sig.tolist())}] here): every replica must use the same "
                    "RobeConfig (hash, seed, block size and alignment, array size) and the same tables"
                )

    def _check_loaded_signature(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "hash_signature"
        if key in state_dict:
            self._robe.verify_signature(state_dict[key].tolist(), "load_state_dict")

    # ------------------------------------------------------------------ in-backward optimiser
    def _set_in_backward_optimizer(self, optimizer_class: Type[torch.optim.Optimizer], kwargs: Dict[str, Any]) -> None:
        """The optimiser that ``apply_optimizer_in_backward`` gave the array, rebuilt on our array: it
        steps inside the backward once the gradient is averaged (world size 1: at once, fused into
        the kernels where ``fuse_optimizer`` can), as TorchRec's fused tables step, and is this
        module's ``fused_optimizer`` (``"array"`` -> its state), which DMP's ``fused_optimizer``
        collects. The array keeps ``_in_backward_optimizers``, so ``in_backward_optimizer_filter``
        leaves it out of the dense optimiser."""
        self._optim = KeyedOptimizerWrapper({ARRAY_PARAMETER_NAME: self.array}, lambda params: optimizer_class(params, **kwargs))
        self._in_backward_spec = (optimizer_class, dict(kwargs))
        self._mark_in_backward()
        if self._world_size == 1:
            try:
                self.fuse_optimizer(self._optim._optimizer)
            except ValueError:
                pass  # not an update the kernels apply: stepped by the grad hook below

    def _mark_in_backward(self) -> None:
        optimizer_class, kwargs = self._in_backward_spec
        self.array._in_backward_optimizers = [self._optim]  # type: ignore[attr-defined]
        self.array._optimizer_classes = [optimizer_class]  # type: ignore[attr-defined]
        self.array._optimizer_kwargs = [dict(kwargs)]  # type: ignore[attr-defined]

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # a copy (copy.deepcopy, pickle) has a new array, without our hook and attributes
        super().__setstate__(state)
        self._hooked_array_id = None
        if self._optim.params and _group_holding(self._optim, self.array) is not None:
            self._mark_in_backward()
        self._install_grad_hook()

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The array's in-backward optimiser (``{"array": ...}``), or an empty one without."""
        return self._optim

    def _step_in_backward(self) -> None:
        if _group_holding(self._optim, self.array) is None:
            raise RuntimeError(
                f"ShardedRobeEmbeddingBagCollection({self._module_fqn or ''!s}): the array was replaced after "
                "sharding (load_state_dict(assign=True)?) and its in-backward optimiser still holds the old one; "
                "load the state in place (assign=False)"
            )
        self._optim.step()
        self.array.grad = None

    # ------------------------------------------------------------------ gradient averaging ("hook")
    def _install_grad_hook(self) -> None:
        needed = (self._gradient_sync == "hook" and self._world_size > 1) or self._optim.params
        if needed and self._hooked_array_id != id(self.array):
            # through a weak reference: the tensor keeps its hooks in C++, where Python's gc cannot
            # see them, so a bound method here made module -> array -> hook -> module a cycle that gc
            # never frees: it kept this module, its process group (self._pg, self._env) and gloo's
            # worker threads alive after destroy_process_group(), until the process ended
            method = weakref.WeakMethod(self._grad_hook)

            def hook(param: torch.Tensor) -> None:
                bound = method()
                if bound is not None:
                    bound(param)

            self.array.register_post_accumulate_grad_hook(hook)
            self._hooked_array_id = id(self.array)

    def _grad_hook(self, param: torch.Tensor) -> None:
        """Once the array's gradient is complete: averages it over ranks ("hook" mode) and steps
        the in-backward optimiser, if any, on the average (at once on one rank)."""
        if not self._require_grad_sync or param.grad is None:
            return  # (no_sync: the gradient accumulates, averaged and stepped at the next synced backward)
        in_backward = bool(self._optim.params)
        if self._world_size == 1 or self._gradient_sync != "hook":
            if in_backward:
                self._step_in_backward()
            return
        grad = param.grad
        grad.div_(self._world_size)
        work = dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self._pg, async_op=True)
        self.allreduce_bytes += grad.numel() * grad.element_size()

        def finish() -> None:
            work.wait()
            if in_backward:
                self._step_in_backward()

        # the engine runs queued callbacks once the whole backward is done: the all-reduce overlaps
        # with what remains of the backward and is complete before optimizer.step()
        torch.autograd.Variable._execution_engine.queue_callback(finish)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate the local gradient without averaging it ("hook" mode;
        in "ddp" mode use the DDP wrapper's ``no_sync()``)."""
        previous = self._require_grad_sync
        self._require_grad_sync = False
        try:
            yield
        finally:
            self._require_grad_sync = previous

    # ------------------------------------------------------------------ ShardedModule protocol
    def create_context(self) -> RobeEmbeddingBagCollectionContext:
        return RobeEmbeddingBagCollectionContext()

    def input_dist(
        self, ctx: RobeEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """No communication (data-parallel): wraps ``features`` the way TorchRec's pipelines expect."""
        features = as_kjt(features)  # (a TensorDict, as TorchRec's sharded collections take it)
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(
                f"ShardedRobeEmbeddingBagCollection: input must be a KeyedJaggedTensor, got {type(features).__name__}"
            )
        return KJTListSplitsAwaitable(
            [NoWait(NoWait(features))],
            ctx,
            module_fqn=self._module_fqn,
            sharding_types=[ShardingType.DATA_PARALLEL.value],
        )

    def _relink_lookup_state(self) -> None:
        # ``load_state_dict(assign=True)``, ``_apply`` (``.to()``) etc. may replace our tensors:
        # point the lookup module at the current ones (and re-check a replaced signature).
        robe = self._robe
        if robe._parameters["array"] is not self.array:
            robe._parameters["array"] = self.array
            self._install_grad_hook()
        if robe._buffers["hash_signature"] is not self.hash_signature:
            robe._buffers["hash_signature"] = self.hash_signature
            robe.check_signature_unchanged(force=True)
        if robe._buffers["lookup_meta"] is not self.lookup_meta:  # (checked at the lookup, once)
            robe._buffers["lookup_meta"] = self.lookup_meta

    def compute(self, ctx: RobeEmbeddingBagCollectionContext, dist_input: KJTList) -> KeyedTensor:
        self._relink_lookup_state()
        training = torch.is_grad_enabled() and self.array.requires_grad
        accumulated = self._accumulating
        if training:
            self._accumulating = not self._require_grad_sync
        if self._fused_optimizer is None or not training or self._accumulating or accumulated:
            # (a lookup under no_sync(), and the first after it, add a dense gradient to array.grad
            # for the next optimiser step: gradient accumulation, as without fusing)
            return self._robe(dist_input[0])
        fused, state, step = self._fused_step()
        out = self._robe.lookup(dist_input[0], fused, state)
        if step is not None:  # counted as torch.optim.Adagrad.step() counts it: once a backward

            def count_step(grad: torch.Tensor) -> None:
                step.add_(1)

            out.values().register_hook(count_step)
        return out

    # ------------------------------------------------------------------ fused update (world size 1)
    def fuse_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """From now on the backward applies ``optimizer``'s update to the array in place, as
        TorchRec's fused tables do: no gradient is left on the array between the backward and
        ``optimizer.step()`` (with SGD, or any optimiser under the Triton kernels, none is built
        at all: one pass over the touched blocks instead of a gradient, its zeroing and an
        optimiser pass over the whole array; Adagrad on CPU builds it inside the op and frees it
        there). World size 1 only: replicas must average their gradients before any update.

        ``optimizer`` must hold the array: ``torch.optim.SGD`` (no momentum, weight decay,
        nesterov, maximize) or ``torch.optim.Adagrad`` (no weight decay, lr_decay, maximize). Each
        training forward reads the array's current ``lr`` (and ``eps``) from its param group, so
        schedules apply, and Adagrad's sum of squares and step count are
        ``optimizer.state[array]``: ``optimizer.state_dict()`` and checkpoints are as without
        fusing. ``optimizer.step()`` then skips the array (its ``.grad`` is ``None``). The
        arithmetic is the optimiser's: Adagrad on CPU gives its bits exactly, SGD sums a slot's
        contributions in another order.

        Every backward through the module is a step: gradient accumulation (several backwards per
        ``optimizer.step()``) or two lookups per step would take more steps than the dense path,
        and a pipeline that runs a forward before the previous ``optimizer.step()`` reads the rate
        one step early. Accumulate under ``no_sync()`` instead: the lookups there, and the first one
        after, leave a dense gradient in ``array.grad`` for ``optimizer.step()``.
        The module keeps ``optimizer``: after building a new one, fuse again.

        Example::

            opt = torch.optim.SGD(dmp.parameters(), lr=0.05)
            sharded = dmp.module.sparse_arch.embedding_bag_collection  # the ShardedRobeEmbeddingBagCollection
            sharded.fuse_optimizer(opt)
        """
        where = f"ShardedRobeEmbeddingBagCollection({self._module_fqn or ''!s}).fuse_optimizer"
        if self._world_size != 1:
            raise ValueError(
                f"{where}: world_size={self._world_size}; a fused update steps on the LOCAL gradient before it is "
                "averaged over ranks, so replicas would diverge (world size 1 only)"
            )
        if self._gradient_sync != "hook":
            raise ValueError(f"{where}: gradient_sync={self._gradient_sync!r} hands the array's gradient to DDP; "
                             "a fused update leaves none (use gradient_sync='hook')")  # fmt: skip
        fusable_update(optimizer, self.array, where)  # raises on what it cannot fuse
        self._fused_optimizer = optimizer

    def unfuse_optimizer(self) -> None:
        """Back to a dense gradient in ``array.grad`` (undoes ``fuse_optimizer``)."""
        self._fused_optimizer = None

    @property
    def fused_optimizer_kind(self) -> Optional[str]:
        """``"sgd"`` or ``"adagrad"`` when ``fuse_optimizer`` is in effect, else ``None``."""
        opt = self._fused_optimizer
        return None if opt is None else fusable_update(opt, self.array, "fused_optimizer_kind")[0]

    def _fused_step(self):
        opt = self._fused_optimizer
        # checked each step: the array may have been replaced (load_state_dict(assign=True))
        kind, group = fusable_update(opt, self.array, "ShardedRobeEmbeddingBagCollection")
        state = step = None
        if kind == "adagrad":
            state, step = opt.state[self.array]["sum"], opt.state[self.array].get("step")
        return FusedUpdate(kind, float(group["lr"]), float(group.get("eps", 1e-10))), state, step

    def output_dist(self, ctx: RobeEmbeddingBagCollectionContext, output: KeyedTensor) -> LazyAwaitable[KeyedTensor]:
        return LazyNoWait(output)

    def compute_and_output_dist(
        self, ctx: RobeEmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # "ddp": the array is an ordinary replicated parameter, averaged by DMP's DDP wrapper.
        # "hook": we average it ourselves, so DDP must ignore it.
        if self._gradient_sync == "hook":
            yield append_prefix(prefix, ARRAY_PARAMETER_NAME)

    @property
    def unsharded_module_type(self) -> Type[RobeEmbeddingBagCollection]:
        return RobeEmbeddingBagCollection

    # ------------------------------------------------------------------ introspection
    @property
    def gradient_sync(self) -> str:
        return self._gradient_sync

    @property
    def robe_module(self) -> RobeEmbeddingBagCollection:
        """The unsharded module doing the lookup (shares ``array`` and ``hash_signature``)."""
        return self._robe

    def embedding_bag_configs(self):
        return self._robe.embedding_bag_configs()

    @property
    def parameter_sharding(self) -> Dict[str, ParameterSharding]:
        return self._parameter_sharding

    def extra_repr(self) -> str:
        return f"{self._robe.extra_repr()}, sharding=data_parallel, world_size={self._world_size}, gradient_sync={self._gradient_sync!r}"


def _in_backward_optimizer_spec(
    array: torch.Tensor, where: str
) -> Optional[Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]]:
    """``(optimizer_class, kwargs)`` that ``apply_optimizer_in_backward`` gave ``array``, else ``None``."""
    if not getattr(array, "_in_backward_optimizers", None):
        return None
    classes = getattr(array, "_optimizer_classes", [])
    kwargs = getattr(array, "_optimizer_kwargs", [])
    if len(classes) != 1 or len(kwargs) != 1:
        raise ValueError(
            f"{where}: the ROBE array carries {len(classes)} in-backward optimisers (apply_optimizer_in_backward "
            "called more than once over it?); one is supported, as for TorchRec's tables"
        )
    optimizer_class, optimizer_kwargs = classes[0], dict(kwargs[0])
    # one step on a 2-element stand-in: TorchRec's placeholders (torchrec.optim.SGD, ...) only
    # configure the fused kernels of sharded tables and cannot step
    probe = nn.Parameter(torch.zeros(2))
    try:
        optimizer = optimizer_class([probe], **optimizer_kwargs)
        probe.grad = torch.zeros(2)
        optimizer.step()
        optimizer.state, optimizer.param_groups  # noqa: B018 (what KeyedOptimizerWrapper reads)
    except Exception as e:
        name = f"{optimizer_class.__module__}.{optimizer_class.__qualname__}"
        raise ValueError(
            f"{where}: the ROBE array's in-backward optimiser {name}({optimizer_kwargs}) cannot train it, a 1-D "
            f"dense parameter ({type(e).__name__}{f': {e}' if str(e) else ' in step()'}); give the array a "
            "torch.optim optimiser (e.g. torch.optim.Adagrad), or leave it out of apply_optimizer_in_backward"
        ) from None
    return optimizer_class, optimizer_kwargs


def _group_holding(optimizer: torch.optim.Optimizer, array: torch.Tensor) -> Optional[Dict[str, Any]]:
    """The param group of ``optimizer`` that holds ``array`` (by identity), or ``None``."""
    return next((g for g in optimizer.param_groups if any(p is array for p in g["params"])), None)


def fusable_update(optimizer: torch.optim.Optimizer, array: torch.Tensor, where: str) -> Tuple[str, Dict[str, Any]]:
    """``(kind, param_group)``: the update of ``optimizer`` on ``array`` that the kernels can apply
    inside the backward (``"sgd"`` or ``"adagrad"``) and the group holding ``array``.
    ``ValueError`` naming the setting that prevents it (``TypeError`` for what is no optimiser)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: expected a torch.optim.Optimizer holding the ROBE array, got {type(optimizer).__name__}")
    group = _group_holding(optimizer, array)
    if group is None:
        raise ValueError(f"{where}: the optimizer does not hold the ROBE array")
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD):
        kind, unsupported = "sgd", ("momentum", "weight_decay", "nesterov", "maximize")
    elif isinstance(optimizer, torch.optim.Adagrad):
        kind, unsupported = "adagrad", ("weight_decay", "lr_decay", "maximize")
        if "sum" not in optimizer.state[array]:
            raise ValueError(f"{where}: torch.optim.Adagrad has no 'sum' state for the array")
    else:
        raise ValueError(f"{where}: {name} cannot be fused into the ROBE backward (torch.optim.SGD or Adagrad can)")
    given = [k for k in unsupported if group.get(k)]
    if given:
        raise ValueError(f"{where}: {name} with {', '.join(f'{k}={group[k]}' for k in given)} cannot be fused into "
                         "the ROBE backward (the kernels apply plain SGD / Adagrad)")  # fmt: skip
    return kind, group


class RobeEmbeddingBagCollectionSharder(BaseEmbeddingSharder[RobeEmbeddingBagCollection]):
    """TorchRec sharder of ``RobeEmbeddingBagCollection``: DATA_PARALLEL, dense kernel.

    The planner sees one shardable tensor per ROBE collection, named ``"array"``: a ``meta`` tensor
    of shape ``[array_size / c, c]`` (``planning_shape``), as many bytes as the array, so the plan
    charges every rank the array's bytes (plus the optimiser state, when ``optimizer_class`` is
    given) instead of ``num_embeddings x embedding_dim`` per table. Constraints for a ROBE
    collection go under the key ``"array"`` (``robe_dist.distributed.planner``).

    Args:
        optimizer_class (Optional[Type[torch.optim.Optimizer]]): the dense optimiser that will train
            the array; the planner then budgets its state (Adagrad: 1x the array, Adam: 2x, SGD: 0x,
            SGD with momentum: 1x). ``None``: no optimiser state budgeted.
        optimizer_kwargs (Optional[Dict[str, Any]]): its arguments (momentum, centered, amsgrad
            change the state it keeps).
        gradient_sync (str): ``"hook"`` (default) or ``"ddp"``: who averages the array's gradient
            (robe_dist.distributed.robe_embedding_bag_collection's docstring).

    Example::

        sharders = [RobeEmbeddingBagCollectionSharder(optimizer_class=torch.optim.Adagrad),
                    EmbeddingBagCollectionSharder()]
        plan = EmbeddingShardingPlanner(topology).collective_plan(model, sharders, pg)
        model = DistributedModelParallel(model, plan=plan, sharders=sharders)
    """

    def __init__(
        self,
        optimizer_class: Optional[Type[torch.optim.Optimizer]] = None,
        optimizer_kwargs: Optional[Dict[str, Any]] = None,
        gradient_sync: str = "hook",
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(fused_params=None, qcomm_codecs_registry=qcomm_codecs_registry)
        if gradient_sync not in GRADIENT_SYNC_MODES:
            raise ValueError(
                f"RobeEmbeddingBagCollectionSharder: gradient_sync must be one of {GRADIENT_SYNC_MODES}, got {gradient_sync!r}"
            )
        self._gradient_sync = gradient_sync
        self._optimizer_class = optimizer_class
        self._optimizer_kwargs = dict(optimizer_kwargs or {})
        self._state_slots = 0 if optimizer_class is None else optimizer_state_slots(optimizer_class, self._optimizer_kwargs)
        if self._state_slots not in _PLANNER_CLASS_FOR_SLOTS:
            raise ValueError(
                f"RobeEmbeddingBagCollectionSharder: {optimizer_class.__name__}({self._optimizer_kwargs}) keeps "
                f"{self._state_slots} array-sized states; TorchRec's planner can budget 0, 1 or 2"
            )

    def shard(
        self,
        module: RobeEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedRobeEmbeddingBagCollection:
        return ShardedRobeEmbeddingBagCollection(
            module=module,
            table_name_to_parameter_sharding=params,
            env=env,
            device=device,
            gradient_sync=self._gradient_sync,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
        )

    def shardable_parameters(self, module: RobeEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """``{"array": meta tensor [array_size / c, c]}``: what the planner sizes (no memory)."""
        tensor = torch.empty(planning_shape(module), dtype=module.array.dtype, device="meta")
        # read by the planner's storage estimator (as for apply_optimizer_in_backward tables)
        if self._optimizer_class is not None:
            tensor._optimizer_classes = [_PLANNER_CLASS_FOR_SLOTS[self._state_slots]]  # type: ignore[attr-defined]
        else:  # the array's own apply_optimizer_in_backward, if any
            spec = _in_backward_optimizer_spec(module.array, "RobeEmbeddingBagCollectionSharder")
            if spec is not None:
                try:
                    slots = optimizer_state_slots(*spec)
                except ValueError:  # an optimiser we do not know: TorchRec's estimator sizes it
                    tensor._optimizer_classes = [spec[0]]  # type: ignore[attr-defined]
                else:
                    if slots not in _PLANNER_CLASS_FOR_SLOTS:
                        raise ValueError(
                            f"RobeEmbeddingBagCollectionSharder: the array's in-backward {spec[0].__name__}({spec[1]}) "
                            f"keeps {slots} array-sized states; TorchRec's planner can budget 0, 1 or 2"
                        )
                    tensor._optimizer_classes = [_PLANNER_CLASS_FOR_SLOTS[slots]]  # type: ignore[attr-defined]
        return {ARRAY_PARAMETER_NAME: tensor}  # type: ignore[dict-item]

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [ShardingType.DATA_PARALLEL.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if sharding_type != ShardingType.DATA_PARALLEL.value:
            return []
        return [EmbeddingComputeKernel.DENSE.value]

    def storage_usage(self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str) -> Dict[str, int]:
        return compute_storage_usage(tensor, compute_device_type, compute_kernel, StorageUsageType.BASE)

    @property
    def optimizer_state_slots(self) -> int:
        """Array-sized optimiser states the planner budgets (0, 1 or 2)."""
        return self._state_slots

    @property
    def gradient_sync(self) -> str:
        return self._gradient_sync

    @property
    def module_type(self) -> Type[RobeEmbeddingBagCollection]:
        return RobeEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedRobeEmbeddingBagCollection]:
        return ShardedRobeEmbeddingBagCollection
