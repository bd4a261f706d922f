"""robe-compare end to end: a two-arm micro comparison (full tables vs ROBE) plus an arm that
diverges, run as the user runs it; the report's numbers are checked against the runs' files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.synthetic_rows=40000", "data.synthetic_days=3", "train.global_batch_size=512", "eval.batch_size=8192",
    "train.log_every_steps=10", "model.embedding_dim=16", "model.dense_arch_layer_sizes=[32,16]",
]  # fmt: skip


def write_config(tmp_path: Path) -> Path:
    cfg = {
        "train_config": str(REPO / "configs" / "tiny_synthetic.yaml"),
        "overrides": SMALL + [f"data.path={tmp_path / 'synth'}"],
        "budgets": ["100x"],
        "arms": [
            {"name": "full", "kind": "full", "overrides": ["dist.table_sharding=table_wise"]},
            {"name": "robe_z16", "kind": "robe", "block_size": 16},
            {"name": "broken", "kind": "robe", "overrides": ["optim.name=sgd", "optim.lr=1e12"]},
        ],
        "systems": {"budget": "100x", "processes": [2], "steps": 20},  # one round: repeats in test_compare.py
    }
    path = tmp_path / "compare.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def table_rows(report: str, header_start: str) -> list:
    lines = report.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(header_start))
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for ln in lines[i + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])))
    return rows


def metrics(run_dir: Path) -> dict:
    out = {"train": []}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if r["kind"] == "train":
            out["train"].append(r)
        elif r["kind"] == "eval":
            out[f"eval_{r['split']}"] = r
        else:
            out[r["kind"]] = r
    return out


@pytest.mark.integration
def test_micro_comparison_reports_what_the_runs_wrote(tmp_path):
    out = tmp_path / "cmp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "robe_dist.compare", "--config", str(write_config(tmp_path)), "--run-dir", str(out),
                        "--budgets", "100x"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    # the diverging arm fails alone: reported, the others complete, exit 1 with one line naming it
    assert p.returncode == 1, p.stderr[-4000:]
    assert "1 run(s) failed: broken@100x " in p.stderr.splitlines()[-1]
    report = (out / "report.md").read_text()
    assert f"--run-dir {out} --budgets 100x`" in report  # the command as given
    # --report-only rereads compare.json (checked for the runs' lists) and writes the same report
    (out / "report.md").unlink()
    r = subprocess.run([sys.executable, "-m", "robe_dist.compare", "--report-only", "--run-dir", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and "1 run(s) failed: broken@100x " in r.stderr, r.stderr[-3000:]
    assert (out / "report.md").read_text() == report
    assert "Not timed (their quality runs failed): broken@100x." in report  # nor run: it would fail alike
    assert not any(d.name.startswith("broken") for d in (out / "systems").iterdir())
    for png in ("auc_vs_memory.png", "throughput.png", "bytes_per_step.png", "loss_curves.png", "traffic_projection.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png

    quality = {r["arm"]: r for r in table_rows(report, "| arm | budget |")}
    assert quality["broken"]["status"].startswith("FAILED") and "NaN" in quality["broken"]["status"]
    full_m = metrics(out / "runs" / "full@1x")
    for arm, run in (("full", "full@1x"), ("robe_z16", "robe_z16@100x")):
        m = metrics(out / "runs" / run)
        row = quality[arm]
        assert row["test AUC"] == f"{m['eval_test']['auc']:.4f}"
        assert row["val AUC"] == f"{m['eval_val']['auc']:.4f}"
        assert row["test log-loss"] == f"{m['eval_test']['logloss']:.4f}"
        assert row["embedding bytes (measured)"] == f"{m['memory']['embedding_bytes_all_ranks']:,}"
        assert row["samples"] == f"{m['summary']['samples']:,}" and row["steps"] == str(m["summary"]["step"])
        ratio = full_m["memory"]["embedding_bytes_all_ranks"] / m["memory"]["embedding_bytes_all_ranks"]
        assert row["x smaller than full"] == f"{ratio:,.1f}"
        assert row["status"] == "ok"  # same samples as the others: no flag
    assert 95 < float(quality["robe_z16"]["x smaller than full"].replace(",", "")) < 105  # a 100x budget, measured

    systems = {r["arm"]: r for r in table_rows(report, "| arm | processes |")}
    for label, run in (("full", "full@1x-2p"), ("robe_z16 100x", "robe_z16@100x-2p")):
        m = metrics(out / "systems" / run)
        t = m["train"]  # samples/s between the first and the last train record
        assert systems[label]["train samples/s"] == f"{(t[-1]['samples'] - t[0]['samples']) / (t[-1]['time_s'] - t[0]['time_s']):,.0f}"
        steps = m["summary"]["step"]
        sent = {k: [v / steps for v in vs] for k, vs in m["summary"]["sent_bytes_per_rank"].items()}
        row = systems[label]
        a2a = sent["alltoall_bytes"]
        assert row["all-to-all MB/step/rank (mean [max])"] == f"{sum(a2a) / 2 / 1e6:,.3f} [{max(a2a) / 1e6:,.3f}]"
        assert row["ROBE all-reduce MB/step/rank"] == f"{sent['robe_allreduce_bytes'][0] / 1e6:,.3f}"
        assert row["param bytes / rank (max)"] == f"{m['memory']['param_bytes_max_rank']:,}"
    assert systems["full"]["sharding plan"] == "26 table_wise/fused"
    assert systems["robe_z16 100x"]["sharding plan"] == "1 data_parallel/dense"
    # measured against the byte model of docs/distributed.md (table-wise: ids + lengths, pooled
    # forward + gradient backward): full tables, W=2, local batch 256, 26 one-hot features of dim 16
    m = metrics(out / "systems" / "full@1x-2p")
    a2a = [v / m["summary"]["step"] for v in m["summary"]["sent_bytes_per_rank"]["alltoall_bytes"]]
    model = 0.5 * 256 * 26 * (8 * 1 + 4 + 8 * 16)
    assert abs(sum(a2a) / 2 - model) / model < 0.02, (a2a, model)
    # the replicated array sends its gradient (payload = array bytes) and nothing through all-to-alls
    r = metrics(out / "systems" / "robe_z16@100x-2p")
    array_bytes = r["placement"]["array_size"] * 4
    assert r["summary"]["sent_bytes_per_rank"]["robe_allreduce_bytes"] == [array_bytes * r["summary"]["step"]] * 2
    assert r["summary"]["sent_bytes_per_rank"]["alltoall_bytes"] == [0, 0]
    # the traffic table: measured bytes per sample beside the byte model's, and a crossover
    assert re.search(r"\| full \| [0-9.]+ \| 3,6[0-9][0-9]\.[0-9] \| 3,640\.0 \| 256 \| - \|", report), report
    assert re.search(r"\| robe_z16 100x \| [0-9.]+ \| 0\.0 \| 0\.0 \| 256 \| [0-9,]+ \|", report)
