"""Plain (unsharded) modules, as in ``torchrec.modules``."""

from robe_dist.modules.hybrid import RobeHybridEmbeddingBagCollection
from robe_dist.modules.qr import QREmbeddingBagCollection
from robe_dist.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

__all__ = ["QREmbeddingBagCollection", "RobeEmbeddingBagCollection", "RobeHybridEmbeddingBagCollection"]
