"""models.runtime: device and AMP resolution, and the CPU allocator setting (never in this process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
import training.cli
from demo.data import generate_task
from models import build_model
from models.runtime import amp_dtype, resolve_amp, resolve_device
from utils.checkpoint import save_checkpoint


def test_amp_modes() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "bf16" and resolve_amp("off", cpu) == "off"
    assert amp_dtype("off", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("half", cpu)
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting, Linux only")
def test_keep_freed_memory_in_heap_applies_on_linux() -> None:
    code = (
        "from models.runtime import keep_freed_memory_in_heap;"
        "import torch;"
        "assert keep_freed_memory_in_heap();"
        # a large tensor still allocates and computes correctly afterwards
        "x = torch.ones(64, 2**20); assert float(x.sum()) == 64 * 2**20"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _tiny_checkpoint(root: Path) -> tuple[Path, Path]:
    task_dir = generate_task("Task92_DemoHippoMR", root / "data", n_train=0, n_test=1, size=16)
    plans = {
        "task": "Task92_DemoHippoMR", "modalities": ["MRI"], "is_ct": False, "num_classes": 3,
        "labels": {"0": "background", "1": "a", "2": "b"}, "label_map": {"0": 0, "1": 1, "2": 2},
        "target_spacing": [1.0, 1.0, 1.0], "patch_size": [8, 8, 8], "pools_per_axis": [1, 1, 1],
        "batch_size": 2, "small_label": 2, "tumour_classes": [], "keep_components": 2,
        "normalisation": {"clip_percentiles": [2, 98], "ct_clip_min": -1024, "zscore": "nonzero"},
    }  # fmt: skip
    config = {"train_mode": "independent", "in_channels": [1], "num_classes": [3], "base_channels": 2,
              "pools_per_axis": [1, 1, 1]}  # fmt: skip
    model = build_model(**config)
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, config, [{"name": "Task92_DemoHippoMR", "plans": plans}], model.state_dict())
    return ckpt, task_dir / "imagesTs"


def test_entry_points_tune_the_allocator_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """predict.main and training.cli.main (what the tests call) leave the process-wide allocator alone;
    the scripts' own entry points ask for it."""
    calls: list[str] = []
    monkeypatch.setattr(predict, "keep_freed_memory_in_heap", lambda: calls.append("predict") or True)
    ckpt, images = _tiny_checkpoint(tmp_path)
    args = ["--ckp", str(ckpt), "--input", str(images), "--output", str(tmp_path / "out"), "--no_progress"]
    assert predict.main(args) == 0
    assert calls == []
    assert predict.main(args, tune_cpu_allocator=True) == 0
    assert calls == ["predict"]
    seen: dict[str, object] = {}

    def fake_main(argv: object, **kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(training.cli, "main", fake_main)
    with pytest.raises(SystemExit):
        training.cli.script_main("x", ("shared",), "shared", "d")
    assert seen["tune_cpu_allocator"] is True
