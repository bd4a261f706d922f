"""robe-compare's config and arms: bad input is one line and exit 2 before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robe_dist import compare
from robe_dist.compare import ArmConfig, DataFacts, arm_runs, load_compare_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, **cfg) -> Path:
    base = {
        "train_config": str(REPO / "configs" / "tiny_synthetic.yaml"),
        "overrides": ["data.synthetic_rows=20000", f"data.path={tmp_path / 'synth'}"],
        "budgets": ["100x"],
        "arms": [{"name": "full", "kind": "full"}, {"name": "robe", "kind": "robe"}],
    }
    base.update(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(base))
    return path


def run_main(tmp_path, capsys, path, *args) -> tuple:
    code = compare.main(["--config", str(path), "--run-dir", str(tmp_path / "out"), *args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("compare_*.yaml")), ids=lambda p: p.name)
def test_compare_configs_load_and_document_themselves(path):
    cfg = load_compare_config(path)
    assert (path.parent / cfg.train_config).is_file()
    comments = " ".join(line for line in path.read_text().splitlines()[:14] if line.startswith("#"))
    for topic in ("What for", "Hardware", "Expected"):
        assert topic in comments, f"{path.name}: the header comment lacks '{topic}'"


def test_default_config_loads_with_every_arm_kind():
    cfg = load_compare_config(REPO / "configs" / "compare_tiny.yaml")
    assert {a.kind for a in cfg.arms} == {"full", "hashing", "qr", "robe", "auto"}
    assert {a.block_size for a in cfg.arms if a.kind == "robe"} == {1, 8, 32}
    assert cfg.budgets == ["10x", "100x", "1000x", "10000x"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arms": [{"name": "x", "kind": "lsh"}]}, "arms[0].kind must be one of"),
        ({"arms": [{"name": "x", "kind": "full"}, {"name": "x", "kind": "robe"}]}, "names must be unique, ['x'] repeats"),
        ({"budgets": ["lots"]}, "budgets must be bytes (e.g. 64MB, 1.5GiB, 4096) or a ratio (e.g. 100x), got 'lots'"),
        ({"budgets": ["1e400"]}, "budgets must be a finite number, got '1e400'"),
        ({"systems": {"budget": "5q"}}, "systems.budget must be bytes"),
        ({"arms": [{"name": "x", "kind": "full", "block_size": 8}]}, "arms.x.block_size applies to kind robe or auto"),
        ({"sistems": {}}, "unknown config key 'sistems' (did you mean 'systems'?)"),
        ({"arms": [{"name": "bad", "kind": "robe", "overrides": ["optim.name=nope"]}]}, "arm bad@100x: optim.name must be one of"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, change, message):
    code, err = run_main(tmp_path, capsys, write(tmp_path, **change))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


def test_unknown_arm_and_unmeetable_budget_stop_before_training(tmp_path, capsys):
    code, err = run_main(tmp_path, capsys, write(tmp_path), "--arms", "nosuch")
    assert code == 2 and err == ["robe-compare: --arms ['nosuch']: not in the config's arms ['full', 'robe']"]
    path = write(tmp_path, arms=[{"name": "h", "kind": "hashing"}, {"name": "q", "kind": "qr"}], budgets=["100000x"])
    code, err = run_main(tmp_path, capsys, path)
    assert code == 2 and len(err) == 1 and "budget 100000x: no arm can meet it (h: the hashing trick needs" in err[0], err
    assert not (tmp_path / "out" / "runs").exists()
    code, err = run_main(tmp_path, capsys, tmp_path / "missing.yaml")
    assert code == 2 and "compare config" in err[0] and "not found" in err[0]
    code, err = run_main(tmp_path, capsys, write(tmp_path), "--budgets", "1e400x")
    assert code == 2 and err == ["robe-compare: --budgets must be a finite number, got '1e400x'"]
    (tmp_path / "c.yaml").write_text("budgets: [100x]\nbudgets: [10x]\n")
    code, err = run_main(tmp_path, capsys, tmp_path / "c.yaml")
    assert code == 2 and len(err) == 1 and "key 'budgets' is given twice" in err[0], err
    (tmp_path / "a_file").write_text("")
    code = compare.main(["--config", str(write(tmp_path)), "--run-dir", str(tmp_path / "a_file")])
    assert code == 2 and capsys.readouterr().err.strip() == f"robe-compare: --run-dir {tmp_path / 'a_file'} is a file, expected a directory"


def test_arms_are_sized_for_equal_memory():
    facts = DataFacts(sizes=[10_000, 500, 20], features=["cat_0", "cat_1", "cat_2"], dim=8)
    (h,) = arm_runs(ArmConfig(name="h", kind="hashing"), ["10x"], facts)
    assert h.embedding_floats <= facts.full_floats / 10 and h.infeasible is None
    capped = json.loads(next(o for o in h.overrides if o.startswith("model.num_embeddings_per_feature=")).split("=", 1)[1])
    assert capped == [532, 500, 20]  # 1,052 rows: tables under M=532 whole, the larger capped at M
    (q,) = arm_runs(ArmConfig(name="q", kind="qr"), ["10x"], facts)
    assert q.embedding_floats <= facts.full_floats / 10 and "model.qr_max_rows=" in " ".join(q.overrides)
    (q2,) = arm_runs(ArmConfig(name="q", kind="qr"), ["10000x"], facts)
    assert q2.infeasible and "cannot fit" in q2.infeasible
    r = arm_runs(ArmConfig(name="r", kind="robe", block_size=8, budgets=["100x", "1000x"]), ["10x"], facts)
    assert [s.id for s in r] == ["r@100x", "r@1000x"] and "robe.block_size=8" in r[0].overrides
    (f,) = arm_runs(ArmConfig(name="f", kind="full"), ["10x", "100x"], facts)
    assert f.budget == "1x" and f.embedding_floats == facts.full_floats


@pytest.mark.parametrize(
    "content, message",
    [
        ("{}", "is not a robe-compare result (an object whose 'quality' and 'systems' list the runs)"),
        ("[1, 2]", "is not a robe-compare result"),
        ('{"quality": [', "is not valid JSON (Expecting value: line 1 column 14 (char 13))"),
        ('{"quality": [{"kind": "full", "id": "full@1x"}], "systems": []}', "is damaged (KeyError"),
        (None, "is a directory, expected the compare.json robe-compare writes"),
    ],
)
def test_report_only_on_a_damaged_compare_json_is_one_line(tmp_path, capsys, content, message):
    out = tmp_path / "out"
    out.mkdir()
    if content is None:
        (out / "compare.json").mkdir()
    else:
        (out / "compare.json").write_text(content)
    code = compare.main(["--report-only", "--run-dir", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"robe-compare: --report-only: {out / 'compare.json'} "), err
    assert message in err[0], err


def test_repeated_timed_runs_give_the_median_and_range_of_their_rates():
    """systems.repeats > 1: the table shows the median samples/s of an arm's successful repeats and
    their range; bytes, memory and plan come from its first repeat (the end-to-end test runs one)."""
    from robe_dist.compare_report import systems_rows

    def record(arm: str, repeat: int, seconds: float, exit: int = 0) -> dict:
        train = [{"samples": 0, "time_s": 1.0, "peak_mem_bytes": 7}, {"samples": 1000, "time_s": 1.0 + seconds, "peak_mem_bytes": 9}]
        memory = {"param_bytes_max_rank": 100 + repeat, "sharding": {"data_parallel/dense": 1}}
        return {"arm": arm, "kind": "full", "processes": 2, "repeat": repeat, "exit": exit,
                "metrics": {"train": train, "memory": memory}}  # fmt: skip

    result = {"systems": [record("full", 0, 1.0), record("full", 1, 4.0), record("full", 2, 2.0),
                          record("other", 0, 1.0), record("other", 1, 0.5, exit=1)]}  # fmt: skip
    head, rows = systems_rows(result)
    by_arm = {row[0]: dict(zip(head, row)) for row in rows}
    assert list(by_arm) == ["full", "other"]  # one row per arm: its first repeat
    assert by_arm["full"]["train samples/s"] == "500 [250, 1,000]"  # 1000 samples in 1, 4 and 2 s
    assert by_arm["full"]["param bytes / rank (max)"] == "100"
    assert by_arm["other"]["train samples/s"] == "1,000"  # the failed repeat is not a rate
