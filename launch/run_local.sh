#!/usr/bin/env bash
# Trains on this machine under torchrun (robe_dist.torchrun: torchrun whose failures end in one
# line): NPROC processes on one node (CPU: gloo; GPU: nccl, one
# process per GPU; chosen automatically by robe_dist.train).
#
#   bash launch/run_local.sh                                        # configs/tiny_synthetic.yaml, 1 process
#   NPROC=2 bash launch/run_local.sh                                # the same on 2 processes
#   NPROC=8 CONFIG=configs/criteo_tb_dlrm_robe.yaml bash launch/run_local.sh --set data.path=/data/criteo_1tb
#   OVERRIDES="train.max_steps=200 optim.lr=0.5" bash launch/run_local.sh
#   RUN_DIR=runs/tiny bash launch/run_local.sh --resume            # continue from its last checkpoint
#
# Environment variables:
#   NPROC      processes (default: the number of GPUs, else 1)
#   CONFIG     config file (default: configs/tiny_synthetic.yaml)
#   RUN_DIR    run directory (default: the config's, runs/<name>)
#   OVERRIDES  space-separated key=value config overrides, each passed as --set key=value
#   VENV       the virtual environment (default: .venv; created by launch/setup.sh when missing)
# Arguments after the script name go to robe_dist.train unchanged (--set, --resume, --print-config).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "run_local: $VENV is missing, running launch/setup.sh first"
  VENV="$VENV" bash launch/setup.sh
fi
PY="$VENV/bin/python"

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
CONFIG=${CONFIG:-configs/tiny_synthetic.yaml}
args=(--config "$CONFIG")
[[ -n "${RUN_DIR:-}" ]] && args+=(--run-dir "$RUN_DIR")
for kv in ${OVERRIDES:-}; do
  args+=(--set "$kv")
done

echo "run_local: $NPROC process(es), $CONFIG"
exec "$PY" -m robe_dist.torchrun --standalone --nproc_per_node="$NPROC" \
  -m robe_dist.train "${args[@]}" "$@"
