"""Putting a label map back into the original geometry and NIfTI round trips."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from inference.geometry import restore_to_original, sitk_affine_ras, write_label_nifti
from utils.preprocessing import resize_nearest


def _rotation(a: float, b: float) -> np.ndarray:
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _input_image(path: Path) -> tuple[sitk.Image, dict]:
    arr = np.arange(5 * 9 * 7, dtype=np.int16).reshape(5, 9, 7)  # (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3, 3.1))
    img.SetOrigin((10.0, -20.5, 5.25))
    img.SetDirection(_rotation(0.4, -0.3).ravel().tolist())
    sitk.WriteImage(img, str(path))
    sidecar = {
        "case": "c",
        "original_shape": [5, 9, 7],
        "crop_box": [[1, 4], [2, 8], [0, 7]],
        "resampled_shape": [6, 3, 14],
        "original_spacing_xyz": list(img.GetSpacing()),
        "origin_xyz": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
    }
    return img, sidecar


def test_resize_nearest() -> None:
    a = np.arange(4).reshape(4, 1, 1)
    np.testing.assert_array_equal(resize_nearest(a, (8, 1, 1)).ravel(), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(resize_nearest(a, (2, 1, 1)).ravel(), [1, 3])
    b = np.random.default_rng(0).integers(0, 3, (3, 4, 5))
    np.testing.assert_array_equal(resize_nearest(resize_nearest(b, (6, 8, 10)), (3, 4, 5)), b)


def test_restore_original_grid_ties_up_and_zero_beyond() -> None:
    """The original's way back: crop voxel i takes label voxel floor(i * original / target spacing
    + 0.5) per axis (SimpleITK nearest neighbour; ties exact here: binary spacings and origin, a signed
    permutation as direction), 0 where that lies beyond the label map, pasted at the crop box."""
    sidecar = {
        "original_shape": [5, 7, 12],
        "crop_box": [[1, 5], [1, 6], [2, 12]],  # crop (4, 5, 10)
        "resampled_shape": [2, 6, 11],
        "original_spacing_xyz": [1.25, 0.75, 2.0],
        "origin_xyz": [-100.5, 20.25, 7.0],
        "direction": [0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        "target_spacing": [4.0, 0.5, 1.0],  # (z, y, x): ratios z 0.5, y 1.5, x 1.25
        "resample_grid": "original",
    }
    label = (np.arange(2 * 6 * 11).reshape(2, 6, 11) + 1).astype(np.uint8)
    out = restore_to_original(label, sidecar)
    idx = [
        np.floor(np.arange(n) * r + 0.5).astype(int)
        for n, r in zip((4, 5, 10), (0.5, 1.5, 1.25), strict=True)
    ]
    assert [i.tolist() for i in idx] == [[0, 1, 1, 2], [0, 2, 3, 5, 6], [0, 1, 3, 4, 5, 6, 8, 9, 10, 11]]
    inside = [i < n for i, n in zip(idx, label.shape, strict=True)]
    gathered = label[np.ix_(*[np.minimum(i, n - 1) for i, n in zip(idx, label.shape, strict=True)])]
    expected = np.where(
        inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :], gathered, 0
    )
    assert out.shape == (5, 7, 12) and not out[0].any() and not out[:, 6].any() and not out[:, :, :2].any()
    np.testing.assert_array_equal(out[1:5, 1:6, 2:12], expected)
    assert not out[4].any()  # z index 2 is beyond the two label slices: 0, as in the original
    # the centred option (and a sidecar without "resample_grid", written before it existed)
    centred = np.zeros((5, 7, 12), np.uint8)
    centred[1:5, 1:6, 2:12] = resize_nearest(label, (4, 5, 10))
    np.testing.assert_array_equal(
        restore_to_original(label, {**sidecar, "resample_grid": "centred"}), centred
    )
    legacy = {k: v for k, v in sidecar.items() if k != "resample_grid"}
    np.testing.assert_array_equal(restore_to_original(label, legacy), centred)


def test_restore_and_write_same_affine(tmp_path: Path) -> None:
    """NIfTI geometry of the written label; the sidecar has no ``resample_grid`` (one written
    before it existed): the centred grid's way back."""
    in_path = tmp_path / "case_001.nii.gz"
    img, sidecar = _input_image(in_path)
    label = np.random.default_rng(1).integers(0, 3, (6, 3, 14)).astype(np.uint8)
    out_path = tmp_path / "out" / "case_001.nii.gz"
    full = write_label_nifti(label, sidecar, out_path)
    assert full.shape == (5, 9, 7) and full.dtype == np.uint8
    assert not full[0].any() and not full[4].any() and not full[:, :2].any() and not full[:, 8:].any()
    np.testing.assert_array_equal(full[1:4, 2:8, :], resize_nearest(label, (3, 6, 7)))
    np.testing.assert_array_equal(restore_to_original(label, sidecar), full)
    assert [p.name for p in out_path.parent.iterdir()] == ["case_001.nii.gz"]  # no temporaries left

    # SimpleITK
    back = sitk.ReadImage(str(out_path))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), full)
    ref = sitk.ReadImage(str(in_path))
    np.testing.assert_allclose(back.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), ref.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(sitk_affine_ras(back), sitk_affine_ras(ref), atol=1e-4)

    # nibabel
    n_in, n_out = nib.load(str(in_path)), nib.load(str(out_path))
    np.testing.assert_allclose(n_out.affine, n_in.affine, atol=1e-4)
    np.testing.assert_allclose(n_in.affine, sitk_affine_ras(ref), atol=1e-4)
    assert n_out.get_data_dtype() == np.uint8
    # nibabel's array is (x, y, z)
    np.testing.assert_array_equal(np.asarray(n_out.dataobj).transpose(2, 1, 0), full)
