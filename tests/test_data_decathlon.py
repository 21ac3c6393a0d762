"""dataset.json / NIfTI reading, label sanitation and per-task settings (tiny files, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from utils.decathlon import (
    DataError,
    apply_label_map,
    case_id_from_path,
    check_nifti_integrity,
    find_tasks,
    load_task,
    read_image,
    read_label,
)
from utils.task_settings import PRESETS, build_plans, derive_patch_and_pools, find_preset, pools_for_patch


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), *, four_d: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array, isVector=False)
    img.SetSpacing(list(spacing) + ([1.0] if four_d else []))
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def _task(tmp_path: Path) -> Path:
    root = tmp_path / "Task42_Thing"
    vol = np.ones((6, 7, 8), np.int16)
    for name in ("a_001", "a_002"):
        _write(root / "imagesTr" / f"{name}.nii.gz", vol)
        _write(root / "labelsTr" / f"{name}.nii.gz", vol.astype(np.uint8))
    _write(root / "imagesTs" / "a_101.nii.gz", vol)
    (root / "imagesTr" / "._a_001.nii.gz").write_bytes(b"junk")
    meta = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "tumour"},
        "training": [
            {"image": "./imagesTr/a_002.nii.gz", "label": "./labelsTr/a_002.nii.gz"},
            {"image": "./imagesTr/a_001.nii.gz", "label": "./labelsTr/a_001.nii.gz"},
            {"image": "./imagesTr/._a_001.nii.gz", "label": "./labelsTr/._a_001.nii.gz"},
        ],
        "test": ["./imagesTs/a_101.nii.gz", {"image": "./imagesTs/._a_101.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "TaskNoJson").mkdir()
    return root


def test_load_task_reads_dataset_json_and_skips_junk(tmp_path: Path) -> None:
    root = _task(tmp_path)
    assert [p.name for p in find_tasks(tmp_path)] == ["Task42_Thing"]
    t = load_task(root)
    assert t.name == "Task42_Thing" and t.modalities == ("CT",)
    assert dict(t.labels) == {0: "background", 1: "organ", 2: "tumour"}
    assert [c.case_id for c in t.training] == ["a_001", "a_002"]
    assert t.training[0].label == root / "labelsTr" / "a_001.nii.gz"
    assert [c.case_id for c in t.test] == ["a_101"] and t.test[0].label is None
    assert case_id_from_path("x/hippocampus_001.nii.gz") == "hippocampus_001"


def test_bad_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "Task1_X").mkdir()
    (tmp_path / "Task1_X" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_task(tmp_path / "Task1_X")


def test_label_sanitation_and_fusion() -> None:
    raw = np.array([0, 1, 2, 254, 3, 1], np.int16)
    assert apply_label_map(raw, {0: 0, 1: 1, 2: 2}).tolist() == [0, 1, 2, 0, 0, 1]  # stray 254 -> 0
    assert apply_label_map(raw, {"0": 0, "1": 1, "2": 1}).tolist() == [0, 1, 1, 0, 0, 1]  # tumour fused
    assert apply_label_map(raw, {0: 0}).dtype == np.uint8


def test_truncated_and_corrupt_nifti_detected(tmp_path: Path) -> None:
    good = _write(
        tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(10, 12, 14)).astype(np.float32)
    )
    check_nifti_integrity(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        check_nifti_integrity(trunc)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image" * 5)
    with pytest.raises(DataError, match="junk.nii.gz"):
        read_image(junk)


def test_read_4d_and_modality_count(tmp_path: Path) -> None:
    arr = np.stack([np.full((4, 5, 6), 1.0, np.float32), np.full((4, 5, 6), 2.0, np.float32)])
    p = _write(tmp_path / "mm.nii.gz", arr, (0.5, 0.6, 3.0), four_d=True)
    img, geom = read_image(p, expected_modalities=2)
    assert img.shape == (2, 4, 5, 6) and img[1].mean() == 2.0
    assert geom.n_modalities == 2 and geom.spacing_zyx == pytest.approx((3.0, 0.6, 0.5))
    assert len(geom.direction) == 9
    with pytest.raises(DataError, match="2 modalities on its 4th axis but dataset.json lists 3"):
        read_image(p, expected_modalities=3)
    lab, lgeom = read_label(_write(tmp_path / "l.nii.gz", np.zeros((4, 5, 6), np.uint8)))
    assert lab.shape == (4, 5, 6) and lgeom.size_zyx == geom.size_zyx


# --- settings -------------------------------------------------------------------------------


def test_paper_preset_table_and_suffix_match() -> None:
    labels = {0: "background", 1: "Anterior", 2: "Posterior"}
    plans = build_plans("Task04_Hippocampus", ["MRI"], labels, [(1, 1, 1)], [(36, 50, 35)])
    assert plans["source"] == "paper_preset"
    assert (plans["patch_size"], plans["pools_per_axis"], plans["batch_size"]) == ([40, 56, 40], [3, 3, 3], 9)
    assert plans["keep_components"] == 2 and plans["small_label"] == 2
    assert plans["normalisation"]["zero_mask"] == "none"  # exactly the paper
    # any TaskNN_Hippocampus gets the row
    assert find_preset("Task104_Hippocampus")[0] == "Task04_Hippocampus"  # type: ignore[index]
    liver = build_plans("Task03_Liver", ["CT"], {0: "bg", 1: "liver", 2: "cancer"}, [(1, 1, 1)], [(9, 9, 9)])
    assert liver["label_map"] == {"0": 0, "1": 1, "2": 1} and liver["num_classes"] == 2 and liver["is_ct"]
    assert liver["labels"] == {"0": "bg", "1": "liver"} and liver["tumour_classes"] == []
    prostate = build_plans(
        "Task05_Prostate", ["T2", "ADC"], {0: "bg", 1: "PZ", 2: "TZ"}, [(3, 1, 1)], [(9, 9, 9)]
    )
    assert prostate["small_label"] == 1 and prostate["target_spacing"] == [3.6, 0.625, 0.625]
    # the pool rule reproduces every paper row
    for row in PRESETS.values():
        if row.paper:
            assert pools_for_patch(row.patch_size) == row.pools_per_axis


def test_unknown_task_gets_derived_settings() -> None:
    spacings = [(2.0, 0.7, 0.7), (3.0, 0.8, 0.8), (2.5, 0.75, 0.75)]
    shapes = [(100, 512, 512), (80, 480, 480), (90, 500, 500)]
    labels = {0: "background", 1: "kidney", 2: "kidney tumor"}
    plans = build_plans("Task77_Kidney", ["CT"], labels, spacings, shapes)
    assert plans["source"] == "derived" and plans["target_spacing"] == [2.5, 0.75, 0.75]
    patch, pools = plans["patch_size"], plans["pools_per_axis"]
    assert math.prod(patch) <= 128**3
    assert all(p % 2**k == 0 and p // 2**k >= 4 for p, k in zip(patch, pools, strict=True))
    assert all(0 < p <= s for p, s in zip(patch, plans["median_resampled_shape"], strict=True))
    assert plans["num_classes"] == 3 and plans["tumour_classes"] == [2] and plans["small_label"] == 2
    assert plans["normalisation"]["zero_mask"] == "nearest"
    # every derived value can be overridden
    o = build_plans(
        "Task77_Kidney", ["CT"], labels, spacings, shapes,
        target_spacing=(1, 1, 1), patch_size=(32, 64, 64), pools_per_axis=(2, 3, 3), batch_size=3,
        label_map={0: 0, 1: 1, 2: 1}, keep_components=1, small_label=1,
    )  # fmt: skip
    assert o["target_spacing"] == [1.0, 1.0, 1.0] and o["patch_size"] == [32, 64, 64]
    assert o["pools_per_axis"] == [2, 3, 3] and o["batch_size"] == 3 and o["num_classes"] == 2
    assert set(o["overrides"]) >= {"target_spacing", "patch_size", "pools_per_axis", "label_map"}
    # a small volume gets a small patch that still pools
    patch, pools = derive_patch_and_pools((64, 62, 60), (1, 1, 1))
    assert patch == (64, 56, 56) and pools == (4, 3, 3)
