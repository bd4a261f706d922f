#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs robe_dist into it.
#
#   bash launch/setup.sh                 # CPU stack into ./.venv (what CI and the README use)
#   ROBE_DIST_STACK=cuda bash launch/setup.sh   # GPU stack: CUDA torch + fbgemm-gpu
#
# Environment variables:
#   VENV             where the environment goes (default: .venv in the repository root)
#   PYTHON           the interpreter that creates it (default: python3; needs 3.11+)
#   ROBE_DIST_STACK  cpu (default) or cuda
#   TORCH_INDEX_URL  (cuda) a PyTorch wheel index for another CUDA version than PyPI's default
#
# The pinned stack is the one measured to load together (../shared/docs/robe-reference.md, stack notes):
# torch 2.13.0, triton 3.7.1 (what torch 2.13.0's CUDA wheel pins; on CPU its interpreter runs the
# Triton kernels in the tests), fbgemm-gpu(-cpu) 1.8.0, torchrec 1.8.0. torchrec goes in with --no-deps,
# because its dependency on fbgemm-gpu (the CUDA build) would overwrite fbgemm-gpu-cpu's
# files on a CPU machine; its own needs are then installed by name.
# The cuda stack (torch 2.13.0+cu130, triton 3.7.1, fbgemm-gpu 1.8.0, torchrec 1.8.0) was checked to
# load together on a CPU machine on 2026-12-01: every fbgemm_gpu library resolves against torch
# 2.13.0's (no undefined symbol), with only the driver's libnvidia-ml.so.1 stubbed; `import
# torchrec.distributed`, FBGEMM's TBE and the robe_dist unit tests run (docs/performance.md, GPU).
# robe_dist also runs with torch 2.11 / torchrec 1.6.1 / fbgemm-gpu-cpu 1.6.0 (the lent GPU image).
# Idempotent: a stamp of the inputs skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STACK=${ROBE_DIST_STACK:-cpu}

TORCH_VERSION=2.13.0
TRITON_VERSION=3.7.1
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
# torchrec 1.8.0's own requirements (it pins torchmetrics==1.0.3).
TORCHREC_NEEDS=(tensordict==0.15.3 tqdm pyre-extensions==0.0.32 torchmetrics==1.0.3 iopath)

case "$STACK" in
  cpu)  FBGEMM_PKG="fbgemm-gpu-cpu==$FBGEMM_VERSION"; TORCH_INDEX=() ;;
  # PyPI's Linux x86-64 torch wheel is the CUDA build; TORCH_INDEX_URL picks another CUDA version
  # (e.g. https://download.pytorch.org/whl/cu126); fbgemm-gpu must be built for the same one.
  cuda) FBGEMM_PKG="fbgemm-gpu==$FBGEMM_VERSION"
        TORCH_INDEX=(); [[ -n "${TORCH_INDEX_URL:-}" ]] && TORCH_INDEX=(--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple) ;;
  *) echo "launch/setup.sh: ROBE_DIST_STACK must be 'cpu' or 'cuda', got '$STACK'" >&2; exit 2 ;;
esac

stamp_inputs() {
  cat launch/setup.sh pyproject.toml setup.py robe_dist/csrc/*.cpp robe_dist/csrc/*.h 2>/dev/null
  echo "$STACK"
}
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
if [[ -f "$VENV/.robe_dist_stamp" && "$(cat "$VENV/.robe_dist_stamp")" == "$want" ]] \
   && "$VENV/bin/python" -c "import robe_dist" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip warns that torchrec "requires fbgemm-gpu": expected, fbgemm-gpu-cpu provides it.
PIP_QUIET_ERR() { "${PIP[@]}" "$@" 2> >(grep -vE "^WARNING: Location|dependency resolver does not|requires fbgemm-gpu, which is not installed" >&2); }

echo "setup: installing torch $TORCH_VERSION ($STACK), triton $TRITON_VERSION, $FBGEMM_PKG, build tools"
PIP_QUIET_ERR install "${TORCH_INDEX[@]}" "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "$FBGEMM_PKG" \
  "setuptools>=64" wheel numpy pyyaml pytest pytest-xdist matplotlib
echo "setup: installing torchrec $TORCHREC_VERSION (--no-deps) and its needs"
PIP_QUIET_ERR install --no-deps "torchrec==$TORCHREC_VERSION"
PIP_QUIET_ERR install "${TORCHREC_NEEDS[@]}"
echo "setup: building and installing robe_dist (C++ operator included)"
PIP_QUIET_ERR install --no-build-isolation --no-deps -e .

"$VENV/bin/python" - <<'PY'
import sys
import torch, triton, torchrec, fbgemm_gpu, robe_dist
from robe_dist import ops
print(f"setup: ok: torch {torch.__version__}, triton {triton.__version__}, torchrec {torchrec.__version__}, "
      f"robe_dist {robe_dist.__version__}, C++ operator: {ops.has_cpp_extension()}")
if not ops.has_cpp_extension():
    sys.exit(f"setup: {ops.cpp_extension_problem()}: the C++ operator did not build; see the pip output above")
PY
echo "$want" > "$VENV/.robe_dist_stamp"
