"""Device kernels of the ROBE lookup (the C++ CPU kernels are in ``robe_dist/csrc``).

``triton_lookup`` holds the Triton kernels that ``robe_dist.ops`` registers as the CUDA
implementation of its custom ops. They also run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how the test suite checks
them against the C++ operator on machines without a GPU.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (it is imported only when a kernel runs)."""
    return importlib.util.find_spec("triton") is not None
