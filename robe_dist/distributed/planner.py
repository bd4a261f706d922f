"""Planning models that hold ROBE collections with TorchRec's ``EmbeddingShardingPlanner``.

TorchRec's planner keys ``ParameterConstraints`` by the names its sharders give to shardable
tensors. A ROBE collection has ONE shardable tensor, its array, named ``"array"``: constraints for
it go under ``constraints["array"]``. Constraints keyed by the name of a table that lives inside a
ROBE collection would be silently ignored by TorchRec's planner (no tensor carries that name);
``check_robe_constraints`` refuses them, and ``RobeShardingPlanner`` runs that check (on every
rank) before planning.

What ``constraints["array"]`` may hold:

* honoured: ``sharding_types`` / ``compute_kernels`` (they must allow ``data_parallel`` /
  ``dense``), ``pooling_factors``, ``num_poolings``, ``batch_sizes`` (the planner's estimate of the
  lookup's input/output buffers: give one pooling factor per feature of the collection),
  ``is_weighted``, ``feature_names``;
* refused (a replicated dense array has no use for them): ``min_partition``, ``cache_params``,
  ``enforce_hbm``, ``stochastic_rounding``, ``bounds_check_mode``, ``output_dtype``,
  ``device_group``, ``key_value_params``, ``use_virtual_table``.

Example::

    constraints = {
        "array": ParameterConstraints(sharding_types=["data_parallel"], pooling_factors=[1.0] * 26),
        "big_table": ParameterConstraints(sharding_types=["table_wise"]),   # an ordinary EBC table
    }
    planner = RobeShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, get_default_sharders(), pg)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, List, Optional

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, PlannerErrorType
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

from robe_dist.distributed.fp_embeddingbag import holds_robe
from robe_dist.distributed.robe_embedding_bag_collection import ARRAY_PARAMETER_NAME
from robe_dist.distributed.sharding_plan import get_default_sharders
from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

_REFUSED_FIELDS = {
    # field: value that means "not set"
    "min_partition": None,
    "cache_params": None,
    "enforce_hbm": None,
    "stochastic_rounding": None,
    "bounds_check_mode": None,
    "output_dtype": None,
    "device_group": None,
    "key_value_params": None,
    "use_virtual_table": False,
}


def find_robe_collections(module: nn.Module) -> Dict[str, RobeEmbeddingBagCollection]:
    """``{module path: collection}`` of the (unsharded) ROBE collections in ``module``."""
    return {path: m for path, m in module.named_modules() if type(m) is RobeEmbeddingBagCollection}


def _ordinary_table_paths(module: nn.Module, table: str) -> List[str]:
    """Paths of the TorchRec embedding modules (outside ROBE collections) holding a table ``table``."""
    paths = []
    for path, m in module.named_modules():
        if type(m) is RobeEmbeddingBagCollection:
            continue
        configs = getattr(m, "embedding_bag_configs", None) or getattr(m, "embedding_configs", None)
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) and callable(configs):
            if any(t.name == table for t in configs()):
                paths.append(path)
    return paths


def check_robe_constraints(
    module: nn.Module, constraints: Optional[Dict[str, ParameterConstraints]]
) -> None:
    """Refuses planner constraints that cannot apply to ``module``'s ROBE collections.

    Raises:
        ValueError: a constraint names a table of a ROBE collection, or ``constraints["array"]``
            excludes data_parallel / dense, or sets a field a replicated array cannot honour, or
            gives ``pooling_factors`` of another length than a collection's number of features (or
            ``num_poolings`` / ``batch_sizes`` of another length than ``pooling_factors``), or would
            also apply to an ordinary table named ``"array"``.
    """
    if not constraints:
        return
    collections = find_robe_collections(module)
    if not collections:
        return
    robe_tables = {t.name: path for path, m in collections.items() for t in m.embedding_bag_configs()}
    for name in constraints:
        if name in robe_tables and name != ARRAY_PARAMETER_NAME:
            raise ValueError(
                f"constraints[{name!r}]: {name!r} is a table of the ROBE collection at {robe_tables[name]!r}; "
                f"its tables share one array and are planned together, under the name {ARRAY_PARAMETER_NAME!r}. "
                f"Put the constraint under constraints[{ARRAY_PARAMETER_NAME!r}] (data_parallel / dense only; "
                "pooling_factors: one per feature of the collection)."
            )
    c = constraints.get(ARRAY_PARAMETER_NAME)
    if c is None:
        return
    clashing = _ordinary_table_paths(module, ARRAY_PARAMETER_NAME)
    if clashing:
        raise ValueError(
            f"constraints[{ARRAY_PARAMETER_NAME!r}] is ambiguous: TorchRec's planner would apply it both to the ROBE "
            f"array(s) and to the ordinary table named {ARRAY_PARAMETER_NAME!r} in {clashing}; rename that table"
        )
    dp, dense = ShardingType.DATA_PARALLEL.value, EmbeddingComputeKernel.DENSE.value
    if c.sharding_types and dp not in c.sharding_types:
        raise ValueError(
            f"constraints[{ARRAY_PARAMETER_NAME!r}].sharding_types={c.sharding_types}: a ROBE array is replicated on "
            f"every rank, the only sharding type is {dp!r}"
        )
    if c.compute_kernels and dense not in c.compute_kernels:
        raise ValueError(
            f"constraints[{ARRAY_PARAMETER_NAME!r}].compute_kernels={c.compute_kernels}: a ROBE array runs on the "
            f"{dense!r} kernel only"
        )
    # pooling_factors: one per feature of the collection (TorchRec's default, [1.0], stands for any
    # count); num_poolings and batch_sizes: one per entry of pooling_factors, as TorchRec asserts
    factors = c.pooling_factors
    if factors != ParameterConstraints().pooling_factors:
        features = {path: sum(len(t.feature_names) for t in m.embedding_bag_configs()) for path, m in collections.items()}
        wrong = {path: n for path, n in features.items() if n != len(factors)}
        if wrong:
            raise ValueError(
                f"constraints[{ARRAY_PARAMETER_NAME!r}].pooling_factors has {len(factors)} entries; it takes one per "
                f"feature of the ROBE collection, and {', '.join(f'{p!r} has {n}' for p, n in wrong.items())} "
                "(all ROBE collections of a model share the constraint's name)"
            )
    for fname in ("num_poolings", "batch_sizes"):
        value = getattr(c, fname)
        if value is not None and len(value) != len(factors):
            raise ValueError(
                f"constraints[{ARRAY_PARAMETER_NAME!r}].{fname} has {len(value)} entries; it takes one per entry of "
                f"pooling_factors ({len(factors)})"
            )
    for fname, unset in _REFUSED_FIELDS.items():
        value = getattr(c, fname)
        if value != unset:
            raise ValueError(
                f"constraints[{ARRAY_PARAMETER_NAME!r}].{fname}={value!r} cannot apply to a replicated ROBE array "
                f"(data_parallel, dense kernel); leave it at {unset!r}"
            )


class RobeShardingPlanner(EmbeddingShardingPlanner):
    """``EmbeddingShardingPlanner`` that first refuses constraints ROBE collections cannot honour.

    Same arguments and results as TorchRec's planner (``check_robe_constraints`` for the rules);
    without ``sharders`` it plans with ``robe_dist.distributed.get_default_sharders()``.
    The check runs on every rank before ``collective_plan``'s rank-0 planning, so a refusal raises
    everywhere instead of leaving the other ranks waiting for the plan. A model holding a
    feature-processed ROBE collection (``robe_dist.distributed.fp_embeddingbag``) is planned with
    ``constraints["array"]`` narrowed to ``sharding_types=["data_parallel"], compute_kernels=["dense"]``
    (the constraints given are left as they are), and its array is checked to come out so.
    """

    def __init__(self, *args, **kwargs) -> None:
        # TorchRec's arguments; the constraints become our own dict, shared with the default
        # enumerator: plan() may add the array's constraint (and takes it out again)
        bound = inspect.signature(EmbeddingShardingPlanner.__init__).bind(self, *args, **kwargs)
        bound.arguments["constraints"] = dict(bound.arguments.get("constraints") or {})
        super().__init__(*bound.args[1:], **bound.kwargs)

    def plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        check_robe_constraints(module, self._constraints)
        sharders = sharders if sharders is not None else get_default_sharders()
        wrapped = {path: m for path, m in module.named_modules()
                   if isinstance(m, FeatureProcessedEmbeddingBagCollection) and holds_robe(m)}  # fmt: skip
        if not wrapped:
            return super().plan(module, sharders)
        # A feature-processed ROBE collection is planned by the sharder of every feature-processed
        # collection, which offers table-wise too: its array is kept data parallel / dense.
        clashing = _ordinary_table_paths(module, ARRAY_PARAMETER_NAME)
        if clashing:
            raise PlannerError(
                f"the ordinary table named {ARRAY_PARAMETER_NAME!r} in {clashing} takes the name under which the planner "
                f"sees the ROBE array of the feature-processed collection(s) {sorted(wrapped)}: rename that table",
                PlannerErrorType.OTHER,
            )
        dp, dense = ShardingType.DATA_PARALLEL.value, EmbeddingComputeKernel.DENSE.value
        constraints = self._constraints
        given = constraints.get(ARRAY_PARAMETER_NAME) if constraints is not None else None
        if constraints is not None:
            base = given if given is not None else ParameterConstraints()
            constraints[ARRAY_PARAMETER_NAME] = dataclasses.replace(base, sharding_types=[dp], compute_kernels=[dense])
        try:
            plan = super().plan(module, sharders)
        finally:
            if constraints is not None:
                if given is None:
                    del constraints[ARRAY_PARAMETER_NAME]
                else:
                    constraints[ARRAY_PARAMETER_NAME] = given
        planned = {path: plan.plan[path][ARRAY_PARAMETER_NAME].sharding_type for path in wrapped if path in plan.plan}
        wrong = {path: kind for path, kind in planned.items() if kind != dp}
        if wrong:
            raise PlannerError(
                f"the ROBE array of the feature-processed collection(s) {wrong} was planned other than {dp!r} (the "
                f"enumerator given to the planner keeps constraints of its own): give it "
                f"constraints[{ARRAY_PARAMETER_NAME!r}] = ParameterConstraints(sharding_types=[{dp!r}], "
                f"compute_kernels=[{dense!r}])",
                PlannerErrorType.OTHER,
            )
        return plan

    def _plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        """``plan``, with TorchRec's enumerator's RuntimeError for a table that no sharding type
        and kernel allowed by the constraints can take (e.g. row-wise on CPU) as a PlannerError,
        which ``collective_plan`` shares with every rank."""
        try:
            return self.plan(module, sharders)
        except RuntimeError as e:
            if isinstance(e, PlannerError) or "No available sharding type" not in str(e):
                raise
            raise PlannerError(str(e).split(". To debug")[0], PlannerErrorType.OTHER) from None

    def collective_plan(
        self,
        module: nn.Module,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        pg: Optional[dist.ProcessGroup] = None,
    ) -> ShardingPlan:
        check_robe_constraints(module, self._constraints)
        sharders = sharders if sharders is not None else get_default_sharders()
        pg = pg if pg is not None else dist.GroupMember.WORLD
        if pg is None or pg.size() == 1:
            return self._plan(module, sharders)
        # as TorchRec's: rank 0 plans and broadcasts the plan; but a PlannerError there (a table
        # that fits no rank) is broadcast too and raised on every rank, where TorchRec's would
        # leave the other ranks waiting in the broadcast until the collective timeout
        box: List[object] = [None]
        if pg.rank() == 0:
            try:
                box = [self._plan(module, sharders)]
            except PlannerError as e:
                box = [("PlannerError", str(e), e.error_type.value)]
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0), group=pg)
        if isinstance(box[0], tuple):
            raise PlannerError(box[0][1], PlannerErrorType(box[0][2]))
        return box[0]
