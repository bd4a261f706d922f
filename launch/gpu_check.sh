#!/usr/bin/env bash
# The GPU device check: everything robe_dist verifies on one GPU, in one run, under 8 minutes;
# logs and JSON figures go under $OUT.
#
#   bash launch/pack_gpu_wheels.sh        # first, on the CPU machine: the wheels the lent image lacks
#   bash launch/gpu_check.sh              # on the GPU machine, from the repository root
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash launch/gpu_check.sh     # with a ready environment
#
# Steps, most important first (each under its own time limit, all under one deadline: BUDGET_S,
# default 480 s, so the whole check fits one 10-minute device command with room to spare; a step
# that fails is recorded and the next one runs; a step with under 15 s left is skipped):
#   0. environment: the carried wheels in .whl/ go into a temporary site (--no-deps) unless torchrec
#      already imports; the C++ operator is built in place against the machine's torch (so the
#      Triton kernels can be compared with it; without a C++ compiler that comparison is skipped)
#   b+c. bench, benchmarks/gpu_check.py: Triton op vs C++ op on the same inputs; one embedding
#      training step at batch 8192 / 65536 against TorchRec's unsharded CUDA EmbeddingBagCollection
#      and nn.EmbeddingBag, with the copy bandwidth and memory; the bf16 array vs L2
#   a. tests_cuda: the tests that exercise the GPU (CUDA tests, Triton kernels compiled for it and
#      compared with the C++ operator, the KJT offsets shim, every non-ATen op of a ROBE run having a
#      CUDA kernel with the image's own torchrec and fbgemm-gpu), right after the figures so that the
#      deadline cannot leave them without time
#   d. train: robe-train on the tiny config for 300 steps, nccl backend, world size 1 (every table
#      in the ROBE array where fbgemm-gpu has no CUDA kernels, as on the lent image: TorchRec's
#      full tables need FBGEMM's CUDA TBE)
#   c2. inference, benchmarks/inference.py: the exported ROBE DLRM (fp32, bf16) against the same
#      DLRM with full tables (MLPerf v1 / 8: 12 GB) through FBGEMM and TorchRec's int8 path (where
#      FBGEMM runs on CUDA) and TorchRec's unsharded EBC, batch 64 to 16384
#   c3. cpu_threads, benchmarks/cpu_threads.py: the CPU operator's training step on 1, 2, 4, 8, 16
#      threads of the machine's cores, and the same bits at each
#   tests_cpu: the rest of tests/unit with the time left (CI runs them on every commit); JUnit XML in $OUT
#   e. $OUT/summary.json: every step's exit status and time
# Environment: PYTHON (default python3), OUT (default ./gpu_check_out), TRAIN_STEPS (default 300),
#   BUDGET_S (default 480), SMOKE=1: toy sizes and the default device, to test this script on a
#   machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$(( START + ${BUDGET_S:-480} ))
declare -A RC SECS

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, logs to $OUT/NAME.log, records status and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( DEADLINE - t0 ))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then
    echo "gpu_check: $name skipped (${left}s left of BUDGET_S)"
    RC[$name]='"skipped"'; SECS[$name]=0
    return
  fi
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
command -v "${CXX:-g++}" > /dev/null || echo "gpu_check: no C++ compiler (${CXX:-g++}): the C++ operator will not build, and the Triton-vs-C++ comparisons are skipped"
step build 240 "$PY" setup.py build_ext --inplace
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PY'
import torch, triton, torchrec, robe_dist.ops as ops
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "torchrec", torchrec.__version__,
      "C++ operator", ops.has_cpp_extension(), ops.cpp_extension_problem(), "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
cat "$OUT/versions.txt"

# b + c. comparison and benchmarks
BENCH=(--out "$OUT"); TRAIN_DEV=(--set dist.device=cuda --set dist.backend=nccl)
if [[ "${SMOKE:-0}" == 1 ]]; then BENCH+=(--smoke); TRAIN_DEV=(); TRAIN_STEPS=${TRAIN_STEPS:-20}; fi
step bench 300 "$PY" benchmarks/gpu_check.py "${BENCH[@]}"

# a. the tests that exercise the GPU, right after the figures (before the longer steps below, so the
# deadline cannot leave them without time); the rest of the unit tests come last
CUDA_TESTS=(tests/unit/test_cuda.py tests/unit/test_triton_kernels.py tests/unit/test_fbgemm_compat.py
            tests/unit/test_robe_module.py::test_cuda_matches_cpu tests/integration/test_cuda_dispatch.py)
step tests_cuda 150 "$PY" -m pytest "${CUDA_TESTS[@]}" -q -p no:cacheprovider -rs --junitxml="$OUT/tests_cuda.xml"

# d. the tiny config under torchrun with nccl, world size 1; its planner keeps small tables full,
# which needs FBGEMM's CUDA kernels: where fbgemm-gpu is the CPU build, every table in the array
if ! "$PY" -c "import sys, torch, fbgemm_gpu; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('fbgemm::bounds_check_indices', 'CUDA') else 1)" 2>/dev/null; then
  echo "gpu_check: fbgemm-gpu has no CUDA kernels here (CPU build): train runs with robe.features=all"
  TRAIN_DEV+=(--set robe.features=all)
fi
RUN="$OUT/tiny_run"
rm -rf "$RUN"  # this script's own run: a second check into the same OUT starts afresh
step train 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m robe_dist.train \
  --run-dir "$RUN" --set train.max_steps="${TRAIN_STEPS:-300}" "${TRAIN_DEV[@]}"
cp "$RUN/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null || true

# c2. scoring speed: the exported ROBE DLRM vs full tables (FBGEMM) and TorchRec's int8 path
INFER=(--device cuda --table-scale 8 --batches 64 2048 16384 --iters 10)
if [[ "${SMOKE:-0}" == 1 ]]; then INFER=(--table-scale 2000 --batches 64 --iters 3); fi
step inference 180 "$PY" benchmarks/inference.py "${INFER[@]}" --json "$OUT/inference.json"

# c3. the CPU operator's step on 1-16 threads of this machine's cores (issue #12: the design argued
# for many threads, measurable only here), and its bits at every thread count
THREADS=(--threads 1 2 4 8 16)
if [[ "${SMOKE:-0}" == 1 ]]; then THREADS=(--threads 1 2 --steps 2 --warmup 1 --array-size 1000000 --batch 1024); fi
step cpu_threads 90 "$PY" benchmarks/cpu_threads.py "${THREADS[@]}" --json "$OUT/cpu_threads.json"

# the rest of the unit tests with the time left (CI runs them on every commit)
step tests_cpu 200 "$PY" -m pytest tests/unit -q -p no:cacheprovider -rs --junitxml="$OUT/tests_cpu.xml" \
  --ignore=tests/unit/test_cuda.py --ignore=tests/unit/test_triton_kernels.py --ignore=tests/unit/test_fbgemm_compat.py

# e. summary
{
  echo "{"
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"total_s\": $(( $(date +%s) - START )),"
  first=1
  for name in build bench train inference cpu_threads tests_cuda tests_cpu; do
    [[ $first -eq 1 ]] || echo ","
    first=0
    printf '  "%s": {"exit": %s, "seconds": %s}' "$name" "${RC[$name]:-null}" "${SECS[$name]:-null}"
  done
  echo; echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
