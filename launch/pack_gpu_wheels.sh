#!/usr/bin/env bash
# Downloads, on a machine with internet, the wheels the lent GPU machine lacks into .whl/
# (git-ignored; the device tool carries it: `carry: [".whl"]`, under 64 MiB in all).
#
#   bash launch/pack_gpu_wheels.sh            # Python 3.12, manylinux x86-64: the lent image
#
# The lent image (../shared/docs/gpu-device.md) has Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# numpy, pytest, tqdm, torchmetrics, pyre-extensions; not torchrec, fbgemm-gpu, tensordict, iopath.
# TorchRec's CUDA fbgemm-gpu (465 MB) cannot travel: fbgemm-gpu-cpu stands in for its imports.
# Versions: torchrec 1.6.1 and fbgemm-gpu-cpu 1.6.0 are the releases built for torch 2.11;
# tensordict 0.15.3 imports with torch 2.11 (checked in a torch 2.11.0+cu130 venv on the CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl fbgemm-gpu-cpu==1.6.0 torchrec==1.6.1 tensordict==0.15.3 cloudpickle pyvers iopath portalocker pyyaml
du -sh .whl
ls .whl
