#!/usr/bin/env bash
# Sets up the environment (launch/setup.sh, a no-op when up to date) and runs the tests.
#
#   bash launch/test.sh                   # everything: CPU unit tests + 2-process integration tests
#   bash launch/test.sh tests/unit -k robe   # any pytest arguments instead of the defaults
#
# CI (.ci/run) runs exactly this. See tests/README.md for the layout.
#
# By default the test files are spread over TEST_WORKERS (2) pytest-xdist workers, a file's tests
# on one worker (their module fixtures shared): most of a test's time is processes importing
# torch and TorchRec, which one worker leaves a core idle for. TEST_WORKERS=0 runs them in order.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
WORKERS=${TEST_WORKERS:-2}
if [[ $# -eq 0 ]]; then
  if [[ "$WORKERS" -gt 0 ]]; then set -- -n "$WORKERS" --dist loadfile tests; else set -- tests; fi
fi
# Keep intra-op threads to the 2 cores CI has; multi-process tests set their own.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The tests start ~150 Python processes: let them reuse robe_dist's compiled bytecode (160 ms each).
unset PYTHONDONTWRITEBYTECODE
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then echo "launch/test.sh: pytest collected no tests" >&2; exit 1; fi
exit $rc
