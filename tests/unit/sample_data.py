"""Where the data tests find the real Criteo rows (``../shared/data/criteo_sample``'s README).

``$ROBE_DIST_CRITEO_SAMPLE`` when set, else ``shared/data/criteo_sample`` beside the clone. Tests
that need them skip, naming the place they looked, when the rows are not there.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ROBE_DIST_CRITEO_SAMPLE"
SAMPLE = Path(os.environ[ENV]) if os.environ.get(ENV) else Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo_sample"
MISSING = f"real Criteo rows not found at {SAMPLE} (set {ENV} to the folder of kaggle_train_head_1000.tsv)"
