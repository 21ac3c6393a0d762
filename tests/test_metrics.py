"""Dice / HD95 on hand-made masks, empty-mask conventions, CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from utils.metrics import dice, evaluate_case, evaluate_folder, hd95, write_metrics_csv


def test_dice_by_hand() -> None:
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros((6, 6, 6), bool)
    a[1:3, 1:3, 1:3] = True  # 8 voxels
    b[1:4, 1:3, 1:3] = True  # 12 voxels, 8 shared
    assert dice(a, b) == pytest.approx(2 * 8 / 20)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_hd95_single_voxels_anisotropic() -> None:
    a = np.zeros((4, 4, 5), bool)
    b = np.zeros((4, 4, 5), bool)
    a[0, 0, 0] = True
    b[0, 0, 3] = True
    assert hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    b2 = np.zeros_like(b)
    b2[3, 0, 0] = True
    assert hd95(a, b2, (1.5, 1.0, 2.0)) == pytest.approx(4.5)


def test_hd95_shifted_cube_by_hand() -> None:
    # Two 3x3x3 cubes shifted by one voxel along z (2.5 mm). Surface of A: 26 voxels.
    # A -> B: A's z=2 face (9 voxels) is 2.5 mm from B's bottom face; A's z=3 ring (8) and z=4 ring (8)
    # are on B's surface (0 mm); A's z=4 centre is inside B, 1 mm (y) from B's surface.
    # Sorted: 16 x 0, 1 x 1.0, 9 x 2.5 -> 95th percentile (index 23.75) = 2.5; B -> A symmetric.
    a = np.zeros((8, 7, 7), bool)
    b = np.zeros((8, 7, 7), bool)
    a[2:5, 2:5, 2:5] = True
    b[3:6, 2:5, 2:5] = True
    assert hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(2.5)
    assert hd95(a, a, (2.5, 1.0, 1.0)) == 0.0


def test_empty_conventions_are_finite() -> None:
    shape, spacing = (10, 10, 10), (2.5, 1.0, 1.0)
    empty = np.zeros(shape, bool)
    full = np.zeros(shape, bool)
    full[3:5, 3:5, 3:5] = True
    assert hd95(empty, empty, spacing) == 0.0
    diag = math.sqrt(25.0**2 + 10.0**2 + 10.0**2)
    assert hd95(full, empty, spacing) == pytest.approx(diag)
    assert hd95(empty, full, spacing) == pytest.approx(diag)
    pred = np.zeros(shape, np.uint8)
    ref = np.zeros(shape, np.uint8)
    ref[full] = 1
    row = evaluate_case(pred, ref, 3, spacing)
    assert row == {"dice_1": 0.0, "hd95_1": pytest.approx(diag), "dice_2": 1.0, "hd95_2": 0.0}
    assert all(math.isfinite(v) for v in row.values())


def test_csv_with_means(tmp_path: Path) -> None:
    rows = [
        {"case": "a", "dice_1": 1.0, "hd95_1": 0.0, "dice_2": 0.5, "hd95_2": 2.0},
        {"case": "b", "dice_1": 0.5, "hd95_1": 4.0, "dice_2": 0.0, "hd95_2": 6.0},
    ]
    means = write_metrics_csv(tmp_path / "m.csv", rows)
    assert means == {"dice_1": 0.75, "hd95_1": 2.0, "dice_2": 0.25, "hd95_2": 4.0}
    with open(tmp_path / "m.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["case"] for r in got] == ["a", "b", "mean"]
    assert list(got[0]) == ["case", "dice_1", "hd95_1", "dice_2", "hd95_2"]
    assert float(got[2]["dice_1"]) == 0.75 and float(got[2]["hd95_2"]) == 4.0


def test_evaluate_folder(tmp_path: Path) -> None:
    import SimpleITK as sitk

    ref = np.zeros((6, 7, 8), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[4:6, 4:6, 4:6] = 2  # raw "tumour" label, fused into class 1 by the label map
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:3] = 1
    for folder, arr in (("pred", pred), ("ref", ref)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 2.0))
        (tmp_path / folder).mkdir()
        sitk.WriteImage(img, str(tmp_path / folder / "c1.nii.gz"))
    rows, means = evaluate_folder(tmp_path / "pred", tmp_path / "ref", 2, label_map={"0": 0, "1": 1, "2": 1},
                                  csv_path=tmp_path / "m.csv")  # fmt: skip
    assert rows[0]["case"] == "c1" and rows[0]["dice_1"] == pytest.approx(2 * 8 / 24)
    assert means["dice_1"] == rows[0]["dice_1"] and (tmp_path / "m.csv").is_file()


def test_evaluate_case_with_background() -> None:
    """``include_background`` adds class 0 first (the original's multiClassDice reports it too)."""
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1
    pred = np.zeros_like(ref)
    pred[:1] = 1
    row = evaluate_case(pred, ref, 2, with_hd95=False, include_background=True)
    assert list(row) == ["dice_0", "dice_1"]
    assert row["dice_0"] == pytest.approx(2 * 32 / (48 + 32)) and row["dice_1"] == pytest.approx(2 * 16 / 48)
    assert list(evaluate_case(pred, ref, 2, with_hd95=False)) == ["dice_1"]
