#!/usr/bin/env bash
# Every GPU check of the project in one run (for a lent GPU machine with only PyTorch installed), within
# 8 minutes on an H100/H200. Results go to $OUT (or ./gpu_out); the last step prints issue 11's table
# (first version vs this run, with the targets) and writes it to $OUT/table.md.
#   bash benchmarks/run_gpu_checks.sh            # on the GPU machine
#   bash benchmarks/run_gpu_checks.sh --smoke    # tiny sizes on the CPU: checks that the script runs
# Missing packages travel as wheels in .whl/ (see the device notes).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then
    SMOKE="--smoke"
    export OMP_NUM_THREADS=1   # tiny models: one thread, no spinning against other jobs
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:.
fi
status=0
run() {  # run NAME SECONDS CMD...: one check, time-limited, its output kept in $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" || { echo "!! $name failed or timed out"; status=1; }
}
if [ -z "$SMOKE" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
fi
# every test of the suite marked cuda (pytest -m cuda: sliding window and predict on the GPU, float16
# autocast with the gradient scaler, ...); its summary line is reported as the check's result. --smoke
# (no GPU) only collects them: the selection must not be empty.
if [ -z "$SMOKE" ]; then
    run gpu_tests 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/
else
    run gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda --collect-only tests/
fi
echo "== cuda tests (pytest -m cuda): $(grep -E '(passed|failed|error|skipped|selected|collected|no tests)' "$OUT/gpu_tests.txt" | tail -n 1)" \
    | tee "$OUT/cuda_tests.txt"
# issue 11: depthwise layers native vs Triton (timings, max error), model-only steps: dense vs separable,
# fp32 vs bf16, native vs Triton kernels, eager vs torch.compile (compile time, max output difference)
run kernels 150 "$PY" benchmarks/bench_kernels.py --steps 20 --warmup 3 \
    --configs dense_fp32 dense_bf16 separable_fp32 separable_fp32_triton separable_bf16 separable_bf16_triton \
    --json "$OUT/kernels.json" $SMOKE
# issue 11: where the universal step's time goes (synchronised phases + torch.profiler table)
run profile 100 "$PY" benchmarks/profile_train_step.py --steps 10 --warmup 5 --json "$OUT/profile.json" $SMOKE
# issues 5 and 11: 20 training steps with the real loader: CPU augmentation (two-step preset) vs GPU
# augmentation, fp32 vs bf16, native vs Triton kernels, and the dense model; data wait and peak memory
run train 240 "$PY" benchmarks/bench_train_gpu.py --steps 20 --warmup 5 --workers 4 \
    --configs universal_fp32 universal_fp32+gpuaug universal_amp+gpuaug independent_fp32 \
    --json "$OUT/train.json" $SMOKE
# issue 11: torch.compile of the separable model (task 0): compile time, step time, outputs vs eager (last:
# the longest and least certain check)
if [ -z "$SMOKE" ]; then
    run compile 120 "$PY" benchmarks/bench_kernels.py --steps 10 --warmup 2 --no_layers --configs separable_compiled \
        --json "$OUT/compile.json"
fi
if [ -n "$SMOKE" ]; then  # the CPU loader benchmark (samples/s per process), tiny
    run loader 60 "$PY" benchmarks/bench_loader.py --smoke --batches 1 --json "$OUT/loader.json"
fi
echo "== issue 11 table (all checks: ${SECONDS}s)"
"$PY" benchmarks/gpu_checks_table.py "$OUT" || status=1
exit $status
