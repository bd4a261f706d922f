"""Distributed ROBE: sharders, sharded modules and planning helpers for TorchRec.

Mirrors ``torchrec.distributed``: ``robe_dist.modules`` holds the plain modules, this package what
``DistributedModelParallel`` and the planner need to replicate a ROBE array (DATA_PARALLEL) next to
TorchRec-sharded tables. See docs/distributed.md.
"""

from robe_dist.distributed.fp_embeddingbag import (
    FeatureProcessedEmbeddingBagCollectionSharder,
    ShardedFeatureProcessedRobeEmbeddingBagCollection,
)
from robe_dist.distributed.planner import RobeShardingPlanner, check_robe_constraints, find_robe_collections
from robe_dist.distributed.robe_embedding_bag_collection import (
    ARRAY_PARAMETER_NAME,
    RobeEmbeddingBagCollectionContext,
    RobeEmbeddingBagCollectionSharder,
    ShardedRobeEmbeddingBagCollection,
    optimizer_state_slots,
    planning_shape,
)
from robe_dist.distributed.sharding_plan import get_default_sharders

__all__ = [
    "ARRAY_PARAMETER_NAME",
    "FeatureProcessedEmbeddingBagCollectionSharder",
    "RobeEmbeddingBagCollectionContext",
    "RobeEmbeddingBagCollectionSharder",
    "RobeShardingPlanner",
    "ShardedFeatureProcessedRobeEmbeddingBagCollection",
    "ShardedRobeEmbeddingBagCollection",
    "check_robe_constraints",
    "find_robe_collections",
    "get_default_sharders",
    "optimizer_state_slots",
    "planning_shape",
]
