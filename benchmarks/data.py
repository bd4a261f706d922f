"""Data pipeline throughput on this machine, per core: raw TSV ingestion (rows/s) and batch
loading from the binary layout (samples/s).

    python benchmarks/data.py [--rows 1000000] [--batch-size 8192] [--json out.json]

Ingestion runs in one process (``--workers 1``) on a generated raw Criteo TSV (synthetic rows in
the real format: 37-40 fields, empty values, negative integers), on the same gzipped, and, if the
real Kaggle rows are beside the repository (../shared/data/criteo_sample, or the folder in
``ROBE_DIST_CRITEO_SAMPLE``, as the tests take it), on those 1,000 lines
repeated to the same size. "per core" divides by the CPU time of this process, so it holds on a busy machine; wall-clock
figures are printed too. Loading iterates the train split of the ingested data with and without
shuffling. Takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from robe_dist.data.dataset import CriteoIterableDataset
from robe_dist.data.ingest import ingest
from robe_dist.data.rawtext import format_tsv
from robe_dist.data.synthetic import _Sampler, table_sizes

SAMPLE = (Path(os.environ["ROBE_DIST_CRITEO_SAMPLE"]) if os.environ.get("ROBE_DIST_CRITEO_SAMPLE")  # as the tests
          else Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_sample") / "kaggle_train_head_1000.tsv"


def write_synthetic_tsv(path: Path, rows: int, chunk: int = 1 << 16) -> None:
    sampler = _Sampler(seed=0, sizes=table_sizes(1e-2), alpha=1.05, multi_hot=False)
    with open(path, "wb") as f:
        for c, start in enumerate(range(0, rows, chunk)):
            rng = np.random.default_rng([0, c])
            raw, _ = sampler.chunk(rng, min(chunk, rows - start))
            raw.labels[:] = rng.integers(0, 2, len(raw.labels))
            f.write(format_tsv(raw, seed=c))


def write_gzip(src: Path, dst: Path) -> None:
    comp = zlib.compressobj(1, wbits=31)  # gzip, fast level
    with open(src, "rb") as f, open(dst, "wb") as out:
        while block := f.read(1 << 24):
            out.write(comp.compress(block))
        out.write(comp.flush())


def write_repeated_sample(path: Path, rows: int) -> None:
    lines = SAMPLE.read_bytes().rstrip(b"\n").split(b"\n")
    block = b"\n".join(lines) + b"\n"
    with open(path, "wb") as f:
        for _ in range(rows // len(lines)):
            f.write(block)


def timed(fn) -> tuple[object, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def bench_ingest(src: Path, out: Path) -> dict:
    manifest, cpu, wall = timed(lambda: ingest([src], out, workers=1, progress=False, log=lambda m: None))
    rows = manifest["rows"]
    return {
        "input": src.name, "rows": rows, "bytes": src.stat().st_size,
        "rows_per_s_per_core": rows / cpu, "rows_per_s_wall": rows / wall, "mb_per_s_per_core": src.stat().st_size / cpu / 1e6,
    }  # fmt: skip


def bench_load(data: Path, batch_size: int, shuffle_buffer: int) -> dict:
    ds = CriteoIterableDataset(data, "train", batch_size=batch_size, shuffle_buffer=shuffle_buffer)
    for _ in zip(range(3), ds):  # warm the page cache and caches
        pass
    n, cpu, wall = timed(lambda: sum(len(b.labels) for b in ds))
    return {"batch_size": batch_size, "shuffle_buffer": shuffle_buffer, "samples": n,
            "samples_per_s_per_core": n / cpu, "samples_per_s_wall": n / wall}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="lines of raw TSV to ingest (default 1M)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    results: dict = {"ingest": [], "load": []}
    with tempfile.TemporaryDirectory(prefix="robe_data_bench_") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "raw").mkdir()
        inputs = [tmp_path / "raw" / "synthetic"]
        write_synthetic_tsv(inputs[0], args.rows)
        inputs.append(tmp_path / "raw" / "synthetic.gz")
        write_gzip(inputs[0], inputs[1])
        if SAMPLE.is_file():
            inputs.append(tmp_path / "raw" / "kaggle_x1000")
            write_repeated_sample(inputs[-1], args.rows)
        else:
            print(f"no real Kaggle rows at {SAMPLE} (set ROBE_DIST_CRITEO_SAMPLE to the folder): kaggle_x1000 left out")
        for src in inputs:
            r = bench_ingest(src, tmp_path / f"out_{src.name}")
            results["ingest"].append(r)
            print(
                f"ingest {r['input']:>13}: {r['rows']:,} lines, {r['bytes'] / 2**20:,.0f} MiB: "
                f"{r['rows_per_s_per_core']:,.0f} rows/s per core ({r['mb_per_s_per_core']:.0f} MB/s), "
                f"{r['rows_per_s_wall']:,.0f} rows/s wall"
            )
        for shuffle in (0, 1 << 17):
            r = bench_load(tmp_path / "out_synthetic", args.batch_size, shuffle)
            results["load"].append(r)
            print(
                f"load batch {r['batch_size']}, shuffle_buffer {shuffle:>6}: {r['samples_per_s_per_core']:,.0f} samples/s "
                f"per core, {r['samples_per_s_wall']:,.0f} samples/s wall"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
