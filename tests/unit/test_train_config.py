"""Training configs: the shipped YAML files, --set overrides, validation errors, the LR schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from robe_dist.train import main
from robe_dist.train_config import (
    DEFAULT_CONFIG,
    Config,
    OptimConfig,
    apply_override,
    config_from_dict,
    load_config,
    to_yaml,
)
from robe_dist.trainer.optim import lr_factor

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml") if not p.name.startswith("compare_"))
"""Training configs (``compare_*.yaml`` are robe-compare's: tests/unit/test_compare.py)."""


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_document_themselves(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    head = path.read_text().splitlines()[:12]
    comments = " ".join(line for line in head if line.startswith("#"))
    for topic in ("What for", "Hardware", "Expected"):
        assert topic in comments, f"{path.name}: the header comment lacks '{topic}'"


def test_shipped_configs_match_the_references():
    robe = load_config(DEFAULT_CONFIG.parent / "criteo_tb_dlrm_robe.yaml")
    assert (robe.model.embedding_dim, robe.model.dense_arch_layer_sizes) == (128, [512, 256, 128])
    assert robe.model.over_arch_layer_sizes == [1024, 1024, 512, 256, 1]
    assert (robe.robe.array_size, robe.robe.block_size, robe.robe.features) == (27_000_000, 32, "all")
    assert (robe.optim.name, robe.optim.lr, robe.train.global_batch_size, robe.train.target_auc) == ("sgd", 1.0, 2048, 0.8025)
    dcn = load_config(DEFAULT_CONFIG.parent / "criteo_tb_dcnv2_sharded.yaml")
    assert (dcn.model.arch, dcn.data.multi_hot, dcn.robe.features) == ("dcn", True, "none")
    assert (dcn.optim.name, dcn.optim.lr, dcn.optim.eps, dcn.train.global_batch_size) == ("adagrad", 0.005, 1e-8, 65536)
    from robe_dist.data.criteo import MLPERF_V1_TABLE_SIZES, MLPERF_V3_TABLE_SIZES

    assert robe.model.num_embeddings_per_feature == list(MLPERF_V1_TABLE_SIZES)
    assert dcn.model.num_embeddings_per_feature == list(MLPERF_V3_TABLE_SIZES)


def test_default_config_is_tiny_synthetic():
    assert load_config().name == "tiny_synthetic"


def test_overrides_reach_nested_fields_and_convert_types():
    cfg = load_config(
        None,
        ["optim.lr=1e-3", "train.max_steps=7", "data.path=/x/y", "robe.features=[cat_1, cat_2]", "eval.every_samples=null"],
    )
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)  # YAML reads 1e-3 as a string
    assert cfg.train.max_steps == 7
    assert cfg.data.path == "/x/y"
    assert cfg.robe.features == ["cat_1", "cat_2"]
    assert cfg.eval.every_samples is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.name=sdg", "optim.name must be one of ['sgd', 'adagrad', 'adam'], got 'sdg'"),
        ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
        ("trian.epochs=2", "unknown config key 'trian' (did you mean 'train'?)"),
        ("train.global_batch_size=big", "train.global_batch_size must be an int, got 'big'"),
        ("train.global_batch_size=0", "train.global_batch_size must be > 0"),
        ("data.kind=parquet", "data.kind must be one of ['synthetic', 'criteo']"),
        ("data.kind=criteo", "data.path must be set when data.kind is 'criteo'"),
        ("model.dense_arch_layer_sizes=[64, 32]", "model.dense_arch_layer_sizes must end with model.embedding_dim (16)"),
        ("model.over_arch_layer_sizes=[64, 2]", "model.over_arch_layer_sizes must end with 1"),
        ("robe.block_size=3", "model.embedding_dim (16) must be a multiple of robe.block_size (3)"),
        ("logging.profile_steps=[5,2]", "logging.profile_steps must be [first, last] with 1 <= first <= last"),
        ("logging.profile_steps=[0]", "logging.profile_steps must be [first, last]"),
        ("robe.array_size=8", "set robe.budget or robe.array_size, not both"),
        ("robe.features=all;robe.budget=null;robe.array_size=2", "robe.array_size (2) must be >= block_size (4)"),
        ("robe.budget=12 apples", "robe.budget must be bytes (e.g. 64MB, 1.5GiB, 4096) or a ratio (e.g. 100x), got '12 apples'"),
        ("robe.features=auto;robe.budget=null", "robe.features 'auto' needs robe.budget"),
        ("robe.hash=murmur", "robe.hash must be one of ['universal', 'paper']"),
        ("robe.features=some", "robe.features must be 'all' or 'none' or 'auto' or a list of a string"),
        ("optim.warmup_steps=10", None),
        ("train.target_auc=0.4", "train.target_auc must be in (0.5, 1] or null"),
        ("train.target_auc=0.7;eval.every_samples=null", "train.target_auc is checked at the evaluations during training"),
        ("train.precision=bf16", "train.precision 'bf16' needs dist.device 'cuda'"),
        ("checkpoint.keep=0", "checkpoint.keep must be > 0"),
        ("optim.robe_lr_factor=0", "optim.robe_lr_factor must be > 0"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
        ("dist.grad_compression=int8", "dist.grad_compression must be one of ['none', 'fp16', 'bf16']"),
        ("dist.grad_compression=bf16", "dist.grad_compression 'bf16' needs dist.device 'cuda'"),
        ("optim.lr=1e39", "optim.lr must fit a float32 (at most 3.403e+38), got 1e+39"),
        ("robe.block_align=0", "robe.block_align must be a positive int, got 0"),
        ("robe.budget=1e400", "robe.budget must be a finite number, got '1e400'"),
        ("robe.budget=1e400x", "robe.budget must be a finite number, got '1e400x'"),
        ("seed=-1", "seed must be in [0, 2**32), got -1"),
        ("data.synthetic_seed=4294967296", "data.synthetic_seed must be in [0, 2**32), got 4294967296"),
        ("optim.lr=[1", "--set 'optim.lr=[1': the value is not valid YAML (line 1, column 3: expected ',' or ']'"),
        ("name='abc", "the value is not valid YAML (line 1, column 5: found unexpected end of stream)"),
        ("robe.features=[]", "robe.features is an empty list"),
        ("robe.features=none;robe.budget=null;robe.array_size=1000", "robe.array_size needs ROBE tables"),
        ("robe.features=all;robe.hot_rows=true", "robe.hot_rows needs robe.features 'auto'"),
        ("optim.name=adagrad;optim.momentum=0.9", "optim.momentum applies to optim.name 'sgd' only; got 'adagrad'"),
        # (found by a review: TorchRec's OverArch refused it after the data step, one traceback per rank)
        ("model.over_arch_layer_sizes=[1]", "model.over_arch_layer_sizes needs at least two layers"),
        ("name=..", "name must be a non-empty string without '/', and not '.' or '..'"),  # (runs/.. is the cwd)
        ("optim=null", "'optim' is a section, which this would reset to its defaults whatever the config says"),
        ("optim.lr={[1]: 2}", "the value is not valid YAML (line 1, column 2: found unhashable key)"),
    ],
)
def test_validation_names_the_field(override, message):
    overrides = override.split(";") + (["dist.device=cpu"] if "precision" in override or "bf16" in override else [])
    if message is None:  # a valid value, for contrast
        load_config(None, overrides)
        return
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_decay_must_start_after_warmup():
    with pytest.raises(ValueError, match=r"optim.decay_start_step \(5\) must be >= optim.warmup_steps \(10\)"):
        config_from_dict({"optim": {"warmup_steps": 10, "decay_start_step": 5, "decay_steps": 100}})


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ValueError, match="expected key=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        load_config("configs/no_such.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "is not valid YAML: line 3, column 3: key 'lr' is given twice in one mapping"),
        ("optim: {lr: [1\n", "is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        ("!!python/object:os.system {}\n", "is not valid YAML: line 1, column 1: could not determine a constructor"),
        (b"\xff\xfe\x00", "is not text (not UTF-8), expected YAML"),
        (None, "is a directory, expected a YAML file"),
        ("? [a, b]\n: 1\n", "is not valid YAML: line 1, column 3: found unhashable key"),  # (a TypeError traceback)
    ],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    if text is None:
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    assert main(["--config", str(path), "--print-config"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"robe-train: config error: config file {str(path)!r} ") and message in err[0], err


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["--set", "optim.name=sdg"]) == 2
    err = capsys.readouterr().err
    assert "config error: optim.name must be one of" in err and "Traceback" not in err


def test_cli_prints_the_resolved_config(capsys):
    assert main(["--set", "optim.lr=0.25", "--run-dir", "/tmp/somewhere", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.25" in out and "run_dir: /tmp/somewhere" in out


def test_every_config_field_has_a_docstring():
    import ast
    import inspect

    import robe_dist.train_config as module

    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Section")) and node.name != "Config":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    documented = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    assert documented, f"{node.name}.{stmt.target.id} has no docstring"


def test_lr_schedule_follows_mlperf():
    cfg = OptimConfig(warmup_steps=4, decay_start_step=10, decay_steps=10, decay_power=2.0, min_lr_factor=0.01)
    assert [lr_factor(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 9) == 1.0
    assert lr_factor(cfg, 10) == 1.0  # first decay step: (10 - 0) / 10
    assert lr_factor(cfg, 15) == pytest.approx(0.25)  # ((10 - 5) / 10) ** 2
    assert lr_factor(cfg, 19) == pytest.approx(0.01)  # 0.1 ** 2 = 0.01 = the floor
    assert lr_factor(cfg, 1000) == 0.01
    assert lr_factor(OptimConfig(), 123456) == 1.0  # no schedule


def test_config_is_a_typed_dataclass():
    cfg = Config()
    assert cfg.resolved_run_dir == Path("runs/run")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        Config(name="a/b")


def test_a_resume_with_another_config_is_told_what_changed(tmp_path):
    """``--resume`` takes the config from --config/--set, not from the run dir: the run says which
    fields differ from the config.yaml the run wrote (it used to take the defaults silently)."""
    from robe_dist.train import config_changes

    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(load_config(None, ["train.max_steps=500", "optim.lr=0.001"])))
    assert config_changes(path, load_config(None, ["train.max_steps=500", "optim.lr=0.001"])) == []
    assert config_changes(path, load_config(None, [])) == ["optim.lr: 0.001 -> 0.05", "train.max_steps: 500 -> None"]
    assert config_changes(tmp_path / "missing.yaml", load_config(None, [])) == []
    many = load_config(None, [f"{k}={v}" for k, v in [("optim.lr", 0.2), ("seed", 3), ("train.epochs", 2), ("eval.batch_size", 512),
                                                      ("model.over_arch_layer_sizes", [8, 1]), ("robe.seed", 9), ("data.synthetic_rows", 10**5),
                                                      ("train.global_batch_size", 256), ("train.log_every_steps", 7)]])  # fmt: skip
    assert len(config_changes(path, many)) == 9 and config_changes(path, many)[-1].startswith("and ")


def test_config_files_with_merge_keys_empty_sections_or_no_mapping_take_overrides(tmp_path, capsys):
    """Found by a review: a YAML merge key (<<: *anchor) was "not valid YAML"; a section whose keys
    are all commented out (null) refused --set into it ("'optim' is not a section"); a top level
    that is a list crashed --set with an AttributeError traceback."""
    merged = tmp_path / "m.yaml"
    merged.write_text("train: {<<: {epochs: 2, log_every_steps: 7}, log_every_steps: 5}\noptim:\n")
    cfg = load_config(merged, ["optim.lr=0.1"])
    assert (cfg.train.epochs, cfg.train.log_every_steps, cfg.optim.lr) == (2, 5, 0.1)
    listed = tmp_path / "l.yaml"
    listed.write_text("- a\n- b\n")
    assert main(["--config", str(listed), "--set", "optim.lr=1", "--print-config"]) == 2
    assert "the config must be a mapping of keys to values, got ['a', 'b']" in capsys.readouterr().err


def test_whole_numbers_in_scientific_notation_are_ints():
    """YAML 1.1 reads 1e6 as a string: int fields refused it although float fields took it."""
    cfg = load_config(None, ["data.synthetic_rows=1e6", "train.global_batch_size=2.048e3"])
    assert (cfg.data.synthetic_rows, cfg.train.global_batch_size) == (1_000_000, 2048)
    with pytest.raises(ValueError, match="data.synthetic_rows must be an int, got '1.5e0'"):
        load_config(None, ["data.synthetic_rows=1.5e0"])
