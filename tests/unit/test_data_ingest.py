"""Raw Criteo files -> .npy: real rows, gzip, streaming in chunks, bad rows, resume, workers, TorchRec."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from robe_dist.data import ingest as I
from robe_dist.data import reader as R
from robe_dist.data.layout import DataError, read_manifest
from robe_dist.data.rawtext import RawRows, format_tsv, random_dense, raw_ids, zipf_ranks
from criteo_reference import parse_text

from sample_data import MISSING, SAMPLE  # noqa: E402
KAGGLE = SAMPLE / "kaggle_train_head_1000.tsv"
DEEPCTR = SAMPLE / "deepctr_sample_200.csv"
needs_sample = pytest.mark.skipif(not KAGGLE.is_file(), reason=MISSING)


def load(out: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.load(out / f"{name}_{part}.npy") for part in ("dense", "sparse", "labels"))  # type: ignore[return-value]


def quiet(msg: str) -> None:
    pass


def run(inputs: list, out: Path, **kw) -> dict:
    return I.ingest(inputs, out, progress=False, log=quiet, **kw)


def log1p(x: float) -> float:
    return float(np.log1p(np.float32(x)))


@needs_sample
def test_kaggle_tsv_values_match_the_text(tmp_path: Path) -> None:
    m = run([KAGGLE], tmp_path / "out", workers=1)
    (entry,) = m["files"]
    assert entry["name"] == "kaggle_train_head_1000" and m["complete"]
    assert (entry["rows"], entry["bad_rows"], entry["padded_rows"]) == (1000, 0, 498)
    assert entry["missing_final_newline"] and entry["format"] == "tsv"
    assert entry["source_crc32"] == f"{zlib.crc32(KAGGLE.read_bytes()):08x}"
    dense, sparse, labels = load(tmp_path / "out", "kaggle_train_head_1000")
    assert (dense.dtype, sparse.dtype, labels.dtype) == (np.float32, np.int64, np.int32)
    assert dense.shape == (1000, 13) and sparse.shape == (1000, 26) and labels.shape == (1000, 1)
    # line 1: 0 | 1 1 5 0 1382 4 15 2 181 1 2 _ 2 | 68fd1e64 80e26c9b ... 07b5194c _ 3a171ecb ... 9727dd16
    assert labels[0, 0] == 0
    np.testing.assert_allclose(dense[0], [log1p(v) for v in (1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2)])
    assert sparse[0, [0, 1, 20, 21, 22, 25]].tolist() == [0x68FD1E64, 0x80E26C9B, 0x07B5194C, 0, 0x3A171ECB, 0x9727DD16]
    # last line (no newline, 38 fields): 0 | 0 1 1 1 8647 _ 0 9 1 0 0 _ 1 | 5a9ed9b0 ... 0014c32a _ 3a171ecb 3b183c5c
    assert labels[-1, 0] == 0
    np.testing.assert_allclose(dense[-1, [4, 5, 7]], [log1p(8647), 0.0, log1p(9)])
    assert sparse[-1, [0, 20, 21, 22, 23, 24, 25]].tolist() == [0x5A9ED9B0, 0x0014C32A, 0, 0x3A171ECB, 0x3B183C5C, 0, 0]
    ref_dense, ref_sparse, ref_labels, reasons = parse_text(KAGGLE.read_bytes())
    assert not any(reasons)
    np.testing.assert_array_equal(sparse, ref_sparse)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(dense, ref_dense, rtol=1e-6)


@needs_sample
@pytest.mark.parametrize("fmt", [None, "csv"])
def test_deepctr_csv_with_header_and_float_integers(tmp_path: Path, fmt: str | None) -> None:
    m = run([DEEPCTR], tmp_path, fmt=fmt)
    (entry,) = m["files"]
    assert entry["format"] == "csv" and entry["header_skipped"]
    assert (entry["rows"], entry["bad_rows"]) == (200, 0)
    dense, sparse, labels = load(tmp_path, "deepctr_sample_200")
    # 0,,3,260.0,,17668.0,,,33.0,,,,0.0,,05db9164,08d6d899,...,87c6f83c,,,0429f84b,,3a171ecb,c0d61a5c,,
    assert labels[0, 0] == 0
    np.testing.assert_allclose(dense[0], [0, log1p(3), log1p(260), 0, log1p(17668), 0, 0, log1p(33), 0, 0, 0, 0, 0])
    assert sparse[0, [0, 1, 17, 18, 19, 20, 21, 22, 23, 24, 25]].tolist() == [
        0x05DB9164,
        0x08D6D899,
        0x87C6F83C,
        0,
        0,
        0x0429F84B,
        0,
        0x3A171ECB,
        0xC0D61A5C,
        0,
        0,
    ]
    # 0,,-1,19.0,35.0,30251.0,... : a negative integer becomes log(1 + 0) = 0
    assert dense[1, 1] == 0 and dense[1, 2] == np.float32(log1p(19))
    # the same file saved with a UTF-8 byte order mark (its header was taken for a bad row)
    bom = tmp_path / "bom" / "deepctr_sample_200.csv"
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + DEEPCTR.read_bytes())
    m = run([bom], tmp_path / "bom_out", fmt=fmt)
    assert m["files"][0]["header_skipped"] and (m["files"][0]["rows"], m["files"][0]["bad_rows"]) == (200, 0)
    assert np.array_equal(load(tmp_path / "bom_out", "deepctr_sample_200")[1], sparse)


@needs_sample
def test_gzip_input_gives_the_same_arrays(tmp_path: Path) -> None:
    gz = tmp_path / "day_0.gz"
    gz.write_bytes(gzip.compress(KAGGLE.read_bytes()))
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(KAGGLE, plain / "day_0")
    a = run([gz], tmp_path / "a")
    b = run([plain], tmp_path / "b")
    assert a["files"][0]["source_crc32"] == f"{zlib.crc32(gz.read_bytes()):08x}"  # of the file as stored
    for x, y in zip(load(tmp_path / "a", "day_0"), load(tmp_path / "b", "day_0")):
        np.testing.assert_array_equal(x, y)
    assert a["files"][0]["rows"] == b["files"][0]["rows"] == 1000
    text = KAGGLE.read_bytes()  # two gzip members back to back (cat a.gz b.gz) read as one text
    cut = text.index(b"\n", len(text) // 2) + 1
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "day_0.gz").write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    run([tmp_path / "two"], tmp_path / "c")
    for x, y in zip(load(tmp_path / "c", "day_0"), load(tmp_path / "b", "day_0")):
        np.testing.assert_array_equal(x, y)


def _raw_rows(n: int, seed: int) -> RawRows:
    rng = np.random.default_rng(seed)
    dense, missing = random_dense(rng, n)
    ids = np.stack([raw_ids(zipf_ranks(rng, (n,), 1000 * (t + 1), 1.05), 17 + t) for t in range(26)], axis=1)
    ids[rng.random((n, 26)) < 0.1] = 0
    return RawRows(labels=rng.integers(0, 2, n).astype(np.int32), dense=dense, dense_missing=missing, ids=ids)


def test_streaming_in_small_chunks_reproduces_generated_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "CHUNK_BYTES", 3000)  # many parse blocks, lines cut across reads
    monkeypatch.setattr(R, "READ_BYTES", 7001)
    rows = _raw_rows(3000, seed=3)
    text = format_tsv(rows, drop_trailing_empty=0.5)
    (tmp_path / "day_7").write_bytes(text[:-1])  # and no final newline
    m = run([tmp_path / "day_7"], tmp_path / "out")
    entry = m["files"][0]
    assert entry["rows"] == 3000 and entry["bad_rows"] == 0 and entry["missing_final_newline"]
    assert entry["padded_rows"] > 100  # format_tsv dropped trailing empty fields on many lines
    dense, sparse, labels = load(tmp_path / "out", "day_7")
    np.testing.assert_array_equal(sparse, rows.ids)
    np.testing.assert_array_equal(labels[:, 0], rows.labels)
    np.testing.assert_array_equal(dense, rows.transformed_dense())


def test_bad_rows_are_counted_per_file_with_line_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "MAX_LINE_BYTES", 5000)  # a line longer than this, spanning reads, is never held whole
    monkeypatch.setattr(R, "READ_BYTES", 4096)
    good = format_tsv(_raw_rows(5, seed=1), drop_trailing_empty=0).split(b"\n")[:5]
    bad = [
        good[0] + b"\t" + good[0],                 # 79 fields
        good[1].replace(b"\t", b"\tzz", 1),        # label ok, I1 not an integer
        b"2" + good[2][1:],                        # label 2
        b"\t".join(good[3].split(b"\t")[:10]),     # 10 fields
        good[4][:-3] + b"XYZ",                     # last categorical not hex
        b"1\t" + b"9" * 20000,                     # over-long line
    ]  # fmt: skip
    text = b"\n".join([good[0], *bad, good[1], b"", good[2]]) + b"\n"
    (tmp_path / "day_0").write_bytes(text)
    entry = run([tmp_path / "day_0"], tmp_path / "out", max_bad_fraction=1.0)["files"][0]  # counted, not refused
    assert entry["rows"] == 3 and entry["lines"] == 10 and entry["bad_rows"] == 7
    assert entry["bad_reasons"] == {
        "blank_line": 1, "too_few_fields": 1, "too_many_fields": 1, "bad_label": 1, "bad_dense": 1,
        "bad_categorical": 1, "line_too_long": 1,
    }  # fmt: skip
    assert [tuple(e) for e in entry["bad_examples"]] == [
        (2, "too_many_fields"),
        (3, "bad_dense"),
        (4, "bad_label"),
        (5, "too_few_fields"),
        (6, "bad_categorical"),
        (9, "blank_line"),  # after the over-long line 7, which never reaches the parser
    ]
    _, _, labels = load(tmp_path / "out", "day_0")
    assert labels.shape == (3, 1)
    parsed = I.ParsedFile(tmp_path / "day_0")  # robe-predict maps its scores back to lines with these
    assert np.concatenate([block.lines for block in parsed]).tolist() == [1, 8, 10]
    parsed.close()


def test_missing_empty_and_clashing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.*not found"):
        run([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "day_0").write_bytes(b"")
    with pytest.raises(DataError, match="day_0: input file is empty"):
        run([tmp_path / "day_0"], tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir: directory has no input files"):
        run([tmp_path / "empty_dir"], tmp_path / "out")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "day_1.gz").write_bytes(gzip.compress(b"x"))
    (tmp_path / "a" / "day_1").write_bytes(b"x")
    with pytest.raises(DataError, match="day_1_\\*.npy"):
        run([tmp_path / "a"], tmp_path / "out")


def test_truncated_gzip_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    data = gzip.compress(format_tsv(_raw_rows(2000, seed=4)))
    (tmp_path / "day_0.gz").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(DataError, match="day_0.gz: cannot read it"):
        run([tmp_path / "day_0.gz"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("day_0*"))
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]


def _write_days(d: Path, n_days: int, rows: int = 400) -> None:
    d.mkdir(exist_ok=True)
    for day in range(n_days):
        (d / f"day_{day}").write_bytes(format_tsv(_raw_rows(rows, seed=day)))


def test_resume_skips_finished_units_and_redoes_interrupted_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_days(raw, 3)
    calls = {"n": 0}
    real_parse = I.parse_buffer

    def crash_in_day_1(buf, **kw):
        calls["n"] += 1
        if b"\n" in buf and calls["n"] > 1:
            raise KeyboardInterrupt("simulated kill")
        return real_parse(buf, **kw)

    monkeypatch.setattr(I, "parse_buffer", crash_in_day_1)
    with pytest.raises(KeyboardInterrupt):
        run([raw], out, workers=1)
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and [f["name"] for f in m["files"]] == ["day_0"]
    assert not (out / "day_1_dense.npy").exists() and not list(out.glob("*.partial"))
    # a hard kill leaves partial files, or even a stale final file not listed in the manifest
    (out / "day_1_sparse.npy.partial").write_bytes(b"junk")
    (out / "day_1_dense.npy").write_bytes(b"stale")
    monkeypatch.setattr(I, "parse_buffer", real_parse)
    day0_mtime = (out / "day_0_dense.npy").stat().st_mtime_ns
    messages: list[str] = []
    m = I.ingest([raw], out, workers=1, progress=False, log=messages.append)
    assert m["complete"] and [f["rows"] for f in m["files"]] == [400, 400, 400]
    assert any("day_0: already done" in s for s in messages)
    assert (out / "day_0_dense.npy").stat().st_mtime_ns == day0_mtime
    assert read_manifest(out)["rows"] == 1200 and np.load(out / "day_1_dense.npy").shape == (400, 13)
    # a changed source is redone
    (raw / "day_2").write_bytes(format_tsv(_raw_rows(250, seed=9)))
    messages.clear()
    m = I.ingest([raw], out, workers=1, progress=False, log=messages.append)
    assert [f["rows"] for f in m["files"]] == [400, 400, 250]
    assert sum("already done" in s for s in messages) == 2


def test_parallel_workers_match_one_worker(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _write_days(raw, 3, rows=300)
    serial = run([raw], tmp_path / "serial", workers=1)
    parallel = run([raw / "day_2", raw / "day_0", raw / "day_1"], tmp_path / "parallel", workers=2)
    assert [f["name"] for f in parallel["files"]] == ["day_0", "day_1", "day_2"]
    assert [f["source_crc32"] for f in parallel["files"]] == [f["source_crc32"] for f in serial["files"]]
    for day in range(3):
        for x, y in zip(load(tmp_path / "serial", f"day_{day}"), load(tmp_path / "parallel", f"day_{day}")):
            np.testing.assert_array_equal(x, y)


@needs_sample
def test_torchrec_tools_and_ours_read_each_others_files(tmp_path: Path) -> None:
    pytest.importorskip("iopath")
    from torchrec.datasets.criteo import BinaryCriteoUtils

    from robe_dist.data.dataset import CriteoIterableDataset

    # TorchRec's tsv_to_npys fails on lines with fewer than 40 fields, so give it padded ones.
    lines = KAGGLE.read_bytes().split(b"\n")[:300]
    padded = b"\n".join(ln + b"\t" * (39 - ln.count(b"\t")) for ln in lines) + b"\n"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "day_0").write_bytes(padded)
    trc = tmp_path / "torchrec"
    trc.mkdir()
    BinaryCriteoUtils.tsv_to_npys(
        str(tmp_path / "raw" / "day_0"), *(str(trc / f"day_0_{p}.npy") for p in ("dense", "sparse", "labels"))
    )
    run([tmp_path / "raw"], tmp_path / "ours")
    _, sparse, labels = load(tmp_path / "ours", "day_0")
    np.testing.assert_array_equal(np.load(trc / "day_0_sparse.npy"), sparse)  # bit-identical ids
    np.testing.assert_array_equal(np.load(trc / "day_0_labels.npy"), labels)
    assert BinaryCriteoUtils.get_shape_from_npy(str(tmp_path / "ours" / "day_0_dense.npy")) == (300, 13)
    np.testing.assert_array_equal(
        BinaryCriteoUtils.load_npy_range(str(tmp_path / "ours" / "day_0_sparse.npy"), 10, 5), sparse[10:15]
    )
    # their directory (no manifest) is read as is
    m = read_manifest(trc)
    assert m["kind"] == "torchrec-npy" and m["rows"] == 300
    batch = next(iter(CriteoIterableDataset(trc, "train", batch_size=150, shuffle_buffer=0)))
    assert batch.sparse_features["cat_0"].values().tolist() == sparse[:150, 0].tolist()
    assert math.isclose(float(batch.labels.sum()), float(labels[:150].sum()))


def test_a_file_with_no_valid_row_or_too_many_bad_lines_is_refused(tmp_path: Path) -> None:
    """Random bytes, or a file mostly of bad lines: DataError naming the file and the first
    reasons; nothing of it is written (its outputs are not published, the manifest does not list it)."""
    rng = np.random.default_rng(0)
    (tmp_path / "noise").write_bytes(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"noise: no valid Criteo row in .* lines \(bad: "):
        run([tmp_path / "noise"], tmp_path / "out")
    good = format_tsv(_raw_rows(10, seed=2), drop_trailing_empty=0).split(b"\n")[:10]
    (tmp_path / "half").write_bytes(b"\n".join(good[:5] + [b"1\tnot\tcriteo"] * 5) + b"\n")
    with pytest.raises(DataError, match=r"half: 5 of 10 lines are bad \(50.0%, more than --max-bad-fraction 0.01\): too_few_fields 5"):
        run([tmp_path / "half"], tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(("noise", "half"))]
    assert run([tmp_path / "half"], tmp_path / "out", max_bad_fraction=0.5)["files"][0]["rows"] == 5


def test_two_writers_of_one_directory_and_a_ctrl_c_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Found by a review: two ingests into one directory renamed each other's temporary files
    ("cannot write .../day_0_dense.npy.partial: No such file or directory"), and Ctrl-C printed
    a traceback."""
    from robe_dist.data.cli import main
    from robe_dist.data.layout import directory_lock

    raw = tmp_path / "day_0"
    raw.write_text(("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a0b0c0d"] * 26) + "\n") * 10)
    with directory_lock(tmp_path / "o"):  # another robe-data is writing it
        assert main(["ingest", "--input", str(raw), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"robe-data: error: {tmp_path / 'o'}: another process is writing it (it holds {tmp_path / 'o.lock'}); wait for it to end\n"  # noqa: E501

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(I, "convert_file", interrupted)
    assert main(["ingest", "--input", str(raw), "--out", str(tmp_path / "o"), "--no-progress", "--workers", "1"]) == 130
    assert capsys.readouterr().err == "robe-data: ingest interrupted; rerun the same command to finish it\n"
    assert read_manifest(tmp_path / "o")["complete"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_with_a_parent_killed_outright(tmp_path: Path) -> None:
    """A SIGTERM or SIGKILL of ingest's process left its workers running: they committed days
    into the directory after it, under a rerun that was writing it."""
    parent = subprocess.Popen([sys.executable, "-c", WORKERS_REPORT], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        pids = [int(parent.stdout.readline()) for _ in range(2)]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        parent.kill()


WORKERS_REPORT = """
import os, time
from robe_dist.data import ingest

def busy(_):  # (idle workers end anyway: the parent's end of their task pipe closes)
    os.write(1, f"{os.getpid()}\\n".encode())  # one write: print's two writes interleave between the workers
    time.sleep(120)

if __name__ == "__main__":
    with ingest._mp_context().Pool(2, initializer=ingest._init_worker, initargs=(None,)) as pool:
        pool.map(busy, range(2), chunksize=1)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # (a zombie is dead, only not yet reaped)
    except FileNotFoundError:
        return False
