"""predict.py end to end on a tiny generated task with a tiny untrained model."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from demo.data import generate_task
from inference.geometry import restore_to_original
from inference.predictor import Segmenter, TaskModel
from inference.settings import InferenceSettings
from models import build_model
from training.config import TrainConfig
from training.data import TaskData
from training.validation import predict_cases_to_nifti, run_inference_settings, task_segmenter, validate_task
from utils.checkpoint import save_checkpoint
from utils.io_utils import read_json
from utils.prep_runner import run_preprocessing
from utils.preprocessing import preprocess_image


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
    # one more input: a test image inside a zero frame of 8 voxels, so that its crop box (non-zero
    # box + 5) leaves a border of at least 3 voxels outside, where the label map must be 0
    names = sorted(p.name for p in inputs.iterdir())
    sources = {n: inputs / n for n in names}
    framed = tmp_path / "framed"
    framed.mkdir()
    src4 = sitk.ReadImage(str(inputs / names[0]))
    arr = np.pad(sitk.GetArrayFromImage(src4), [(0, 0), (8, 8), (8, 8), (8, 8)])
    img4 = sitk.GetImageFromArray(arr, isVector=False)
    img4.SetSpacing(src4.GetSpacing())
    img4.SetOrigin(src4.GetOrigin())
    img4.SetDirection(src4.GetDirection())
    sources["framed.nii.gz"] = framed / "framed.nii.gz"
    sitk.WriteImage(img4, str(sources["framed.nii.gz"]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    one_mod = sitk.GetImageFromArray(np.ones((6, 7, 8), np.float32))
    sitk.WriteImage(one_mod, str(bad / "three_d.nii.gz"))  # 1 modality, the task needs 2
    out = tmp_path / "out"
    rc = predict.main(["--ckp", str(ckpt), "--task", "Task93_DemoProstateMR", "--input", str(inputs), str(bad),
                       str(sources["framed.nii.gz"]), "--output", str(out), "--no_progress", "--batch_size", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.nii.gz" in err and "three_d.nii.gz" in err and "modalit" in err
    assert sorted(p.name for p in out.iterdir()) == sorted([*sources, "predict_settings.json"])
    # the same steps done by hand: preprocess with the checkpoint's plans, segment the preprocessed
    # array (sliding window, unified-patch resize, post-processing), undo crop + resampling
    task = TaskModel.from_checkpoint(ckpt, "Task93_DemoProstateMR")
    by_hand = Segmenter(task, InferenceSettings(batch_size=3))
    for name, path in sources.items():
        src, dst = sitk.ReadImage(str(path)), sitk.ReadImage(str(out / name))
        assert dst.GetDimension() == 3 and dst.GetPixelID() == sitk.sitkUInt8
        assert dst.GetSize() == src.GetSize()[:3]
        np.testing.assert_allclose(dst.GetSpacing(), src.GetSpacing()[:3], atol=1e-5)
        np.testing.assert_allclose(dst.GetOrigin(), src.GetOrigin()[:3], atol=1e-4)
        d4 = np.asarray(src.GetDirection()).reshape(4, 4)[:3, :3]
        np.testing.assert_allclose(np.asarray(dst.GetDirection()).reshape(3, 3), d4, atol=1e-5)
        np.testing.assert_allclose(nib.load(str(out / name)).affine, nib.load(str(path)).affine, atol=1e-4)
        labels = sitk.GetArrayFromImage(dst)
        image, weight, sidecar = preprocess_image(path, task.plans)
        expected = restore_to_original(by_hand.segment_array(image, weight), sidecar)
        np.testing.assert_array_equal(labels, expected)
        assert len(np.unique(labels)) >= 2  # the untrained model still predicts several classes
        if name == "framed.nii.gz":
            box = sidecar["crop_box"]
            assert all(a >= 3 and b <= n - 3 for (a, b), n in zip(box, labels.shape, strict=True))
            inside = np.zeros(labels.shape, bool)
            inside[box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]] = True
            assert labels[inside].any() and not labels[~inside].any()


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


LIVER = "Task91_DemoLiverCT"


def test_predict_py_on_raw_image_equals_validation_path(tmp_path: Path) -> None:
    """predict.py on a raw training image and the training-side path (validation segmenter on the
    preprocessed case, then predict_cases_to_nifti) give the same label map and geometry."""
    generate_task(LIVER, tmp_path / "data", n_train=2, n_test=0, size=16)
    summary = run_preprocessing(tmp_path / "data", tmp_path / "prep", tasks=[LIVER], progress=False,
                                log=lambda _msg: None)  # fmt: skip
    assert summary.done == 2 and not summary.failed
    plans = read_json(tmp_path / "prep" / LIVER / "plans.json")
    case_id = "liverct_002"  # 2 mm slices resampled to 3 mm: the grids differ, restoring matters
    case = str(tmp_path / "prep" / LIVER / "train" / case_id)
    sidecar = read_json(case + ".json")
    assert sidecar["resampled_shape"] != sidecar["original_shape"]
    torch.manual_seed(0)
    config = {"train_mode": "independent", "in_channels": [1], "num_classes": [2], "module": None,
              "base_channels": 4, "pools_per_axis": plans["pools_per_axis"], "deep_supervision": True,
              "residual": True}  # fmt: skip
    model = build_model(**config).eval()
    task = TaskData(LIVER, plans, tmp_path / "prep" / LIVER, [], [case])
    settings = run_inference_settings(
        TrainConfig(mode="independent", tasks=[LIVER], device="cpu"), torch.device("cpu")
    )
    assert settings.postprocess  # the preset validates with post-processing, as predict.py does
    segmenter = task_segmenter(model, task, 0, None, settings)
    # balance the untrained model: shift the class-1 bias so that about half the voxels are class 1
    p1 = float(np.median(segmenter.probabilities(np.load(case + "_image.npy"))[1]))
    head = model.output_heads.heads[0]
    with torch.no_grad():
        head.bias[1] += math.log((1 - p1) / p1)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, config, [{"name": LIVER, "plans": plans}], model.state_dict())

    raw = tmp_path / "data" / LIVER / "imagesTr" / f"{case_id}.nii.gz"
    rc = predict.main(["--ckp", str(ckpt), "--task", LIVER, "--input", str(raw),
                       "--output", str(tmp_path / "predict"), "--no_progress"])  # fmt: skip
    assert rc == 0
    (written,) = predict_cases_to_nifti(segmenter, [case], tmp_path / "val")
    by_predict = sitk.ReadImage(str(tmp_path / "predict" / f"{case_id}.nii.gz"))
    by_val = sitk.ReadImage(str(written))
    a, b = sitk.GetArrayFromImage(by_predict), sitk.GetArrayFromImage(by_val)
    assert a.shape == tuple(sidecar["original_shape"])
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(a.ravel(), minlength=2)
    assert counts.size == 2 and counts.min() > 0.1 * a.size  # both classes, each a real share
    np.testing.assert_array_equal(a, restore_to_original(segmenter.segment_prepared_case(case), sidecar))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(by_predict, get)(), getattr(by_val, get)(), atol=1e-6)
    # validation scores this case in the original geometry against the raw label (the original's
    # evaluation) when the raw data are given, else on the preprocessed grid
    raw_label = sitk.GetArrayFromImage(
        sitk.ReadImage(str(tmp_path / "data" / LIVER / "labelsTr" / f"{case_id}.nii.gz"))
    )
    fused = np.isin(raw_label, [1, 2])  # the liver's tumour (label 2) belongs to the organ
    assert (raw_label == 2).any()
    expected = 2 * np.logical_and(a == 1, fused).sum() / ((a == 1).sum() + fused.sum())
    (row,) = validate_task(segmenter, task, dataset_dir=tmp_path / "data").rows
    assert row["grid"] == "original" and row["dice_1"] == pytest.approx(expected, abs=1e-12)
    (row_pre,) = validate_task(segmenter, task).rows
    assert row_pre["grid"] == "preprocessed" and row_pre["dice_1"] != pytest.approx(expected, abs=1e-6)
