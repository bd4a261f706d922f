"""Settings for the whole test session, applied before any test module imports torch or triton."""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run under Triton's interpreter on machines without an NVIDIA GPU (CPU tensors,
# numpy underneath). Triton reads the variable when it is first imported, and torch may import
# it early, so it is set here rather than in the test module.
if "TRITON_INTERPRET" not in os.environ and not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ["TRITON_INTERPRET"] = "1"
