"""Optimisers (SGD, Adagrad, Adam), the MLPerf learning-rate schedule and gradient clipping."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_dist.distributed import ShardedRobeEmbeddingBagCollection
from robe_dist.train_config import OptimConfig

def optimizer_spec(cfg: OptimConfig) -> Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]:
    """The optimiser class and its keyword arguments other than ``lr``."""
    if cfg.name == "sgd":
        return torch.optim.SGD, {"momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    if cfg.name == "adagrad":  # MLPerf v3: no lr decay, zero initial accumulator
        return torch.optim.Adagrad, {"eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return torch.optim.Adam, {"betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def lr_factor(cfg: OptimConfig, step: int) -> float:
    """Fraction of the peak learning rate at ``step`` (0-based), MLPerf DLRM's policy: linear
    warm-up over ``warmup_steps``, constant, then polynomial decay from ``decay_start_step`` over
    ``decay_steps`` down to ``min_lr_factor``, where it stays."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay_steps and step >= cfg.decay_start_step:
        left = max(0, cfg.decay_start_step + cfg.decay_steps - step)
        return max(cfg.min_lr_factor, (left / cfg.decay_steps) ** cfg.decay_power)
    return 1.0


class TrainOptimizer:
    """What the train pipeline drives: one optimiser over the dense MLPs, the ROBE arrays and
    (fused into the backward) the full tables, with the schedule and clipping around it. Its parts
    (keys of the state dict): ``fused`` (full tables), ``dense`` (MLPs, at ``lr``), ``embeddings``
    (data-parallel full tables, at ``embedding_lr``, without momentum, weight decay or clipping,
    as the fused ones) and ``robe`` (the arrays, at ``robe_lr_factor`` times that).

    ``zero_grad()`` (called by the pipeline before the forward) sets every group's rate for the
    coming step, so the fused tables, which update inside the backward, use the same rate as the
    dense part; ``step()`` clips the gradients of the MLPs and arrays, steps, and counts.

    Args:
        model: the DistributedModelParallel model.
        cfg: the optimiser section of the config.
        embedding_params: parameters of the embedding modules (ROBE arrays, data-parallel full
            tables), trained at ``embedding_lr``; the fused full tables are left out here.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, embedding_params: List[torch.Tensor]) -> None:
        self.cfg = cfg
        cls, kwargs = optimizer_spec(cfg)
        params = dict(in_backward_optimizer_filter(model.named_parameters()))
        embedding_ids = {id(p) for p in embedding_params}
        array_ids = {id(m.array) for m in model.modules() if isinstance(m, ShardedRobeEmbeddingBagCollection)}
        arrays = {n: p for n, p in params.items() if id(p) in array_ids}
        embeddings = {n: p for n, p in params.items() if id(p) in embedding_ids and n not in arrays}
        dense = {n: p for n, p in params.items() if n not in embeddings and n not in arrays}
        optims: List[Tuple[str, KeyedOptimizer]] = []
        fused = getattr(model, "fused_optimizer", None)
        if fused is not None and fused.params:
            optims.append(("fused", fused))
        self.torch_optimizers: List[torch.optim.Optimizer] = []
        """The torch optimisers inside (dense part, embeddings), for ``fuse_robe_updates``."""

        def wrap(params: Dict[str, torch.Tensor], lr: float, **overrides: Any) -> KeyedOptimizer:
            opt = cls(list(params.values()), lr=lr, **{**kwargs, **overrides})
            self.torch_optimizers.append(opt)
            return KeyedOptimizerWrapper(params, lambda ps: opt)

        if dense:
            optims.append(("dense", wrap(dense, cfg.lr)))
        emb_lr = cfg.embedding_lr or cfg.lr
        if embeddings:  # full tables the planner made data-parallel: they take the fused tables' update
            # (FBGEMM's fused kernels have no momentum or weight decay and are not clipped), so a
            # table trains the same whichever way TorchRec places it, on any number of ranks
            plain = {k: 0.0 for k in ("momentum", "weight_decay") if k in kwargs}
            optims.append(("embeddings", wrap(embeddings, emb_lr, **plain)))
        if arrays:
            optims.append(("robe", wrap(arrays, cfg.robe_lr_factor * emb_lr)))
        self.optimizer = CombinedOptimizer(optims)
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.clip_params = list(dense.values()) + list(arrays.values())
        self.step_count = 0
        self.last_grad_norm: float = float("nan")

    @property
    def lr(self) -> float:
        """The dense part's learning rate of the last step taken (``zero_grad`` sets each step's
        rate before it; read after the step, ``step_count`` already counts it), or of the first
        step before any."""
        return self.cfg.lr * lr_factor(self.cfg, max(self.step_count - 1, 0))

    def zero_grad(self, set_to_none: bool = True) -> None:
        factor = lr_factor(self.cfg, self.step_count)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        if self.cfg.grad_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.cfg.grad_clip_norm)
            self.last_grad_norm = norm  # a tensor: read it only when logging
        self.optimizer.step()
        self.step_count += 1

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def holder_of(self, param: torch.Tensor) -> torch.optim.Optimizer:
        """The torch optimiser that trains ``param``."""
        for opt in self.torch_optimizers:
            if any(p is param for group in opt.param_groups for p in group["params"]):
                return opt
        raise KeyError("parameter not trained by this TrainOptimizer")


def fuse_robe_updates(model: nn.Module, optimizer: TrainOptimizer, fused_update: bool, world_size: int) -> Optional[str]:
    """Fuses the optimiser's step on each ROBE array into the lookup's backward
    (``ShardedRobeEmbeddingBagCollection.fuse_optimizer``) where that takes the same steps: one
    process, ``robe.fused_update``, SGD without momentum / Adagrad, no gradient clipping. Returns
    the line to log (``None``: the model has no ROBE array)."""
    sharded = [m for m in model.modules() if isinstance(m, ShardedRobeEmbeddingBagCollection)]
    if not sharded:
        return None
    cfg = optimizer.cfg
    why_not = None
    if not fused_update:
        why_not = "robe.fused_update is false"
    elif world_size > 1:
        why_not = f"{world_size} processes average it first"
    elif cfg.grad_clip_norm is not None:
        why_not = "optim.grad_clip_norm clips it"
    else:
        try:
            for m in sharded:
                m.fuse_optimizer(optimizer.holder_of(m.array))
        except (KeyError, ValueError) as e:
            for m in sharded:
                m.unfuse_optimizer()
            why_not = str(e).split(": ", 1)[-1]
    if why_not:
        return f"ROBE array: dense gradient, then the optimiser ({why_not})"
    return f"ROBE array: {cfg.name} fused into the lookup's backward (one process)"
