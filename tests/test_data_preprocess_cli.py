"""preprocess_taskSep.py and data_explore.py end to end on tiny demo tasks (CPU, a few seconds)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import data_explore
import preprocess_taskSep
from demo.data import generate_demo_data

PLANS_KEYS = {
    "task", "modalities", "is_ct", "labels", "num_classes", "label_map", "target_spacing", "patch_size",
    "pools_per_axis", "batch_size", "small_label", "tumour_classes", "keep_components", "normalisation",
    "source", "median_resampled_shape", "resample_grid",
}  # fmt: skip
SIDECAR_KEYS = {
    "case", "image_file", "original_shape", "crop_box", "resampled_shape", "original_spacing_xyz",
    "origin_xyz", "direction", "target_spacing", "resample_grid",
}  # fmt: skip


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_src")
    generate_demo_data(root, seed=0, n_train=3, n_test=1, size=20)
    return root


@pytest.fixture()
def demo(demo_src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "dataset"
    shutil.copytree(demo_src, dst)
    return dst


def _run(dataset: Path, prep: Path, *extra: str) -> int:
    args = ["--dataset_dir", str(dataset), "--prep_dir", str(prep), "--nProc", "1", "--no_progress"]
    return preprocess_taskSep.main([*args, *extra])  # folds: <prep>/fold_splits.json by default


def test_preprocess_demo_end_to_end_and_rerun(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prep = tmp_path / "prep"
    assert _run(demo, prep) == 0
    out = capsys.readouterr().out
    assert "16 case(s) preprocessed, 0 already done, 0 failed" in out
    for task in ("Task91_DemoLiverCT", "Task92_DemoHippoMR", "Task93_DemoProstateMR", "Task94_DemoSpleenCT"):
        plans = json.loads((prep / task / "plans.json").read_text())
        assert PLANS_KEYS <= set(plans) and plans["source"] == "derived"
        assert plans["resample_grid"] == "original" and plans["normalisation"]["ct_clip_for"] == "all"
        n_mod, n_cls = len(plans["modalities"]), plans["num_classes"]
        side = json.loads(next((prep / task / "train").glob("*.json")).read_text())
        assert SIDECAR_KEYS | {"class_voxels"} <= set(side)
        case = side["case"]
        img = np.load(prep / task / "train" / f"{case}_image.npy", mmap_mode="r")
        lab = np.load(prep / task / "train" / f"{case}_label.npy")
        wgt = np.load(prep / task / "train" / f"{case}_weight.npy")
        assert img.dtype == np.float32 and img.shape == (n_mod, *side["resampled_shape"])
        assert lab.dtype == np.uint8 and wgt.dtype == np.uint8 and lab.max() < n_cls
        assert len(list((prep / task / "test").glob("*.json"))) == 1
        assert not list((prep / task / "test").glob("*_label.npy"))
    liver = json.loads((prep / "Task91_DemoLiverCT" / "plans.json").read_text())
    assert liver["num_classes"] == 2 and liver["label_map"]["2"] == 1 and liver["is_ct"]  # tumour fused
    prostate = json.loads((prep / "Task93_DemoProstateMR" / "plans.json").read_text())
    assert prostate["modalities"] == ["T2", "ADC"] and prostate["small_label"] == 1
    folds = json.loads((prep / "fold_splits.json").read_text())
    assert len(folds) == 4 and all(len(f) == 5 for f in folds.values())
    hippo = folds["Task92_DemoHippoMR"]
    assert {c for f in hippo for c in f["val"]} == {"hippomr_001", "hippomr_002", "hippomr_003"}

    # rerun: everything skipped, nothing rewritten
    stamp = {p: p.stat().st_mtime_ns for p in prep.rglob("*.npy")}
    folds_text = (prep / "fold_splits.json").read_text()
    assert _run(demo, prep) == 0
    assert "0 case(s) preprocessed, 16 already done" in capsys.readouterr().out
    assert stamp == {p: p.stat().st_mtime_ns for p in prep.rglob("*.npy")}
    assert (prep / "fold_splits.json").read_text() == folds_text  # existing splits kept

    # interrupted run: a case without sidecar and a stray temporary file -> completed on rerun
    train = prep / "Task94_DemoSpleenCT" / "train"
    (train / "spleenct_002.json").unlink()
    (train / ".u2tmp-abc12345-spleenct_002_image.npy").write_bytes(b"partial")
    assert _run(demo, prep) == 0
    assert "1 case(s) preprocessed, 15 already done" in capsys.readouterr().out
    assert (train / "spleenct_002.json").is_file() and not list(train.glob(".u2tmp-*"))

    # data_explore on the same tasks
    assert (
        data_explore.main(["--dataset_dir", str(demo), "--out_dir", str(tmp_path / "ex"), "--no_progress"])
        == 0
    )
    summary = capsys.readouterr().out
    assert "Task93_DemoProstateMR" in summary and "median spacing" in summary
    rows = list(csv.DictReader(open(tmp_path / "ex" / "meta_per_case.csv")))
    assert len(rows) == 12 and {
        "dim_z",
        "spacing_x",
        "datatype",
        "scl_slope",
        "smallest_label_voxels",
    } <= set(rows[0])
    stats = list(csv.DictReader(open(tmp_path / "ex" / "stats_per_task.csv")))
    assert {(s["task"], s["quantity"]) for s in stats} >= {("Task91_DemoLiverCT", "smallest_label_voxels")}


def _rewrite(
    path: Path, array: np.ndarray, like: sitk.Image, *, four_d: bool = False, shift: float = 0.0
) -> None:
    img = sitk.GetImageFromArray(array, isVector=False)
    if four_d:
        img.SetSpacing([*like.GetSpacing()[:3], 1.0])
        img.SetOrigin([*like.GetOrigin()[:3], 0.0])
        d4 = np.eye(4)
        d4[:3, :3] = np.reshape(like.GetDirection(), (4, 4))[:3, :3]
        img.SetDirection(d4.ravel().tolist())
    else:
        img.SetSpacing(like.GetSpacing())
        img.SetOrigin([o + shift for o in like.GetOrigin()])
        img.SetDirection(like.GetDirection())
    sitk.WriteImage(img, str(path), useCompression=True)


def test_bad_inputs_are_reported_and_good_cases_finish(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    liver, spleen, prostate = (
        demo / "Task91_DemoLiverCT",
        demo / "Task94_DemoSpleenCT",
        demo / "Task93_DemoProstateMR",
    )
    # 1. truncated image
    data = (liver / "imagesTr" / "liverct_001.nii.gz").read_bytes()
    (liver / "imagesTr" / "liverct_001.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    # 2. label of another shape
    lab = sitk.ReadImage(str(liver / "labelsTr" / "liverct_002.nii.gz"))
    _rewrite(liver / "labelsTr" / "liverct_002.nii.gz", sitk.GetArrayFromImage(lab)[:-2], lab)
    # 3. label with other geometry (origin moved by 5 mm)
    lab = sitk.ReadImage(str(spleen / "labelsTr" / "spleenct_001.nii.gz"))
    _rewrite(spleen / "labelsTr" / "spleenct_001.nii.gz", sitk.GetArrayFromImage(lab), lab, shift=5.0)
    # 4. missing label
    (spleen / "labelsTr" / "spleenct_002.nii.gz").unlink()
    # 5. 4D image with 3 modalities where dataset.json lists 2
    img = sitk.ReadImage(str(prostate / "imagesTr" / "prostatemr_003.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    _rewrite(
        prostate / "imagesTr" / "prostatemr_003.nii.gz", np.concatenate([arr, arr[:1]]), img, four_d=True
    )

    prep = tmp_path / "prep"
    assert _run(demo, prep) == 1
    cap = capsys.readouterr()
    text = cap.out + cap.err
    expected = [
        ("liverct_001.nii.gz", "truncated"),
        ("liverct_002.nii.gz", "differ in shape"),
        ("spleenct_001.nii.gz", "differ in origin"),
        ("spleenct_002.nii.gz", "label file not found"),
        ("prostatemr_003.nii.gz", "3 modalities on its 4th axis but dataset.json lists 2"),
    ]
    summary = text.split("Failed cases:")[1]
    for name, reason in expected:
        assert any(name in line and reason in line for line in summary.splitlines()), (name, reason, summary)
    assert "11 case(s) preprocessed, 0 already done, 5 failed" in text
    # good cases are done, bad ones are not
    assert (prep / "Task91_DemoLiverCT" / "train" / "liverct_003.json").is_file()
    assert (prep / "Task91_DemoLiverCT" / "test" / "liverct_101.json").is_file()
    assert not (prep / "Task91_DemoLiverCT" / "train" / "liverct_001.json").exists()
    folds = json.loads((prep / "fold_splits.json").read_text())
    assert list(folds) == ["Task92_DemoHippoMR"]  # only complete tasks get splits


def test_unknown_task_derived_settings_overrides_and_parallel(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # a task the project has never seen: any name, other spacing
    src = demo / "Task92_DemoHippoMR"
    new = demo / "Task555_SomethingNew"
    src.rename(new)
    meta = json.loads((new / "dataset.json").read_text())
    meta["name"] = "SomethingNew"
    (new / "dataset.json").write_text(json.dumps(meta))
    prep = tmp_path / "prep"
    tasks = ["--tasks", "Task555_SomethingNew", "Task94_DemoSpleenCT"]
    assert _run(demo, prep, *tasks, "--nProc", "2") == 0  # spawned worker processes
    plans = json.loads((prep / "Task555_SomethingNew" / "plans.json").read_text())
    assert plans["source"] == "derived" and plans["preset_row"] is None and plans["num_classes"] == 3
    assert all(p % 2**k == 0 for p, k in zip(plans["patch_size"], plans["pools_per_axis"], strict=True))
    assert not (prep / "Task91_DemoLiverCT").exists()
    capsys.readouterr()

    # other settings on existing output: refused without --overwrite, applied with it
    flags = [
        "--tasks",
        "Task555_SomethingNew",
        "--target_spacing",
        "2",
        "2",
        "2",
        "--patch_size",
        "16",
        "16",
        "16",
    ]
    assert _run(demo, prep, *flags) == 1
    assert "--overwrite" in capsys.readouterr().out
    assert _run(demo, prep, *flags, "--pools", "2", "2", "2", "--overwrite") == 0
    plans = json.loads((prep / "Task555_SomethingNew" / "plans.json").read_text())
    assert plans["target_spacing"] == [2.0, 2.0, 2.0] and plans["patch_size"] == [16, 16, 16]
    assert plans["pools_per_axis"] == [2, 2, 2] and "target_spacing" in plans["overrides"]
    side = json.loads((prep / "Task555_SomethingNew" / "train" / "hippomr_001.json").read_text())
    assert side["target_spacing"] == [2.0, 2.0, 2.0] and side["resample_grid"] == "original"
    capsys.readouterr()

    # the centred grid: another preprocessing setting, recorded in plans and sidecars
    flags += ["--pools", "2", "2", "2", "--resample_grid", "centred"]
    assert _run(demo, prep, *flags) == 1
    assert "resample_grid: 'original' -> 'centred'" in capsys.readouterr().out
    assert _run(demo, prep, *flags, "--overwrite") == 0
    plans = json.loads((prep / "Task555_SomethingNew" / "plans.json").read_text())
    assert plans["resample_grid"] == "centred" and "resample_grid" in plans["overrides"]
    centred = json.loads((prep / "Task555_SomethingNew" / "train" / "hippomr_001.json").read_text())
    assert centred["resample_grid"] == "centred"
    crop = [b - a for a, b in centred["crop_box"]]
    spacing_zyx = centred["original_spacing_xyz"][::-1]
    assert centred["resampled_shape"] == [round(n * s / 2.0) for n, s in zip(crop, spacing_zyx, strict=True)]
    assert side["resampled_shape"] == [
        int(n * round(s, 3) / 2.0) for n, s in zip(crop, spacing_zyx, strict=True)
    ]


def test_help_lists_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        preprocess_taskSep.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset_dir", "--prep_dir", "--tasks", "--nProc", "--overwrite", "--folds_file",
                 "--target_spacing", "--patch_size", "--pools", "--label_map", "--resample_grid",
                 "--ct_clip_for"):  # fmt: skip
        assert flag in text
