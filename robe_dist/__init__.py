"""robe_dist: ROBE compressed embeddings for TorchRec.

One learned 1-D array replaces every embedding table of a recommendation model (Desai, Chou,
Shrivastava, "Random Offset Block Embedding (ROBE)", MLSys 2022). See README.md and docs/.
"""

from robe_dist.config import RobeConfig, full_table_bytes, full_table_elements
from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

__version__ = "0.1.0"

__all__ = [
    "RobeConfig",
    "RobeEmbeddingBagCollection",
    "full_table_bytes",
    "full_table_elements",
]
