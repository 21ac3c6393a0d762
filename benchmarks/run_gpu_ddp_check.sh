#!/usr/bin/env bash
# Issue 10's GPU measurement, for a lent GPU machine (one GPU is enough; about 4 minutes on an H200):
#   1. the training step at world size 1 under torchrun -- the project's data-parallel path and stock DDP
#      with find_unused_parameters -- against a plain process (universal model, paper preset sizes);
#   2. what the loss of the global batch costs each process as the job grows (W = 1 ... 16 simulated):
#      time and extra GPU memory.
# Results in $OUT (or ./gpu_out): ddp_steps.{txt,json}, ddp_loss.{txt,json}.
#   bash benchmarks/run_gpu_ddp_check.sh
# Missing packages travel as wheels in .whl/ (see the device notes), as for run_gpu_checks.sh.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:.
fi
status=0
timeout 420 "$PY" benchmarks/bench_ddp.py --device cuda --procs 1 --configs plain own ddp --steps 20 --warmup 3 \
    --json "$OUT/ddp_steps.json" 2>&1 | tee "$OUT/ddp_steps.txt" || status=1
timeout 240 "$PY" benchmarks/bench_ddp.py --device cuda --loss_scaling 1 2 4 8 16 --steps 5 --warmup 1 \
    --json "$OUT/ddp_loss.json" 2>&1 | tee "$OUT/ddp_loss.txt" || status=1
exit $status
