#!/usr/bin/env python
"""Test AUC of five embedding choices at equal memory: the placement planner's table.

Runs ``robe-train`` once per (choice, budget) on ``configs/tiny_synthetic.yaml`` (synthetic data
with a planted model, 26 MLPerf-shaped tables, ids mapped to 0..K on the train split; evaluation
and checkpoints only at the end) and prints test AUC and log-loss, with the memory each run used:

  full       every table full (the reference; as large as the budget allows only at 1x)
  robe_all   every table in one ROBE array of the whole budget (robe.features: all)
  hashing    the hashing trick as DLRM and TorchRec apply it: every table capped at M rows
             (id % M; tables smaller than M kept whole), M the largest that fits the budget
  hand       a split by hand: the smallest tables full while they take at most half the budget,
             the rest in a ROBE array of what they leave (robe.features: [list])
  auto       the placement planner (robe.features: auto)

Every run of a seed sees the same samples in the same order (one pass); ``--seeds`` repeats every
choice per seed (initialisation and data order) and reports the mean and the range, since single
runs differ by about 0.001 AUC. Writes the table to stdout and every run's figures to ``--json``::

    python benchmarks/placement.py                                   # 17 runs, about 9 minutes on 2 cores
    python benchmarks/placement.py --seeds 0 1 2 --json runs/placement.json          # docs/placement.md
    python benchmarks/placement.py --budgets 100x 1000x --choices robe_all auto
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
CHOICES = ("robe_all", "hashing", "hand", "auto")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny_synthetic.yaml"))
    p.add_argument("--budgets", nargs="+", default=["10x", "100x", "1000x", "10000x"])
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=CHOICES)
    p.add_argument("--no-full", action="store_true", help="skip the full-table reference run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run every choice once per seed (config 'seed': "
                   "initialisation and data order); the table shows the mean and the range")
    p.add_argument("--runs", default="runs/placement", help="parent of the run dirs (replaced)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    p.add_argument("--json", default=None, help="also write every run's figures here")
    return p.parse_args(argv)


def hand_split(sizes: List[int], features: List[str], dim: int, budget_floats: int) -> List[str]:
    """The ROBE features of the hand split: smallest tables full while they fit half the budget."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    used, full = 0, set()
    for i in order:
        if used + sizes[i] * dim > budget_floats // 2:
            break
        used += sizes[i] * dim
        full.add(i)
    return [f for i, f in enumerate(features) if i not in full]


def run_seeds(name: str, overrides: List[str], args) -> Dict:
    """``run`` once per seed; the record of the first seed with every seed's AUC added."""
    runs = [run(f"{name}_seed{s}", overrides + [f"seed={s}"], args) for s in args.seeds]
    record = dict(runs[0], name=name, seeds=args.seeds)
    aucs = [r.get("test_auc") for r in runs]
    if all(a is not None for a in aucs):
        record.update(test_auc=sum(aucs) / len(aucs), test_auc_runs=aucs,
                      test_logloss=sum(r["test_logloss"] for r in runs) / len(runs))  # fmt: skip
    else:
        record.pop("test_auc", None)
        record["error"] = next(r.get("error") for r in runs if r.get("test_auc") is None)
    return record


def run(name: str, overrides: List[str], args) -> Dict:
    run_dir = Path(args.runs) / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "robe_dist.train", "--config", args.config, "--run-dir", str(run_dir)]
    quick = ["eval.every_samples=null", "checkpoint.every_steps=null", "checkpoint.at_end=false", "logging.progress_bar=false"]
    for kv in quick + list(args.overrides) + overrides:
        cmd += ["--set", kv]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    record: Dict = {"name": name, "overrides": overrides, "exit": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "eval" and r["split"] == "test":
                record.update(test_auc=r["auc"], test_logloss=r["logloss"])
            elif r["kind"] == "placement":
                record["placement"] = r
            elif r["kind"] == "summary":
                record.update(samples=r["samples"], planted_test_auc=r.get("planted_test_auc"))
    if proc.returncode != 0:
        record["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    print(f"  {name}: exit {proc.returncode}, test AUC {record.get('test_auc')}, {record['wall_s']} s", flush=True)
    return record


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from robe_dist.data.criteo import DEFAULT_CAT_NAMES
    from robe_dist.data.layout import read_manifest
    from robe_dist.placement import Budget, PlacementError, hashing_trick_sizes
    from robe_dist.train_config import load_config
    from robe_dist.trainer.data import make_synthetic

    cfg = load_config(args.config, args.overrides)
    data = make_synthetic(cfg, log=print) if cfg.data.kind == "synthetic" else Path(cfg.data.path)
    sizes = [int(n) for n in read_manifest(data)["table_sizes"]]
    dim, features = cfg.model.embedding_dim, list(DEFAULT_CAT_NAMES)
    full_floats = sum(sizes) * dim
    records = []
    if not args.no_full:
        records.append(dict(run_seeds("full", ["robe.features=none", "robe.budget=null"], args), choice="full", budget="1x",
                            floats=full_floats))  # fmt: skip
    for budget in args.budgets:
        floats = Budget.parse(budget).floats(full_floats)
        for choice in args.choices:
            if choice == "robe_all":
                over = ["robe.features=all", f"robe.budget={budget}"]
            elif choice == "auto":
                over = ["robe.features=auto", f"robe.budget={budget}"]
            elif choice == "hand":
                over = [f"robe.features={json.dumps(hand_split(sizes, features, dim, floats))}", f"robe.budget={budget}"]
            else:
                try:
                    capped = hashing_trick_sizes(sizes, dim, floats)
                except PlacementError:  # not even one row per table fits: run that, marked over budget
                    capped = [1] * len(sizes)
                over = ["robe.features=none", "robe.budget=null", f"model.num_embeddings_per_feature={json.dumps(capped)}"]
                floats_used = sum(capped) * dim
            record = run_seeds(f"{choice}_{budget}", over, args)
            record.update(choice=choice, budget=budget,
                          floats=floats_used if choice == "hashing" else (record.get("placement") or {}).get("used_bytes", 0) // 4)
            records.append(record)
    print()
    print(table(records, full_floats))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


def table(records: List[Dict], full_floats: int) -> str:
    budgets = list(dict.fromkeys(r["budget"] for r in records if r["choice"] != "full"))
    lines = ["| budget | " + " | ".join(CHOICES) + " |", "|---|" + "---|" * len(CHOICES)]
    full = next((r for r in records if r["choice"] == "full"), None)
    if full:
        lines.insert(0, f"full tables ({full_floats:,} floats): test AUC {_auc(full)}, log-loss {full.get('test_logloss', float('nan')):.4f}\n")
    for b in budgets:
        cells = []
        for c in CHOICES:
            r = next((r for r in records if r["choice"] == c and r["budget"] == b), None)
            if r is None:
                cells.append("")
            elif r.get("test_auc") is None:
                cells.append(f"failed ({r.get('error')})")
            else:
                over = " over budget" if r["floats"] > Budget_floats(b, full_floats) else ""
                cells.append(f"{_auc(r)} ({r['floats']:,} floats{over})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _auc(r: Dict) -> str:
    runs = r.get("test_auc_runs") or []
    spread = f" [{min(runs):.4f}, {max(runs):.4f}]" if len(runs) > 1 else ""
    return f"{r['test_auc']:.4f}{spread}" if r.get("test_auc") is not None else "-"


def Budget_floats(budget: str, full_floats: int) -> int:
    from robe_dist.placement import Budget

    return Budget.parse(budget).floats(full_floats)


if __name__ == "__main__":
    main()
