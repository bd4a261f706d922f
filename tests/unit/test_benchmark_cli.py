"""The benchmark scripts' own input checks (the scripts are run as users run them, in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lookup_names_a_jemalloc_path_that_is_not_there(tmp_path):
    missing = tmp_path / "libjemalloc.so.2"
    env = dict(os.environ, ROBE_DIST_JEMALLOC=str(missing))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lookup.py"), "--allocator", "jemalloc_thp"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert f"ROBE_DIST_JEMALLOC={missing} is not a file" in lines[0] and "libjemalloc.so.2" in lines[0]
