"""metrics.jsonl stays one JSON object per line when a write fails (a full disk, a file size limit)."""

import json
import resource

import pytest
import torch

from robe_dist.trainer.env import DistEnv
from robe_dist.trainer.metrics_log import MetricsError, MetricsLog

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def lines(path):
    return [json.loads(line)["kind"] for line in path.read_text().splitlines()]


def test_a_write_that_fails_leaves_no_half_record_and_names_the_file(tmp_path):
    log = MetricsLog(tmp_path, ENV, total_steps=10, start_step=0, progress_bar=False)
    log.write("start", step=0)
    size = (tmp_path / "metrics.jsonl").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, hard))  # room for part of the next record only
    try:
        with pytest.raises(MetricsError, match=r"metrics.jsonl: cannot be written \(File too large\); the run stops"):
            log.write("train", step=5, loss=0.5, note="x" * 100)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "metrics.jsonl").stat().st_size == size  # (it used to end in half a record)
    log.write("train", step=10)
    log.close()
    assert lines(tmp_path / "metrics.jsonl") == ["start", "train"]


def test_a_half_record_left_by_an_earlier_run_is_cut_off_when_the_log_is_opened(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start"}\n{"kind": "train", "step": 5, "lo')
    log = MetricsLog(tmp_path, ENV, total_steps=10, start_step=5, progress_bar=False)
    log.write("start", step=5)
    log.close()
    assert lines(tmp_path / "metrics.jsonl") == ["start", "start"]


def test_a_metrics_file_that_cannot_be_opened_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(MetricsError, match=r"metrics.jsonl: cannot be opened for writing \(Is a directory\)"):
        MetricsLog(tmp_path, ENV, total_steps=10, start_step=0, progress_bar=False)


def test_a_metrics_file_deleted_while_the_run_lives_is_written_again(tmp_path):
    """Records went on into the unlinked file and were lost without a word."""
    log = MetricsLog(tmp_path, ENV, total_steps=10, start_step=0, progress_bar=False)
    log.write("start", step=0)
    (tmp_path / "metrics.jsonl").unlink()
    log.write("train", step=5)
    assert lines(tmp_path / "metrics.jsonl") == ["train"]
    (tmp_path / "metrics.jsonl").unlink()
    tmp_path.rename(tmp_path.with_name(tmp_path.name + "_moved"))  # the run dir itself gone
    with pytest.raises(MetricsError, match=r"--run-dir .* was deleted or moved while the run was going, with its config.yaml "
                                           r"and metrics.jsonl; the run stops"):  # fmt: skip
        log.write("train", step=10)


def test_a_run_dir_deleted_and_made_again_is_not_written_as_if_nothing_happened(tmp_path):
    """A checkpoint saved after the run dir was deleted makes it again (checkpoints/); the
    metrics used to go on in it with config.yaml and the earlier records silently gone."""
    run = tmp_path / "run"
    run.mkdir()
    log = MetricsLog(run, ENV, total_steps=10, start_step=0, progress_bar=False)
    log.write("start", step=0)
    (run / "metrics.jsonl").unlink()
    run.rmdir()
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(MetricsError, match=r"--run-dir .*run was replaced while the run was going"):
        log.write("checkpoint", step=5)
    assert not (run / "metrics.jsonl").exists()
    log.close()
