"""DLRM / DLRM_DCN over ROBE and full tables, planned and wrapped in DistributedModelParallel."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, get_args, get_type_hints

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ShardedModule, ShardingType
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import optimizers as trec_optim

from robe_dist.data.stats import TableStats
from robe_dist.distributed import RobeShardingPlanner, ShardedRobeEmbeddingBagCollection, get_default_sharders
from robe_dist.modules import QREmbeddingBagCollection, RobeEmbeddingBagCollection, RobeHybridEmbeddingBagCollection
from robe_dist.placement import Placement, PlacementError, evaluate_placement, plan_placement
from robe_dist.train_config import Config, ConfigError
from robe_dist.trainer.env import DistEnv

logger = logging.getLogger("robe_dist.train")

NUM_DENSE_FEATURES = 13
FUSED_OPTIMIZERS = {"sgd": trec_optim.SGD, "adagrad": trec_optim.Adagrad, "adam": trec_optim.Adam}


class AutocastDLRMTrain(DLRMTrain):
    """``DLRMTrain`` whose model runs under ``torch.autocast`` (loss computed in fp32)."""

    def __init__(self, dlrm_module: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__(dlrm_module)
        self.autocast_dtype = dtype
        self.autocast_device_type = device_type

    def forward(self, batch: Batch):
        with torch.autocast(self.autocast_device_type, dtype=self.autocast_dtype):
            logits = self.model(batch.dense_features, batch.sparse_features)
        logits = logits.squeeze(-1).float()
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


def table_configs(cfg: Config, feature_names: Sequence[str], num_embeddings: Sequence[int]) -> Tuple[
    List[EmbeddingBagConfig], List[str]
]:
    """All tables (one ``t_<feature>`` per feature, in feature order) and the names of those that
    live in the ROBE array (``robe.features``); the others are full tables."""
    if len(num_embeddings) != len(feature_names):
        raise ConfigError(
            f"model.num_embeddings_per_feature has {len(num_embeddings)} sizes; the data has "
            f"{len(feature_names)} sparse features ({feature_names[0]} .. {feature_names[-1]})"
        )
    wanted = cfg.robe.features
    if wanted in ("all", "auto"):  # auto: place_tables decides which of them stay
        robe_features = set(feature_names)
    elif wanted == "none":
        robe_features = set()
    else:
        unknown = sorted(set(wanted) - set(feature_names))
        if unknown:
            raise ConfigError(f"robe.features names unknown features {unknown}; the data has {list(feature_names)}")
        robe_features = set(wanted)
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=cfg.model.embedding_dim, num_embeddings=int(n), feature_names=[f])
        for f, n in zip(feature_names, num_embeddings)
    ]
    return tables, [t.name for t in tables if t.feature_names[0] in robe_features]


def model_spec(cfg: Config, tables: List[EmbeddingBagConfig], robe_names: List[str], array_size: Optional[int],
               id_moduli: Dict[str, int], ids: str = "raw", vocab: Optional[Dict] = None,
               hot_ids: Optional[Dict[str, Sequence[int]]] = None) -> Dict:  # fmt: skip
    """What ``build_collection`` was given, as JSON: with the run's config it rebuilds the
    model without the data (``robe-export``). ``id_moduli``: features whose ids are taken modulo;
    ``ids``: ``"vocab"`` when the data's ids were remapped by ``robe-data vocab``, else ``"raw"``;
    ``vocab``: that vocabulary's ``path`` and ``fingerprint`` (robe-predict applies it to raw rows);
    ``hot_ids``: the exact-row ids of ROBE tables (their number is kept: the ids themselves are
    the model's buffers, in its checkpoints)."""
    return {
        "version": 1,
        "ids": ids,
        "vocab": vocab,
        "tables": [[t.name, t.feature_names[0], int(t.num_embeddings), int(t.embedding_dim)] for t in tables],
        "robe_tables": list(robe_names),
        "array_size": cfg.robe.robe_config(array_size).array_size if robe_names else None,
        "id_moduli": {f: int(n) for f, n in id_moduli.items()},
        "hot_rows": {t: len(v) for t, v in (hot_ids or {}).items()},
    }


def placeholder_hot_ids(spec: Dict) -> Dict[str, range]:
    """Hot ids of the right number for a model rebuilt from ``spec`` (loading its checkpoint
    replaces them with the trained model's)."""
    return {t: range(n) for t, n in spec.get("hot_rows", {}).items()}


def tables_of_spec(spec: Dict) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=n, feature_names=[f], num_embeddings=rows, embedding_dim=d) for n, f, rows, d in spec["tables"]]


def place_tables(
    cfg: Config, tables: List[EmbeddingBagConfig], robe_names: List[str], stats: Optional[List[TableStats]]
) -> Placement:
    """The placement for ``robe.budget``: planned (``robe.features: auto``, from ``stats``) or,
    for a fixed list of ROBE tables, the array the full tables leave."""
    if cfg.robe.features == "auto":
        return plan_placement(tables, cfg.robe.budget, stats, block_size=cfg.robe.block_size, hot_rows=cfg.robe.hot_rows)
    return evaluate_placement(tables, cfg.robe.budget, robe_names, stats, block_size=cfg.robe.block_size)


def build_collection(
    cfg: Config, tables: List[EmbeddingBagConfig], robe_names: List[str], array_size: Optional[int] = None,
    device: torch.device = torch.device("meta"), hot_ids: Optional[Dict[str, Sequence[int]]] = None,
) -> nn.Module:
    """The embedding collection DLRM reads: all tables in one ROBE array, all full tables (on
    ``meta``: DMP materialises each rank's shards), both (RobeHybridEmbeddingBagCollection, also
    for exact rows of ``hot_ids``), or quotient-remainder tables (``model.qr_max_rows``,
    QREmbeddingBagCollection). ``device``: of the full tables (``meta`` for DMP; a real device to
    load a checkpoint into, as robe-export does). ``array_size`` (a placement's) overrides
    ``robe.array_size``."""
    robe = cfg.robe.robe_config(array_size) if robe_names else None
    if cfg.model.qr_max_rows is not None:  # validated: no ROBE tables then
        try:
            return QREmbeddingBagCollection(tables, cfg.model.qr_max_rows, cfg.model.qr_operation, device=device)
        except ValueError as e:
            raise PlacementError(f"model.qr_max_rows {cfg.model.qr_max_rows:,}: {e}") from None
    if len(robe_names) == len(tables) and not hot_ids:
        return RobeEmbeddingBagCollection(tables, robe)
    if not robe_names:
        return EmbeddingBagCollection(tables=tables, device=device)
    return RobeHybridEmbeddingBagCollection(tables, robe, robe_tables=robe_names, device=device, hot_ids=hot_ids or None)


def build_dlrm(cfg: Config, collection: nn.Module, device: torch.device) -> nn.Module:
    """TorchRec's DLRM (``model.arch: dlrm``) or DLRM_DCN (``dcn``) in a train wrapper
    returning ``(loss, (loss, logits, labels))``."""
    m = cfg.model
    kwargs = dict(
        embedding_bag_collection=collection,
        dense_in_features=NUM_DENSE_FEATURES,
        dense_arch_layer_sizes=list(m.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(m.over_arch_layer_sizes),
    )
    if m.arch == "dcn":
        dlrm = DLRM_DCN(dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim, **kwargs)
    else:
        dlrm = DLRM(**kwargs)
    if cfg.train.precision == "bf16":
        return AutocastDLRMTrain(dlrm, torch.bfloat16, device.type)
    return DLRMTrain(dlrm)


def check_device_settings(cfg: Config, env: DistEnv) -> None:
    """``ConfigError`` for settings this run's device cannot take, known from the config alone:
    checked before the data is made and the tables are placed (and again where they are used)."""
    if cfg.train.precision == "bf16" and env.device.type != "cuda":
        raise ConfigError(f"train.precision 'bf16' needs a CUDA device; this run is on {env.device.type} "
                          f"(dist.device {cfg.dist.device!r}): use 'fp32'")  # fmt: skip
    if cfg.dist.grad_compression == "bf16" and env.device.type != "cuda":
        raise ConfigError(
            "dist.grad_compression 'bf16' needs a CUDA device (PyTorch's bf16_compress_hook needs NCCL); "
            "use 'fp16' or 'none' on CPU"
        )
    if cfg.dist.table_sharding is not None:
        settable = {v for t in get_args(get_type_hints(type(cfg.dist))["table_sharding"]) for v in get_args(t)}
        offered = settable.intersection(EmbeddingBagCollectionSharder().sharding_types(env.device.type))
        if cfg.dist.table_sharding not in offered:  # (TorchRec's planner says only "No available sharding type ... for t_cat_1")
            raise ConfigError(
                f"dist.table_sharding {cfg.dist.table_sharding!r}: TorchRec shards full tables that way on GPUs only; "
                f"on {env.device.type} it offers {', '.join(sorted(offered))} (or null: its planner chooses)"
            )


def shard_model(
    model: nn.Module, cfg: Config, env: DistEnv, optimizer_class: type, optimizer_kwargs: Dict
) -> DistributedModelParallel:
    """Plans ``model`` with robe_dist's EmbeddingShardingPlanner and sharders (TorchRec's, plus the
    ROBE one: the array is DATA_PARALLEL, replicated) and wraps it in DistributedModelParallel.
    Full tables get the configured optimiser fused into their backward; ``optimizer_class`` and
    ``optimizer_kwargs`` (the dense optimiser) size the ROBE array's optimiser state in the plan."""
    full_params = [
        p
        for mod in model.modules()
        if isinstance(mod, EmbeddingBagCollection)
        for p in mod.parameters()
    ]
    if full_params and cfg.optim.name == "adam" and env.device.type == "cpu":
        raise ConfigError(
            "optim.name 'adam' cannot train full tables on CPU: FBGEMM's CPU kernel has no fused Adam. "
            "Use optim.name 'sgd' or 'adagrad', put every table in the ROBE array (robe.features: all), or run on GPU"
        )
    if full_params:
        fused = {"lr": cfg.optim.embedding_lr or cfg.optim.lr}
        if cfg.optim.name in ("adagrad", "adam"):
            fused["eps"] = cfg.optim.eps
        if cfg.optim.name == "adam":
            fused["beta1"], fused["beta2"] = cfg.optim.betas
        # no scaling with the world size: TorchRec divides the sharded tables' gradients by it in
        # the all-to-all's backward (comm_ops gradient division), as DDP averages the dense part
        # (tests/integration/test_train.py::test_full_tables_take_the_same_step_on_one_and_two_ranks_and_resume_exactly)
        # TorchRec's placeholder classes: their kwargs go to FBGEMM's fused kernel as they are
        _apply_optimizer_in_backward(FUSED_OPTIMIZERS[cfg.optim.name], full_params, fused)
    compression = cfg.dist.grad_compression
    check_device_settings(cfg, env)
    # compressed all-reduce goes through DDP's comm hooks, so the array joins DDP's buckets
    sharders = get_default_sharders(
        optimizer_class=optimizer_class,
        optimizer_kwargs=optimizer_kwargs,
        gradient_sync="hook" if compression == "none" else "ddp",
    )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    constraints = None
    if cfg.dist.table_sharding is not None and full_params:
        kind = ShardingType(cfg.dist.table_sharding).value
        constraints = {
            t.name: ParameterConstraints(sharding_types=[kind])
            for mod in model.modules()
            if isinstance(mod, EmbeddingBagCollection)
            for t in mod.embedding_bag_configs()
        }
    planner = RobeShardingPlanner(
        constraints=constraints,
        topology=TopologyFactory.create_topology(
            TrainerConfig(
                world_size=env.world_size,
                local_world_size=local_world,
                hbm_cap_bytes=torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None,
            ),
            kernel_config=KernelConfig(compute_device=env.device.type),
        ),
        batch_size=max(1, cfg.train.global_batch_size // env.world_size),
    )
    try:
        plan = planner.collective_plan(model, sharders, torch.distributed.GroupMember.WORLD)
    except PlannerError as e:  # raised on every rank (RobeShardingPlanner shares rank 0's)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "does not fit" in ln), lines[-1] if lines else type(e).__name__)
        if cfg.dist.table_sharding is not None:
            reason += f" (dist.table_sharding {cfg.dist.table_sharding!r} constrains every full table to it)"
        raise ConfigError(
            f"TorchRec's planner found no sharding plan for the full tables at train.global_batch_size="
            f"{cfg.train.global_batch_size} on {env.world_size} rank(s): {reason}"
        ) from None
    wrapper = CountingDataParallelWrapper(None if compression == "none" else compression)
    dmp = DistributedModelParallel(
        module=model, device=env.device, plan=plan, sharders=sharders, data_parallel_wrapper=wrapper
    )
    dmp.allreduce_counter = wrapper  # read by the trainer's metrics
    placed = Counter(
        f"{s.sharding_type}/{s.compute_kernel}" for ps in plan.plan.values() for s in ps.values()
    )
    logger.info("sharding plan: %s", ", ".join(f"{n} x {kind}" for kind, n in sorted(placed.items())))
    dmp.sharding_summary = dict(sorted(placed.items()))  # logged in metrics.jsonl's memory record
    return dmp


class CountingDataParallelWrapper(DefaultDataParallelWrapper):
    """TorchRec's data-parallel wrapper (DDP over the unsharded parameters) with a communication
    hook that counts the bytes each all-reduce is handed, split into ROBE arrays (``"ddp"`` gradient
    sync) and the rest (the MLPs, data-parallel tables): ``sent["robe"]``, ``sent["dense"]``.
    The hook is PyTorch's ``allreduce_hook``, or ``fp16``/``bf16_compress_hook`` for a compressed
    all-reduce (2 bytes a value)."""

    def __init__(self, precision: Optional[str]) -> None:
        super().__init__(allreduce_comm_precision=None)
        self.precision = precision
        self.sent = {"robe": 0, "dense": 0}

    def wrap(self, dmp: DistributedModelParallel, env, device: torch.device) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        super().wrap(dmp, env, device)
        ddp = dmp._dmp_wrapped_module
        if not isinstance(ddp, DistributedDataParallel) or env.world_size == 1:
            return  # one rank: DDP's all-reduce sends nothing
        hook = {None: default_hooks.allreduce_hook, "fp16": default_hooks.fp16_compress_hook,
                "bf16": default_hooks.bf16_compress_hook}[self.precision]  # fmt: skip
        robe_arrays = {id(m.array) for m in dmp.modules() if isinstance(m, ShardedRobeEmbeddingBagCollection)}

        def counting_hook(state, bucket):
            word = 2 if self.precision else bucket.buffer().element_size()
            robe = sum(p.numel() for p in bucket.parameters() if id(p) in robe_arrays)
            self.sent["robe"] += robe * word
            self.sent["dense"] += (bucket.buffer().numel() - robe) * word
            return hook(state, bucket)

        ddp.register_comm_hook(env.process_group, counting_hook)


def has_sharded_modules(model: nn.Module) -> bool:
    return any(isinstance(m, ShardedModule) for m in model.modules())


def embedding_parameters(model: nn.Module) -> List[torch.Tensor]:
    """Parameters of the sharded embedding modules: ROBE arrays and full tables (those the planner
    made data-parallel are trained by the dense optimiser, at the embeddings' rate)."""
    return [p for m in model.modules() if isinstance(m, ShardedModule) for p in m.parameters()]


def robe_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``{path: module}`` of the ROBE collections (sharded or not) in ``model``; paths as in
    ``model.state_dict()`` (without DMP's and DDP's wrapper prefixes)."""
    kinds = (RobeEmbeddingBagCollection, ShardedRobeEmbeddingBagCollection)
    root = model.module if isinstance(model, DistributedModelParallel) else model
    return {path: m for path, m in root.named_modules() if isinstance(m, kinds)}
