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


def test_restore_and_write_same_affine(tmp_path: Path) -> None:
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
