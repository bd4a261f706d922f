"""The robe-data command line: subcommands end to end, output, exit codes."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robe_dist.data.cli import main

from sample_data import MISSING, SAMPLE  # noqa: E402
REPO = Path(__file__).resolve().parents[2]


def test_synth_info_vocab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--rows", "3000", "--out", str(tmp_path / "s"), "--days", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "planted (best achievable) AUC 0." in out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 2 and manifest["rows"] == 3000
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "3,000 rows in 3 files" in out and "train 2,000, val 500, test 500" in out and "planted" in out
    assert main(["vocab", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "v"), "--min-count", "2"]) == 0
    assert "table sizes [" in capsys.readouterr().out
    sizes = json.loads((tmp_path / "v" / "cardinalities.json").read_text())["table_sizes"]
    assert len(sizes) == 26 and np.load(tmp_path / "v" / "day_0_sparse.npy").max() < max(sizes)
    assert main(["info", "--json", str(tmp_path / "v")]) == 0
    assert json.loads(capsys.readouterr().out)["table_sizes"] == sizes
    # the vocabulary's most frequent ids are its indices; values below --min-count (index 0) have none
    with np.load(tmp_path / "v" / "table_top_ids.npz") as top:
        assert all(top[k].min() >= 1 for k in top.files if k.endswith(".ids") and len(top[k]))
    # robe-data plan: whole tables by default, exact rows for hot ids with --hot-rows
    for flags, has_hot in (([], False), (["--hot-rows"], True)):
        assert main(["plan", "--data", str(tmp_path / "v"), "--budget", "10x", "--json", *flags]) == 0
        assert bool(json.loads(capsys.readouterr().out)["hot_rows"]) == has_hot


def test_ingest_reports_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a0b0c0d"] * 26)
    (tmp_path / "day_0").write_text("\n".join([good, good + "\textra", "x" + good[1:], good]))
    args = ["ingest", "--input", str(tmp_path / "day_0"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 2  # more bad lines than --max-bad-fraction (0.01): refused
    assert "lines are bad" in capsys.readouterr().err
    assert main(args + ["--max-bad-fraction", "1"]) == 0
    out = capsys.readouterr().out
    assert "day_0: 2 rows, 2 bad rows skipped (bad: too_many_fields 1, bad_label 1; last line had no newline)" in out
    assert "ingested 2 rows" in out and "2 bad rows skipped" in out


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=MISSING)
def test_ingest_real_sample_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", "-i", str(SAMPLE), "-o", str(tmp_path), "--workers", "1", "--no-progress"]) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert [(f["name"], f["rows"], f["format"]) for f in m["files"]] == [
        ("deepctr_sample_200", 200, "csv"),
        ("kaggle_train_head_1000", 1000, "tsv"),
    ]
    assert "padded 498 short lines" in capsys.readouterr().out


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    path = tmp_path / "day_3"
    if make == "empty":
        path.write_bytes(b"")
    assert main(["ingest", "--input", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and ("not found" if make == "missing" else "empty") in err


def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["synth", "--out", "x"])  # --rows missing
    assert e.value.code == 2
    assert main(["info", "/nonexistent/dir"]) == 2


def test_module_entry_point(tmp_path: Path) -> None:
    """python -m robe_dist.data.cli works and exits 2 naming a missing input."""
    res = subprocess.run(
        [sys.executable, "-m", "robe_dist.data.cli", "ingest", "--input", str(tmp_path / "gone"), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and f"{tmp_path / 'gone'}: input not found" in res.stderr


def test_an_input_that_is_no_file_or_only_a_header_is_named_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/null was "input not found", a header-only CSV "empty file"."""
    assert main(["ingest", "--input", "/dev/null", "--out", str(tmp_path / "o")]) == 2
    assert "/dev/null: not a regular file" in capsys.readouterr().err
    (tmp_path / "h.csv").write_text("label,I1,I2\n")
    assert main(["ingest", "--input", str(tmp_path / "h.csv"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no valid Criteo row in 0 lines (a header line only)" in capsys.readouterr().err


def test_a_backup_named_like_a_day_is_not_taken_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """day_2.bak beside day_2 became one more day, sorted last: the test split."""
    good = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a0b0c0d"] * 26) + "\n"
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("day_0", "day_1.gz", "day_2.tsv", "day_2.tsv.bak"):
        (raw / name).write_bytes(gzip.compress(good.encode()) if name.endswith(".gz") else good.encode())
    assert main(["ingest", "--input", str(raw), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "day_2.tsv.bak: named day_* but not day_N[.tsv|.csv|.txt][.gz]" in capsys.readouterr().err
    (raw / "day_2.tsv.bak").unlink()
    assert main(["ingest", "--input", str(raw), "--out", str(tmp_path / "o"), "--no-progress"]) == 0


def test_blank_lines_are_skipped_without_counting_against_the_bad_fraction(tmp_path: Path, capsys) -> None:
    """A small file ending in a few empty lines was refused (3 of 53 lines bad, over 0.01)."""
    good = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a0b0c0d"] * 26) + "\n"
    raw = tmp_path / "day_0"
    raw.write_text(good * 50 + "\n\n\n")
    assert main(["ingest", "--input", str(raw), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    entry = json.loads((tmp_path / "o" / "manifest.json").read_text())["files"][0]
    assert (entry["rows"], entry["bad_rows"], entry["bad_reasons"]) == (50, 3, {"blank_line": 3})
    raw.write_text(good * 50 + "x\n")  # a damaged line still counts
    assert main(["ingest", "--input", str(raw), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "1 of 51 lines are bad" in capsys.readouterr().err
