#!/usr/bin/env bash
# The trainer end to end on CPU: samples/s and where a step's time goes (logging.profile_steps),
# for the default config and for an MLPerf-shaped DLRM, on 1 process (2 threads) and 2 processes
# (1 thread each; the default config keeps its own dist.cpu_threads: 1). docs/performance.md
# ("The trainer end to end") shows a run of it.
#
#   bash benchmarks/trainer_e2e.sh [OUT_DIR]        # ~8 minutes on 2 cores, ~6 GB of memory
#
# MLPerf-shaped: MLPerf v1's DLRM (dim 128, MLPs 512-256-128 and 1024-1024-512-256-1), batch 8192,
# synthetic data with tables of MLPerf v1's sizes / 20 (9.4M rows; full tables: 4.8 GB), SGD;
# ROBE: every table in the paper's 27M-float array (Z = 32); full: TorchRec table-wise, FBGEMM's
# fused SGD. 40 steps, steps 21-30 profiled. Default config: 600 steps, 401-420 profiled.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/trainer_e2e}
mkdir -p "$OUT"
PY=.venv/bin/python
QUIET=(--set eval.at_end=false --set eval.every_samples=null --set checkpoint.every_steps=null
       --set checkpoint.at_end=false --set logging.progress_bar=false)
MLPERF=(--set data.synthetic_rows=600000 --set data.synthetic_days=3 --set data.synthetic_scale=0.05
        --set data.vocab=false --set model.embedding_dim=128 --set "model.dense_arch_layer_sizes=[512,256,128]"
        --set "model.over_arch_layer_sizes=[1024,1024,512,256,1]" --set optim.name=sgd --set optim.lr=0.1
        --set train.global_batch_size=8192 --set train.max_steps=40 --set train.log_every_steps=10
        --set "logging.profile_steps=[21,30]")
ROBE=(--set robe.features=all --set robe.budget=null --set robe.array_size=27000000 --set robe.block_size=32)
FULL=(--set robe.features=none --set robe.budget=null --set dist.table_sharding=table_wise)
TINY=(--set train.max_steps=600 --set "logging.profile_steps=[401,420]")

run() {  # name nproc threads args...   (threads: of the single process; "config": the config's own)
  local name=$1 n=$2 threads=$3; shift 3
  rm -rf "${OUT:?}/$name"
  local rc=0
  if [[ $n == 1 && $threads == config ]]; then
    $PY -m robe_dist.train --run-dir "$OUT/$name" "${QUIET[@]}" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  elif [[ $n == 1 ]]; then
    OMP_NUM_THREADS=$threads $PY -m robe_dist.train --run-dir "$OUT/$name" "${QUIET[@]}" --set dist.cpu_threads="$threads" "$@" \
      > "$OUT/$name.log" 2>&1 || rc=$?
  else
    OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node="$n" -m robe_dist.train \
      --run-dir "$OUT/$name" "${QUIET[@]}" --set dist.cpu_threads=1 "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  fi
  echo "== $name ($n process(es))"
  if [[ $rc != 0 ]]; then echo "FAILED (exit $rc), the end of $OUT/$name.log:"; tail -n 20 "$OUT/$name.log"; return 0; fi
  grep -A14 "^profile of" "$OUT/$name.log" || true
  grep "^summary:" "$OUT/$name.log"
}

run tiny_1p 1 config "${TINY[@]}"
run tiny_2p 2 - "${TINY[@]}"
for n in 1 2; do
  run "mlperf_robe_${n}p" "$n" 2 "${MLPERF[@]}" "${ROBE[@]}"
  run "mlperf_full_${n}p" "$n" 2 "${MLPERF[@]}" "${FULL[@]}"
done
