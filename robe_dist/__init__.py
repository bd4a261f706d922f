"""robe_dist: ROBE compressed embeddings for TorchRec.

One learned 1-D array replaces every embedding table of a recommendation model (Desai, Chou,
Shrivastava, "Random Offset Block Embedding (ROBE)", MLSys 2022). See README.md and docs/.

The public names are imported lazily (PEP 562), so ``robe-data`` and other light entry points
start without loading torch and torchrec.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RobeConfig": "robe_dist.config",
    "full_table_bytes": "robe_dist.config",
    "full_table_elements": "robe_dist.config",
    "RobeEmbeddingBagCollection": "robe_dist.modules.robe_embedding_bag_collection",
    "RobeHybridEmbeddingBagCollection": "robe_dist.modules.hybrid",
    "RobeEmbeddingBagCollectionSharder": "robe_dist.distributed",
    "ShardedRobeEmbeddingBagCollection": "robe_dist.distributed",
    "get_default_sharders": "robe_dist.distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robe_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))

