"""robe-compare: ROBE against TorchRec's sharded full tables and the other compressions, side by side.

Trains and evaluates several embedding choices ("arms") on the same data, model, seed and samples,
each as its own ``robe-train`` run (same trainer, DMP and pipeline; a crashing arm loses only
itself), measures them as systems, and writes a report with plots::

    robe-compare --config configs/compare_tiny.yaml --run-dir runs/compare     # ~15 min on 2 CPU cores
    python -m robe_dist.compare --config configs/compare_tiny.yaml --run-dir runs/compare \\
        --arms full auto --budgets 100x --set data.synthetic_rows=200000        # a subset, quicker

Arms (``kind`` in the config's ``arms`` list), each at every budget of ``budgets`` (full: once):

  full      every table full, sharded by TorchRec's planner (the production baseline)
  hashing   the hashing trick as DLRM and TorchRec apply it: each table capped at M rows
            (``id % M``; smaller tables whole), M the largest that fits the budget
  qr        compositional quotient-remainder embeddings (Shi et al., KDD 2020) at the budget
  robe      every table in one ROBE array of the budget, block size ``block_size``
  auto      robe_dist's placement planner (``robe.features: auto``): full tables and an array

What the run dir gets: ``runs/<arm>@<budget>/`` (each robe-train run: config.yaml, metrics.jsonl),
``systems/<arm>@<budget>-<N>p/`` (short timed runs on N processes; ``...-<N>p-r<k>/``, one per
round, when ``systems.repeats`` > 1), ``compare.json`` (every figure
the report shows, read from those metrics.jsonl files), ``report.md`` and ``*.png``.

Quality runs use ``quality_processes`` processes (1 by default); the systems runs train ``systems.steps`` steps of the arms at
``systems.budget`` on each of ``systems.processes`` process counts (gloo on CPU, nccl on GPUs) and
record samples/s, peak memory, the bytes each rank holds and the bytes it sends per step, counted
where they are sent (robe_dist.distributed.comm_counter and the trainer's all-reduce counters).
An arm whose quality run failed is reported as failed and not timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence


from robe_dist.placement import Budget, PlacementError, hashing_trick_sizes
from robe_dist.train_config import Config, _build, apply_override, load_config, read_yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_COMPARE_CONFIG = REPO / "configs" / "compare_tiny.yaml"
ArmKind = Literal["full", "hashing", "qr", "robe", "auto"]


@dataclass
class ArmConfig:
    """One embedding choice."""

    name: str
    """Unique name (the run dirs are ``<name>@<budget>``)."""

    kind: ArmKind
    """``full``, ``hashing``, ``qr``, ``robe`` or ``auto`` (see the module docstring)."""

    block_size: Optional[int] = None
    """``robe`` / ``auto``: Z, the block size (``null``: the training config's ``robe.block_size``)."""

    budgets: Optional[List[str]] = None
    """Budgets of this arm (``null``: the comparison's ``budgets``); ignored by ``full``."""

    overrides: List[str] = field(default_factory=list)
    """Extra ``key=value`` overrides of the training config for this arm only."""


@dataclass
class SystemsConfig:
    """The timed runs: throughput, memory and traffic."""

    budget: Optional[str] = "100x"
    """The budget whose arms (and ``full``) are timed (``null``: no systems runs)."""

    processes: List[int] = field(default_factory=lambda: [1, 2])
    """Numbers of processes to time each arm on (torchrun on one node)."""

    steps: int = 150
    """Training steps of each timed run (throughput from the steps after the first log line)."""

    repeats: int = 1
    """Timed runs per arm and process count; the report gives the median samples/s and the range
    (on a shared machine single runs can differ by a third)."""


@dataclass
class CompareConfig:
    """A comparison: ``robe-compare --config FILE``."""

    train_config: str = "tiny_synthetic.yaml"
    """The training config every arm starts from (relative paths: to this file's directory)."""

    overrides: List[str] = field(default_factory=list)
    """``key=value`` overrides of the training config for every arm (e.g. ``model.embedding_dim=32``)."""

    budgets: List[str] = field(default_factory=lambda: ["10x", "100x", "1000x", "10000x"])
    """Memory budgets of the embeddings: compression ratios against the full tables or bytes."""

    arms: List[ArmConfig] = field(default_factory=list)
    """The embedding choices; a ``full`` arm is the reference of the report."""

    quality_processes: int = 1
    """Processes of each quality run (torchrun on one node when > 1; e.g. 8 GPUs for CriteoTB,
    whose full tables need ~96 GB)."""

    systems: SystemsConfig = field(default_factory=SystemsConfig)
    """The timed runs."""

    timeout_s: int = 3600
    """A run that takes longer is stopped and reported as failed."""

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("arms must list at least one arm")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: names must be unique, {dup} repeats")
        for a in self.arms:
            if not a.name or "/" in a.name or "@" in a.name:
                raise ValueError(f"arms: name {a.name!r} must be non-empty, without '/' or '@'")
            if a.block_size is not None and a.kind not in ("robe", "auto"):
                raise ValueError(f"arms.{a.name}.block_size applies to kind robe or auto, not {a.kind}")
        for b in list(self.budgets) + [b for a in self.arms for b in (a.budgets or [])]:
            Budget.parse(b, field="budgets")
        if self.systems.budget is not None:
            Budget.parse(self.systems.budget, field="systems.budget")
        if not self.systems.processes or any(p < 1 for p in self.systems.processes):
            raise ValueError(f"systems.processes must list positive process counts, got {self.systems.processes}")
        if self.systems.repeats < 1:
            raise ValueError(f"systems.repeats must be >= 1, got {self.systems.repeats}")
        if self.systems.steps < 10:
            raise ValueError(f"systems.steps must be >= 10, got {self.systems.steps}")
        if self.quality_processes < 1:
            raise ValueError(f"quality_processes must be >= 1, got {self.quality_processes}")
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")


def load_compare_config(path: Path) -> CompareConfig:
    """Reads a comparison config; raises ``ValueError`` naming a bad key or value."""
    try:
        values = read_yaml(path, "compare config") or {}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (see configs/compare_tiny.yaml)") from None
    return _build(CompareConfig, values, "")


# ---------------------------------------------------------------------------------------------
# Arms -> robe-train runs


@dataclass
class RunSpec:
    """One robe-train run of an arm at a budget."""

    arm: str
    kind: str
    budget: str  # "1x" for full
    overrides: List[str]
    embedding_floats: Optional[int] = None
    """Floats of the embeddings this arm is built with (its design, from the sizes)."""
    infeasible: Optional[str] = None
    """Why the arm cannot meet this budget (it is then reported, not run)."""

    @property
    def id(self) -> str:
        return f"{self.arm}@{self.budget}"


@dataclass
class DataFacts:
    """What the arms are sized from: the dataset's tables and the model's embedding width."""

    sizes: List[int]
    features: List[str]
    dim: int

    @property
    def full_floats(self) -> int:
        return sum(self.sizes) * self.dim


def data_facts(cfg: Config, log=print) -> DataFacts:
    """Generates the synthetic data (once) or reads the Criteo manifest; the tables' sizes."""
    from robe_dist.data.criteo import DEFAULT_CAT_NAMES
    from robe_dist.data.layout import read_manifest
    from robe_dist.trainer.data import make_synthetic

    path = make_synthetic(cfg, log=log) if cfg.data.kind == "synthetic" else Path(cfg.data.path)
    sizes = cfg.model.num_embeddings_per_feature or [int(n) for n in read_manifest(path)["table_sizes"]]
    return DataFacts(sizes=[int(n) for n in sizes], features=list(DEFAULT_CAT_NAMES), dim=cfg.model.embedding_dim)


def arm_runs(arm: ArmConfig, budgets: Sequence[str], facts: DataFacts) -> List[RunSpec]:
    """The runs of ``arm``: its overrides at each budget (``infeasible`` says when it cannot fit)."""
    from robe_dist.modules.qr import qr_max_rows_for_budget, qr_rows

    full = ["robe.features=none", "robe.budget=null", "robe.array_size=null"]
    if arm.kind == "full":
        return [RunSpec(arm.name, arm.kind, "1x", full + arm.overrides, facts.full_floats)]
    specs = []
    for budget in arm.budgets or budgets:
        floats = Budget.parse(budget).floats(facts.full_floats)
        spec = RunSpec(arm.name, arm.kind, budget, [], floats)
        try:
            if arm.kind == "hashing":
                capped = hashing_trick_sizes(facts.sizes, facts.dim, floats)
                spec.overrides = full + [f"model.num_embeddings_per_feature={json.dumps(capped)}"]
                spec.embedding_floats = sum(capped) * facts.dim
            elif arm.kind == "qr":
                try:
                    m = qr_max_rows_for_budget(facts.sizes, facts.dim, floats)
                except ValueError as e:
                    raise PlacementError(str(e)) from None
                spec.overrides = full + [f"model.qr_max_rows={m}"]
                spec.embedding_floats = sum(qr_rows(n, m) for n in facts.sizes) * facts.dim
            else:  # robe, auto: the trainer's placement sizes the array (floats: what it reports)
                spec.overrides = [f"robe.features={'all' if arm.kind == 'robe' else 'auto'}", f"robe.budget={budget}", "robe.array_size=null"]
                if arm.block_size is not None:
                    spec.overrides.append(f"robe.block_size={arm.block_size}")
        except PlacementError as e:
            spec.infeasible = str(e)
        spec.overrides += arm.overrides
        specs.append(spec)
    return specs


def check_run(base: Path, common: Sequence[str], spec: RunSpec, facts: DataFacts) -> None:
    """Builds the run's config and, for robe/auto, its placement, so that a bad arm stops the
    comparison before any training. Raises ``ValueError`` naming the arm."""
    from robe_dist.data.stats import read_table_stats
    from robe_dist.trainer.model import place_tables, table_configs

    try:
        cfg = load_config(base, list(common) + spec.overrides)
        if cfg.robe.budget is not None and spec.infeasible is None:
            tables, robe_names = table_configs(cfg, facts.features, facts.sizes)
            stats = None
            if cfg.robe.features == "auto":
                from robe_dist.trainer.data import training_data_dir

                stats = read_table_stats(training_data_dir(cfg))
            try:
                placement = place_tables(cfg, tables, robe_names, stats)
                spec.embedding_floats = placement.used_bytes // 4
            except PlacementError as e:
                spec.infeasible = str(e)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"arm {spec.id}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Running


def _train_command(nproc: int) -> List[str]:
    if nproc == 1:
        return [sys.executable, "-m", "robe_dist.train"]
    return [sys.executable, "-m", "robe_dist.torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "robe_dist.train"]


def read_metrics(run_dir: Path) -> Dict[str, Any]:
    """The records of a run's metrics.jsonl, grouped: start, memory, placement, train (list),
    eval (by split), summary."""
    out: Dict[str, Any] = {"train": [], "eval": {}}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        r = json.loads(line)
        kind = r.pop("kind")
        if kind == "train":
            out["train"].append(r)
        elif kind == "eval":
            out["eval"][r["split"]] = r
        else:
            out[kind] = r
    return out


def run_one(spec: RunSpec, base: Path, common: Sequence[str], run_dir: Path, nproc: int, extra: Sequence[str],
            timeout_s: int, log) -> Dict[str, Any]:  # fmt: skip
    """Runs robe-train for ``spec``; returns its record (status, wall time, metrics)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = _train_command(nproc) + ["--config", str(base), "--run-dir", str(run_dir)]
    for kv in list(common) + spec.overrides + list(extra):
        cmd += ["--set", kv]
    record: Dict[str, Any] = {"id": spec.id, "arm": spec.arm, "kind": spec.kind, "budget": spec.budget,
                              "processes": nproc, "run_dir": str(run_dir), "overrides": spec.overrides}  # fmt: skip
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=_child_env())
        code, err = proc.returncode, (proc.stderr or proc.stdout).strip().splitlines()
    except subprocess.TimeoutExpired:
        code, err = None, [f"stopped after the {timeout_s} s timeout"]
    record["wall_s"] = round(time.time() - t0, 1)
    record["exit"] = code
    (run_dir / "stderr.txt").parent.mkdir(parents=True, exist_ok=True)
    if code != 0:
        record["error"] = err[-1] if err else f"exit {code}"
        (run_dir / "stderr.txt").write_text("\n".join(err) + "\n")
    record["metrics"] = read_metrics(run_dir)
    status = "ok" if code == 0 else f"FAILED ({record['error']})"
    log(f"  {spec.id} on {nproc} process(es): {status}, {record['wall_s']} s")
    return record


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_comparison(cfg: CompareConfig, config_path: Path, out_dir: Path, train_overrides: Sequence[str],
                   only_arms: Optional[Sequence[str]], only_budgets: Optional[Sequence[str]], log=print) -> Dict[str, Any]:  # fmt: skip
    """Checks every arm, runs them, writes ``compare.json``; returns its content."""
    base = (config_path.parent / cfg.train_config).resolve()
    common = list(cfg.overrides) + list(train_overrides)
    try:
        base_cfg = load_config(base, common)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"train_config {cfg.train_config}: {e}") from None
    arms = cfg.arms
    if only_arms:
        unknown = sorted(set(only_arms) - {a.name for a in arms})
        if unknown:
            raise ValueError(f"--arms {unknown}: not in the config's arms {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in only_arms]
    for b in only_budgets or []:
        Budget.parse(b, field="--budgets")
    facts = data_facts(base_cfg, log=log)
    specs = [s for a in arms for s in arm_runs(a, cfg.budgets, facts)]
    if only_budgets:
        specs = [s for s in specs if s.kind == "full" or s.budget in only_budgets]
    for s in specs:
        check_run(base, common, s, facts)
    by_budget: Dict[str, List[RunSpec]] = {}
    for s in specs:
        by_budget.setdefault(s.budget, []).append(s)
    for b, ss in by_budget.items():
        if b != "1x" and all(s.infeasible for s in ss):
            raise ValueError(f"budget {b}: no arm can meet it ({'; '.join(f'{s.arm}: {s.infeasible}' for s in ss)})")
    quick = ["eval.every_samples=null", "checkpoint.every_steps=null", "checkpoint.at_end=false", "logging.progress_bar=false"]
    result: Dict[str, Any] = {
        "config": _shown(config_path), "train_config": _shown(base), "overrides": common, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(), "full_floats": facts.full_floats, "dim": facts.dim, "table_sizes": facts.sizes,
        "seed": base_cfg.seed, "cli_overrides": list(train_overrides), "cli_arms": list(only_arms or []),
        "cli_budgets": list(only_budgets or []), "systems_budget": cfg.systems.budget,
        "systems_steps": cfg.systems.steps, "systems_repeats": cfg.systems.repeats, "quality_processes": cfg.quality_processes,
        "multi_hot": base_cfg.data.multi_hot, "quality": [], "systems": [],
    }  # fmt: skip
    log(f"robe-compare: {len(specs)} quality runs ({sum(1 for s in specs if s.infeasible)} cannot meet their budget)")
    t0 = time.time()
    for s in specs:
        if s.infeasible:
            result["quality"].append(dict(id=s.id, arm=s.arm, kind=s.kind, budget=s.budget, infeasible=s.infeasible,
                                          embedding_floats=None))  # fmt: skip
            log(f"  {s.id}: cannot meet the budget ({s.infeasible})")
            continue
        rec = run_one(s, base, common, out_dir / "runs" / s.id, cfg.quality_processes, quick, cfg.timeout_s, log)
        rec["embedding_floats"] = s.embedding_floats
        result["quality"].append(rec)
        _write_json(out_dir / "compare.json", result)
    sb = cfg.systems.budget
    if sb is not None:
        ok = {r["id"] for r in result["quality"] if r.get("exit") == 0}
        timed = [s for s in specs if not s.infeasible and (s.kind == "full" or s.budget == sb)]
        # an arm whose quality run failed (diverged, crashed) would fail its timed runs alike
        result["not_timed"] = [s.id for s in timed if s.id not in ok]
        timed = [s for s in timed if s.id in ok]
        for name in result["not_timed"]:
            log(f"  {name}: not timed (its quality run failed)")
        extra = quick + [f"train.max_steps={cfg.systems.steps}", "eval.at_end=false",
                         f"train.log_every_steps={max(1, cfg.systems.steps // 6)}"]  # fmt: skip
        reps = cfg.systems.repeats
        log(f"robe-compare: {len(timed) * len(cfg.systems.processes) * reps} timed runs ({cfg.systems.steps} steps each)")
        for rep in range(reps):  # whole rounds: a slow spell of the machine hits every arm once
            for s in timed:
                for p in cfg.systems.processes:
                    name = f"{s.id}-{p}p" + (f"-r{rep}" if reps > 1 else "")
                    rec = run_one(s, base, common, out_dir / "systems" / name, p, extra, cfg.timeout_s, log)
                    rec.update(embedding_floats=s.embedding_floats, repeat=rep)
                    result["systems"].append(rec)
                    _write_json(out_dir / "compare.json", result)
    result["wall_s"] = round(time.time() - t0, 1)
    _write_json(out_dir / "compare.json", result)
    return result


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (reports are read elsewhere)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def machine() -> Dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__}  # fmt: skip
    try:
        import torchrec

        info["torchrec"] = getattr(torchrec, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="robe-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_COMPARE_CONFIG, help="comparison config (default: configs/compare_tiny.yaml)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/compare"), help="where runs, compare.json, report.md and plots go")
    p.add_argument("--arms", nargs="+", default=None, metavar="NAME", help="only these arms (names from the config)")
    p.add_argument("--budgets", nargs="+", default=None, metavar="B", help="only these budgets (e.g. 100x 1000x)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the training config for every arm (repeatable)")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and the plots from the run dir's compare.json")
    p.add_argument("--publish", type=Path, default=None, metavar="MD",
                   help="also write the report to MD (e.g. docs/results.md), its plots beside it in MD's stem dir")
    return p.parse_args(argv)


RERUN = "rerun robe-compare without --report-only to rewrite it"
"""What to do about a damaged ``compare.json``."""


def read_result(path: Path) -> Dict[str, Any]:
    """``compare.json`` of an earlier run (``--report-only``), checked for the lists the report
    reads; ``ValueError`` or ``FileNotFoundError`` naming it."""
    if path.is_dir():
        raise ValueError(f"--report-only: {path} is a directory, expected the compare.json robe-compare writes")
    if not path.is_file():
        raise FileNotFoundError(f"--report-only: {path} not found (run robe-compare without it first)")
    try:
        result = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--report-only: {path} is not valid JSON ({e}); {RERUN}") from None
    if not (isinstance(result, dict) and all(isinstance(result.get(k), list) for k in ("quality", "systems"))
            and all(isinstance(r, dict) and "kind" in r and "id" in r for r in result["quality"] + result["systems"])):  # fmt: skip
        raise ValueError(f"--report-only: {path} is not a robe-compare result (an object whose 'quality' and "
                         f"'systems' list the runs); {RERUN}")  # fmt: skip
    return result


def main(argv: Optional[List[str]] = None) -> int:
    from robe_dist.compare_report import write_report

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.run_dir.exists() and not args.run_dir.is_dir():
            raise ValueError(f"--run-dir {args.run_dir} is a file, expected a directory")
        if args.report_only:
            result = read_result(args.run_dir / "compare.json")
        else:
            cfg = load_compare_config(args.config)
            for kv in args.overrides:
                apply_override({}, kv)  # syntax check
            result = run_comparison(cfg, args.config, args.run_dir, args.overrides, args.arms, args.budgets)
    except (ValueError, FileNotFoundError) as e:
        print(f"robe-compare: {e}", file=sys.stderr)
        return 2
    try:
        report = write_report(result, args.run_dir, args.publish)
    except (KeyError, TypeError, AttributeError) as e:  # a compare.json edited or damaged inside
        if not args.report_only:
            raise
        print(f"robe-compare: --report-only: {args.run_dir / 'compare.json'} is damaged ({type(e).__name__}: {e}); {RERUN}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"robe-compare: wrote {report} and {len(list(args.run_dir.glob('*.png')))} plots")
    failed = [r["id"] for r in result["quality"] if "infeasible" not in r and r.get("exit") != 0]
    failed += [f"{r['id']} ({r['processes']}p, timed)" for r in result["systems"] if r.get("exit") != 0]
    if failed:
        print(f"robe-compare: {len(failed)} run(s) failed: {', '.join(failed)} (see report.md)", file=sys.stderr)
        return 1
    return 0


def main_exit() -> None:
    """Console entry point (``robe-compare``)."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
