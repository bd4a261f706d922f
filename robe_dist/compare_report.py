"""robe-compare's report: ``report.md`` and PNG plots from ``compare.json`` (robe_dist.compare).

Every figure is read from the runs' ``metrics.jsonl`` records that ``compare.json`` holds; the
only arithmetic is ratios, differences, per-step divisions and the traffic projection (stated in
the report next to its inputs). ``tests/unit/test_compare.py`` checks the report against the files.
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

BANDWIDTHS_GBPS = {"100 Gb/s Ethernet (12.5 GB/s)": 12.5e9, "400 Gb/s InfiniBand NDR (50 GB/s)": 50e9}
"""Per-GPU network bandwidths of the traffic projection."""
KIND_TEXT = {
    "full": "every table full, sharded by TorchRec's planner (the production baseline)",
    "hashing": "the hashing trick as DLRM and TorchRec apply it, every table capped at M rows (id % M)",
    "qr": "quotient-remainder compositional embeddings (Shi et al., KDD 2020), every table capped at M rows",
    "robe": "every table in one ROBE array of the budget (block size Z in the arm's name)",
    "auto": "robe_dist's placement planner: full tables where they pay, the rest in a ROBE array",
}
PROJECTION_RANKS = [8, 16, 32, 64, 128, 256, 512, 1024]
PROJECTION_W = 64
"""Ranks of the bytes-against-local-batch panel."""


# ---------------------------------------------------------------------------------------------
# Figures of one run, from its metrics


def auc_on_test(r: Dict) -> Optional[float]:
    return r.get("metrics", {}).get("eval", {}).get("test", {}).get("auc")


def train_rate(r: Dict) -> Optional[float]:
    """Training samples/s between the first and the last train record (start-up excluded)."""
    train = r.get("metrics", {}).get("train", [])
    if len(train) < 2 or train[-1]["time_s"] <= train[0]["time_s"]:
        return None
    return (train[-1]["samples"] - train[0]["samples"]) / (train[-1]["time_s"] - train[0]["time_s"])


def eval_rate(r: Dict) -> Optional[float]:
    e = r.get("metrics", {}).get("eval", {}).get("test")
    return e["eval_samples"] / e["eval_s"] if e and e.get("eval_s") else None


def per_step_bytes(r: Dict) -> Optional[Dict[str, List[float]]]:
    """Per rank, bytes per training step: ``{"robe_allreduce_bytes": [...], "dense_allreduce_bytes": [...],
    "alltoall_bytes": [...]}`` (the summary's counters over its steps)."""
    s = r.get("metrics", {}).get("summary")
    if not s or not s.get("sent_bytes_per_rank") or not s.get("step"):
        return None
    return {k: [v / s["step"] for v in vs] for k, vs in s["sent_bytes_per_rank"].items()}


def memory(r: Dict, key: str) -> Optional[int]:
    return r.get("metrics", {}).get("memory", {}).get(key)


def peak_rss(r: Dict) -> Optional[int]:
    train = r.get("metrics", {}).get("train", [])
    return max((t["peak_mem_bytes"] for t in train), default=None)


def status(r: Dict) -> str:
    if r.get("infeasible"):
        return "cannot meet the budget: " + r["infeasible"]
    if r.get("exit") != 0:
        return f"FAILED: {r.get('error', 'no exit status')}"
    return "ok"


# ---------------------------------------------------------------------------------------------
# Formatting


def _f(x: Optional[float], fmt: str = "{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 1e6:,.3f}"


def _label(r: Dict) -> str:
    return r["arm"] if r["kind"] == "full" else f"{r['arm']} {r['budget']}"


def quality_rows(result: Dict) -> Tuple[List[str], List[List[str]]]:
    full = next((r for r in result["quality"] if r["kind"] == "full" and r.get("exit") == 0), None)
    full_auc = auc_on_test(full) if full else None
    full_bytes = memory(full, "embedding_bytes_all_ranks") if full else None
    samples = [r["metrics"]["summary"]["samples"] for r in result["quality"] if r.get("metrics", {}).get("summary")]
    common = max(set(samples), key=samples.count) if samples else None
    head = ["arm", "budget", "embedding bytes (measured)", "x smaller than full", "test AUC", "vs full",
            "test log-loss", "val AUC", "steps", "samples", "seed", "wall s", "status"]  # fmt: skip
    rows = []
    for r in result["quality"]:
        s = r.get("metrics", {}).get("summary", {})
        emb = memory(r, "embedding_bytes_all_ranks")
        auc = auc_on_test(r)
        ev = r.get("metrics", {}).get("eval", {})
        note = status(r)
        if s and common is not None and s.get("samples") != common:
            note += f"; saw {s['samples']:,} samples, the others {common:,}"
        rows.append([
            r["arm"], r["budget"], f"{emb:,}" if emb else "-",
            _f(full_bytes / emb if full_bytes and emb else None, "{:,.1f}"),
            _f(auc), _f(auc - full_auc if auc is not None and full_auc is not None else None, "{:+.4f}"),
            _f(ev.get("test", {}).get("logloss")), _f(ev.get("val", {}).get("auc")),
            str(s.get("step", "-")), f"{s['samples']:,}" if s.get("samples") else "-",
            str(result.get("seed", "-")), _f(r.get("wall_s"), "{:.0f}"), note,
        ])  # fmt: skip
    return head, rows


def systems_rows(result: Dict) -> Tuple[List[str], List[List[str]]]:
    head = ["arm", "processes", "train samples/s", "param bytes / rank (max)", "optimiser state bytes / rank (max)",
            "peak RSS / process (max)", "ROBE all-reduce MB/step/rank", "dense all-reduce MB/step/rank",
            "all-to-all MB/step/rank (mean [max])", "sharding plan", "status"]  # fmt: skip
    rows = []
    for r in first_repeats(result):
        b = per_step_bytes(r)
        a2a = "-"
        if b and r["processes"] > 1:
            v = b["alltoall_bytes"]
            a2a = f"{_mb(sum(v) / len(v))} [{_mb(max(v))}]"
        rows.append([
            _label(r), str(r["processes"]), _rates_text(rates(result, _label(r), r["processes"])),
            _f(memory(r, "param_bytes_max_rank"), "{:,}"), _f(memory(r, "optimizer_state_bytes_max_rank"), "{:,}"),
            _f(peak_rss(r), "{:,}"),
            _mb(b["robe_allreduce_bytes"][0]) if b and r["processes"] > 1 else "-",
            _mb(b["dense_allreduce_bytes"][0]) if b and r["processes"] > 1 else "-",
            a2a, ", ".join(f"{n} {k}" for k, n in (memory(r, "sharding") or {}).items()) or "-", status(r),
        ])  # fmt: skip
    return head, rows


def first_repeats(result: Dict) -> List[Dict]:
    """The systems records of the first repeat (bytes, memory and plan are the same in every repeat)."""
    return [r for r in result["systems"] if r.get("repeat", 0) == 0]


def rates(result: Dict, label: str, processes: int) -> List[float]:
    """Training samples/s of every successful repeat of (arm, processes)."""
    return [x for r in result["systems"] if _label(r) == label and r["processes"] == processes
            and r.get("exit") == 0 and (x := train_rate(r)) is not None]  # fmt: skip


def _rates_text(xs: List[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:,.0f}"
    return f"{statistics.median(xs):,.0f} [{min(xs):,.0f}, {max(xs):,.0f}]"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Traffic projection from the measured bytes


def traffic_model(result: Dict) -> Dict[str, Dict[str, float]]:
    """Per arm (measured on W_m > 1 ranks at local batch b_m): all-reduce payload per step P
    (robe + dense, independent of W and b) and all-to-all bytes per sample s, normalised by the
    share ``(W_m - 1) / W_m`` of a rank's samples whose tables live elsewhere, so that on W ranks
    at local batch b a rank sends ``2 (W-1)/W P + (W-1)/W s b`` (ring all-reduce; even table-wise
    sharding). Inputs are the measured per-rank means."""
    out = {}
    for r in first_repeats(result):
        b = per_step_bytes(r)
        w = r["processes"]
        if not b or w < 2 or r.get("exit") != 0:
            continue
        mean = {k: sum(v) / len(v) for k, v in b.items()}
        start = r["metrics"].get("start", {})
        local_batch = _global_batch(r) / w
        sharded = sum(n for k, n in (r["metrics"].get("memory", {}).get("sharding") or {}).items()
                      if not k.startswith("data_parallel"))  # fmt: skip
        out[_label(r)] = {
            "sharded_tables": sharded,
            "allreduce_payload": mean["robe_allreduce_bytes"] + mean["dense_allreduce_bytes"],
            "robe_payload": mean["robe_allreduce_bytes"],
            "alltoall_per_sample": mean["alltoall_bytes"] / ((w - 1) / w) / local_batch,
            "measured_ranks": w, "measured_local_batch": local_batch, "steps": start.get("total_steps"),
        }  # fmt: skip
    return out


def _global_batch(r: Dict) -> float:
    s = r["metrics"]["summary"]
    return s["samples"] / s["step"]


def projected_bytes(m: Dict[str, float], ranks: int, local_batch: float) -> float:
    f = (ranks - 1) / ranks
    return 2 * f * m["allreduce_payload"] + f * m["alltoall_per_sample"] * local_batch


def s_model(m: Dict[str, float], result: Dict) -> Optional[float]:
    """The byte model's all-to-all bytes per sample: T sharded tables x (8 p + 4 + 8 d), one-hot."""
    if result.get("multi_hot", True):
        return None  # p unknown here
    return m["sharded_tables"] * (8 + 4 + 8 * result["dim"])


def _full_model(model: Dict[str, Dict[str, float]]) -> Optional[Dict[str, float]]:
    return next((v for k, v in model.items() if k == "full"), None)


def crossover_batch(arm: Dict[str, float], full: Dict[str, float]) -> Optional[float]:
    """Local batch above which ``arm`` sends fewer bytes per step than ``full``."""
    ds = full["alltoall_per_sample"] - arm["alltoall_per_sample"]
    dp = 2 * (arm["allreduce_payload"] - full["allreduce_payload"])
    if ds <= 0:
        return None if dp > 0 else 0.0
    return max(dp / ds, 0.0)


# ---------------------------------------------------------------------------------------------
# Plots


def plots(result: Dict, out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ok = [r for r in result["quality"] if r.get("exit") == 0 and auc_on_test(r) is not None]
    # 1. AUC against memory
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    arms: Dict[str, List[Tuple[int, float]]] = {}
    kinds = {}
    for r in ok:
        emb = memory(r, "embedding_bytes_all_ranks")
        if emb:
            arms.setdefault(r["arm"], []).append((emb, auc_on_test(r)))
            kinds[r["arm"]] = r["kind"]
    for arm, pts in arms.items():
        pts.sort()
        style = dict(marker="*", markersize=14, linestyle="none") if kinds[arm] == "full" else dict(marker="o")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=arm, **style)
    planted = next((r["metrics"]["summary"].get("planted_test_auc") for r in ok if r["metrics"].get("summary")), None)
    if planted:
        ax.axhline(planted, color="grey", linestyle="--", label="planted model (best reachable)")
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (measured, all ranks)")
    ax.set_ylabel("test AUC")
    ax.set_title("Quality against memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "auc_vs_memory.png")

    sys_ok = [r for r in first_repeats(result) if r.get("exit") == 0]
    labels = list(dict.fromkeys(_label(r) for r in sys_ok))
    procs = sorted({r["processes"] for r in sys_ok})
    if labels:
        # 2. throughput bars
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        width = 0.8 / max(1, len(procs))
        for j, p in enumerate(procs):
            per = [rates(result, lab, p) for lab in labels]
            mid = [statistics.median(x) if x else 0 for x in per]
            err = [[m - min(x) if x else 0 for m, x in zip(mid, per)], [max(x) - m if x else 0 for m, x in zip(mid, per)]]
            ax.bar([i + j * width for i in range(len(labels))], mid, width, yerr=err, capsize=3, label=f"{p} process(es)")
        ax.set_xticks([i + width * (len(procs) - 1) / 2 for i in range(len(labels))], labels, rotation=20, fontsize=8)
        ax.set_ylabel("training samples/s")
        ax.set_title("Training throughput" + (" (median, range of the repeats)" if result.get("systems_repeats", 1) > 1 else ""))
        ax.legend(fontsize=8)
        save(fig, "throughput.png")
        # 3. bytes per step per rank
        multi = [r for r in sys_ok if r["processes"] > 1 and per_step_bytes(r)]
        if multi:
            fig, ax = plt.subplots(figsize=(7.5, 4.2))
            names = [f"{_label(r)} ({r['processes']}p)" for r in multi]
            bottom = [0.0] * len(multi)
            for key, lab in (("robe_allreduce_bytes", "ROBE array all-reduce"), ("dense_allreduce_bytes", "dense all-reduce"),
                             ("alltoall_bytes", "all-to-all (sharded tables)")):  # fmt: skip
                vals = [sum(per_step_bytes(r)[key]) / r["processes"] / 1e6 for r in multi]
                ax.bar(names, vals, bottom=bottom, label=lab)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_ylabel("MB sent per step per rank (mean)")
            ax.set_title("Communication per training step (counted where sent)")
            ax.tick_params(axis="x", rotation=20, labelsize=8)
            ax.legend(fontsize=8)
            save(fig, "bytes_per_step.png")
    # 4. loss curves of the quality runs at the systems budget
    sb = result.get("systems_budget")
    curves = [r for r in ok if r["kind"] == "full" or r["budget"] == sb] if sb else ok
    if curves:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for r in curves:
            tr = r["metrics"]["train"]
            ax.plot([t["samples"] for t in tr], [t["loss"] for t in tr], label=_label(r))
        ax.set_xlabel("training samples")
        ax.set_ylabel("training loss (mean over the log interval)")
        ax.set_title("Training loss")
        ax.legend(fontsize=8)
        save(fig, "loss_curves.png")
    # 5. traffic projection: against the number of ranks, and against the local batch
    model = traffic_model(result)
    if model:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
        colors = {lab: f"C{i}" for i, lab in enumerate(model)}
        b = next(iter(model.values()))["measured_local_batch"]
        for (bw_name, bw), style in zip(BANDWIDTHS_GBPS.items(), ("-", "--")):
            for lab, m in model.items():
                ms = [1e3 * projected_bytes(m, w, b) / bw for w in PROJECTION_RANKS]
                ax1.plot(PROJECTION_RANKS, ms, style, color=colors[lab], marker="o", markersize=3, label=f"{lab}, {bw_name}")
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")
        ax1.set_xlabel("GPUs (ranks)")
        ax1.set_ylabel("communication time per step (ms)")
        ax1.set_title(f"local batch {b:,.0f} (as measured)", fontsize=10)
        ax1.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=6)
        w = PROJECTION_W
        batches = [2**k for k in range(4, 17)]
        for lab, m in model.items():
            ax2.plot(batches, [projected_bytes(m, w, x) / 1e6 for x in batches], color=colors[lab], label=lab)
        full = _full_model(model)
        for lab, m in model.items():
            x = crossover_batch(m, full) if full is not None and m is not full else None
            if x:
                ax2.axvline(x, color=colors[lab], linestyle=":", alpha=0.7)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("local batch per rank")
        ax2.set_ylabel(f"MB sent per rank per step, {w} ranks")
        ax2.set_title("dotted: crossover with the full tables", fontsize=10)
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
        fig.suptitle("Communication projected from the bytes measured on 2 ranks")
        save(fig, "traffic_projection.png")
    return written


# ---------------------------------------------------------------------------------------------
# The report


def write_report(result: Dict[str, Any], out_dir: Path, publish: Optional[Path] = None) -> Path:
    """Writes ``out_dir/report.md`` and the plots; returns the report's path. ``publish``: also
    write the report there (e.g. docs/results.md) with its plots in ``<publish stem>/``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    m = result.get("machine", {})
    lines = [
        "# robe-compare report",
        "",
        f"Command: `robe-compare --config {result.get('config')} --run-dir {out_dir}"
        + (f" --arms {' '.join(result['cli_arms'])}" if result.get("cli_arms") else "")
        + (f" --budgets {' '.join(result['cli_budgets'])}" if result.get("cli_budgets") else "")
        + "".join(f" --set {o}" for o in result.get("cli_overrides") or []) + "`",
        f"Date: {result.get('date')}; machine: {m.get('platform')}, {m.get('cpus')} CPUs"
        + (f", {m['gpu']}" if m.get("gpu") else "") + f"; torch {m.get('torch')}, torchrec {m.get('torchrec')}.",
        f"Training config: `{result.get('train_config')}` with {result.get('overrides')}; seed {result.get('seed')}; "
        f"full tables: {result.get('full_floats', 0):,} floats (dim {result.get('dim')}). Wall time of all runs: "
        f"{result.get('wall_s', '-')} s.",
        "",
        "Every figure below is read from the runs' `metrics.jsonl` (collected in `compare.json`).",
        "",
        "Arms: " + "; ".join(f"**{k}**: {v}" for k, v in KIND_TEXT.items() if any(r["kind"] == k for r in result["quality"])) + ".",
        "",
        f"## Quality at equal memory ({result.get('quality_processes', 1)} process(es) each, same data, seed and samples)",
        "",
        "![AUC against memory](auc_vs_memory.png)",
        "",
        table(*quality_rows(result)),
        "",
    ]
    if result.get("systems"):
        lines += [
            f"## Systems: the arms at {result.get('systems_budget')} and the full tables, "
            f"{result.get('systems_steps')} timed steps each"
            + (f", {result['systems_repeats']} rounds (samples/s: median [min, max])" if result.get("systems_repeats", 1) > 1 else ""),
            "",
            "Bytes sent are counted on every rank where they are sent: all-to-alls by wrapping "
            "`torch.distributed`'s collectives (TorchRec's input and output dists), the ROBE array's "
            "all-reduce by robe_dist's sharded module, the dense all-reduce by a DDP communication hook. "
            "All-reduce columns are the payload handed to the collective (a ring all-reduce then sends "
            "2 (W-1)/W of it); all-to-all columns are what the rank addressed to the other ranks.",
            "",
            "![throughput](throughput.png) ![bytes per step](bytes_per_step.png)",
            "",
            table(*systems_rows(result)),
            "",
        ]
        if result.get("not_timed"):
            lines += ["Not timed (their quality runs failed): " + ", ".join(result["not_timed"]) + ".", ""]
        evals = [(_label(r), eval_rate(r)) for r in result["quality"] if eval_rate(r)]
        if evals:
            lines += ["Evaluation samples/s (1 process, the test split): "
                      + ", ".join(f"{a} {v:,.0f}" for a, v in evals) + ".", ""]  # fmt: skip
        model = traffic_model(result)
        if model:
            full = _full_model(model)
            lines += ["## Traffic projection", "", "![traffic projection](traffic_projection.png)", "",
                      "From the bytes measured per rank on 2 ranks: a rank sends 2 (W-1)/W P + (W-1)/W s b per step "
                      "(P: all-reduce payload, s: all-to-all bytes per sample of the local batch b, normalised by "
                      "the share (W-1)/W of samples whose tables live on other ranks).", "",
                      table(["arm", "P (MB)", "s (bytes/sample)", "s, byte model", "local batch b", "crossover b* vs full tables"],
                            [[k, _mb(v["allreduce_payload"]), f"{v['alltoall_per_sample']:,.1f}",
                              _f(s_model(v, result), "{:,.1f}"),
                              f"{v['measured_local_batch']:,.0f}",
                              ("-" if full is None or v is full else _f(crossover_batch(v, full), "{:,.0f}"))]
                             for k, v in model.items()]), "",
                      "b*: the local batch above which the arm sends fewer bytes per step than the sharded full "
                      "tables (0: always; -: never). The byte model (docs/distributed.md): s = T (8 p + 4 + 8 d) "
                      "for T sharded tables, one-hot (p = 1) int64 ids, their lengths, the pooled fp32 "
                      "embedding forward and its gradient backward.",
                      ""]  # fmt: skip
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Runs", ""]
    for r in result["quality"] + result["systems"]:
        if r.get("run_dir"):
            lines.append(f"- `{r['id']}` ({r.get('processes', 1)} process(es)): `{r['run_dir']}`, overrides `{r['overrides']}`")
    text = "\n".join(lines) + "\n"
    # (after the tables: a compare.json they cannot read stops the report before any notice)
    try:
        plots(result, out_dir)
    except ImportError as e:  # matplotlib is an extra (launch/setup.sh installs it)
        print(f"robe-compare: no plots ({e}; pip install matplotlib); report.md has the tables", file=sys.stderr)
    path = out_dir / "report.md"
    _write_atomic(path, text)
    if publish is not None:
        images = publish.parent / publish.stem
        images.mkdir(parents=True, exist_ok=True)
        for png in out_dir.glob("*.png"):
            shutil.copyfile(png, images / png.name)
        _write_atomic(publish, re.sub(r"\]\(([a-z_]+\.png)\)", rf"]({publish.stem}/\1)", text))
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
