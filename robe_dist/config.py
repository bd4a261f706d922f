"""RobeConfig: the shared array's size, block size, hash mapping and seed."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from robe_dist.hashing import PAPER_DEFAULT_SEED

HASH_MODES = ("universal", "paper")
_BYTES_PER_ELEMENT = 4  # the array is float32
_MAX_ARRAY_SIZE = 2**48  # (a petabyte of floats: past it, byte counts near int64 limits)


@dataclass
class RobeConfig:
    """Configuration of one ROBE array shared by all tables of a collection.

    Example::

        robe = RobeConfig(array_size=27_000_000, block_size=32)              # the paper's CriteoTB size
        robe = RobeConfig.from_bytes(108 * 2**20)                            # by memory
        robe = RobeConfig.from_compression(tables, ratio=1000)               # 1000x smaller than the tables
    """

    array_size: int
    """Length ``m`` of the shared array, in elements (float32). Must be >= ``block_size``."""

    block_size: int = 32
    """``Z``: the embedding is cut in blocks of Z contiguous elements, each block hashed to its own
    start. Every table's ``embedding_dim`` must be a multiple of it. Z=32 fp32 is one 128-byte line."""

    seed: Optional[int] = None
    """Hash seed. ``None`` means 0 for ``"universal"`` and 1024, the authors' seed, for ``"paper"``.
    Part of the module's state and checkpoints: a checkpoint made with another seed is refused."""

    hash: str = "universal"
    """The mapping: ``"universal"`` (robe_dist's own: raw int64 ids of any value, the table's name
    enters the hash) or ``"paper"`` (the authors' published mapping: tables laid end to end, ids
    must lie in ``[0, num_embeddings)``). See docs/robe.md."""

    init_scale: Optional[float] = None
    """The array is initialised uniform in ``[-init_scale, init_scale]``. ``None`` follows the paper:
    ``sqrt(1 / n)`` with ``n`` the largest table's ``num_embeddings`` (capped at 2**31 for tables
    declared with a huge raw-id space)."""

    block_align: int = 1
    """Block starts are multiples of this many elements; it must divide ``block_size``. 1 (the
    paper's ROBE-Z): any slot. 16 puts
    every block on a 64-byte line of float32, so a block of Z = 32 floats spans 2 lines instead of
    2.94 on average, and the CPU step reads and writes a third fewer lines (docs/performance.md);
    two colliding blocks then overlap by multiples of 16 elements rather than by any amount. Part of
    the mapping: a checkpoint made with another alignment is refused."""

    def __post_init__(self) -> None:
        if self.hash not in HASH_MODES:
            raise ValueError(f"RobeConfig.hash must be one of {HASH_MODES}, got {self.hash!r}")
        for name in ("array_size", "block_size", "block_align"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RobeConfig.{name} must be a positive int, got {value!r}")
        if self.block_size % self.block_align:
            raise ValueError(
                f"RobeConfig.block_align ({self.block_align}) must divide block_size ({self.block_size}): "
                "otherwise slots between aligned blocks are never read, or read unevenly"
            )
        if self.array_size < self.block_size:
            raise ValueError(
                f"RobeConfig.array_size ({self.array_size}) must be >= block_size ({self.block_size}): "
                "a block of Z contiguous elements must fit in the array"
            )
        if self.seed is None:
            self.seed = PAPER_DEFAULT_SEED if self.hash == "paper" else 0
        if self.array_size >= _MAX_ARRAY_SIZE:
            raise ValueError(f"RobeConfig.array_size must be < 2**48 elements, got {self.array_size}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"RobeConfig.seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        if self.hash == "paper" and self.seed >= 2**32:
            raise ValueError(f"RobeConfig.seed must be < 2**32 for hash='paper' (numpy seed), got {self.seed}")
        if self.init_scale is not None and not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"RobeConfig.init_scale must be a positive finite float or None, got {self.init_scale!r}")

    @property
    def num_bytes(self) -> int:
        """Size of the array in bytes."""
        return self.array_size * _BYTES_PER_ELEMENT

    @classmethod
    def from_bytes(cls, num_bytes: int, block_size: int = 32, **kwargs) -> "RobeConfig":
        """An array of (at most) ``num_bytes`` bytes of float32."""
        return cls(array_size=int(num_bytes) // _BYTES_PER_ELEMENT, block_size=block_size, **kwargs)

    @classmethod
    def from_compression(
        cls, tables: Sequence[EmbeddingBagConfig], ratio: float, block_size: int = 32, **kwargs
    ) -> "RobeConfig":
        """An array ``ratio`` times smaller than the full tables (``sum(num_embeddings * dim)``)."""
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < math.inf:
            raise ValueError(f"ratio must be a finite number > 0, got {ratio!r}")
        if not tables:
            raise ValueError("from_compression needs the tables whose full size the ratio divides, got none")
        size = max(block_size, int(full_table_elements(tables) / ratio))
        return cls(array_size=size, block_size=block_size, **kwargs)


def full_table_elements(tables: Sequence[EmbeddingBagConfig]) -> int:
    """Number of floats the tables would take as ordinary full tables."""
    return sum(t.num_embeddings * t.embedding_dim for t in tables)


def full_table_bytes(tables: Sequence[EmbeddingBagConfig], bytes_per_element: int = 4) -> int:
    """Bytes the tables would take as ordinary full tables (float32 by default)."""
    return full_table_elements(tables) * bytes_per_element
