"""Metrics promises (utils/metrics.py, docs/inference.md), by hand: HD95 with an anisotropic spacing
whose three values differ and a mask offset along one axis at a time (any permutation of the spacing
axes changes the answer), the surface definition, the percentile, and the per-case CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from utils.metrics import evaluate_case, evaluate_folder, hd95, mean_per_class, surface, write_metrics_csv

SPACING = (3.0, 1.0, 0.5)  # z, y, x mm


@pytest.mark.parametrize("axis, steps, want", [(0, 2, 6.0), (1, 3, 3.0), (2, 4, 2.0)])
def test_single_voxel_offset_along_one_axis(axis: int, steps: int, want: float) -> None:
    a = np.zeros((7, 8, 9), bool)
    b = np.zeros_like(a)
    a[2, 2, 2] = True
    where = [2, 2, 2]
    where[axis] += steps
    b[tuple(where)] = True
    assert hd95(a, b, SPACING) == pytest.approx(want)  # steps x that axis's spacing
    assert hd95(b, a, SPACING) == pytest.approx(want)


@pytest.mark.parametrize("axis, want", [(0, 3.0), (1, 1.0), (2, 0.5)])
def test_cube_shifted_along_one_axis(axis: int, want: float) -> None:
    """3×3×3 cubes one voxel apart along ``axis``: of A's 26 surface voxels 16 are on B's surface (0),
    9 are one step away (the axis's spacing) and the centre lies inside B, 0.5 mm (one x step) from
    its surface. 95th percentile (position 23.75 of 0..25): the axis's spacing."""
    a = np.zeros((8, 8, 8), bool)
    a[2:5, 2:5, 2:5] = True
    b = np.roll(a, 1, axis=axis)
    assert hd95(a, b, SPACING) == pytest.approx(want)
    pred, ref = a.astype(np.uint8), b.astype(np.uint8)
    row = evaluate_case(pred, ref, 2, SPACING)
    assert row == {"dice_1": pytest.approx(2 * 18 / 54), "hd95_1": pytest.approx(want)}


def test_empty_prediction_costs_the_diagonal_in_this_spacing() -> None:
    a = np.zeros((7, 8, 9), bool)
    b = np.zeros_like(a)
    b[3, 3, 3] = True
    # sqrt((7·3)² + (8·1)² + (9·0.5)²) = sqrt(441 + 64 + 20.25)
    assert hd95(a, b, SPACING) == pytest.approx(np.sqrt(525.25))


def test_surface_is_six_connected_and_the_array_border_counts() -> None:
    """A 3D cross (a voxel and its 6 face neighbours): the centre has no face neighbour outside, so it
    is not surface, although edge neighbours are outside. A mask filling the array: its border shell."""
    cross = np.zeros((5, 5, 5), bool)
    cross[2, 2, 1:4] = cross[2, 1:4, 2] = cross[1:4, 2, 2] = True
    want = cross.copy()
    want[2, 2, 2] = False
    np.testing.assert_array_equal(surface(cross), want)
    full = np.ones((4, 4, 4), bool)
    shell = full.copy()
    shell[1:3, 1:3, 1:3] = False
    np.testing.assert_array_equal(surface(full), shell)


def test_hd95_percentile_interpolates_linearly() -> None:
    """A: 22 voxels in a row along y, B: its first 20. A -> B distances (1 mm steps): 20 x 0, 1, 2; the
    95th percentile sits at position 0.95 · 21 = 19.95 between 0 and 1: 0.95 mm (B -> A: all 0)."""
    a = np.zeros((3, 24, 3), bool)
    a[1, 1:23, 1] = True
    b = np.zeros_like(a)
    b[1, 1:21, 1] = True
    assert hd95(a, b, SPACING) == pytest.approx(0.95)
    assert hd95(b, a, SPACING) == pytest.approx(0.95)  # symmetric: the larger of the two directions


def test_default_spacing_is_one_mm_and_3d_only() -> None:
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[2, 3, 4] = True  # sqrt(2² + 3² + 4²) voxels of 1 mm on every axis
    assert hd95(a, b) == pytest.approx(np.sqrt(29.0))
    row = evaluate_case(a.astype(np.uint8), b.astype(np.uint8), 2)
    assert row == {"dice_1": 0.0, "hd95_1": pytest.approx(np.sqrt(29.0))}
    with pytest.raises(ValueError):
        hd95(np.ones((3, 3), bool), np.ones((3, 3), bool))  # 2D masks of one shape
    with pytest.raises(ValueError):
        hd95(a, b[:5])


def test_background_only_when_asked() -> None:
    pred = np.zeros((4, 4, 4), np.uint8)
    ref = pred.copy()
    pred[1, 1, 1] = ref[1, 1, 1] = 1
    assert list(evaluate_case(pred, ref, 2, with_hd95=False)) == ["dice_1"]
    both = evaluate_case(pred, ref, 2, include_background=True)
    assert list(both) == ["dice_0", "hd95_0", "dice_1", "hd95_1"] and both["dice_0"] == 1.0


def test_means_and_csv_columns(tmp_path: Path) -> None:
    rows = [
        {
            "case": "a",
            "grid": "original",
            "voxels": 10,
            "hd95_2": 4.0,
            "dice_1": 1.0,
            "dice_2": 0.5,
            "hd95_1": 0.0,
        },
        {
            "case": "b",
            "grid": "original",
            "voxels": 30,
            "hd95_2": 2.0,
            "dice_1": 0.5,
            "dice_2": 0.0,
            "hd95_1": 6.0,
        },
    ]
    # only dice_* / hd95_* columns are averaged, not other numbers
    want = {"dice_1": 0.75, "hd95_1": 3.0, "dice_2": 0.25, "hd95_2": 3.0}
    assert mean_per_class(rows) == want
    assert write_metrics_csv(tmp_path / "m.csv", rows) == want
    with open(tmp_path / "m.csv", newline="") as f:
        header = next(csv.reader(f))
    # other columns first as found, then the metrics by class: dice before hd95
    assert header == ["case", "grid", "voxels", "dice_1", "hd95_1", "dice_2", "hd95_2"]


def _nifti(path: Path, array: np.ndarray) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def test_evaluate_folder_names_and_label_map(tmp_path: Path) -> None:
    """Plain .nii files count (case = name without .nii), hidden ._* and non-NIfTI files do not;
    raw values outside the label map -- also beyond 255 -- are background."""
    ref = np.zeros((4, 5, 6), np.int16)
    ref[0, 0, :3] = (1, 2, 255)  # all three mapped to class 1
    ref[1, 0, :2] = (256, 300)  # not in the map: background
    pred = np.zeros((4, 5, 6), np.uint8)
    pred[0, 0, :3] = 1
    _nifti(tmp_path / "ref" / "c2.nii", ref)
    _nifti(tmp_path / "pred" / "c2.nii", pred)
    _nifti(tmp_path / "pred" / "._c2.nii", pred)  # macOS junk: skipped
    (tmp_path / "pred" / "notes.txt").write_text("not an image")
    rows, means = evaluate_folder(
        tmp_path / "pred", tmp_path / "ref", 2, label_map={"0": 0, "1": 1, "2": 1, "255": 1}
    )
    assert [r["case"] for r in rows] == ["c2"]
    assert rows[0]["dice_1"] == 1.0 and rows[0]["hd95_1"] == 0.0 and means["dice_1"] == 1.0
