#!/usr/bin/env bash
# Sets up the environment (launch/setup.sh, a no-op when up to date) and runs the tests.
#
#   bash launch/test.sh                   # everything: CPU unit tests + 2-process integration tests
#   bash launch/test.sh tests/unit -k robe   # any pytest arguments instead of the defaults
#
# CI (.ci/run) runs exactly this. See tests/README.md for the layout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if [[ $# -eq 0 ]]; then set -- tests; fi
# Keep intra-op threads to the 2 cores CI has; multi-process tests set their own.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then echo "launch/test.sh: pytest collected no tests" >&2; exit 1; fi
exit $rc
