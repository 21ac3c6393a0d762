"""benchmarks/run_gpu_checks.sh stays runnable: its --smoke mode runs every check of the GPU script at
tiny sizes on the CPU (the Triton rows are skipped there) and prints issue 11's table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_run_gpu_checks_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/run_gpu_checks.sh", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the suite's CUDA tests are selected (--smoke only collects them) and the result is reported
    assert "tests collected" in (tmp_path / "cuda_tests.txt").read_text()
    assert (
        "test_amp_scaler.py::test_fit_fp16_on_cuda_resume_continues_the_scaler"
        in (tmp_path / "gpu_tests.txt").read_text()
    )
    table = (tmp_path / "table.md").read_text()
    assert "model-only step, universal separable, native kernels (fp32)" in table
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert {m["config"] for m in kernels["models"]} >= {"dense_fp32", "separable_fp32", "separable_bf16"}
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["total_s"] > 0 and "Lovász-softmax forward" in profile["phase_table"]
    train = {r["config"]: r for r in json.loads((tmp_path / "train.json").read_text())["results"]}
    assert {"universal_fp32", "universal_fp32+gpuaug", "independent_fp32"} <= set(train)
    loader = json.loads((tmp_path / "loader.json").read_text())
    assert {r["pipeline"] for r in loader["results"]} == {
        "before",
        "two_step",
        "composed",
        "composed_linear",
        "device_plan",
    }
