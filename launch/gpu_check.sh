#!/usr/bin/env bash
# The GPU device check: everything robe_dist verifies on one GPU, in one run, under 8 minutes;
# logs and JSON figures go under $OUT.
#
#   bash launch/pack_gpu_wheels.sh        # first, on the CPU machine: the wheels the lent image lacks
#   bash launch/gpu_check.sh              # on the GPU machine, from the repository root
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash launch/gpu_check.sh     # with a ready environment
#
# Steps (each under its own time limit; a failed step is recorded and the next one runs):
#   0. environment: the carried wheels in .whl/ go into a temporary site (--no-deps) unless torchrec
#      already imports; the C++ operator is built in place against the machine's torch (so the
#      Triton kernels can be compared with it)
#   a. the unit tests, CUDA tests included (tests/unit; pytest's JUnit XML in $OUT)
#   b+c. benchmarks/gpu_check.py: Triton op vs C++ op on the same inputs; one embedding training
#      step at batch 8192 / 65536 against TorchRec's unsharded CUDA EmbeddingBagCollection and
#      nn.EmbeddingBag, with the copy bandwidth and memory; the bf16 array vs L2
#   c2. benchmarks/inference.py: the exported ROBE DLRM (fp32, bf16) against the same DLRM with full
#      tables (MLPerf v1 / 8: 12 GB) through FBGEMM and TorchRec's int8 path, batch 64 to 16384
#   d. robe-train on the tiny config for 300 steps, nccl backend, world size 1
#   e. $OUT/summary.json: every step's exit status and time
# Environment: PYTHON (default python3), OUT (default ./gpu_check_out), TRAIN_STEPS (default 300),
#   SMOKE=1: toy sizes and the default device, to test this script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
START=$(date +%s)
declare -A RC SECS

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, logs to $OUT/NAME.log, records status and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "gpu_check: $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  echo "gpu_check: $name -> exit ${RC[$name]} in ${SECS[$name]}s"
  tail -n 3 "$OUT/$name.log"
}

# 0. environment
if ! "$PY" -c "import torchrec" 2>/dev/null; then
  if [[ ! -d .whl ]]; then echo "gpu_check: torchrec is missing and there is no .whl/ (run launch/pack_gpu_wheels.sh)"; exit 2; fi
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl > "$OUT/wheels.log" 2>&1 || { cat "$OUT/wheels.log"; exit 2; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
step build 240 "$PY" setup.py build_ext --inplace
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PY'
import torch, triton, torchrec, robe_dist.ops as ops
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "torchrec", torchrec.__version__,
      "C++ operator", ops.has_cpp_extension(), ops.cpp_extension_problem(), "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
cat "$OUT/versions.txt"

# a. the unit tests (CUDA tests run here; Triton compiles for the GPU)
step tests 240 "$PY" -m pytest tests/unit -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml"

# b + c. comparison and benchmarks
BENCH=(--out "$OUT"); TRAIN_DEV=(--set dist.device=cuda --set dist.backend=nccl)
if [[ "${SMOKE:-0}" == 1 ]]; then BENCH+=(--smoke); TRAIN_DEV=(); TRAIN_STEPS=${TRAIN_STEPS:-20}; fi
step bench 300 "$PY" benchmarks/gpu_check.py "${BENCH[@]}"

# c2. scoring speed: the exported ROBE DLRM vs full tables (FBGEMM) and TorchRec's int8 path
INFER=(--device cuda --table-scale 8 --batches 64 2048 16384 --iters 10)
if [[ "${SMOKE:-0}" == 1 ]]; then INFER=(--table-scale 2000 --batches 64 --iters 3); fi
step inference 180 "$PY" benchmarks/inference.py "${INFER[@]}" --json "$OUT/inference.json"

# d. the tiny config under torchrun with nccl, world size 1
RUN="$OUT/tiny_run"
rm -rf "$RUN"  # this script's own run: a second check into the same OUT starts afresh
step train 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m robe_dist.train \
  --run-dir "$RUN" --set train.max_steps="${TRAIN_STEPS:-300}" "${TRAIN_DEV[@]}"
cp "$RUN/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null || true

# e. summary
{
  echo "{"
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"total_s\": $(( $(date +%s) - START )),"
  first=1
  for name in build tests bench inference train; do
    [[ $first -eq 1 ]] || echo ","
    first=0
    printf '  "%s": {"exit": %s, "seconds": %s}' "$name" "${RC[$name]:-null}" "${SECS[$name]:-null}"
  done
  echo; echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
