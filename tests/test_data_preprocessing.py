"""Per-case preprocessing steps on tiny generated volumes (CPU, well under a second each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.geometry import restore_to_original
from utils.decathlon import DataError, Geometry
from utils.io_utils import read_json
from utils.preprocessing import (
    case_is_done,
    clip_ct,
    crop_to_box,
    nonzero_bbox,
    preprocess_arrays,
    preprocess_case,
    preprocess_image,
    resample_to_spacing,
    resample_volume,
    save_case,
    zero_background,
)
from utils.task_settings import NORMALISATION, build_plans, estimate_resampled_shape


def _plans(
    target=(1.0, 1.0, 1.0), modalities=("MRI",), label_map=None, num_classes=3, grid="original"
) -> dict:
    lm = label_map or {str(i): i for i in range(num_classes)}
    return {
        "modalities": list(modalities),
        "is_ct": modalities[0] == "CT",
        "label_map": lm,
        "num_classes": num_classes,
        "target_spacing": list(target),
        "resample_grid": grid,
        "normalisation": {k: (list(v) if isinstance(v, tuple) else v) for k, v in NORMALISATION.items()},
    }


def _write(path: Path, arr: np.ndarray, spacing_zyx, origin=(10.0, -20.0, 5.0), direction=None) -> Path:
    four_d = arr.ndim == 4
    img = sitk.GetImageFromArray(arr, isVector=False)
    sp = list(spacing_zyx[::-1])
    if four_d:
        img.SetSpacing([*sp, 1.0])
        img.SetOrigin([*origin, 0.0])
        if direction is not None:
            d4 = np.eye(4)
            d4[:3, :3] = np.reshape(direction, (3, 3))
            img.SetDirection(d4.ravel().tolist())
    else:
        img.SetSpacing(sp)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def _ball(shape, spacing_zyx, centre_mm, radius_mm) -> np.ndarray:
    zz, yy, xx = np.meshgrid(
        *[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing_zyx, strict=True)], indexing="ij"
    )
    return ((zz - centre_mm[0]) ** 2 + (yy - centre_mm[1]) ** 2 + (xx - centre_mm[2]) ** 2) < radius_mm**2


def test_crop_box_is_nonzero_bbox_widened_by_5() -> None:
    v = np.zeros((30, 40, 50), np.float32)
    v[10:12, 3:20, 44:47] = 1.0
    assert nonzero_bbox(v) == [[5, 17], [0, 25], [39, 50]]  # half-open, clipped to the volume
    assert crop_to_box(np.stack([v, v]), nonzero_bbox(v)).shape == (2, 12, 25, 11)
    assert nonzero_bbox(np.zeros((3, 4, 5))) == [[0, 3], [0, 4], [0, 5]]


def test_spacing_after_resampling_within_one_percent(tmp_path: Path) -> None:
    spacing = (3.0, 0.8, 0.8)
    shape = (20, 60, 60)
    img = np.where(_ball(shape, spacing, (30, 24, 24), 15), 200.0, 100.0).astype(np.float32)
    lab = _ball(shape, spacing, (30, 24, 24), 15).astype(np.uint8)
    ip, lp = _write(tmp_path / "i.nii.gz", img, spacing), _write(tmp_path / "l.nii.gz", lab, spacing)
    plans = _plans(target=(1.5, 1.2, 1.2), num_classes=2)
    image, label, weight, side = preprocess_case(ip, lp, plans)
    assert image.shape[1:] == label.shape == weight.shape == tuple(side["resampled_shape"])
    crop = np.diff(np.asarray(side["crop_box"]), axis=1).ravel()
    extent_mm = crop * np.asarray(spacing)
    effective = extent_mm / np.asarray(side["resampled_shape"])
    np.testing.assert_allclose(effective, plans["target_spacing"], rtol=0.01)
    # the ball keeps its physical volume (4/3 pi r^3) within a few percent
    vol_mm3 = label.sum() * np.prod(plans["target_spacing"])
    assert vol_mm3 == pytest.approx(4 / 3 * np.pi * 15**3, rel=0.05)
    assert side["class_voxels"] == [int((label == 0).sum()), int(label.sum())]


def test_resample_volume_same_extent_and_label_dtype() -> None:
    x = np.linspace(0, 1, 40, dtype=np.float32)[None, None, :] * np.ones((10, 12, 40), np.float32)
    r = resample_volume(x, (2.0, 1.0, 1.0), (20, 12, 20))
    assert r.shape == (20, 12, 20) and r.dtype == np.float32
    assert abs(float(r.mean()) - float(x.mean())) < 0.01  # same extent: no shift, no border fill
    lab = (x > 0.5).astype(np.uint8)
    rl = resample_volume(lab, (2.0, 1.0, 1.0), (20, 12, 20), is_label=True)
    assert rl.dtype == np.uint8 and set(np.unique(rl)) == {0, 1} and rl[0, 0, 9] == 0 and rl[0, 0, 10] == 1


def test_mr_normalisation_foreground_mean0_std1(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    shape, spacing = (30, 30, 30), (1.2, 1.0, 1.0)
    head = _ball(shape, spacing, (18, 15, 15), 9)
    img = np.where(head, 300 + 40 * rng.standard_normal(shape), 0).astype(np.float32)
    img[_ball(shape, spacing, (18, 15, 15), 4)] += 120
    image, weight, side = preprocess_image(_write(tmp_path / "mr.nii.gz", img, spacing), _plans())
    fg = image[0][weight == 1]
    assert abs(float(fg.mean())) < 1e-3 and float(fg.std()) == pytest.approx(1.0, abs=1e-3)
    assert np.all(image[0][weight == 0] <= 0)  # background was zero and stays at or below zero
    assert all(a > 0 and b < n for (a, b), n in zip(side["crop_box"], shape, strict=True))  # zeros cropped
    assert "class_voxels" not in side


def _znorm_by_hand(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Independent reference for step 4 on an already clipped volume: percentile clip to [lo, hi],
    z-score with mean/std (float64) of the voxels > 0, zeros stay 0."""
    v = np.clip(v.astype(np.float64), lo, hi)
    fg = v[v > 0]
    out = (v - fg.mean()) / fg.std()
    out[v == 0] = 0.0
    return out


def test_clip_ct_sets_values_below_minimum_in_place() -> None:
    v = np.array([-3024.0, -1024.5, -1024.0, -1023.0, 0.0, 1500.0], np.float32)
    out = clip_ct(v)
    assert out is v  # in place
    np.testing.assert_array_equal(v, [-1024.0, -1024.0, -1024.0, -1023.0, 0.0, 1500.0])
    w = np.array([-1000.0, -600.0, -599.0, 20.0], np.float32)
    np.testing.assert_array_equal(clip_ct(w, -600.0), [-600.0, -600.0, -599.0, 20.0])


def test_ct_clip_and_weight_map(tmp_path: Path) -> None:
    shape, spacing = (16, 20, 20), (2.5, 1.0, 1.0)
    # every z column is constant, so the z-only resampling (2.5 mm -> 1 mm, y/x grids unchanged)
    # reproduces the slice pattern exactly and the result can be predicted voxel by voxel
    sl = np.full(shape[1:], -3024.0)  # outside the scanner's field of view
    sl[4:16, 4:16] = 40.0 + 10.0 * (np.arange(4, 16) % 3)  # tissue 40 / 50 / 60 HU, varying in x
    sl[8:12, 8:12] = -500.0  # a lung-like hole: above -1024, kept
    img = np.broadcast_to(sl, shape).astype(np.float32)
    image, weight, side = preprocess_image(
        _write(tmp_path / "ct.nii.gz", img, spacing), _plans(modalities=("CT",))
    )
    assert side["crop_box"] == [[0, 16], [0, 20], [0, 20]] and image.shape == (1, 40, 20, 20)
    # the original grid samples input slice i * 0.4: the last one (15.6) lies beyond the input
    # (its voxels reach 15.5), so it is 0 there (weight 0, image 0), as in the original
    assert np.all(weight[-1] == 0) and np.all(image[0, -1] == 0)
    weight, image = weight[:-1], image[:, :-1]
    tissue = sl > 0
    assert weight.dtype == np.uint8
    np.testing.assert_array_equal(weight, np.broadcast_to(tissue, weight.shape).astype(np.uint8))
    # by hand: -3024 -> -1024 (64 % of the voxels, so the 2nd percentile is -1024 and the 98th 60 HU),
    # then z-score with the tissue's mean and std
    clipped = np.maximum(sl, -1024.0)
    mean, std = sl[tissue].mean(), sl[tissue].std()
    assert std > 5  # a real z-score, not the constant-volume fallback
    expected = _znorm_by_hand(clipped, -1024.0, 60.0)
    np.testing.assert_allclose(image[0], np.broadcast_to(expected, image.shape[1:]), rtol=0, atol=1e-3)
    air = image[0][:, sl == -3024.0]
    np.testing.assert_allclose(air, (-1024.0 - mean) / std, rtol=0, atol=1e-3)  # the value -1024 HU gives
    # without the CT clip, the air (-3024) would set the 2nd percentile and stay at its own value
    assert abs((-3024.0 - mean) / std - (-1024.0 - mean) / std) > 100


def test_ct_clip_min_from_plans_for_every_task_or_ct_only() -> None:
    rng = np.random.default_rng(3)
    shape = (6, 10, 10)
    vol = rng.uniform(20.0, 80.0, shape)  # tissue
    vol[:, :, :2] = -3000.0  # 20 % air far below any clip
    vol[:, :, 2:3] = -2000.0  # 10 % below -1024 too
    vol[:, :, 3:4] = -700.0  # 10 % between -1024 and -600
    geom = Geometry((6, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    image = vol[None].astype(np.float32)  # same spacing as the target: values kept (to float noise)
    cases = ((True, -1024.0, "all"), (True, -600.0, "all"), (False, -1024.0, "all"), (False, -1024.0, "ct"))
    for is_ct, ct_min, clip_for in cases:
        plans = {**_plans(modalities=("CT",)), "is_ct": is_ct}
        plans["normalisation"] = {**plans["normalisation"], "ct_clip_min": ct_min, "ct_clip_for": clip_for}
        out, weight, _, _ = preprocess_arrays(image, geom, plans)
        clipped = is_ct or clip_for == "all"  # the original clipped every task; "ct": CT tasks only
        ref = np.maximum(vol, ct_min) if clipped else vol.copy()
        lo, hi = np.percentile(ref, [2, 98])
        np.testing.assert_allclose(out[0], _znorm_by_hand(ref, lo, hi), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(weight, (vol > 0).astype(np.uint8))
        a, b, c = out[0, 0, 0, 0], out[0, 0, 0, 2], out[0, 0, 0, 3]  # -3000, -2000, -700 HU
        if clipped and ct_min == -1024.0:
            assert a == b and c > b  # both below -1024 end equal, -700 is kept
        elif clipped:
            assert a == b == c  # everything below -600 is clipped to it
        else:
            assert a < b < c  # no CT clip: the three stay apart (the 2nd percentile lies in the -3000 block)


def test_label_values_and_tumour_fusion(tmp_path: Path) -> None:
    shape, spacing = (16, 16, 16), (1.0, 1.0, 1.0)
    img = np.full(shape, 100.0, np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[3:12, 3:12, 3:12] = 1
    lab[6:9, 6:9, 6:9] = 2
    lab[0, 0, 0] = 254  # stray value
    ip, lp = _write(tmp_path / "i.nii.gz", img, spacing), _write(tmp_path / "l.nii.gz", lab, spacing)
    _, keep, _, _ = preprocess_case(ip, lp, _plans())
    assert set(np.unique(keep)) == {0, 1, 2}
    fused_plans = _plans(label_map={"0": 0, "1": 1, "2": 1}, num_classes=2)
    _, fused, _, side = preprocess_case(ip, lp, fused_plans)
    assert set(np.unique(fused)) == {0, 1} and fused.sum() == (lab[lab < 3] > 0).sum()
    assert side["class_voxels"][1] == 9**3


def test_4d_image_two_modalities(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    shape, spacing = (8, 20, 20), (3.0, 0.8, 0.8)
    body = np.zeros(shape, bool)
    body[:, 3:17, 3:17] = True
    t2 = np.where(body, 500 + 50 * rng.standard_normal(shape), 0)
    adc = np.where(body, 1500 + 200 * rng.standard_normal(shape), 0)
    arr = np.stack([t2, adc]).astype(np.float32)
    direction = (0.98, -0.2, 0.0, 0.2, 0.98, 0.0, 0.0, 0.0, 1.0)
    direction = tuple(np.linalg.qr(np.reshape(direction, (3, 3)))[0].ravel() * np.sign(0.98))
    ip = _write(tmp_path / "p.nii.gz", arr, spacing, direction=direction)
    lp = _write(tmp_path / "pl.nii.gz", body.astype(np.uint8), spacing, direction=direction)
    plans = _plans(target=(3.0, 1.6, 1.6), modalities=("T2", "ADC"), num_classes=2)
    image, label, weight, side = preprocess_case(ip, lp, plans)
    assert image.shape == (2, *label.shape) and image.dtype == np.float32
    for m in range(2):
        fg = image[m][weight == 1]
        assert abs(float(fg.mean())) < 0.05 and float(fg.std()) == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(side["direction"], direction, atol=1e-5)
    with pytest.raises(DataError, match="dataset.json lists 3 modalities"):
        preprocess_image(ip, _plans(modalities=("T2", "ADC", "DWI")))


def test_sidecar_round_trip(tmp_path: Path) -> None:
    shape, spacing = (12, 30, 26), (2.0, 0.7, 0.9)
    origin, direction = (-12.5, 40.0, 7.25), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    lab = _ball(shape, spacing, (12, 10, 12), 7).astype(np.uint8)
    img = np.where(lab > 0, 80.0, 20.0).astype(np.float32)
    img[:, :, :8] = 0  # something to crop
    ip = _write(tmp_path / "case_7.nii.gz", img, spacing, origin, direction)
    lp = _write(tmp_path / "case_7_l.nii.gz", lab, spacing, origin, direction)
    image, label, weight, side = preprocess_case(ip, lp, _plans(target=(1.0, 1.0, 1.0), num_classes=2))
    out = tmp_path / "train"
    files = save_case(out, "case_7", image, weight, side, label=label)
    assert case_is_done(out, "case_7", with_label=True)
    back = read_json(files["sidecar"])
    assert back == json.loads(json.dumps(side))  # plain JSON, nothing lost
    ref = sitk.ReadImage(str(ip))
    assert back["case"] == "case_7" and back["original_shape"] == list(shape)
    np.testing.assert_allclose(back["original_spacing_xyz"], ref.GetSpacing())
    np.testing.assert_allclose(back["origin_xyz"], ref.GetOrigin())
    np.testing.assert_allclose(back["direction"], ref.GetDirection())
    assert back["crop_box"] == [[0, 12], [0, 30], [3, 26]] and back["resample_grid"] == "original"
    # the sidecar suffices to put the label back into the original grid
    restored = restore_to_original(np.load(files["label"]), back)
    dice = 2 * np.sum((restored > 0) & (lab > 0)) / (restored.sum() + lab.sum())
    assert dice > 0.9
    for key in ("image", "label", "weight"):
        assert np.load(files[key], mmap_mode="r").shape[-3:] == tuple(back["resampled_shape"])


def test_zero_mask_stops_bspline_ringing_in_zero_background(tmp_path: Path) -> None:
    shape, spacing = (24, 24, 24), (1.1, 1.1, 1.1)
    ball = _ball(shape, spacing, (13, 13, 13), 7)
    img = np.where(ball, 300.0, 0.0).astype(np.float32)
    path = _write(tmp_path / "b.nii.gz", img, spacing)
    paper = _plans()  # zero_mask "none": the B-spline's tiny ringing values count as > 0
    improved = {**_plans(), "normalisation": {**_plans()["normalisation"], "zero_mask": "nearest"}}
    _, w_paper, _ = preprocess_image(path, paper)
    image, w_imp, side = preprocess_image(path, improved)
    box = side["crop_box"]
    nearest = resample_to_spacing(
        crop_to_box(ball.astype(np.uint8), box),
        spacing,
        side["target_spacing"],
        origin_xyz=side["origin_xyz"],
        direction=side["direction"],
        is_label=True,
    )
    assert int(w_imp.sum()) == int(nearest.sum())  # exactly the original non-zero region
    assert w_paper.sum() > 3 * w_imp.sum()  # without the mask, ringing leaks far into the background
    assert np.all(image[0][w_imp == 0] == 0)


def test_zero_background_is_border_connected_zeros_only() -> None:
    v = np.ones((10, 10, 10), np.int16)
    v[:, :, :2] = 0  # background touching the border
    v[5, 5, 5] = 0  # a 0 HU voxel inside tissue
    bg = zero_background(v)
    assert bg[:, :, :2].all() and not bg[5, 5, 5] and bg.sum() == 200


def test_estimate_resampled_shape_original_truncates_centred_rounds() -> None:
    # original: int(n * round(s, 3) / round(t, 3)); centred: round(n * s / t)
    shape, spacing, target = (20, 33, 7), (0.625, 0.7031, 3.0), (0.8, 0.77, 1.0)
    assert estimate_resampled_shape(shape, spacing, target) == (15, 30, 21)
    assert estimate_resampled_shape(shape, spacing, target, "centred") == (16, 30, 21)
    # spacings rounded to 3 decimals first: 10 x 0.7999 mm at 0.8 mm are 10 voxels, not 9
    assert estimate_resampled_shape((10, 10, 10), (0.7999,) * 3, (0.8,) * 3) == (10, 10, 10)
    assert estimate_resampled_shape((1, 1, 1), (0.5,) * 3, (3.0,) * 3) == (1, 1, 1)  # never 0
    with pytest.raises(ValueError, match="resample grid"):
        estimate_resampled_shape(shape, spacing, target, "corner")


def test_original_grid_nearest_positions_and_zero_beyond_input() -> None:
    """Output voxel i samples input index i * target / spacing from the same origin (nearest:
    floor(x + 0.5), ties up); one beyond the input's last voxel (index > n - 0.5) gets 0."""
    lab = np.arange(1, 5, dtype=np.uint8).reshape(1, 1, 4)
    ident = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    up = resample_to_spacing(
        lab, (1.0, 1.0, 3.0), (1.0, 1.0, 1.0), origin_xyz=(4.0, -2.0, 8.0), direction=ident, is_label=True
    )
    np.testing.assert_array_equal(up.ravel(), [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 0])  # 12 = int(4 * 3 / 1)
    lab10 = np.arange(1, 11, dtype=np.uint8).reshape(1, 1, 10)
    down = resample_to_spacing(
        lab10, (1.0, 1.0, 1.0), (1.0, 1.0, 1.5), origin_xyz=(0.0, 0.0, 0.0), direction=ident, is_label=True
    )
    np.testing.assert_array_equal(down.ravel(), [1, 3, 4, 6, 7, 9])  # 0, 1.5->2, 3, 4.5->5, 6, 7.5->8


def test_original_grid_keeps_int16_and_resamples_equal_sizes() -> None:
    """An int16 volume stays int16 (SimpleITK truncates the B-spline value toward 0), and it is
    resampled even when its size does not change (the identity B-spline moves some voxels by 1)."""
    rng = np.random.default_rng(5)
    vol = rng.integers(-1100, 400, (10, 12, 9)).astype(np.int16)
    origin, direction = (3.5, -2.0, 7.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    out = resample_to_spacing(vol, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), origin_xyz=origin, direction=direction)
    assert out.dtype == np.int16 and out.shape == vol.shape
    ref = resample_to_spacing(
        vol.astype(np.float64), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), origin_xyz=origin, direction=direction
    )
    np.testing.assert_array_equal(out, np.trunc(ref).astype(np.int16))
    assert np.abs(ref - vol).max() < 1e-6 and (out != vol).any()  # not a copy


def test_preprocess_pixel_type_grid_and_legacy_plans(tmp_path: Path) -> None:
    """The file's int16 type is what the original grid resamples; the centred grid (option, and
    plans written before ``resample_grid`` existed) resamples float32 over the crop's extent."""
    rng = np.random.default_rng(6)
    shape, spacing = (10, 24, 22), (2.5, 0.7, 0.7)
    ct = np.where(_ball(shape, spacing, (12, 8, 8), 6), 60, -1024) + rng.integers(-20, 20, shape)
    path = _write(tmp_path / "ct.nii.gz", ct.astype(np.int16), spacing)
    target = (1.0, 0.77, 0.77)
    img, weight, side = preprocess_image(path, _plans(target=target, modalities=("CT",)))
    # truncated in float64 as the original: 24 * 0.7 / 0.77 = 21.8 -> 21, 22 * 0.7 / 0.77 = 19.999... -> 19
    assert side["resample_grid"] == "original" and img.shape[1:] == (25, 21, 19)
    as_int = resample_to_spacing(
        ct.astype(np.int16), spacing, target, origin_xyz=side["origin_xyz"], direction=side["direction"]
    )
    np.testing.assert_array_equal(weight, (np.maximum(as_int, -1024) > 0).astype(np.uint8))
    centred = _plans(target=target, modalities=("CT",), grid="centred")
    img_c, _, side_c = preprocess_image(path, centred)
    assert side_c["resample_grid"] == "centred" and img_c.shape[1:] == (25, 22, 20)  # rounded
    legacy = {k: v for k, v in centred.items() if k != "resample_grid"}
    img_l, _, side_l = preprocess_image(path, legacy)
    assert side_l["resample_grid"] == "centred"
    np.testing.assert_array_equal(img_l, img_c)
    with pytest.raises(ValueError, match="resample_grid"):
        preprocess_image(path, {**centred, "resample_grid": "corner"})


def test_plans_record_the_grid_and_derive_the_spacing_it_resamples_to() -> None:
    """Derived target spacing: the median to 3 decimals on the original grid (the spacing its
    arrays have), 4 on the centred one; the median shape follows each grid's rule."""
    spacings, shapes = [(2.5, 0.78125, 0.78125)] * 3, [(40, 100, 100)] * 3
    plans = build_plans("Task555_New", ["CT"], {0: "bg", 1: "organ"}, spacings, shapes)
    assert plans["resample_grid"] == "original" and plans["target_spacing"] == [2.5, 0.781, 0.781]
    assert plans["median_resampled_shape"] == [40, 100, 100]  # int(100 * 0.781 / 0.781)
    assert plans["normalisation"]["ct_clip_for"] == "all"
    centred = build_plans(
        "Task555_New",
        ["CT"],
        {0: "bg", 1: "organ"},
        spacings,
        shapes,
        resample_grid="centred",
        ct_clip_for="ct",
    )
    assert centred["target_spacing"] == [2.5, 0.7812, 0.7812] and centred["resample_grid"] == "centred"
    assert centred["normalisation"]["ct_clip_for"] == "ct"
    assert {"resample_grid", "ct_clip_for"} <= set(centred["overrides"])
    with pytest.raises(ValueError, match="resample_grid"):
        build_plans("Task555_New", ["CT"], {0: "bg", 1: "organ"}, spacings, shapes, resample_grid="corner")
