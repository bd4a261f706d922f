"""Bad input to robe-data and the dataset reader: one-line errors naming the file or option (exit
2, ``DataError``), and a failed command leaves an existing dataset as it was."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from robe_dist.data.cli import main
from robe_dist.data.ingest import ingest
from robe_dist.data.layout import DataError, read_manifest
from robe_dist.data.synthetic import generate
from robe_dist.data.vocab import build_vocab

GOOD_LINE = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a0b0c0d"] * 26) + "\n"


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, asserted to be one ``robe-data: error:`` line."""
    err = capsys.readouterr().err
    assert err.startswith("robe-data: error: ") and err.count("\n") == 1, err
    return err


def npy_dataset(directory: Path, days: int = 2, rows: int = 4, **dtypes: type) -> Path:
    """A tiny TorchRec-layout dataset (no manifest); ``dtypes`` overrides a part's dtype."""
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(days):
        arrays = {
            "dense": np.zeros((rows, 13), np.float32),
            "sparse": np.arange(rows * 26, dtype=np.int64).reshape(rows, 26) + 2**31 + 1,
            "labels": np.ones((rows, 1), np.int32),
        }
        for part, a in arrays.items():
            np.save(directory / f"day_{d}_{part}.npy", a.astype(dtypes.get(part, a.dtype)))
    return directory


def ingested(tmp_path: Path) -> tuple[Path, bytes]:
    """A complete ingested dataset (day_0, 5 rows) and its manifest's bytes."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "day_0").write_text(GOOD_LINE * 5)
    out = tmp_path / "good"
    assert main(["ingest", "-i", str(tmp_path / "raw" / "day_0"), "-o", str(out), "--no-progress"]) == 0
    return out, (out / "manifest.json").read_bytes()


# ------------------------------------------------------------------ 1. failed ingest, good dataset
@pytest.mark.parametrize("bad", ["not_gzip", "truncated_gzip", "garbage_text"])
def test_failed_ingest_leaves_a_complete_dataset_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    out, before = ingested(tmp_path)
    path = tmp_path / ("fake.gz" if bad != "garbage_text" else "day_9.tsv")
    if bad == "truncated_gzip":
        data = gzip.compress((GOOD_LINE * 200).encode())
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"this is not criteo data\n" * 3)
    capsys.readouterr()
    assert main(["ingest", "--input", str(path), "--out", str(out), "--no-progress"]) == 2
    assert str(path) in error_line(capsys)
    assert (out / "manifest.json").read_bytes() == before
    m = read_manifest(out)
    assert m["complete"] and m["rows"] == 5 and not list(out.glob("fake*")) and not list(out.glob("*.partial"))


def test_failed_ingest_after_a_new_unit_committed_restores_the_manifest(tmp_path: Path) -> None:
    out, before = ingested(tmp_path)
    (tmp_path / "raw" / "day_1").write_text(GOOD_LINE * 3)  # converted and committed first
    (tmp_path / "raw" / "day_2").write_text("junk\n" * 3)  # then this one fails
    with pytest.raises(DataError, match="day_2: no valid Criteo row"):
        ingest([tmp_path / "raw"], out, workers=1, progress=False, log=lambda s: None)
    assert (out / "manifest.json").read_bytes() == before
    assert read_manifest(out)["rows"] == 5
    # fixed, the same command finishes the dataset
    (tmp_path / "raw" / "day_2").write_text(GOOD_LINE * 2)
    m = ingest([tmp_path / "raw"], out, workers=1, progress=False, log=lambda s: None)
    assert m["complete"] and [f["rows"] for f in m["files"]] == [5, 3, 2]


def test_ingest_with_nothing_to_do_leaves_the_manifest_as_it_is(tmp_path: Path) -> None:
    out, before = ingested(tmp_path)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert ingest([tmp_path / "raw" / "day_0"], out, progress=False, log=lambda s: None)["complete"]
    assert (out / "manifest.json").read_bytes() == before and (out / "manifest.json").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------ 2, 3. damaged .npy and manifest
def test_truncated_npy_is_a_one_line_error_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = npy_dataset(tmp_path / "d")
    path = data / "day_0_sparse.npy"
    full = path.read_bytes()
    path.write_bytes(full[:-8])
    with pytest.raises(DataError, match=rf"day_0_sparse.npy: truncated: {len(full) - 8:,} bytes, its header needs {len(full):,}"):
        read_manifest(data)
    for args in (["info", str(data)], ["stats", "--data", str(data)]):
        assert main(args) == 2
        assert "day_0_sparse.npy: truncated" in error_line(capsys)
    path.write_bytes(full + b"\0" * 8)
    with pytest.raises(DataError, match="day_0_sparse.npy: .* trailing data"):
        read_manifest(data)
    path.write_bytes(b"not an npy file")
    with pytest.raises(DataError, match="day_0_sparse.npy: not a readable .npy file"):
        read_manifest(data)


@pytest.mark.parametrize(
    "part, dtype, expected",
    [("sparse", np.float64, "integer"), ("sparse", np.float32, "integer"), ("labels", np.float32, "integer"),
     ("dense", np.int64, "floating-point")],
)  # fmt: skip
def test_wrong_dtype_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], part: str, dtype: type, expected: str) -> None:
    data = npy_dataset(tmp_path / "d", **{part: dtype})
    with pytest.raises(DataError, match=rf"day_0_{part}.npy: dtype {np.dtype(dtype)}, expected an? {expected} dtype"):
        read_manifest(data)
    assert main(["info", str(data)]) == 2
    assert f"day_0_{part}.npy" in error_line(capsys)


def test_int32_ids_and_torchrec_dtypes_are_accepted(tmp_path: Path) -> None:
    assert read_manifest(npy_dataset(tmp_path / "d", sparse=np.int32))["rows"] == 8


_OK = '"format": "robe_dist.criteo-npy", "version": 1, "files": []'


@pytest.mark.parametrize("text", [
    "{not json", "[1, 2]", '{"format": "robe_dist.criteo-npy", "files": 3}', "\xff",
    # found by a review: a newer format was read as this one; sizes that are not numbers crashed info
    # with a TypeError; a unit named outside the directory was read
    '{"format": "robe_dist.criteo-npy", "version": 99, "files": []}', '{"format": "robe_dist.criteo-npy", "files": []}',
    "{" + _OK + ', "multi_hot_sizes": [3, "x"]}', "{" + _OK + ', "table_sizes": "abc"}',
    '{"format": "robe_dist.criteo-npy", "version": 1, "files": [{"name": "../elsewhere/day_0"}]}',
])  # fmt: skip
def test_damaged_manifest_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    data = npy_dataset(tmp_path / "d")
    (data / "manifest.json").write_bytes(text.encode("latin1"))
    with pytest.raises(DataError, match="manifest.json: "):
        read_manifest(data)
    assert main(["info", str(data)]) == 2
    assert str(data / "manifest.json") in error_line(capsys)


# ------------------------------------------------------------------ 4. a file where a directory belongs
def test_out_or_data_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = npy_dataset(tmp_path / "d")
    (tmp_path / "day_0").write_text(GOOD_LINE)
    file = tmp_path / "file"
    file.write_text("keep me")
    for args in (
        ["ingest", "--input", str(tmp_path / "day_0"), "--out", str(file), "--no-progress"],
        ["vocab", "--data", str(data), "--out", str(file)],
        ["synth", "--rows", "30", "--out", str(file)],
    ):
        assert main(args) == 2
        assert f"--out {file}: is a file, expected a directory" in error_line(capsys)
    for args in (["vocab", "--data", str(file), "--out", str(tmp_path / "v")], ["stats", "--data", str(file)],
                 ["plan", "--data", str(file), "--budget", "10x"]):  # fmt: skip
        assert main(args) == 2
        assert f"--data {file}: is a file, expected a dataset directory" in error_line(capsys)
    assert main(["info", str(file)]) == 2
    assert f"{file}: is a file, expected a dataset directory" in error_line(capsys)
    assert file.read_text() == "keep me" and not (tmp_path / "v").exists()
    # the library functions too
    with pytest.raises(DataError, match="file: is a file"):
        ingest([tmp_path / "day_0"], file, progress=False)
    with pytest.raises(DataError, match="file: is a file"):
        build_vocab(data, file, log=None)
    with pytest.raises(DataError, match="file: is a file"):
        generate(file, 30, log=None)
    with pytest.raises(DataError, match="file: is a file, expected a dataset directory"):
        read_manifest(file)


# ------------------------------------------------------------------ 5, 6. option ranges
@pytest.mark.parametrize(
    "dim, block, option",
    [("0", "32", "--dim"), ("-4", "32", "--dim"), ("16", "0", "--block-size"), ("16", "3", "--block-size"),
     ("16", "-2", "--block-size")],
)  # fmt: skip
def test_plan_refuses_impossible_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str], dim: str, block: str, option: str) -> None:
    data = npy_dataset(tmp_path / "d")
    assert main(["plan", "--data", str(data), "--budget", "10x", "--dim", dim, "--block-size", block]) == 2
    assert option in error_line(capsys)


def test_plan_and_empty_paths_name_the_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A budget below one embedding named the trainer's robe.budget; an empty --out wrote into
    the current directory."""
    data = tmp_path / "s"
    generate(data, 3000, days=3, seed=0, log=None)
    assert main(["plan", "--data", str(data), "--budget", "1B"]) == 2
    assert error_line(capsys).startswith("robe-data: error: --budget 1 bytes leaves 0 bytes for the ROBE array")
    assert main(["ingest", "--input", str(data), "--out", ""]) == 2
    assert error_line(capsys) == "robe-data: error: --out: an empty path; give a file or directory name\n"


@pytest.mark.parametrize(
    "args, option",
    [(["--scale", "nan"], "--scale"), (["--scale", "inf"], "--scale"), (["--scale", "0"], "--scale"),
     (["--seed", "-1"], "--seed"), (["--ctr", "1.5"], "--ctr"), (["--alpha", "nan"], "--alpha"),
     (["--days", "0"], "--days")],
)  # fmt: skip
def test_synth_refuses_out_of_range_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], option: str) -> None:
    assert main(["synth", "--rows", "30", "--out", str(tmp_path / "s"), *args]) == 2
    assert option in error_line(capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_ingest_refuses_workers_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str) -> None:
    (tmp_path / "day_0").write_text(GOOD_LINE)
    assert main(["ingest", "-i", str(tmp_path / "day_0"), "-o", str(tmp_path / "o"), "--workers", workers]) == 2
    assert f"--workers must be a whole number >= 1, got {workers}" in error_line(capsys).replace(" (parallel processes)", "")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("count", ["-1", "0"])
def test_vocab_refuses_min_count_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str], count: str) -> None:
    data = npy_dataset(tmp_path / "d")
    assert main(["vocab", "--data", str(data), "--out", str(tmp_path / "v"), "--min-count", count]) == 2
    assert "--min-count" in error_line(capsys)
    assert not (tmp_path / "v").exists()


def test_manifest_written_by_ingest_is_json(tmp_path: Path) -> None:
    out, before = ingested(tmp_path)
    assert json.loads(before)["complete"] is True


def test_a_dataset_that_cannot_be_written_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """stats (and plan) write table_stats.json into the dataset: on a read-only mount that is an
    OSError from deep inside, said in one line (root ignores file modes: the write is made to fail)."""
    import errno

    import robe_dist.data.stats as stats

    data = npy_dataset(tmp_path / "d")

    def read_only(directory, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(directory) / "table_stats.json.partial"))

    monkeypatch.setattr(stats, "write_table_stats", read_only)
    assert main(["stats", "--data", str(data)]) == 2
    assert error_line(capsys) == f"robe-data: error: {data / 'table_stats.json.partial'}: Read-only file system\n"


def test_writing_into_a_torchrec_made_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a review: ingest into a directory of TorchRec-made days (no manifest) wrote a
    manifest of its own days only, and the others silently left the dataset."""
    data = npy_dataset(tmp_path / "d")
    raw = tmp_path / "day_9"
    raw.write_text(("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a0b0c0d"] * 26) + "\n") * 3)
    assert main(["ingest", "--input", str(raw), "--out", str(data), "--no-progress"]) == 2
    assert "holds a dataset without a manifest (day_0_dense.npy" in error_line(capsys)
    assert main(["vocab", "--data", str(data), "--out", str(data / "v")]) == 0  # (its vocabulary goes elsewhere)
    capsys.readouterr()
    assert main(["vocab", "--data", str(data / "v"), "--out", str(data)]) == 2
    assert "holds a dataset without a manifest" in error_line(capsys)
    assert not (data / "manifest.json").exists()
