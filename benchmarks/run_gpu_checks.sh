#!/usr/bin/env bash
# Every GPU check of the project in one run (for a lent GPU machine with only PyTorch installed).
# Missing packages travel as wheels in .whl/ (see the device notes); results go to $OUT (or ./gpu_out).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:.
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
# issue 2: model step time and memory at the preset, plain vs fused vs channels_last
python3 benchmarks/bench_model.py --patch 128 --device cuda --steps 5 --configs independent/plain independent/fused \
    universal-separable/plain universal-separable/fused universal-separable/cl+fused --json "$OUT/gpu_model.json" \
    2>&1 | tee "$OUT/gpu_model.txt"
# issue 4: the CUDA tests
python3 -m pytest -q -p no:cacheprovider tests/test_inference.py::test_cuda_pipelined_cpu_accumulator_matches_cpu \
    tests/test_predict.py::test_predict_cuda_matches_cpu 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
# issue 5: 20 training steps, universal fp32 / AMP and dense fp32, with the real loader
python3 benchmarks/bench_train_gpu.py --steps 20 --warmup 2 --workers 4 \
    --configs universal_fp32 universal_amp independent_fp32 --json "$OUT/gpu_train.json" 2>&1 | tee "$OUT/gpu_train.txt"
