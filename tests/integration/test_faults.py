"""Faults: SIGTERM (Slurm preemption), Ctrl-C and kill -9 in the middle of a real training run.

A stopped run must leave a checkpoint from which ``--resume`` reaches the weights of an
uninterrupted run, bit for bit on the same number of processes.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import REPO, SMALL, checkpoint_tensors, ok, records, train

LONG = ["train.max_steps=200", "train.epochs=3", "train.log_every_steps=5", "checkpoint.every_steps=50",
        "eval.at_end=false", "logging.progress_bar=false"]  # fmt: skip


def start(run_dir: Path, data_dir: Path, *overrides: str, nproc: int = 1, resume: bool = False) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "robe_dist.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "robe_dist.train"]
    args = ["--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    for o in [*SMALL, f"data.path={data_dir}", *LONG, *overrides]:
        args += ["--set", o]
    return subprocess.Popen(launcher + args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has logged a train record (it is past start-up, in the training loop)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before training: {proc.communicate()[1][-3000:]}")
        if metrics.is_file() and any(json.loads(line)["kind"] == "train" for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError("the run did not start training in time")


def final_weights(run_dir: Path, step: int, tmp_path: Path) -> dict:
    return checkpoint_tensors(run_dir / "checkpoints" / f"step_{step:08d}", tmp_path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults") / "synthetic"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run (1 process)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    ok(train(run, data_dir, *LONG))
    return run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, data_dir, reference, sig):
    run = tmp_path / "run"
    proc = start(run, data_dir)
    wait_for_training(run, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, err[-3000:]
    (stopped,) = records(run, "interrupted")
    step = stopped["step"]
    line = f"robe-train: interrupted by {sig.name} at step {step}; checkpoint {run / 'checkpoints' / f'step_{step:08d}'}; rerun with --resume"
    assert line in err.splitlines()
    assert "Traceback" not in err
    assert (run / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").is_file()
    assert step < 200
    if sig == signal.SIGTERM:
        return  # its resume is checked on 2 ranks (test_sigterm_to_torchrun_...); the code path is the same
    ok(train(run, data_dir, *LONG, resume=True))
    a, b = final_weights(reference, 200, tmp_path), final_weights(run, 200, tmp_path)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.integration
def test_sigterm_to_torchrun_stops_every_rank_at_one_step(tmp_path, data_dir, reference):
    """torchrun forwards SIGTERM to its workers; they agree on a step (checked every 10), save one
    checkpoint and stop; the resumed run ends where the uninterrupted run does (the 1-process
    reference, up to float summation order; bit-for-bit resume on 2 ranks is
    test_train.py::test_full_tables_take_the_same_step_on_one_and_two_ranks_and_resume_exactly)."""
    run = tmp_path / "run"
    every_10 = ["eval.every_samples=5120", "eval.max_batches=1"]  # a validation every 10 steps of 512
    proc = start(run, data_dir, *every_10, nproc=2)
    wait_for_training(run, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (stopped,) = records(run, "interrupted")
    assert stopped["step"] % 10 == 0 and stopped["signal"] == "SIGTERM"
    assert sum("robe-train: interrupted by SIGTERM" in line for line in err.splitlines()) == 1  # rank 0 only
    ok(train(run, data_dir, *LONG, *every_10, nproc=2, resume=True))
    # the stop came at a step whose validation was due: the resumed run ran it first, so no
    # validation (nor a train.target_auc stop) is lost to the signal
    assert [r["step"] for r in records(run, "eval")] == list(range(10, 201, 10))
    a, b = final_weights(reference, 200, tmp_path), final_weights(run, 200, tmp_path)
    assert a.keys() == b.keys()
    far = [k for k in a if a[k].is_floating_point() and not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6)]
    assert not far, f"resumed on 2 ranks after SIGTERM, the weights differ from the uninterrupted run's in {far}"


def test_kill_9_at_random_instants_then_resume_gives_the_same_weights(tmp_path, data_dir, reference):
    """SIGKILL at seeded random moments, checkpoints every 5 steps (so some kills land while one is
    being written), resume each time: the final weights equal the uninterrupted run's."""
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(6):
        proc = start(run, data_dir, "checkpoint.every_steps=5", resume=attempt > 0)
        wait_for_training(run, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:  # finished before the kill
            break
        proc.kill()
        proc.communicate(timeout=60)
        kills += 1
    ok(train(run, data_dir, *LONG, "checkpoint.every_steps=5", resume=True))
    assert kills >= 2
    a, b = final_weights(reference, 200, tmp_path), final_weights(run, 200, tmp_path)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


TEARDOWN_PROBE = """
import os, sys
from pathlib import Path
from robe_dist.train import main
code = main(sys.argv[1:-1])
names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
Path(sys.argv[-1]).joinpath(f"threads_{os.environ['RANK']}.txt").write_text(repr(sorted(n for n in names if "gloo" in n)))
sys.exit(code)
"""


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list threads")
def test_process_group_and_gloo_threads_end_inside_main(tmp_path, data_dir):
    """After a 2-rank run with sharded tables and a ROBE array, main() has destroyed the process
    group: no gloo thread is left for interpreter finalisation (where rank 1 used to abort now and
    then), and the ranks exit normally (no os._exit)."""
    probe = tmp_path / "probe.py"
    probe.write_text(TEARDOWN_PROBE)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for o in [*SMALL, f"data.path={data_dir}", "robe.features=[cat_0, cat_1]", "optim.name=adagrad", "optim.lr=0.05",
              "train.max_steps=20", "eval.at_end=false"]:  # fmt: skip
        args += ["--set", o]
    p = subprocess.run(args + [str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    assert [(tmp_path / f"threads_{r}.txt").read_text() for r in (0, 1)] == ["[]", "[]"]


BUG_ON_RANK_1 = """
import sys
from robe_dist import train

KIND = sys.argv.pop(1)
train.SHUTDOWN_WAIT_S = 3.0  # (60 s in a real run)
log_train = train.Trainer.log_train


def log_train_with_a_bug(self, *args, **kwargs):
    if self.env.rank == 1:
        if KIND == "bug":
            raise RuntimeError("a bug met by rank 1 alone")
        raise train.DataError("a data error met by rank 1 alone")
    return log_train(self, *args, **kwargs)


train.Trainer.log_train = log_train_with_a_bug
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["bug", "handled_error"])
def test_an_error_on_one_rank_ends_the_job_at_once(tmp_path, data_dir, kind):
    """An error that only rank 1 meets, while rank 0 waits in the next collective.

    A bug (or out of memory): rank 1 must not wait for the others in a barrier no one else will
    reach (the job hung until the collective timeout, with the error unprinted); it leaves, its
    traceback is printed, and torchrun stops rank 0, whose collective fails as its peer is gone.
    An error of the kinds every rank is expected to meet together (data, config, checkpoint),
    which rank 0 says for all, met by rank 1 alone after all: rank 1 waits for the others a
    bounded time (``SHUTDOWN_WAIT_S``), then says the error itself and leaves with its status."""
    script = tmp_path / "bug.py"
    script.write_text(BUG_ON_RANK_1)
    args = [sys.executable, "-m", "robe_dist.torchrun", "--standalone", "--nproc_per_node=2", str(script), kind,
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for o in [*SMALL, f"data.path={data_dir}", *LONG]:
        args += ["--set", o]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        _, err = proc.communicate(timeout=120)  # it used to hang for gloo's 30-minute timeout
    finally:
        proc.kill()
    if kind == "bug":
        assert proc.returncode == 1
        assert "RuntimeError: a bug met by rank 1 alone" in err
        assert "torchrun: workers failed (" in err and "rank 1 status 1" in err
    else:
        assert proc.returncode == 2
        assert ("robe-train: rank 1: a data error met by rank 1 alone (the other ranks did not stop with it "
                "within 3 s; ending the job)") in err  # fmt: skip
        assert "workers failed" not in err  # rank 1 said why; rank 0 (status 4) is a consequence
    # rank 0's collective failed, as its peer had gone: one line, not a traceback of its own
    assert "robe-train: rank 0: a collective failed because another rank stopped" in err
    assert err.count("Traceback") == (kind == "bug")


SIGTERM_IN_AN_EVALUATION_ON_THE_LAST_RANK = """
import os, signal, sys
from robe_dist import train

run_eval = train.Trainer.run_eval
SPLIT, FINAL = sys.argv.pop(1), sys.argv.pop(1) == "final"


def run_eval_preempted(self, split, final=False):
    if (split, final) == (SPLIT, FINAL) and self.env.rank == self.env.world_size - 1:
        os.kill(os.getpid(), signal.SIGTERM)  # (Slurm's preemption, reaching the last rank first)
    return run_eval(self, split, final)


train.Trainer.run_eval = run_eval_preempted
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.integration
@pytest.mark.parametrize("when", ["final", "during_training"])
def test_sigterm_during_an_evaluation_stops_it_and_resume_runs_it(tmp_path, data_dir, when):
    """The final evaluation of CriteoTB's splits takes minutes, longer than Slurm's grace period: a
    SIGTERM there (on one rank) stops it on every rank at the same batch, with the trained model
    in a checkpoint and the usual one line; the resumed run trains no step and evaluates. A
    validation during training cut short stays due: the resumed run runs it first."""
    script, run = tmp_path / "preempted.py", tmp_path / "run"
    script.write_text(SIGTERM_IN_AN_EVALUATION_ON_THE_LAST_RANK)
    split, step, what = ("test", 20, "final evaluation") if when == "final" else ("val", 10, "evaluation")
    overrides = ["train.max_steps=20", "eval.every_samples=5120", "logging.progress_bar=false"]  # validations at 10, 20
    nproc = 2 if when == "final" else 1  # (the ranks' agreement is the final case's; one process is quicker)
    args = [sys.executable, "-m", "robe_dist.torchrun", "--standalone", f"--nproc_per_node={nproc}", str(script), split, when]
    for o in [*SMALL, f"data.path={data_dir}", *overrides]:
        args += ["--set", o]
    proc = subprocess.run(args + ["--run-dir", str(run)], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    checkpoint = run / "checkpoints" / f"step_{step:08d}"
    line = (f"robe-train: interrupted by SIGTERM during the {what} of the {split} split at step {step}; "
            f"checkpoint {checkpoint}; rerun with --resume")  # fmt: skip
    assert proc.returncode == 128 + signal.SIGTERM.value, proc.stderr[-4000:]
    assert [x for x in proc.stderr.splitlines() if "interrupted" in x] == [line]
    assert "Traceback" not in proc.stderr
    assert [(r["step"], r["signal"]) for r in records(run, "interrupted")] == [(step, "SIGTERM")]
    evals = [(r["split"], r["step"]) for r in records(run, "eval")]
    assert evals == ([("val", 10), ("val", 20)] if when == "final" else []) and not records(run, "summary")

    ok(train(run, data_dir, *overrides, nproc=nproc, resume=True))
    assert [r["step"] for r in records(run, "start")] == [0, step] and records(run, "train")[-1]["step"] == 20
    resumed = records(run, "eval")[len(evals):]
    assert [(r["split"], r["step"]) for r in resumed] == [("val", 10)] * (when != "final") + [("val", 20), ("test", 20)]
    if when == "final":  # the same weights, evaluated again
        assert (resumed[0]["auc"], resumed[0]["logloss"]) == (records(run, "eval")[1]["auc"], records(run, "eval")[1]["logloss"])
    (summary,) = records(run, "summary")
    assert summary["test_auc"] == resumed[-1]["auc"] and summary["step"] == 20


SIGTERM_WHILE_MAKING_DATA = """
import os, signal, sys
from robe_dist import train

prepare_data = train.prepare_data


def prepare_data_preempted(cfg, env):
    os.kill(os.getpid(), signal.SIGTERM)  # while the data is made, before the model exists
    return prepare_data(cfg, env)


train.prepare_data = prepare_data_preempted
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_during_start_up_finishes_the_data_and_stops_in_one_line(tmp_path, data_dir):
    """Start-up (making the synthetic data, building the model) can take minutes: a signal there
    is kept until it ends (the data is complete for the next run), then the run stops before any
    step, with one line and 128 + signal, leaving the run dir without config or checkpoint."""
    script, run = tmp_path / "preempted.py", tmp_path / "run"
    script.write_text(SIGTERM_WHILE_MAKING_DATA)
    args = [sys.executable, str(script), "--run-dir", str(run)]
    for o in [*SMALL, f"data.path={data_dir}", *LONG]:
        args += ["--set", o]
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 128 + signal.SIGTERM.value, p.stderr[-3000:]
    line = "robe-train: interrupted by SIGTERM during start-up, before any step; nothing to save: rerun the same command"
    assert [x for x in p.stderr.splitlines() if "interrupted" in x] == [line] and "Traceback" not in p.stderr
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
    assert not list((run / "checkpoints").glob("step_*"))
    assert json.loads((data_dir / "manifest.json").read_text())["complete"]


@pytest.mark.integration
@pytest.mark.parametrize("entry", ["python -m robe_dist.train", "robe-train"])
def test_sigterm_while_torch_is_imported_ends_in_one_line(tmp_path, entry):
    """The first second, before the trainer's handler exists (torch and TorchRec are being
    imported): exit 128 + SIGTERM with one line, not a silent death by the signal."""
    cmd = [sys.executable, "-m", "robe_dist.train"] if entry.startswith("python") else [str(Path(sys.executable).parent / "robe-train")]
    proc = subprocess.Popen(cmd + ["--run-dir", str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM.value, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robe-train: interrupted by SIGTERM"), err[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_checkpoint_cut_short_by_a_file_size_limit_says_why_and_resume_continues(tmp_path, data_dir, reference):
    """A full disk or ``ulimit -f`` in the middle of a shard: torch's zip writer reports only
    "unexpected pos"; the one line also names the limit. The last complete checkpoint stays, and
    a resume without the limit reaches the uninterrupted run's weights."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "robe_dist.train", "--run-dir", str(run)]
    for o in [*SMALL, f"data.path={data_dir}", *LONG]:
        args += ["--set", o]
    limited = subprocess.run(["bash", "-c", 'ulimit -f 1000; exec "$@"', "-", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert limited.returncode == 2, limited.stderr[-3000:]
    (line,) = [line for line in limited.stderr.splitlines() if line.startswith("robe-train:") or "robe-train:" in line]
    assert "writing checkpoint" in line and ("file size limit of 1,024,000 bytes" in line or "File too large" in line), line
    assert line.endswith("no complete checkpoint was written before it"), line  # (the first save, at step 50)
    assert "Traceback" not in limited.stderr
    ok(train(run, data_dir, *LONG, resume=True))
    a, b = final_weights(reference, 200, tmp_path), final_weights(run, 200, tmp_path)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.integration
def test_metrics_that_cannot_be_written_on_2_ranks_end_the_job_in_rank_0s_line(tmp_path, data_dir, reference):
    """Only rank 0 writes metrics.jsonl: when it cannot (a full disk, here ``ulimit -f``), rank 0
    says so and leaves at once; rank 1's collective fails (one line, status 4); the launcher
    exits with rank 0's 2 (torchrun stopping rank 0 as it leaves must not turn it into -15)."""
    args = [sys.executable, "-m", "robe_dist.torchrun", "--standalone", "--nproc_per_node=2", "-m", "robe_dist.train",
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for o in [*SMALL, f"data.path={data_dir}", *LONG, "train.log_every_steps=1", "checkpoint.every_steps=null",
              "checkpoint.at_end=false"]:  # fmt: skip
        args += ["--set", o]
    p = subprocess.run(["bash", "-c", 'ulimit -f 12; exec "$@"', "-", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=180, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 2, p.stderr[-3000:]
    said = [line for line in p.stderr.splitlines() if "robe-train:" in line or "torchrun:" in line]
    assert len(said) == 2 and "metrics.jsonl: cannot be written (File too large)" in said[0], said
    assert said[1].startswith("robe-train: rank 1: a collective failed because another rank stopped"), said
    assert "Traceback" not in p.stderr
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line whole
