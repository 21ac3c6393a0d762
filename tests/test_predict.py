"""predict.py end to end on a tiny generated task with a tiny untrained model."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from demo.data import generate_task
from models import build_model
from utils.checkpoint import save_checkpoint


def _plans(task: str, modalities: list[str], num_classes: int, patch: list[int]) -> dict:
    return {
        "task": task,
        "modalities": modalities,
        "is_ct": False,
        "labels": {str(i): f"c{i}" for i in range(num_classes)},
        "num_classes": num_classes,
        "label_map": {str(i): i for i in range(num_classes)},
        "target_spacing": [3.0, 1.2, 1.2],
        "patch_size": patch,
        "pools_per_axis": [2, 2, 2],
        "batch_size": 2,
        "small_label": 1,
        "tumour_classes": [],
        "keep_components": 2,
        "normalisation": {"clip_percentiles": [2, 98], "ct_clip_min": -1024, "zscore": "nonzero"},
        "source": "derived",
        "median_resampled_shape": [8, 16, 16],
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shared 2-task checkpoint whose model patch (16, 16, 16) differs from the task patch
    (8, 16, 16): exercises the unified-patch resize too. Task 1 = the 4D two-modality demo task."""
    root = tmp_path_factory.mktemp("e2e")
    task_dir = generate_task("Task93_DemoProstateMR", root / "data", n_train=0, n_test=2, size=20)
    torch.manual_seed(0)
    config = {"train_mode": "shared", "in_channels": [1, 2], "num_classes": [2, 3], "module": None,
              "base_channels": 4, "pools_per_axis": [2, 2, 2], "deep_supervision": True, "residual": True}  # fmt: skip
    model = build_model(**config)
    tasks = [
        {"name": "TaskX_Other", "plans": _plans("TaskX_Other", ["CT"], 2, [16, 16, 16])},
        {
            "name": "Task93_DemoProstateMR",
            "plans": _plans("Task93_DemoProstateMR", ["T2", "ADC"], 3, [8, 16, 16]),
        },
    ]
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, config, tasks, model.state_dict(), model_patch=[16, 16, 16])
    return ckpt, task_dir


def test_predict_end_to_end(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, task_dir = setup
    inputs = task_dir / "imagesTs"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    one_mod = sitk.GetImageFromArray(np.ones((6, 7, 8), np.float32))
    sitk.WriteImage(one_mod, str(bad / "three_d.nii.gz"))  # 1 modality, the task needs 2
    out = tmp_path / "out"
    rc = predict.main(["--ckp", str(ckpt), "--task", "Task93_DemoProstateMR", "--input", str(inputs), str(bad),
                       "--output", str(out), "--no_progress", "--batch_size", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.nii.gz" in err and "three_d.nii.gz" in err and "modalit" in err
    names = sorted(p.name for p in inputs.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        src, dst = sitk.ReadImage(str(inputs / name)), sitk.ReadImage(str(out / name))
        assert dst.GetDimension() == 3 and dst.GetPixelID() == sitk.sitkUInt8
        assert dst.GetSize() == src.GetSize()[:3]
        np.testing.assert_allclose(dst.GetSpacing(), src.GetSpacing()[:3], atol=1e-5)
        np.testing.assert_allclose(dst.GetOrigin(), src.GetOrigin()[:3], atol=1e-4)
        d4 = np.asarray(src.GetDirection()).reshape(4, 4)[:3, :3]
        np.testing.assert_allclose(np.asarray(dst.GetDirection()).reshape(3, 3), d4, atol=1e-5)
        np.testing.assert_allclose(
            nib.load(str(out / name)).affine, nib.load(str(inputs / name)).affine, atol=1e-4
        )
        labels = sitk.GetArrayFromImage(dst)
        assert labels.min() >= 0 and labels.max() <= 2


def test_predict_errors_and_help(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, task_dir = setup
    img = task_dir / "imagesTs" / sorted(p.name for p in (task_dir / "imagesTs").iterdir())[0]
    # ambiguous task, unknown task, not a checkpoint: exit 2 with a message
    assert predict.main(["--ckp", str(ckpt), "--input", str(img), "--output", str(tmp_path)]) == 2
    assert "choose one with --task" in capsys.readouterr().err
    assert (
        predict.main(["--ckp", str(ckpt), "--task", "Nope", "--input", str(img), "--output", str(tmp_path)])
        == 2
    )
    assert "Task93_DemoProstateMR" in capsys.readouterr().err
    assert (
        predict.main(["--ckp", str(img), "--task", "x", "--input", str(img), "--output", str(tmp_path)]) == 2
    )
    assert "not a readable torch file" in capsys.readouterr().err
    text = predict.build_parser().format_help()
    for flag in ("--ckp", "--task", "--input", "--output", "--device", "--tta", "--no_postprocess",
                 "--batch_size", "--weight_mode", "--unified_mode", "--amp", "--fp16_accumulator"):  # fmt: skip
        assert flag in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_cuda_matches_cpu(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, task_dir = setup
    inputs = task_dir / "imagesTs"
    common = ["--ckp", str(ckpt), "--task", "Task93_DemoProstateMR", "--input", str(inputs), "--no_progress"]
    assert predict.main([*common, "--output", str(tmp_path / "cpu")]) == 0
    assert predict.main([*common, "--output", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    for f in sorted(inputs.iterdir()):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cpu" / f.name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "gpu" / f.name)))
        assert (a == b).mean() > 0.99
