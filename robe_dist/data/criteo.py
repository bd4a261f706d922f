"""Criteo constants: column layout, feature names, MLPerf table sizes and multi-hot sizes.

The raw Criteo click logs (1TB ``day_0 .. day_23`` and Kaggle's ``train.txt``) hold one sample per
line: ``label``, 13 integer features ``I1..I13`` (may be empty or negative) and 26 categorical
features ``C1..C26`` (8 hex digits, may be empty), tab separated. Feature names follow TorchRec
(``torchrec.datasets.criteo``) so batches plug into TorchRec models unchanged.
"""

from __future__ import annotations

from typing import Final

INT_FEATURE_COUNT: Final = 13
CAT_FEATURE_COUNT: Final = 26
#: label + 13 integer + 26 categorical columns.
NUM_COLUMNS: Final = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT
#: Lines with fewer fields than this are malformed; from here up to NUM_COLUMNS the missing trailing
#: fields are padded as missing (real Criteo lines lose trailing empty categoricals: 37-38 fields).
MIN_FIELDS: Final = 1 + INT_FEATURE_COUNT + 1

DEFAULT_LABEL_NAME: Final = "label"
DEFAULT_INT_NAMES: Final[tuple[str, ...]] = tuple(f"int_{i}" for i in range(INT_FEATURE_COUNT))
#: KeyedJaggedTensor keys, identical to torchrec.datasets.criteo.DEFAULT_CAT_NAMES.
DEFAULT_CAT_NAMES: Final[tuple[str, ...]] = tuple(f"cat_{i}" for i in range(CAT_FEATURE_COUNT))

#: Sparse id written for an empty categorical field. 0 is what TorchRec's ``tsv_to_npys`` and
#: MLPerf's DLRM preprocessing write, so files stay bit-compatible with theirs. (A literal
#: ``00000000`` in the text also parses to 0; raw Criteo ids are 32-bit hashes, so it is rare.)
MISSING_CAT_ID: Final = 0

#: MLPerf DLRM v0.7-v2.1 (Criteo 1TB, ``max_ind_range = 40M``) table sizes, C1..C26.
MLPERF_V1_TABLE_SIZES: Final[tuple[int, ...]] = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)  # fmt: skip
#: MLPerf DLRMv2 (v3.0 and later, multi-hot Criteo) table sizes, C1..C26.
MLPERF_V3_TABLE_SIZES: Final[tuple[int, ...]] = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
#: MLPerf DLRMv2 multi-hot bag sizes per table (every sample has exactly this many ids).
MLPERF_V3_MULTI_HOT_SIZES: Final[tuple[int, ...]] = (
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1,
)  # fmt: skip
#: MLPerf's id cap: ``id % max_ind_range`` before building vocabularies.
MLPERF_MAX_IND_RANGE: Final = 40_000_000
#: Criteo 1TB: days 0..23; days 0..22 train, day 23 split in halves (validation, test).
CRITEO_1TB_DAYS: Final = 24

assert len(MLPERF_V1_TABLE_SIZES) == CAT_FEATURE_COUNT
assert len(MLPERF_V3_TABLE_SIZES) == CAT_FEATURE_COUNT
assert len(MLPERF_V3_MULTI_HOT_SIZES) == CAT_FEATURE_COUNT
