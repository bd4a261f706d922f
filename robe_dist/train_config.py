"""Training configuration: typed dataclasses, loaded from YAML, overridden with ``--set key=value``.

A config file has one mapping per section (``data``, ``model``, ``robe``, ``optim``, ``train``,
``eval``, ``checkpoint``, ``dist``, ``logging``) plus the top-level ``name`` and ``seed``; every key
is a field of the dataclass below, documented on the field. Values are checked when the config is
built: a wrong key or value raises ``ValueError`` naming the field (``optim.name``) and what it
accepts.

Example::

    cfg = load_config("configs/tiny_synthetic.yaml", overrides=["optim.lr=0.5", "train.max_steps=20"])
    cfg.optim.lr          # 0.5
    print(to_yaml(cfg))   # the resolved config, as saved in the run dir
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml

from robe_dist.config import RobeConfig
from robe_dist.placement import Budget

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_synthetic.yaml"
"""The embedded default: used when no ``--config`` is given."""
DEFAULT_ARRAY_SIZE = 1_000_000
"""``robe.array_size`` when neither it nor ``robe.budget`` is set."""


@dataclass
class DataConfig:
    """Where the samples come from (robe_dist.data)."""

    kind: Literal["synthetic", "criteo"] = "synthetic"
    """``synthetic``: a planted-model dataset, generated on first use (robe_dist.data.synthetic);
    ``criteo``: a Criteo dataset preprocessed by ``robe-data`` (the npy layout), read from ``path``."""

    path: Optional[str] = None
    """Dataset directory. ``criteo``: required. ``synthetic``: where the generated data is cached
    (default ``data_cache/synthetic-<rows>-<days>-<seed>-<scale>[-mh]``, reused when it exists)."""

    synthetic_rows: int = 200_000
    """Synthetic only: number of samples generated (all splits together)."""

    synthetic_days: int = 3
    """Synthetic only: number of day files (as Criteo's day_0 .. day_N; the last day is split
    into validation and test, like Criteo 1TB's day 23)."""

    synthetic_seed: int = 0
    """Synthetic only: seed of the planted model and of the samples."""

    synthetic_scale: float = 1.0e-3
    """Synthetic only: table cardinalities as a fraction of MLPerf v1's (at least 16 ids each; tables
    smaller than 16 keep their size)."""

    vocab: bool = False
    """Synthetic only: map each table's ids to ``0 .. K`` (``robe-data vocab`` over the train split,
    cached beside the generated data, with the table statistics ``robe.features: auto`` reads), so
    full tables get one exact row per id instead of ``id % rows``. For Criteo data, run
    ``robe-data vocab`` and point ``data.path`` at its output."""

    multi_hot: bool = False
    """Multi-hot bags (MLPerf v3 DLRMv2 sizes). Synthetic: generate them; Criteo: read the
    dataset's multi-hot files (it must have them)."""

    shuffle_buffer: Optional[int] = None
    """Training rows are shuffled in blocks of this many rows (block order and rows within a
    block, from (seed, epoch)); ``null``: the dataset's default (131072); 0: file order."""


@dataclass
class ModelConfig:
    """TorchRec's DLRM (dot interaction, MLPerf v1) or DLRM_DCN (DCNv2, MLPerf v3)."""

    arch: Literal["dlrm", "dcn"] = "dlrm"
    """``dlrm``: torchrec.models.dlrm.DLRM; ``dcn``: torchrec.models.dlrm.DLRM_DCN."""

    embedding_dim: int = 32
    """Width of every embedding; must equal the last dense layer and be a multiple of
    ``robe.block_size`` for ROBE tables."""

    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 32])
    """Bottom MLP over the 13 dense features; the last size must equal ``embedding_dim``."""

    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 32, 1])
    """Top MLP over the interaction output; the last size must be 1 (one logit)."""

    dcn_num_layers: int = 3
    """``dcn`` only: number of DCNv2 cross layers."""

    dcn_low_rank_dim: int = 512
    """``dcn`` only: rank of the cross layers' low-rank weights."""

    num_embeddings_per_feature: Optional[List[int]] = None
    """Rows of each of the 26 tables (cat_0 .. cat_25). ``null``: the dataset's ``table_sizes``
    (its manifest). Full tables and ``robe.hash: paper`` tables read ``id % rows`` (as TorchRec's
    Criteo pipeline); ``robe.hash: universal`` tables take raw ids and use it only for the
    initial scale."""

    qr_max_rows: Optional[int] = None
    """Compositional quotient-remainder embeddings (Shi et al., KDD 2020;
    robe_dist.modules.QREmbeddingBagCollection): every full table with more rows becomes a
    quotient and a remainder table of at most this many rows together; smaller tables stay whole.
    ``null``: off. Needs ``robe.features: none`` (a baseline of ``robe-compare``)."""

    qr_operation: Literal["mult", "add"] = "mult"
    """How a quotient-remainder table combines its two pooled bags: ``mult`` (the paper's best) or ``add``."""


@dataclass
class RobeSection:
    """The shared ROBE array (robe_dist.RobeConfig) and which tables live in it."""

    features: Union[Literal["all", "none", "auto"], List[str]] = "all"
    """Which tables live in the ROBE array: ``all``, ``none`` (full tables only: the sharded
    baseline), ``auto`` (the placement planner, robe_dist.placement, chooses the full tables and
    the array size for ``robe.budget`` from the training split's id statistics), or a list of
    feature names (``[cat_0, cat_9]``); the other tables stay full ``EmbeddingBagCollection``
    tables, sharded by TorchRec's planner."""

    budget: Optional[Union[str, int]] = None
    """Memory of all embeddings (full tables + array, float32; optimiser state not included):
    bytes (``64MB``, ``1.5GiB``, ``4096``) or a compression ratio against the full tables
    (``100x``). Required by ``features: auto``; with ``all`` or a list, the array gets what the
    full tables leave. Set this or ``array_size``, not both."""

    hot_rows: bool = False
    """With ``features: auto``: let the planner also give the most frequent ids of the tables it
    keeps in the array exact rows (a small ordinary table per such table, one row per hot id and a
    tail row; the array keeps their other ids), where the statistics list them (``robe-data
    stats`` / ``vocab``); with ``hash: paper`` only on vocabulary ids (raw ids, taken modulo the
    table size, would never meet the hot ids). Off by default: on this project's synthetic data the planner's rule
    spends too much on them (docs/placement.md: -0.003 AUC at 10x, +0.0004 at 100x, -0.005 at 1000x)."""

    array_size: Optional[int] = None
    """Length of the array in float32 elements (the paper's CriteoTB runs: 27,000,000). ``null``:
    from ``robe.budget``, else 1,000,000."""

    block_size: int = 32
    """Z: embeddings are read in blocks of Z contiguous floats (the paper: 32; as RobeConfig)."""

    block_align: int = 1
    """Block starts are multiples of this many floats (1: any slot, as the paper; 16: a 64-byte
    line, so a block of Z = 32 floats spans 2 lines, not 2.94: a faster CPU step, see
    docs/performance.md). Part of the mapping, saved in checkpoints (as RobeConfig.block_align)."""

    hash: Literal["universal", "paper"] = "universal"
    """The mapping: ``universal`` (raw int64 ids) or ``paper`` (the authors', ids < num_embeddings)."""

    seed: Optional[int] = None
    """Hash seed (``null``: 0 for universal, 1024 for paper). Saved in checkpoints; a checkpoint
    with another seed is refused."""

    init_scale: Optional[float] = None
    """Uniform init in +-init_scale (``null``: sqrt(1 / largest table), as the paper)."""

    fused_update: bool = True
    """On one process, apply the array's optimiser inside the lookup's backward, as TorchRec's
    fused tables do (no gradient kept on the array; with SGD, or on CUDA, none built at all: one
    pass over the touched blocks instead of three over the array). Needs ``optim.name`` sgd (no momentum or weight decay) or
    adagrad (no weight decay) and no ``optim.grad_clip_norm``; otherwise, and always on more
    processes (they average the gradient first), the array gets a dense gradient. The trainer logs
    which. The same steps (Adagrad on CPU bit for bit, SGD up to the order of float additions) and
    the same checkpoints either way."""

    def robe_config(self, array_size: Optional[int] = None) -> RobeConfig:
        """The array's RobeConfig; ``array_size`` (from a placement) overrides ``robe.array_size``."""
        size = array_size if array_size is not None else self.array_size
        return RobeConfig(
            array_size=size if size is not None else DEFAULT_ARRAY_SIZE, block_size=self.block_size, seed=self.seed,
            hash=self.hash, init_scale=self.init_scale, block_align=self.block_align,
        )  # fmt: skip


@dataclass
class OptimConfig:
    """Optimiser of the dense part and the embeddings, and the MLPerf learning-rate schedule."""

    name: Literal["sgd", "adagrad", "adam"] = "sgd"
    """``sgd`` (MLPerf v1, the paper), ``adagrad`` (MLPerf v3) or ``adam``. Applies to the dense
    MLPs, the ROBE array and (fused into the backward by FBGEMM) the full tables."""

    lr: float = 1.0
    """Peak learning rate of the dense part (and of the embeddings unless ``embedding_lr``)."""

    embedding_lr: Optional[float] = None
    """Learning rate of the full tables and the ROBE arrays (``null``: ``lr``); scheduled like ``lr``."""

    robe_lr_factor: float = 1.0
    """Learning rate of the ROBE arrays as a multiple of the embeddings' (``embedding_lr``, else
    ``lr``), so that it follows them when they are changed. A shared slot takes the steps of every
    id hashed to it, so the array can want a smaller rate than exact rows (docs/placement.md)."""

    momentum: float = 0.0
    """``sgd`` only: momentum (dense part and ROBE array; full tables take none, fused or not)."""

    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """``adam`` only: (beta1, beta2)."""

    eps: float = 1.0e-8
    """``adagrad`` / ``adam``: denominator epsilon (MLPerf v3 Adagrad: 1e-8)."""

    weight_decay: float = 0.0
    """L2 penalty of the dense optimiser (MLPs and ROBE array; not applied to full tables, fused or not)."""

    warmup_steps: int = 0
    """Linear warm-up from 0 to the peak rate over this many steps (MLPerf v1: 2750 at batch 64k)."""

    decay_start_step: int = 0
    """First step of the polynomial decay (0 with ``decay_steps: 0``: no decay)."""

    decay_steps: int = 0
    """Length of the decay: the rate goes as ``((decay_steps - k) / decay_steps) ** decay_power``."""

    decay_power: float = 2.0
    """Exponent of the polynomial decay (MLPerf: 2)."""

    min_lr_factor: float = 0.0
    """Floor of the decay, as a fraction of the peak rate (the rate stays there after the decay)."""

    grad_clip_norm: Optional[float] = None
    """Clip the global L2 norm of the dense gradients (MLPs and replicated ROBE array) to this
    value before each step; ``null``: no clipping. Full tables are not clipped (fused by FBGEMM or,
    where TorchRec's planner makes them data-parallel, stepped like the fused ones)."""


@dataclass
class TrainConfig:
    """The training loop."""

    global_batch_size: int = 1024
    """Samples per step over all ranks; each rank takes ``global_batch_size / world_size``, so a run
    sees the same batches whatever the number of ranks."""

    epochs: int = 1
    """Passes over the training split."""

    max_steps: Optional[int] = None
    """Stop after this many steps (``null``: run all epochs)."""

    target_auc: Optional[float] = None
    """Stop as soon as a validation AUC reaches this value (MLPerf v1: 0.8025, v3: 0.80275); checked
    at the evaluations during training, so it needs ``eval.every_samples``."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16``: forward under torch.autocast(bfloat16) (CUDA only); parameters stay fp32."""

    log_every_steps: int = 20
    """Write a ``metrics.jsonl`` line (loss, samples/s, memory) every this many steps."""


@dataclass
class EvalConfig:
    """Evaluation: AUC, log-loss and accuracy, over all ranks."""

    batch_size: int = 4096
    """Samples per evaluation step over all ranks (the paper: 16384)."""

    every_samples: Optional[int] = None
    """Evaluate on the validation split every this many training samples (``null``: only at the end)."""

    max_batches: Optional[int] = None
    """Evaluate on the split's first ``max_batches x batch_size`` rows, the same rows on any number
    of ranks (``null``: the whole split)."""

    at_end: bool = True
    """Evaluate on validation and test when training ends."""


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint snapshots (model, optimiser, data position, RNG)."""

    every_steps: Optional[int] = None
    """Save every this many steps (``null``: only at the end)."""

    at_end: bool = True
    """Save when training ends."""

    keep: int = 2
    """Number of most recent checkpoints kept (older ones are deleted)."""

    dir: Optional[str] = None
    """Where checkpoints go (``null``: ``<run dir>/checkpoints``); must be shared by all nodes."""


@dataclass
class DistConfig:
    """Process group and device."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: cuda (the local rank's GPU) when available, else cpu."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: nccl on cuda, gloo on cpu."""

    cpu_threads: Optional[int] = None
    """CPU only: intra-op threads per process (``torch.set_num_threads``); ``null``: PyTorch's
    default (``OMP_NUM_THREADS``, which torchrun sets to 1, else all cores)."""

    table_sharding: Optional[Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]] = None
    """How TorchRec shards the full tables: ``null`` lets its planner choose per table (it may
    replicate small tables, data_parallel); otherwise every full table is constrained to this
    type (``table_wise``: the byte model of docs/distributed.md). ``row_wise`` and
    ``table_row_wise`` (rows split over ranks / over a node's ranks: tables larger than one
    device) need GPUs: TorchRec's sharders do not offer them on CPU."""

    grad_compression: Literal["none", "fp16", "bf16"] = "none"
    """Compress the data-parallel gradient all-reduce (the ROBE array and the dense layers) with
    PyTorch's DDP communication hooks (``fp16_compress_hook`` / ``bf16_compress_hook``): half the
    bytes, gradients rounded to 16 bits before averaging (``bf16`` needs CUDA/NCCL). ``none``: full
    fp32. With compression the
    array is averaged by DMP's DDP wrapper (``gradient_sync="ddp"``) instead of robe_dist's own
    hook. Effect on AUC: docs/distributed.md."""


@dataclass
class LoggingConfig:
    """What the user sees."""

    progress_bar: bool = True
    """tqdm progress bar on rank 0 (samples/s, running loss)."""

    all_ranks: bool = False
    """Also print log messages from ranks other than 0."""

    profile_steps: Optional[List[int]] = None
    """``[first, last]``: profile global steps ``first..last`` (1-based) with ``torch.profiler`` on
    every rank: ``RUN/profile/rank<r>.trace.json`` and ``.txt``, and a ``profile`` record of ms per
    step by phase and operator in ``metrics.jsonl`` (robe_dist.trainer.profile). ``null``: off."""


@dataclass
class Config:
    """A training run: ``python -m robe_dist.train --config FILE``."""

    name: str = "run"
    """Name of the run; the run dir defaults to ``runs/<name>``."""

    seed: int = 0
    """Seed of the model initialisation and of the data order."""

    run_dir: Optional[str] = None
    """Where ``metrics.jsonl``, ``config.yaml`` and checkpoints go (``null``: ``runs/<name>``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    robe: RobeSection = field(default_factory=RobeSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir if self.run_dir is not None else Path("runs") / self.name)


# ---------------------------------------------------------------------------------------------
# Building from dicts, with type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an int", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against (and, for numbers, converted to) the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"{where} must be one of {list(typing.get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):  # a list of sections (e.g. robe-compare's arms)
        return _build(tp, value, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:  # YAML 1.1 reads 1e6 and 1.5e6 as strings: a whole number written so is one
                as_float = float(value)
            except ValueError:
                pass
            else:
                if as_float.is_integer() and abs(as_float) < 2**63:
                    return int(as_float)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: Dict[str, Any], where: str) -> Any:
    """An instance of the dataclass ``cls`` from ``values``, every field type-checked; errors name ``where.key``."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {path!r}{hint}; {where or 'top level'} keys: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, path)
        else:
            kwargs[key] = _convert(value, tp, path)
    return cls(**kwargs)


def config_from_dict(values: Dict[str, Any]) -> Config:
    """A validated ``Config`` from a nested dict (a parsed YAML file)."""
    return _build(Config, values, "")


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------
# YAML files and --set overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the
    last, so a config with ``lr`` set twice would silently train with the second)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor (its keys may be overridden here)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # (PyYAML's own refusal, not a TypeError traceback)
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what (PyYAML's own message takes 4-8 lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{' '.join(str(problem).split())}"


def read_yaml(path: Path, what: str) -> Any:
    """Reads the YAML file ``path`` (``what``: "config file", "compare config", ...); raises
    ``FileNotFoundError`` or ``ValueError`` in one line naming it."""
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, expected a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(path)!r} is not text (not UTF-8), expected YAML") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from None
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None


def apply_override(values: Dict[str, Any], override: str) -> None:
    """Applies ``"section.key=value"`` to the nested dict ``values`` (value parsed as YAML)."""
    if "=" not in override:
        raise ValueError(f"--set {override!r}: expected key=value, e.g. --set optim.lr=0.5")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"--set {override!r}: bad key {key!r}")
    if not isinstance(values, dict):
        raise ValueError(f"the config must be a mapping of keys to values, got {str(values)[:80]}")
    node = values
    for part in parts[:-1]:
        if node.get(part) is None:  # (a section header whose keys are all commented out reads as null)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"--set {override!r}: {part!r} is not a section")
    sections = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)}
    if len(parts) == 1 and parts[0] in sections and raw.strip() in ("", "null", "~", "{}", "None"):
        raise ValueError(f"--set {override!r}: {parts[0]!r} is a section, which this would reset to its defaults "
                         f"whatever the config says; set its keys (e.g. --set {parts[0]}.<key>=<value>)")  # fmt: skip
    try:
        node[parts[-1]] = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {override!r}: the value is not valid YAML ({_yaml_problem(e)}); quote a string "
                         "with both kinds of quotes, e.g. --set \"name='a b'\"") from None  # fmt: skip


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (default: ``configs/tiny_synthetic.yaml``) and applies ``overrides``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a key is unknown, a value has the wrong type or is out of range.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        values = read_yaml(path, "config file") or {}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (configs live in configs/*.yaml)") from None
    for override in overrides:
        apply_override(values, override)
    return config_from_dict(values)


# ---------------------------------------------------------------------------------------------
# Value checks (types are already right when these run)


_FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """A config value found wrong only once the data or the machine is known (a table size list
    that does not fit the data, an optimiser the CPU kernels lack, a GPU that is not there): one
    line from rank 0, exit 2, like the errors ``validate`` finds. ``this_rank_only``: an error only
    some ranks meet (a local rank with no GPU): it is said by the rank that met it."""

    def __init__(self, message: str, this_rank_only: bool = False) -> None:
        super().__init__(message)
        self.this_rank_only = this_rank_only


def _positive(value: Optional[float], where: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{where} must be {bound}{' or null' if allow_none else ''}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ``ValueError`` naming the field."""
    d, m, r, o, t, e, c = cfg.data, cfg.model, cfg.robe, cfg.optim, cfg.train, cfg.eval, cfg.checkpoint
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):  # (runs/<name> stays under runs/)
        raise ValueError(f"name must be a non-empty string without '/', and not '.' or '..', got {cfg.name!r}")
    if d.kind == "criteo" and not d.path:
        raise ValueError("data.path must be set when data.kind is 'criteo' (the directory written by robe-data)")
    _positive(d.synthetic_rows, "data.synthetic_rows")
    _positive(d.synthetic_days, "data.synthetic_days")
    _positive(d.synthetic_scale, "data.synthetic_scale")
    _positive(d.shuffle_buffer, "data.shuffle_buffer", allow_none=True, allow_zero=True)
    for value, where in ((cfg.seed, "seed"), (d.synthetic_seed, "data.synthetic_seed")):
        if not 0 <= value < 2**32:  # numpy's and torch's generators take 32-bit unsigned seeds
            raise ValueError(f"{where} must be in [0, 2**32), got {value}")

    _positive(m.embedding_dim, "model.embedding_dim")
    for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
        sizes = getattr(m, name)
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"model.{name} must be a non-empty list of positive ints, got {sizes}")
    if m.dense_arch_layer_sizes[-1] != m.embedding_dim:
        raise ValueError(
            f"model.dense_arch_layer_sizes must end with model.embedding_dim ({m.embedding_dim}): the dense "
            f"output meets the embeddings in the interaction; got {m.dense_arch_layer_sizes}"
        )
    if m.over_arch_layer_sizes[-1] != 1:
        raise ValueError(f"model.over_arch_layer_sizes must end with 1 (one logit), got {m.over_arch_layer_sizes}")
    if len(m.over_arch_layer_sizes) < 2:  # (TorchRec's OverArch: "must have multiple layers", after the data step)
        raise ValueError(f"model.over_arch_layer_sizes needs at least two layers (TorchRec's OverArch), e.g. [64, 1]; "
                         f"got {m.over_arch_layer_sizes}")  # fmt: skip
    _positive(m.dcn_num_layers, "model.dcn_num_layers")
    _positive(m.dcn_low_rank_dim, "model.dcn_low_rank_dim")
    if m.num_embeddings_per_feature is not None and any(n < 1 for n in m.num_embeddings_per_feature):
        raise ValueError(f"model.num_embeddings_per_feature must hold positive ints, got {m.num_embeddings_per_feature}")

    _positive(m.qr_max_rows, "model.qr_max_rows", allow_none=True)
    if m.qr_max_rows is not None and r.features != "none":
        raise ValueError(
            f"model.qr_max_rows needs robe.features 'none' (quotient-remainder tables replace full tables, "
            f"not ROBE ones); got robe.features {r.features!r}"
        )

    if isinstance(r.features, list) and len(set(r.features)) != len(r.features):
        raise ValueError(f"robe.features lists a feature twice: {r.features}")
    if r.features == []:
        raise ValueError("robe.features is an empty list: name the features to compress, or 'none' for full tables only")
    if r.features == "none" and r.array_size is not None:
        raise ValueError("robe.array_size needs ROBE tables: robe.features 'none' keeps every table full")
    if r.hot_rows and r.features != "auto":
        raise ValueError(f"robe.hot_rows needs robe.features 'auto' (the planner chooses the hot ids); got {r.features!r}")
    if o.momentum and o.name != "sgd":
        raise ValueError(f"optim.momentum applies to optim.name 'sgd' only; got {o.name!r}")
    if r.features == "auto" and r.budget is None:
        raise ValueError("robe.features 'auto' needs robe.budget: bytes (e.g. 64MB) or a compression ratio (e.g. 100x)")
    if r.budget is not None:
        if r.array_size is not None:
            raise ValueError("set robe.budget or robe.array_size, not both (a budget sizes the array)")
        if r.features == "none":
            raise ValueError("robe.budget needs ROBE tables: robe.features 'none' keeps every table full")
        try:
            Budget.parse(r.budget)
        except ValueError as err:
            raise ValueError(str(err)) from None
    _positive(r.array_size, "robe.array_size", allow_none=True)
    if r.features != "none":
        try:
            r.robe_config()
        except ValueError as err:
            raise ValueError(str(err).replace("RobeConfig.", "robe.")) from None
        if m.embedding_dim % r.block_size:
            raise ValueError(
                f"model.embedding_dim ({m.embedding_dim}) must be a multiple of robe.block_size ({r.block_size})"
            )

    _positive(o.lr, "optim.lr")
    _positive(o.embedding_lr, "optim.embedding_lr", allow_none=True)
    for rate, where in ((o.lr, "optim.lr"), (o.embedding_lr, "optim.embedding_lr")):
        if rate is not None and rate > _FLOAT32_MAX:  # the optimisers step in float32
            raise ValueError(f"{where} must fit a float32 (at most {_FLOAT32_MAX:.4g}), got {rate!r}")
    _positive(o.robe_lr_factor, "optim.robe_lr_factor")
    _positive(o.momentum, "optim.momentum", allow_zero=True)
    _positive(o.eps, "optim.eps")
    _positive(o.weight_decay, "optim.weight_decay", allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    for name in ("warmup_steps", "decay_start_step", "decay_steps"):
        _positive(getattr(o, name), f"optim.{name}", allow_zero=True)
    _positive(o.decay_power, "optim.decay_power")
    if not 0 <= o.min_lr_factor <= 1:
        raise ValueError(f"optim.min_lr_factor must be in [0, 1], got {o.min_lr_factor}")
    if o.decay_steps and o.decay_start_step < o.warmup_steps:
        raise ValueError(
            f"optim.decay_start_step ({o.decay_start_step}) must be >= optim.warmup_steps ({o.warmup_steps}): "
            "the decay starts after the warm-up"
        )
    _positive(o.grad_clip_norm, "optim.grad_clip_norm", allow_none=True)

    _positive(t.global_batch_size, "train.global_batch_size")
    _positive(t.epochs, "train.epochs")
    _positive(t.max_steps, "train.max_steps", allow_none=True)
    if t.target_auc is not None and not 0.5 < t.target_auc <= 1:
        raise ValueError(f"train.target_auc must be in (0.5, 1] or null, got {t.target_auc}")
    if t.target_auc is not None and cfg.eval.every_samples is None:  # (it was never reached, silently)
        raise ValueError("train.target_auc is checked at the evaluations during training: it needs eval.every_samples")
    if t.precision == "bf16" and cfg.dist.device == "cpu":
        raise ValueError("train.precision 'bf16' needs dist.device 'cuda' (or 'auto' on a GPU machine); use 'fp32' on CPU")
    if cfg.dist.grad_compression == "bf16" and cfg.dist.device == "cpu":
        raise ValueError(
            "dist.grad_compression 'bf16' needs dist.device 'cuda' (PyTorch's bf16_compress_hook needs NCCL); "
            "use 'fp16' or 'none' on CPU"
        )
    _positive(t.log_every_steps, "train.log_every_steps")

    _positive(e.batch_size, "eval.batch_size")
    _positive(e.every_samples, "eval.every_samples", allow_none=True)
    _positive(e.max_batches, "eval.max_batches", allow_none=True)
    _positive(c.every_steps, "checkpoint.every_steps", allow_none=True)
    _positive(c.keep, "checkpoint.keep")
    ps = cfg.logging.profile_steps
    if ps is not None and not (len(ps) == 2 and 1 <= ps[0] <= ps[1]):
        raise ValueError(f"logging.profile_steps must be [first, last] with 1 <= first <= last, or null; got {ps}")
    _positive(cfg.dist.cpu_threads, "dist.cpu_threads", allow_none=True)
    if cfg.dist.backend == "nccl" and cfg.dist.device == "cpu":
        raise ValueError("dist.backend 'nccl' needs dist.device 'cuda'; use 'gloo' (or 'auto') on CPU")
