"""Feature-processed ROBE collections under ``DistributedModelParallel``.

TorchRec's ``FeatureProcessedEmbeddingBagCollection`` (position-weighted features: the feature
processors turn positions into per-sample weights, the collection pools with them) takes any
weighted ``EmbeddingBagCollectionInterface``, a ``RobeEmbeddingBagCollection`` too. TorchRec's
sharder for it assumes an ``EmbeddingBagCollection`` inside (it reads ``embedding_bags``), so the
planner failed on a ROBE one. ``FeatureProcessedEmbeddingBagCollectionSharder`` here is TorchRec's
sharder, which ``robe_dist.distributed.get_default_sharders()`` lists in its place: an ordinary
collection inside is sharded exactly as TorchRec does it; a ROBE collection inside is replicated
by ``RobeEmbeddingBagCollectionSharder`` (its one tensor ``"array"``, data parallel, dense), with
the feature processors applied after the (local) input dist, as TorchRec applies them.

One sharder serves every feature-processed collection of a model, and TorchRec's planner asks a
sharder for its sharding types without saying which module: for an ordinary collection it offers
table-wise and the rest. ``RobeShardingPlanner`` therefore narrows ``constraints["array"]`` to
data_parallel / dense when a model holds a feature-processed ROBE collection, and checks the
plan; with another planner (or an enumerator of your own) give ``constraints["array"] = ParameterConstraints(sharding_types=["data_parallel"],
compute_kernels=["dense"])``, or the shard step refuses the plan with that advice.

Example::

    ebc = RobeEmbeddingBagCollection(tables, RobeConfig(array_size=2**20, block_size=32), is_weighted=True)
    fp = FeatureProcessedEmbeddingBagCollection(ebc, PositionWeightedModuleCollection({"f0": 20}))
    sharders = get_default_sharders()
    plan = RobeShardingPlanner(topology).collective_plan(model, sharders, pg)
    model = DistributedModelParallel(model, plan=plan, sharders=sharders)
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fp_embeddingbag import (
    FeatureProcessedEmbeddingBagCollectionSharder as _TorchRecFPSharder,
    ShardedFeatureProcessedEmbeddingBagCollection,
)
from torchrec.distributed.types import ParameterSharding, QuantizedCommCodecs, ShardingEnv, ShardingType
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

from robe_dist.distributed.robe_embedding_bag_collection import (
    ARRAY_PARAMETER_NAME,
    RobeEmbeddingBagCollectionSharder,
)
from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection


def holds_robe(module: FeatureProcessedEmbeddingBagCollection) -> bool:
    """Whether a feature-processed collection wraps a ``RobeEmbeddingBagCollection``."""
    return type(module._embedding_bag_collection) is RobeEmbeddingBagCollection


class ShardedFeatureProcessedRobeEmbeddingBagCollection(ShardedFeatureProcessedEmbeddingBagCollection):
    """TorchRec's sharded feature-processed collection around a ``ShardedRobeEmbeddingBagCollection``.

    Same forward as TorchRec's (processors after the input dist, then the lookup); the array's
    gradient is averaged as the inner sharded module's ``gradient_sync`` says (TorchRec's version
    would hide it from DDP whatever that mode is).
    """

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        yield from self._embedding_bag_collection.sharded_parameter_names(
            append_prefix(prefix, "_embedding_bag_collection")
        )


class FeatureProcessedEmbeddingBagCollectionSharder(_TorchRecFPSharder):
    """TorchRec's ``FeatureProcessedEmbeddingBagCollectionSharder``, also for ROBE collections inside.

    Args:
        ebc_sharder (Optional[EmbeddingBagCollectionSharder]): shards an ordinary collection inside
            (TorchRec's default when ``None``).
        robe_sharder (Optional[RobeEmbeddingBagCollectionSharder]): replicates a ROBE collection
            inside (default arguments when ``None``).
        qcomm_codecs_registry: as TorchRec's.
    """

    def __init__(
        self,
        ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
        robe_sharder: Optional[RobeEmbeddingBagCollectionSharder] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(ebc_sharder=ebc_sharder, qcomm_codecs_registry=qcomm_codecs_registry)
        self._robe_sharder = robe_sharder or RobeEmbeddingBagCollectionSharder(
            qcomm_codecs_registry=self.qcomm_codecs_registry
        )

    @staticmethod
    def _check_inner(module: FeatureProcessedEmbeddingBagCollection) -> None:
        inner = module._embedding_bag_collection
        if type(inner) is not RobeEmbeddingBagCollection and not isinstance(inner, EmbeddingBagCollection):
            raise ValueError(
                f"FeatureProcessedEmbeddingBagCollection around a {type(inner).__name__}: its sharder takes an "
                "EmbeddingBagCollection or a RobeEmbeddingBagCollection inside"
            )

    def shardable_parameters(self, module: FeatureProcessedEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        self._check_inner(module)
        if holds_robe(module):
            return self._robe_sharder.shardable_parameters(module._embedding_bag_collection)
        return super().shardable_parameters(module)

    def shard(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedFeatureProcessedEmbeddingBagCollection:
        self._check_inner(module)
        if not holds_robe(module):
            return super().shard(module, params, env, device, module_fqn)
        planned = params.get(ARRAY_PARAMETER_NAME)
        dp = ShardingType.DATA_PARALLEL.value
        if planned is not None and planned.sharding_type != dp:
            raise ValueError(
                f"FeatureProcessedEmbeddingBagCollection {module_fqn or ''!s}: its ROBE array was planned "
                f"{planned.sharding_type!r}; a ROBE array is replicated ({dp!r}, dense). Plan with "
                f"robe_dist.distributed.RobeShardingPlanner, or give the planner constraints[{ARRAY_PARAMETER_NAME!r}] = "
                f"ParameterConstraints(sharding_types=[{dp!r}], compute_kernels=['dense'])"
            )
        return ShardedFeatureProcessedRobeEmbeddingBagCollection(
            module, params, ebc_sharder=self._robe_sharder, env=env,  # type: ignore[arg-type]
            device=device if device is not None else torch.device("cpu"), module_fqn=module_fqn,
        )  # fmt: skip
