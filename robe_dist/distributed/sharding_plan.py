"""Default sharders: TorchRec's, plus robe_dist's (as ``torchrec.distributed.sharding_plan``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Type, cast

import torch
from torch import nn
from torchrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder as _TorchRecFPSharder
from torchrec.distributed.sharding_plan import get_default_sharders as _torchrec_default_sharders
from torchrec.distributed.types import ModuleSharder

from robe_dist.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
from robe_dist.distributed.robe_embedding_bag_collection import RobeEmbeddingBagCollectionSharder


def get_default_sharders(
    optimizer_class: Optional[Type[torch.optim.Optimizer]] = None,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
    gradient_sync: str = "hook",
) -> List[ModuleSharder[nn.Module]]:
    """TorchRec's default sharders followed by ``RobeEmbeddingBagCollectionSharder``; TorchRec's
    ``FeatureProcessedEmbeddingBagCollectionSharder`` is replaced by robe_dist's, which also takes a
    ROBE collection inside (``robe_dist.distributed.fp_embeddingbag``).

    An explicit ``sharders=[...]`` list given to ``DistributedModelParallel`` or to the planner
    replaces TorchRec's defaults, which do not know ROBE collections: pass this list instead.
    The arguments go to ``RobeEmbeddingBagCollectionSharder``.

    Example::

        sharders = get_default_sharders(optimizer_class=torch.optim.Adagrad)
        plan = EmbeddingShardingPlanner(topology).collective_plan(model, sharders, pg)
        model = DistributedModelParallel(model, plan=plan, sharders=sharders)
    """
    robe = RobeEmbeddingBagCollectionSharder(
        optimizer_class=optimizer_class, optimizer_kwargs=optimizer_kwargs, gradient_sync=gradient_sync
    )
    sharders = [
        FeatureProcessedEmbeddingBagCollectionSharder(robe_sharder=robe)
        if type(s) is _TorchRecFPSharder else s
        for s in _torchrec_default_sharders()
    ]
    return sharders + [cast(ModuleSharder[nn.Module], robe)]
