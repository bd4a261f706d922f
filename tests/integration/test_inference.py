"""robe-export and robe-predict end to end: a model trained by robe-train (1 and 2 processes, a
hybrid of full tables and a ROBE array placed by the planner) scores the same as in training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = [  # the default config (auto placement at 100x: full tables + a ROBE array), smaller
    "data.synthetic_rows=60000", "data.synthetic_days=3", "train.global_batch_size=512", "eval.batch_size=8192",
    "train.log_every_steps=20", "eval.every_samples=null", "checkpoint.every_steps=null", "logging.progress_bar=false",
]  # fmt: skip


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "synthetic"


def train(run_dir: Path, data_dir: Path, nproc: int) -> dict:
    launcher = ["-m", "robe_dist.train"] if nproc == 1 else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "robe_dist.train"]  # fmt: skip
    args = [*launcher, "--run-dir", str(run_dir)]
    for o in [*SMALL, f"data.path={data_dir}"]:
        args += ["--set", o]
    p = run(*args)
    assert p.returncode == 0, p.stderr[-4000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "test": next(r for r in recs if r["kind"] == "eval" and r["split"] == "test"),
        "summary": next(r for r in recs if r["kind"] == "summary"),
        "placement": next(r for r in recs if r["kind"] == "placement"),
    }


@pytest.mark.integration
@pytest.mark.parametrize("nproc", [1, 2])
def test_exported_model_scores_as_in_training(tmp_path, data_dir, nproc):
    run_dir = tmp_path / "run"
    m = train(run_dir, data_dir, nproc)
    assert m["placement"]["full_tables"] and m["placement"]["robe_tables"]  # a hybrid
    ckpt = Path(m["summary"]["checkpoint"])
    art = tmp_path / "model.pt2"
    p = run("-m", "robe_dist.inference.export", "--checkpoint", str(ckpt), "--out", str(art))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"wrote {art}" in p.stdout and "ROBE array of" in p.stdout and "full tables" in p.stdout
    scores = tmp_path / "scores.txt"
    vocab = Path(str(data_dir) + "-vocab")
    p = run("-m", "robe_dist.inference.predict", "--model", str(art), "--data", str(vocab), "--split", "test", "--out", str(scores))
    assert p.returncode == 0, p.stderr[-3000:]
    auc = float(p.stdout.split("AUC ")[1].split(",")[0])
    assert abs(auc - m["test"]["auc"]) < 2e-4, (auc, m["test"]["auc"], p.stdout)
    lines = scores.read_text().split()
    assert len(lines) == m["test"]["eval_samples"] and all(0 < float(x) < 1 for x in lines[:1000])
    if nproc == 1:
        return
    # reduced precision: the array and tables in bf16, AUC printed by robe-predict
    art16 = tmp_path / "model_bf16.pt2"
    p = run("-m", "robe_dist.inference.export", "--checkpoint", str(ckpt), "--out", str(art16), "--dtype", "bf16", "--data", str(vocab))
    assert p.returncode == 0 and "bf16" in p.stdout, p.stderr[-3000:]
    change = float(p.stdout.split("change ")[1].rstrip(")\n"))
    assert abs(change) < 0.005 and "validation AUC of the artifact" in p.stdout
    assert art16.stat().st_size < art.stat().st_size
    p = run("-m", "robe_dist.inference.predict", "--model", str(art16), "--data", str(vocab), "--split", "test")
    assert p.returncode == 0, p.stderr[-3000:]
    assert abs(float(p.stdout.split("AUC ")[1].split(",")[0]) - auc) < 0.005


@pytest.mark.integration
def test_bad_artifacts_and_checkpoints_are_one_line_and_exit_2(tmp_path, data_dir):
    import torch

    run_dir = tmp_path / "run"
    m = train(run_dir, data_dir, 1)
    ckpt = Path(m["summary"]["checkpoint"])
    art = tmp_path / "model.pt2"
    assert run("-m", "robe_dist.inference.export", "--checkpoint", str(ckpt), "--out", str(art)).returncode == 0
    vocab = str(data_dir) + "-vocab"

    def predict(model: Path) -> list:
        p = run("-m", "robe_dist.inference.predict", "--model", str(model), "--data", vocab)
        assert p.returncode == 2, p.stderr[-2000:]
        return [ln for ln in p.stderr.splitlines() if ln.startswith("robe-predict:")]

    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(art.read_bytes()[: art.stat().st_size // 2])
    assert len(said := predict(truncated)) == 1 and "truncated?" in said[0]
    newer = tmp_path / "newer.pt2"
    extra = {"robe_dist.json": ""}
    ep = torch.export.load(str(art), extra_files=extra)
    meta = json.loads(extra["robe_dist.json"])
    torch.export.save(ep, str(newer), extra_files={"robe_dist.json": json.dumps(dict(meta, format_version=99))})
    assert zipfile.is_zipfile(newer)
    assert "format version 99 is newer" in predict(newer)[0]
    assert "no such file" in predict(tmp_path / "missing.pt2")[0]
    # a checkpoint whose config says another hash seed than its tensors were hashed with
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(ckpt, edited)
    (edited / "config.yaml").write_text((edited / "config.yaml").read_text().replace("seed: null", "seed: 9", 1))
    p = run("-m", "robe_dist.inference.export", "--checkpoint", str(edited), "--out", str(tmp_path / "y.pt2"))
    assert p.returncode == 2 and "hash signature does not match" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # a checkpoint without its model spec (or not a checkpoint at all)
    (ckpt / "model_spec.json").unlink()
    p = run("-m", "robe_dist.inference.export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.pt2"))
    assert p.returncode == 2 and p.stderr.strip().startswith("robe-export:") and "model_spec.json" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt2").exists()


def _criteo_sample() -> Path:
    env = os.environ.get("ROBE_DIST_CRITEO_SAMPLE")
    return (Path(env) if env else REPO.parent / "shared" / "data" / "criteo_sample") / "kaggle_train_head_1000.tsv"


@pytest.mark.integration
@pytest.mark.skipif(not _criteo_sample().is_file(), reason=f"real Criteo rows not found at {_criteo_sample()} (set ROBE_DIST_CRITEO_SAMPLE)")
def test_raw_criteo_rows_score_as_ingested_and_bad_rows_are_skipped(tmp_path, data_dir):
    import numpy as np
    import torch

    from robe_dist.inference.predict import load_artifact

    run_dir = tmp_path / "run"
    over = ["data.vocab=false", "robe.features=all", "robe.budget=null", "robe.array_size=65536"]
    args = ["-m", "robe_dist.train", "--run-dir", str(run_dir)]
    for o in [*SMALL, f"data.path={tmp_path / 'raw_synth'}", *over]:
        args += ["--set", o]
    assert (p := run(*args)).returncode == 0, p.stderr[-3000:]
    ckpt = next((run_dir / "checkpoints").iterdir())
    art = tmp_path / "raw.pt2"
    assert run("-m", "robe_dist.inference.export", "--checkpoint", str(ckpt), "--out", str(art)).returncode == 0
    rows = tmp_path / "day_0.tsv"
    sample = _criteo_sample().read_bytes()
    rows.write_bytes(sample + (b"" if sample.endswith(b"\n") else b"\n") + b"not a criteo row\n")
    scores = tmp_path / "scores.txt"
    p = run("-m", "robe_dist.inference.predict", "--model", str(art), "--data", str(rows), "--out", str(scores))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 bad lines skipped, not scored" in p.stdout
    # the same rows through robe-data ingest, scored by the artifact directly
    assert run("-m", "robe_dist.data.cli", "ingest", "--input", str(rows), "--out", str(tmp_path / "npy")).returncode == 0
    dense = torch.from_numpy(np.load(tmp_path / "npy" / "day_0_dense.npy"))
    sparse = torch.from_numpy(np.load(tmp_path / "npy" / "day_0_sparse.npy"))
    model, _ = load_artifact(art)
    with torch.no_grad():
        expected = model(dense, sparse.t().reshape(-1).to(torch.int64), torch.ones(sparse.numel(), dtype=torch.int64))
    got = torch.tensor([float(x) for x in scores.read_text().split()])
    assert len(got) == len(expected) == 1000
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-7)
    # a model trained on vocabulary ids refuses raw rows
    run_dir2 = tmp_path / "vocab_run"
    m = train(run_dir2, data_dir, 1)
    art2 = tmp_path / "vocab.pt2"
    assert run("-m", "robe_dist.inference.export", "--checkpoint", m["summary"]["checkpoint"], "--out", str(art2)).returncode == 0
    p = run("-m", "robe_dist.inference.predict", "--model", str(art2), "--data", str(rows))
    assert p.returncode == 2 and "robe-data vocab" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
