"""robe-export and robe-predict end to end: a model trained by robe-train (1 and 2 processes, a
hybrid of full tables and a ROBE array placed by the planner) scores the same as in training.
Training runs robe-train's ``main()`` on 1 or 2 ranks that imported it once (train_runs.py;
test_train.py runs it through its launchers); export and predict run in-process through their
``main()`` (the console scripts' code)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from train_runs import robe_train

from robe_dist.inference import export as robe_export
from robe_dist.inference import predict as robe_predict

REPO = Path(__file__).resolve().parents[2]
SMALL = [  # the default config (auto placement at 100x: full tables + a ROBE array), smaller
    "data.synthetic_rows=60000", "data.synthetic_days=3", "train.global_batch_size=512", "eval.batch_size=8192",
    "train.log_every_steps=20", "eval.every_samples=null", "checkpoint.every_steps=null", "logging.progress_bar=false",
]  # fmt: skip


def train(run_dir: Path, data_path: Path, nproc: int = 1, *overrides: str) -> dict:
    """robe-train's ``main()`` on ``nproc`` ranks (train_runs.py); the run's test evaluation,
    summary and placement records."""
    args = ["--run-dir", str(run_dir)]
    for o in [*SMALL, f"data.path={data_path}", *overrides]:
        args += ["--set", o]
    p = robe_train(args, nproc)
    assert p.returncode == 0, p.stderr[-4000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "test": next((r for r in recs if r["kind"] == "eval" and r["split"] == "test"), None),
        "summary": next(r for r in recs if r["kind"] == "summary"),
        "placement": next((r for r in recs if r["kind"] == "placement"), None),
    }


def call(main, capsys, *args: str) -> tuple:
    """(exit status, stdout, stderr lines) of a console script's main() run in this process."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, [ln for ln in out.err.splitlines() if ln.startswith(("robe-export:", "robe-predict:"))]


def auc_of(stdout: str) -> float:
    return float(stdout.split("AUC ")[1].split(",")[0])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "synthetic"


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, data_dir) -> dict:
    """The default hybrid trained on 1 process, and its checkpoint."""
    run_dir = tmp_path_factory.mktemp("hybrid") / "run"
    m = train(run_dir, data_dir)
    assert m["placement"]["full_tables"] and m["placement"]["robe_tables"]  # a hybrid
    return dict(m, ckpt=Path(m["summary"]["checkpoint"]), vocab=Path(str(data_dir) + "-vocab"))


@pytest.fixture(scope="module")
def hybrid_artifact(tmp_path_factory, hybrid) -> Path:
    """``hybrid`` exported (fp32), for the tests that only read the artifact."""
    art = tmp_path_factory.mktemp("artifact") / "model.pt2"
    assert robe_export.main(["--checkpoint", str(hybrid["ckpt"]), "--out", str(art)]) == 0
    return art


@pytest.mark.integration
@pytest.mark.parametrize("nproc", [1, 2])
def test_exported_model_scores_as_in_training(tmp_path, capsys, caplog, data_dir, hybrid, nproc):
    # the 2-process model also has its blocks aligned (robe.block_align: part of the exported mapping)
    m = hybrid if nproc == 1 else dict(train(tmp_path / "run2", data_dir, 2, "robe.block_align=4"), vocab=hybrid["vocab"])
    ckpt = Path(m["summary"]["checkpoint"])
    art = tmp_path / "model.pt2"
    code, out, err = call(robe_export.main, capsys, "--checkpoint", ckpt, "--out", art)
    assert code == 0, err
    assert f"wrote {art}" in out and "ROBE array of" in out and "full tables" in out
    # the atomic write's temporary file ends in .pt2 (no torch warning about its name) and is gone
    assert not [r for r in caplog.records if "Expect archive" in r.getMessage()], caplog.text
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    assert ("starts aligned to 4" in out) == (nproc == 2), out
    assert robe_predict.read_metadata(art)["format_version"] == (2 if nproc == 2 else 1)  # older readers refuse v2
    scores = tmp_path / "scores.txt"
    code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", m["vocab"], "--split", "test", "--out", scores)
    assert code == 0, err
    assert abs(auc_of(out) - m["test"]["auc"]) < 2e-4, (out, m["test"]["auc"])
    assert abs(float(out.split("log-loss ")[1].split()[0].rstrip(";")) - m["test"]["logloss"]) < 2e-4, (out, m["test"]["logloss"])
    lines = scores.read_text().split()
    assert len(lines) == m["test"]["eval_samples"] and all(0 < float(x) < 1 for x in lines[:1000])
    if nproc == 1:
        return
    # reduced precision: the array and tables in bf16; the validation AUC change printed at export
    art16 = tmp_path / "model_bf16.pt2"
    code, out, err = call(robe_export.main, capsys, "--checkpoint", ckpt, "--out", art16, "--dtype", "bf16", "--data", m["vocab"])
    assert code == 0 and "bf16" in out, err
    assert abs(float(out.split("change ")[1].split(")")[0])) < 0.005 and "validation AUC of the artifact" in out
    assert art16.stat().st_size < art.stat().st_size
    import torch

    stored = {t.dtype for t in torch.export.load(str(art16)).state_dict.values()}
    assert torch.bfloat16 in stored and torch.float16 not in stored, stored


@pytest.mark.integration
@pytest.mark.parametrize("kind, overrides, dtype", [
    ("qr", ["robe.features=none", "robe.budget=null", "robe.array_size=null", "model.qr_max_rows=512"], "fp32"),
    ("hot_rows", ["robe.hot_rows=true"], "bf16"),
    # raw ids (no vocabulary): the full tables read them modulo their size, as the trainer did
    ("raw_ids", ["data.vocab=false"], "fp32"),
])  # fmt: skip
def test_quotient_remainder_and_hot_row_models_export_and_score_as_in_training(tmp_path, capsys, data_dir, hybrid, kind, overrides, dtype):
    # (the QR split's id check was a data-dependent guard under torch.export; a hot-row model's
    # per-sample weights stayed 16-bit where the CPU operator widens a 16-bit array)
    m = train(tmp_path / "run", data_dir, 1, *overrides, "train.max_steps=30")
    art = tmp_path / "model.pt2"
    code, out, err = call(robe_export.main, capsys, "--checkpoint", m["summary"]["checkpoint"], "--out", art, "--dtype", dtype)
    assert code == 0, err
    said = []  # torch's warnings while robe-predict loads the program (the QR graph's sizes: one line each)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("torch._export.serde.serialize").addHandler(handler)
    try:
        data = data_dir if kind == "raw_ids" else hybrid["vocab"]
        code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", data, "--split", "test",
                              "--out", tmp_path / "scores.txt")  # fmt: skip
    finally:
        logging.getLogger("torch._export.serde.serialize").removeHandler(handler)
    assert code == 0, err
    assert abs(auc_of(out) - m["test"]["auc"]) < (2e-4 if dtype == "fp32" else 2e-3), (out, m["test"]["auc"])
    assert not [w for w in said if "did not appear in the graph" in w], said[:3]
    if kind == "raw_ids":  # (a hybrid: full tables whose ids are taken modulo their size)
        assert m["placement"]["full_tables"] and robe_predict.read_metadata(art)["id_moduli"]


@pytest.mark.integration
def test_a_model_of_torchrecs_npy_files_scores_only_files_made_the_same_way(tmp_path, capsys, data_dir, hybrid):
    """TorchRec's scripts write dense features as log(x - min + 2), robe_dist's as log(1 + max(x, 0)):
    a model trained on a TorchRec-made directory scores such directories, and raw rows or robe-data's
    datasets are refused in one line (they were scored, with the wrong dense inputs)."""
    trec = tmp_path / "trec"  # robe_dist's files without the manifest: read as a TorchRec-made directory
    trec.mkdir()
    for f in data_dir.glob("day_*.npy"):
        shutil.copy(f, trec / f.name)
    m = train(tmp_path / "run", trec, 1, "robe.features=all", "robe.budget=null", "robe.array_size=65536", "data.vocab=false", "train.max_steps=30",
              "data.kind=criteo", "model.num_embeddings_per_feature=[" + ", ".join(["1000"] * 26) + "]")
    art = tmp_path / "model.pt2"
    assert call(robe_export.main, capsys, "--checkpoint", m["summary"]["checkpoint"], "--out", art)[0] == 0
    code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", trec, "--split", "test", "--out", tmp_path / "s.txt")
    assert code == 0 and abs(auc_of(out) - m["test"]["auc"]) < 2e-4, (err, out, m["test"]["auc"])
    rows = tmp_path / "rows.tsv"
    rows.write_text("1" + "\t1" * 13 + "\t68fd1e64" * 26 + "\n")
    for data, said in [(data_dir, "is a dataset made by robe-data, but this model was trained on one made by TorchRec"),
                       (rows, "trained on a directory made by TorchRec's scripts")]:  # fmt: skip
        code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", data, "--out", tmp_path / "s2.txt",
                              *(["--split", "test"] if data.is_dir() else []))  # fmt: skip
        assert code == 2 and len(err) == 1 and said in err[0], err


@pytest.mark.integration
def test_bad_artifacts_and_checkpoints_are_one_line_and_exit_2(tmp_path, capsys, data_dir, hybrid, hybrid_artifact):
    import torch

    art = hybrid_artifact

    def refused(model: Path) -> str:
        code, _, err = call(robe_predict.main, capsys, "--model", model, "--data", hybrid["vocab"])
        assert code == 2 and len(err) == 1, err
        return err[0]

    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(art.read_bytes()[: art.stat().st_size // 2])
    assert "truncated?" in refused(truncated)
    newer = tmp_path / "newer.pt2"
    extra = {"robe_dist.json": ""}
    ep = torch.export.load(str(art), extra_files=extra)
    meta = json.loads(extra["robe_dist.json"])
    torch.export.save(ep, str(newer), extra_files={"robe_dist.json": json.dumps(dict(meta, format_version=99))})
    assert zipfile.is_zipfile(newer) and "format version 99 is newer" in refused(newer)
    assert "no such file" in refused(tmp_path / "missing.pt2")
    # a weight changed in the copy (stored uncompressed: it scored, AUC 0.53, log-loss nan), metadata
    # of the wrong types, a member that cannot be read (encrypted): one line, no torch traceback
    with zipfile.ZipFile(art) as z:
        members = z.infolist()
    weight = max((m for m in members if "/data/weights/" in m.filename), key=lambda m: m.file_size)
    data = bytearray(art.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[weight.header_offset + 26 : weight.header_offset + 30])
    data[weight.header_offset + 30 + name_len + extra_len + 10] ^= 0xFF
    changed = tmp_path / "changed.pt2"
    changed.write_bytes(bytes(data))
    assert f"{weight.filename} fails its CRC check" in refused(changed)

    def rewritten(name: str, meta_text=None, flag: int = 0) -> Path:
        out = tmp_path / name
        with zipfile.ZipFile(art) as zin, zipfile.ZipFile(out, "w") as zout:
            for m in zin.infolist():
                is_meta = m.filename.endswith("/extra/robe_dist.json")
                zout.writestr(m, meta_text if is_meta and meta_text is not None else zin.read(m))
        if flag:  # set a general-purpose flag of the metadata's entry in the central directory
            raw = bytearray(out.read_bytes())
            at = raw.rindex(b"PK\x01\x02", 0, raw.rindex(b"/extra/robe_dist.json"))
            raw[at + 8] |= flag
            out.write_bytes(bytes(raw))
        return out

    meta_text = [zipfile.ZipFile(art).read(m) for m in members if m.filename.endswith("/extra/robe_dist.json")][0]
    for bad in ({"vocab": "ec23"}, {"vocab": {"path": 5, "fingerprint": "ec23"}}, {"format_version": "3"}):
        said = refused(rewritten("bad_meta.pt2", json.dumps({**json.loads(meta_text), **bad})))
        assert "its robe_dist metadata is damaged" in said, said
    assert "its robe_dist metadata is damaged (RecursionError" in refused(rewritten("deep.pt2", "[" * 100000 + "]" * 100000))
    assert "cannot be read (RuntimeError: File" in refused(rewritten("encrypted.pt2", flag=1))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    # an npy dataset of other ids than the model's: the raw-id dataset its vocabulary was built from
    code, _, err = call(robe_predict.main, capsys, "--model", art, "--data", data_dir)
    assert code == 2 and len(err) == 1 and "holds raw ids, but this model was trained on ids mapped by vocabulary" in err[0], err
    # a checkpoint whose config says another hash seed than its tensors were hashed with
    edited = tmp_path / "edited"
    shutil.copytree(hybrid["ckpt"], edited)
    (edited / "config.yaml").write_text((edited / "config.yaml").read_text().replace("seed: null", "seed: 9", 1))
    code, _, err = call(robe_export.main, capsys, "--checkpoint", edited, "--out", tmp_path / "y.pt2")
    assert code == 2 and len(err) == 1 and "hash signature does not match" in err[0], err
    # checkpoints that do not fit the model their config describes, and an --out that is a directory
    def export_refused(edit, out=None) -> str:
        ckpt = tmp_path / f"ckpt_{edit.__name__}"
        shutil.copytree(hybrid["ckpt"], ckpt)
        edit(ckpt)
        code, _, err = call(robe_export.main, capsys, "--checkpoint", ckpt, "--out", out or tmp_path / "z.pt2")
        assert code == 2 and len(err) == 1, err
        return err[0]

    def truncated_shard(ckpt):
        shard = next(ckpt.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])

    def other_arch(ckpt):
        (ckpt / "config.yaml").write_text((ckpt / "config.yaml").read_text().replace("arch: dlrm", "arch: dcn", 1))

    def other_dim(ckpt):
        text = (ckpt / "config.yaml").read_text()
        assert "embedding_dim: 16" in text and "dense_arch_layer_sizes: [64, 16]" in text
        text = text.replace("embedding_dim: 16", "embedding_dim: 24", 1).replace("[64, 16]", "[64, 24]", 1)
        (ckpt / "config.yaml").write_text(text)

    def unchanged(ckpt):
        pass

    assert "damaged: tensor file" in export_refused(truncated_shard)
    assert "do not fit the model of its config" in export_refused(other_arch)
    assert "do not describe a model robe_dist can build" in export_refused(other_dim)
    (tmp_path / "a_dir").mkdir()
    assert "is a directory" in export_refused(unchanged, out=tmp_path / "a_dir")
    assert not (tmp_path / "z.pt2").exists() and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    # a checkpoint without its model spec
    (edited / "model_spec.json").unlink()
    code, _, err = call(robe_export.main, capsys, "--checkpoint", edited, "--out", tmp_path / "x.pt2")
    assert code == 2 and len(err) == 1 and "model_spec.json" in err[0], err
    assert not (tmp_path / "x.pt2").exists() and not (tmp_path / "y.pt2").exists()


def _snapshot(path: Path) -> dict:
    """Every file under ``path`` (or ``path`` itself) and a digest of its bytes."""
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.integration
def test_bad_options_and_outputs_are_one_line_exit_2_and_overwrite_nothing(tmp_path, capsys, hybrid, hybrid_artifact):
    """An --out that is an input, options that would be ignored, bad --batch-size, --model or raw
    file: refused in one line naming it, exit 2, before any scoring, the inputs unchanged."""
    import gzip

    import torch

    art, npy, ckpt = hybrid_artifact, hybrid["vocab"], hybrid["ckpt"]
    tsv = tmp_path / "day_2.tsv"  # (refused before it is parsed: its content does not matter)
    tsv.write_bytes(b"0\t1\t2\n" * 10)
    inputs = {**_snapshot(art), **_snapshot(tsv), **_snapshot(npy), **_snapshot(ckpt)}

    def refused(main, *args, names: str) -> str:
        code, _, err = call(main, capsys, *args)
        assert code == 2 and len(err) == 1 and names in err[0], (code, err)
        assert {**_snapshot(art), **_snapshot(tsv), **_snapshot(npy), **_snapshot(ckpt)} == inputs, "an input changed"
        return err[0]

    def predict(*args, names: str) -> str:
        return refused(robe_predict.main, "--model", art, *args, names=names)

    # 1. --out an input: the model (also through a link), the raw file, a file of the npy dataset or the vocabulary
    link = tmp_path / "link.pt2"
    link.symlink_to(art)
    for out in (art, link):
        assert "is the --model file" in predict("--data", npy, "--out", out, names=f"--out {out}")
    assert "is the --data file" in predict("--data", tsv, "--out", tsv, names=f"--out {tsv}")
    assert "inside the --data directory" in predict("--data", npy, "--out", npy / "day_2_sparse.npy", names="--out")
    assert "inside the --vocab directory" in predict("--data", tsv, "--vocab", npy, "--out", npy / "manifest.json",
                                                     names="--out")  # fmt: skip
    # 2. robe-export's --out inside the checkpoint, or the checkpoint itself, or inside its --data dataset
    for out in (ckpt / ".metadata", ckpt):
        assert "--checkpoint directory" in refused(robe_export.main, "--checkpoint", ckpt, "--out", out, names=f"--out {out}")
    assert "is the --data dataset" in refused(robe_export.main, "--checkpoint", ckpt, "--out", npy / "model.pt2",
                                              "--data", npy, names=f"--out {npy / 'model.pt2'}")  # fmt: skip
    # 3. --out a directory: refused before scoring (the data is not even read), nothing left beside it
    (tmp_path / "a_dir").mkdir()
    empty = tmp_path / "empty.tsv"
    empty.touch()
    assert "is a directory" in predict("--data", empty, "--out", tmp_path / "a_dir", names="--out")
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    # 4. a batch size that is not positive
    for bad in ("0", "-5"):
        predict("--data", npy, "--batch-size", bad, names=f"--batch-size {bad}")
    # 5, 6. a truncated gzip file, an empty file
    whole = gzip.compress(b"".join(b"%d\t" % (i % 2) + b"\t".join(b"%d" % j for j in range(39)) + b"\n" for i in range(2000)))
    truncated = tmp_path / "day_3.tsv.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    assert "truncated or corrupt" in predict("--data", truncated, names=f"--data {truncated}")
    assert "the file is empty" in predict("--data", empty, names=f"--data {empty}")
    # 7. a directory as the model
    assert "is a directory; a .pt2 file" in refused(robe_predict.main, "--model", tmp_path / "a_dir", "--data", npy,
                                                    names=f"--model {tmp_path / 'a_dir'}")  # fmt: skip
    # 8. options that would be ignored: --split of a raw file, --vocab of npy rows or of a raw-id model
    assert "drop --split" in predict("--data", tsv, "--split", "val", names="--split val")
    assert "drop --vocab" in predict("--data", npy, "--vocab", npy, names=f"--vocab {npy}")
    raw_ids = tmp_path / "raw_ids.pt2"  # the artifact, its metadata saying raw ids
    extra = {"robe_dist.json": ""}
    ep = torch.export.load(str(art), extra_files=extra)
    meta = dict(json.loads(extra["robe_dist.json"]), ids="raw", vocab=None)
    torch.export.save(ep, str(raw_ids), extra_files={"robe_dist.json": json.dumps(meta)})
    code, _, err = call(robe_predict.main, capsys, "--model", raw_ids, "--data", tsv, "--vocab", npy)
    assert code == 2 and len(err) == 1 and f"--vocab {npy}" in err[0] and "trained on raw ids" in err[0], err
    # an artifact that does not say how its model reads ids (an older robe-export), and a multi-hot
    # model given raw (one-hot) rows
    for name, changes, says in (("no_ids", {"ids": None}, "does not record whether"),
                                ("multi_hot", {"multi_hot": True}, "a multi-hot model scores npy datasets only")):
        other = tmp_path / f"{name}.pt2"
        meta = {k: v for k, v in dict(json.loads(extra["robe_dist.json"]), **changes).items() if v is not None}
        torch.export.save(ep, str(other), extra_files={"robe_dist.json": json.dumps(meta)})
        code, _, err = call(robe_predict.main, capsys, "--model", other, "--data", tsv, "--vocab", npy)
        assert code == 2 and len(err) == 1 and says in err[0], (name, err)
    # a missing parent directory of --out is created (as robe-export does)
    scores = tmp_path / "missing" / "dir" / "s.txt"
    code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", npy, "--out", scores)
    assert code == 0 and f"scores in {scores}" in out, err
    assert len(scores.read_text().split()) == int(out.split(" rows of")[0].split()[-1].replace(",", ""))
    assert sorted(p.name for p in scores.parent.iterdir()) == ["s.txt"]


_LOAD_AS_DOCUMENTED = """
import sys, torch, robe_dist.ops
model = torch.export.load(sys.argv[1]).module()
g = torch.Generator().manual_seed(0)
dense, values = torch.rand(4, 13, generator=g), torch.randint(0, 3, (26 * 4,), generator=g)
print(model(dense, values, torch.ones(26 * 4, dtype=torch.long)).tolist())
"""


@pytest.mark.integration
def test_the_artifact_runs_after_torch_export_load_and_import_robe_dist_ops(hybrid_artifact):
    """docs/inference.md: in a fresh interpreter, ``import robe_dist.ops`` (the custom op, and
    FBGEMM's ops that the KJT layout calls) is all ``torch.export.load`` needs; the scores equal
    robe-predict's loader's."""
    import torch

    p = subprocess.run([sys.executable, "-c", _LOAD_AS_DOCUMENTED, str(hybrid_artifact)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    scores = torch.tensor(json.loads(p.stdout.strip().splitlines()[-1]))
    model, _ = robe_predict.load_artifact(hybrid_artifact)
    g = torch.Generator().manual_seed(0)
    dense, values = torch.rand(4, 13, generator=g), torch.randint(0, 3, (26 * 4,), generator=g)
    assert scores.shape == (4,) and torch.equal(scores, model(dense, values, torch.ones(26 * 4, dtype=torch.long)))
    # one row (--batch-size 1, or a last batch of one row): the loader's own path for it
    one = model(dense[:1], values[::4], torch.ones(26, dtype=torch.long))
    torch.testing.assert_close(one, scores[:1], rtol=1e-6, atol=1e-7)

def _criteo_sample() -> Path:
    env = os.environ.get("ROBE_DIST_CRITEO_SAMPLE")
    return (Path(env) if env else REPO.parent / "shared" / "data" / "criteo_sample") / "kaggle_train_head_1000.tsv"


@pytest.mark.integration
@pytest.mark.skipif(not _criteo_sample().is_file(), reason=f"real Criteo rows not found at {_criteo_sample()} (set ROBE_DIST_CRITEO_SAMPLE)")
def test_raw_criteo_rows_score_as_ingested_and_bad_rows_are_skipped(tmp_path, capsys, hybrid):
    import numpy as np
    import torch

    from robe_dist.data.cli import main as robe_data

    run_dir = tmp_path / "run"
    m = train(run_dir, tmp_path / "raw_synth", 1, "data.vocab=false", "robe.features=all", "robe.budget=null",
              "robe.array_size=65536", "eval.at_end=false")  # fmt: skip
    art = tmp_path / "raw.pt2"
    assert call(robe_export.main, capsys, "--checkpoint", m["summary"]["checkpoint"], "--out", art)[0] == 0
    rows = tmp_path / "day_0.tsv"
    lines = _criteo_sample().read_bytes().splitlines(keepends=True)
    assert len(lines) == 1000
    rows.write_bytes(b"".join(lines[:500]) + b"not a criteo row\n" + b"".join(lines[500:]))
    scores = tmp_path / "scores.txt"
    code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", rows, "--out", scores)
    assert code == 0, err
    assert "1 bad lines skipped, not scored (too_few_fields: 1; file lines 501): their lines in the scores say nan" in out
    # the same rows through robe-data ingest, scored by the artifact directly
    assert robe_data(["ingest", "--input", str(rows), "--out", str(tmp_path / "npy"), "--no-progress"]) == 0
    capsys.readouterr()
    dense = torch.from_numpy(np.load(tmp_path / "npy" / "day_0_dense.npy"))
    sparse = torch.from_numpy(np.load(tmp_path / "npy" / "day_0_sparse.npy"))
    model, _ = robe_predict.load_artifact(art)
    with torch.no_grad():
        expected = model(dense, sparse.t().reshape(-1).to(torch.int64), torch.ones(sparse.numel(), dtype=torch.int64))
    got = torch.tensor([float(x) for x in scores.read_text().split()])
    assert len(got) == 1001 and len(expected) == 1000  # line k of the scores is line k of the data
    assert got[500].isnan() and not got[torch.arange(1001) != 500].isnan().any()
    torch.testing.assert_close(torch.cat([got[:500], got[501:]]), expected.float(), rtol=1e-6, atol=1e-7)
    # with a header line, the scores' lines are the lines after it
    headed = tmp_path / "headed.tsv"
    headed.write_bytes(b"label\t" + b"\t".join(b"c%d" % i for i in range(39)) + b"\n" + rows.read_bytes())
    code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", headed, "--out", tmp_path / "headed.txt")
    assert code == 0 and "file lines 502)" in out, (out, err)
    assert (tmp_path / "headed.txt").read_text() == scores.read_text()


@pytest.mark.integration
def test_raw_rows_of_a_vocab_model_go_through_its_vocabulary(tmp_path, capsys, data_dir, hybrid, hybrid_artifact):
    """The default model reads ids remapped by robe-data vocab: raw Criteo text of the test day
    scores as the vocabulary's npy rows do; another vocabulary, or none, is refused in one line."""
    import numpy as np
    import torch

    from robe_dist.data.rawtext import RawRows, format_tsv
    from robe_dist.data.vocab import build_vocab

    n = 3000
    raw_ids = np.load(data_dir / "day_2_sparse.npy")[:n].astype(np.int64)  # the raw synthetic source
    dense = np.random.default_rng(0).integers(-2, 60, (n, 13))
    rows = RawRows(labels=np.load(data_dir / "day_2_labels.npy")[:n].reshape(-1).astype(np.int32), dense=dense,
                   dense_missing=dense == 7, ids=raw_ids)  # fmt: skip
    tsv = tmp_path / "day_2.tsv"
    tsv.write_bytes(format_tsv(rows))
    art = hybrid_artifact
    scores = tmp_path / "scores.txt"
    code, out, err = call(robe_predict.main, capsys, "--model", art, "--data", tsv, "--out", scores)  # recorded vocab
    assert code == 0, err
    vocab_ids = torch.from_numpy(np.load(hybrid["vocab"] / "day_2_sparse.npy")[:n].astype(np.int64))
    assert (vocab_ids > 0).float().mean() > 0.5  # mostly ids the vocabulary kept
    model, _ = robe_predict.load_artifact(art)
    with torch.no_grad():
        expected = model(torch.from_numpy(rows.transformed_dense()), vocab_ids.t().reshape(-1),
                         torch.ones(vocab_ids.numel(), dtype=torch.int64))  # fmt: skip
    got = torch.tensor([float(x) for x in scores.read_text().split()])
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-7)
    assert call(robe_predict.main, capsys, "--model", art, "--data", tsv, "--vocab", hybrid["vocab"])[0] == 0

    def refused(vocab: Path) -> str:
        code, _, err = call(robe_predict.main, capsys, "--model", art, "--data", tsv, "--vocab", vocab)
        assert code == 2 and len(err) == 1, err
        return err[0]

    assert "not a robe-data vocab directory" in refused(data_dir)
    other = tmp_path / "other_vocab"
    build_vocab(data_dir, other, max_ind_range=0, min_count=2, train_only=True, log=None)
    assert "is not the one this model was trained with" in refused(other)
