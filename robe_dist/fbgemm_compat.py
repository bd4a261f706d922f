"""TorchRec's KeyedJaggedTensor on CUDA with the CPU-only FBGEMM build (``fbgemm-gpu-cpu``).

A KJT made from lengths computes its offsets with ``fbgemm::asynchronous_complete_cumsum``.
``fbgemm-gpu-cpu`` (what installs where the 465 MB CUDA ``fbgemm-gpu`` wheel cannot, e.g. the
lent GPU image with its own torch, ../shared/docs/gpu-device.md) defines that op with CPU and Meta
kernels only, so ``kjt.to("cuda").offsets()`` raises ``NotImplementedError`` there, and with it
every ROBE lookup, exported artifact and training step on CUDA. Where the op has no CUDA kernel,
``install()`` (run when ``robe_dist.ops`` is imported) registers one in plain PyTorch: a cumsum
with a leading zero, along the last dimension, as FBGEMM's. With the CUDA ``fbgemm-gpu`` build
the op has its own kernel and nothing is registered.

TorchRec's sharded tables still need the CUDA build (TBE, permutes, bounds checks); a ROBE array
alone does not.
"""

from __future__ import annotations

from typing import Optional

import torch

COMPLETE_CUMSUM = "fbgemm::asynchronous_complete_cumsum"

_LIBRARY: Optional[torch.library.Library] = None  # kept alive: dropping it unregisters the kernel


def complete_cumsum(t: torch.Tensor) -> torch.Tensor:
    """``fbgemm::asynchronous_complete_cumsum``: the inclusive cumsum along the last dimension
    with a zero prepended, in ``t``'s dtype (``[n] -> [n + 1]``, ``[r, n] -> [r, n + 1]``)."""
    return torch.nn.functional.pad(torch.cumsum(t, dim=-1, dtype=t.dtype), (1, 0))


def install() -> bool:
    """Registers ``complete_cumsum`` as the op's CUDA kernel where FBGEMM gives none; ``True`` if
    it did (or had done so already)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    try:
        import fbgemm_gpu  # noqa: F401  (defines the fbgemm:: schemas; TorchRec imports it anyway)
    except ImportError:
        return False
    if not torch._C._dispatch_has_kernel(COMPLETE_CUMSUM) or torch._C._dispatch_has_kernel_for_dispatch_key(
        COMPLETE_CUMSUM, "CUDA"
    ):
        return False
    library = torch.library.Library("fbgemm", "IMPL")
    library.impl("asynchronous_complete_cumsum", complete_cumsum, "CUDA")
    _LIBRARY = library
    return True
