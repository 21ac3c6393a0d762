"""Golden data of the preprocessing and of the way back to the original grid (``--only preprocess``).

Inputs (:func:`make_inputs`, NumPy and SimpleITK only, fixed seeds) are NIfTI files:

* a tiny Decathlon-format dataset with one training case for each of three paper-preset tasks:
  ``Task05_Prostate`` (4D float32, two modalities, zero background at the high sides, anisotropic
  spacing, rotated direction), ``Task03_Liver`` (int16 CT: air about -1024 with values below it, a
  zero slab, 3 mm slices resampled to 1 mm so that the last output slices lie beyond the input,
  tumour label 2) and ``Task04_Hippocampus`` (float32 at 1 mm: the sizes do not change; a stray
  label 254);
* two images whose label maps go back to the original grid: ``restore_4d`` (4D, anisotropic,
  negative direction cosines, target = Prostate's) and ``restore_ties`` (3D, a signed permutation
  as direction, spacings and origin exact in binary, so that source indices fall exactly on
  k + 0.5 and SimpleITK's rounding of ties is seen without floating-point noise).

:func:`generate` runs the original's ``utils.preprocess`` (crop, ``tinies.resample2fixedSpacing``,
clip, weight, normalisation) and ``utils.set_ND_volume_roi_with_bounding_box_range`` (its
``resample2fixedSize`` and the paste) on them and stores their outputs. It also checks that no
stored value depends on floating-point noise (no B-spline value within 1e-9 of where SimpleITK's
truncation to int16 would flip, none within 1e-12 x the largest of 0 for a ``> 0`` test, no nearest-neighbour source index within 1e-6 of
a tie except the exact ties of ``restore_ties``), so the tests give the same verdict on every
machine.

Nothing of this project is imported here (see ``make_golden.py``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

#: per task: dataset.json fields and the original's config_task fields
TASKS: dict[str, dict[str, Any]] = {
    "Task05_Prostate": {
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "pixel_spacing": [3.6, 0.625, 0.625],
        "patch_size": [20, 192, 192],
        "case": "prostate_00",
    },
    "Task03_Liver": {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "pixel_spacing": [1.0, 0.77, 0.77],
        "patch_size": [128, 128, 128],
        "case": "liver_0",
    },
    "Task04_Hippocampus": {
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "pixel_spacing": [1.0, 1.0, 1.0],
        "patch_size": [40, 56, 40],
        "case": "hippocampus_003",
    },
}

#: the images whose (random) label maps are put back into the original grid
RESTORE: dict[str, dict[str, Any]] = {
    "restore_4d": {"target_spacing": [3.6, 0.625, 0.625], "label_seed": 11, "num_class": 3},
    "restore_ties": {"target_spacing": [4.0, 0.5, 1.0], "label_seed": 12, "num_class": 3},
}


def _image(
    arrays: list[np.ndarray],
    spacing_zyx: tuple[float, ...],
    origin_xyz: tuple[float, ...],
    direction: tuple[float, ...],
) -> sitk.Image:
    """A 3D image (one array) or a 4D one (modalities on the 4th axis) with the given geometry."""
    if len(arrays) == 1:
        img = sitk.GetImageFromArray(arrays[0])
        img.SetSpacing(list(spacing_zyx[::-1]))
        img.SetOrigin(list(origin_xyz))
        img.SetDirection(list(direction))
        return img
    img = sitk.GetImageFromArray(np.stack(arrays), isVector=False)
    d4 = np.eye(4)
    d4[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    img.SetSpacing([*spacing_zyx[::-1], 1.0])
    img.SetOrigin([*origin_xyz, 0.0])
    img.SetDirection(d4.ravel().tolist())
    return img


def _ellipsoid(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 <= 1.0


_ROT = (-1.0, 0.0, 0.0, 0.0, -0.8, 0.6, 0.0, -0.6, -0.8)  # negative cosines, not axis-aligned


def _prostate(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    shape = (12, 34, 32)
    # MR signal everywhere except a zero background at the high y / high x sides (and its corner):
    # the crop cuts there, the planes the resampling starts on (index 0) are tissue
    inside = np.ones(shape, dtype=bool)
    inside[:, 27:, :] = False
    inside[:, :, 26:] = False
    inside &= ~_ellipsoid(shape, (6, 27, 26), (20, 7, 7))
    t2 = (300 + 80 * rng.standard_normal(shape)).clip(20, None) * inside
    adc = (900 + 150 * rng.standard_normal(shape)).clip(30, None) * inside
    label = np.zeros(shape, dtype=np.uint8)
    label[_ellipsoid(shape, (6, 14, 12), (4, 7, 6))] = 2
    label[_ellipsoid(shape, (6, 17, 12), (3, 4, 4))] = 1
    t2[label == 1] += 150
    adc[label == 2] -= 200
    return [t2.astype(np.float32), adc.astype(np.float32)], label


def _liver(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    shape = (11, 30, 28)
    body = _ellipsoid(shape, (5, 15, 16), (30, 13, 11))
    ct = np.where(body, 40 + 15 * rng.standard_normal(shape), -1024 + 12 * rng.standard_normal(shape))
    liver = _ellipsoid(shape, (5, 13, 14), (5, 6, 5)) & body
    tumour = _ellipsoid(shape, (5, 12, 13), (2, 2, 2))
    ct[liver] = 60 + 10 * rng.standard_normal(int(liver.sum()))
    ct[tumour] = 25 + 10 * rng.standard_normal(int(tumour.sum()))
    ct[_ellipsoid(shape, (5, 24, 16), (6, 1.5, 1.5))] = 700  # bone: the upper percentile
    ct[:, :, :6] = 0  # a zero slab (padding outside the scanned field): the crop cuts it
    label = np.zeros(shape, dtype=np.uint8)
    label[liver] = 1
    label[tumour & liver] = 2
    return [np.rint(ct).astype(np.int16)], label


def _hippocampus(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    shape = (20, 26, 18)
    mri = (120 + 25 * rng.standard_normal(shape)).clip(5, None)
    label = np.zeros(shape, dtype=np.uint8)
    label[_ellipsoid(shape, (8, 12, 9), (4, 5, 3))] = 1
    label[_ellipsoid(shape, (13, 14, 9), (3, 4, 3)) & (label == 0)] = 2
    mri[label > 0] += 40
    label[2, 3, 4] = 254  # the MSD quirk: a stray value in the background
    return [mri.astype(np.float32)], label


_CASES = {
    "Task05_Prostate": (_prostate, (4.1, 0.5703, 0.6641), (12.3, -45.6, 7.8), _ROT),
    "Task03_Liver": (_liver, (3.0, 0.71, 0.8), (-180.2, -160.7, -503.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "Task04_Hippocampus": (_hippocampus, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
}


def _restore_images(rng: np.random.Generator) -> dict[str, sitk.Image]:
    out = {}
    shape = (9, 30, 34)
    inside = np.zeros(shape, dtype=bool)
    inside[1:8, 3:20, 2:25] = True  # the crop cuts the high y and x sides
    mods = [
        ((200 + 50 * rng.standard_normal(shape)).clip(10, None) * inside).astype(np.float32) for _ in range(2)
    ]
    out["restore_4d"] = _image(mods, (4.0, 1.3, 0.7), (33.3, -12.7, 101.9), _ROT)
    shape = (14, 20, 18)
    inside = np.zeros(shape, dtype=bool)
    inside[3:12, 6:17, 7:16] = True
    vol = ((100 + 30 * rng.standard_normal(shape)).clip(10, None) * inside).astype(np.float32)
    out["restore_ties"] = _image(
        [vol], (2.0, 0.75, 1.25), (-100.5, 20.25, 7.0), (0, -1, 0, -1, 0, 0, 0, 0, 1)
    )
    return out


def make_inputs(tmpdir: str | Path) -> dict[str, Any]:
    """Write the inputs under ``tmpdir``.

    Returns:
        ``{"dataset": <folder with the three Task folders>, "cases": {task: (image, label)},
        "restore": {name: image}}`` (paths as strings).
    """
    root = Path(tmpdir)
    dataset = root / "dataset"
    cases: dict[str, tuple[str, str]] = {}
    for t_idx, (task, info) in enumerate(TASKS.items()):
        make, spacing, origin, direction = _CASES[task]
        images, label = make(np.random.default_rng(1000 + t_idx))
        tdir = dataset / task
        (tdir / "imagesTr").mkdir(parents=True, exist_ok=True)
        (tdir / "labelsTr").mkdir(parents=True, exist_ok=True)
        img_path = tdir / "imagesTr" / f"{info['case']}.nii.gz"
        lab_path = tdir / "labelsTr" / f"{info['case']}.nii.gz"
        sitk.WriteImage(_image(images, spacing, origin, direction), str(img_path))
        sitk.WriteImage(_image([label], spacing, origin, direction), str(lab_path))
        meta = {
            "name": task.split("_", 1)[1],
            "tensorImageSize": "4D" if len(images) > 1 else "3D",
            "modality": info["modality"],
            "labels": info["labels"],
            "numTraining": 1,
            "numTest": 0,
            "training": [
                {"image": f"./imagesTr/{info['case']}.nii.gz", "label": f"./labelsTr/{info['case']}.nii.gz"}
            ],
            "test": [],
        }
        (tdir / "dataset.json").write_text(json.dumps(meta, indent=2))
        cases[task] = (str(img_path), str(lab_path))
    restore = {}
    (root / "restore").mkdir(parents=True, exist_ok=True)
    for name, img in _restore_images(np.random.default_rng(2000)).items():
        path = root / "restore" / f"{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        restore[name] = str(path)
    return {"dataset": str(dataset), "cases": cases, "restore": restore}


def restore_label(name: str, resampled_shape: tuple[int, ...]) -> np.ndarray:
    """The predicted label map (in the preprocessed grid) that is put back for ``RESTORE[name]``."""
    info = RESTORE[name]
    rng = np.random.default_rng(info["label_seed"])
    return rng.integers(0, info["num_class"], size=tuple(resampled_shape)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# checks that the stored values do not hang on floating-point noise
# ---------------------------------------------------------------------------------------------


def _reference_geometry(path: str) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    img = sitk.ReadImage(path)
    if img.GetDimension() == 4:
        size = img.GetSize()
        img = sitk.Extract(img, (size[0], size[1], size[2], 0), (0, 0, 0, 0))
    return img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _bspline_float64(crop: np.ndarray, path: str, target_zyx: list[float]) -> np.ndarray:
    """The original's B-spline resampling of ``crop`` with a float64 output (no cast)."""
    spacing, origin, direction = _reference_geometry(path)
    old = np.asarray([round(s, 3) for s in spacing], dtype=float)
    new = np.asarray([round(s, 3) for s in target_zyx], dtype=float)[::-1]
    size = np.asarray(np.asarray(crop.shape, dtype=float)[::-1] * old / new, dtype=int)
    img = sitk.GetImageFromArray(crop.astype(np.float64))
    img.SetOrigin(origin)
    img.SetSpacing(old.tolist())
    img.SetDirection(direction)
    out = sitk.Resample(
        img,
        size.tolist(),
        sitk.Transform(),
        sitk.sitkBSpline,
        origin,
        new.tolist(),
        direction,
        0.0,
        sitk.sitkFloat64,
    )
    return sitk.GetArrayFromImage(out)


def _check_bspline_margin(v64: np.ndarray, dtype: np.dtype, what: str) -> None:
    """Integer output: no value within 1e-9 of a non-zero integer (SimpleITK truncates toward 0);
    float output: no value that is not exactly 0 within 1e-12 x the largest of 0 (rounding noise is
    about 1e-16 x the values summed)."""
    if dtype.kind in "iu":
        near = np.abs(v64 - np.rint(v64)) < 1e-9
        bad = near & (np.rint(v64) != 0)
    else:
        bad = (v64 != 0) & (np.abs(v64) < 1e-12 * np.abs(v64).max())
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} resampled values sit on floating-point noise")


def _check_no_ties(in_sizes_xyz: list[int], ratios_xyz: list[float], what: str, margin: float = 1e-6) -> None:
    """No nearest-neighbour source index i * ratio within ``margin`` of k + 0.5."""
    for n, r in zip(in_sizes_xyz, ratios_xyz, strict=True):
        x = np.arange(n) * r
        frac = x - np.floor(x)
        if np.any(np.abs(frac - 0.5) < margin):
            raise AssertionError(f"{what}: a nearest-neighbour tie (ratio {r})")


# ---------------------------------------------------------------------------------------------
# the original's outputs
# ---------------------------------------------------------------------------------------------


def _config(
    original: Any,
    task: str,
    num_class: int,
    pixel_spacing: list[float],
    labels: dict[str, str],
    patch_size: list[int],
    n_mod: int,
) -> Any:
    from tests.golden.original import task_config

    return task_config(
        task,
        num_class=num_class,
        labels=labels,
        patch_size=patch_size,
        pixel_spacing=pixel_spacing,
        num_modality=n_mod,
    )


def generate(original: Any, out_path: str | Path) -> None:
    """Run the original on the inputs and write ``out_path`` (npz)."""
    data: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(tmp)
        for task, info in TASKS.items():
            img_path, lab_path = inputs["cases"][task]
            n_mod = len(info["modality"])
            num_class = len(info["labels"])
            if task == "Task03_Liver":
                num_class = 2  # the original's config drops the "cancer" label: the training-label defect
            cfg = _config(
                original, task, num_class, info["pixel_spacing"], info["labels"], info["patch_size"], n_mod
            )
            volumes, label, weight, original_shape, (bbmin, bbmax) = original.utils.preprocess(
                img_path, lab_path, cfg
            )
            key = task
            data[f"{key}/image"] = np.asarray(volumes).astype(np.float32)
            data[f"{key}/image_dtype"] = np.asarray(str(np.asarray(volumes).dtype))
            data[f"{key}/label"] = np.asarray(label).astype(np.uint8)
            data[f"{key}/weight"] = np.asarray(weight).astype(np.uint8)
            data[f"{key}/original_shape"] = np.asarray(original_shape, dtype=np.int64)
            data[f"{key}/bbox"] = np.asarray([bbmin, bbmax], dtype=np.int64)
            if task == "Task03_Liver":
                # what the original's pipeline meant: keep label 2 through preprocessing, then its
                # preprocess_taskSep fuses cancer into liver (label == 2 -> 1)
                cfg3 = _config(
                    original, task, 3, info["pixel_spacing"], info["labels"], info["patch_size"], 1
                )
                _, label3, _, _, _ = original.utils.preprocess(img_path, lab_path, cfg3)
                fused = np.asarray(label3).copy()
                fused[fused == 2] = 1
                data[f"{key}/label_fused"] = fused.astype(np.uint8)
            # noise checks: B-spline values (modality by modality) and nearest-neighbour ties
            sitk_img = sitk.ReadImage(img_path)
            arr = sitk.GetArrayFromImage(sitk_img)
            arr = arr[np.newaxis] if sitk_img.GetDimension() == 3 else arr
            crop = tuple(slice(a, b + 1) for a, b in zip(bbmin, bbmax, strict=True))
            for m in range(arr.shape[0]):
                v64 = _bspline_float64(arr[m][crop], img_path, info["pixel_spacing"])
                _check_bspline_margin(v64, arr.dtype, f"{task} modality {m}")
            spacing, _, _ = _reference_geometry(img_path)
            crop_xyz = [b - a + 1 for a, b in zip(bbmin, bbmax, strict=True)][::-1]
            new_xyz = [round(s, 3) for s in info["pixel_spacing"]][::-1]
            out_xyz = [int(n * round(s, 3) / t) for n, s, t in zip(crop_xyz, spacing, new_xyz, strict=True)]
            _check_no_ties(out_xyz, [t / round(s, 3) for s, t in zip(spacing, new_xyz, strict=True)], task)

        for name, info in RESTORE.items():
            path = inputs["restore"][name]
            n_mod = 2 if sitk.ReadImage(path).GetDimension() == 4 else 1
            cfg = _config(
                original,
                name,
                info["num_class"],
                info["target_spacing"],
                {"0": "background", "1": "a", "2": "b"},
                [16, 16, 16],
                n_mod,
            )
            volumes, _, _, original_shape, (bbmin, bbmax) = original.utils.preprocess(
                path, None, cfg, with_gt=False
            )
            shape = np.asarray(volumes).shape[1:]
            pred = restore_label(name, shape).astype(np.int16)  # the original's evaluate pasted int16 maps
            pasted = original.utils.set_ND_volume_roi_with_bounding_box_range(
                cfg, np.zeros(original_shape, np.int16), bbmin, bbmax, pred, sitk.sitkNearestNeighbor, path
            )
            data[f"{name}/resampled_shape"] = np.asarray(shape, dtype=np.int64)
            data[f"{name}/original_shape"] = np.asarray(original_shape, dtype=np.int64)
            data[f"{name}/bbox"] = np.asarray([bbmin, bbmax], dtype=np.int64)
            data[f"{name}/pasted"] = np.asarray(pasted).astype(np.uint8)
            spacing, _, _ = _reference_geometry(path)
            crop_xyz = [b - a + 1 for a, b in zip(bbmin, bbmax, strict=True)][::-1]
            ratios = [s / t for s, t in zip(spacing, info["target_spacing"][::-1], strict=True)]
            if name == "restore_ties":
                # exact binary geometry: SimpleITK's nearest neighbour is floor(i * ratio + 0.5), 0 beyond
                crop = pasted[tuple(slice(a, b + 1) for a, b in zip(bbmin, bbmax, strict=True))]
                idx = [
                    np.floor(np.arange(n) * r + 0.5).astype(int)
                    for n, r in zip(crop_xyz, ratios, strict=True)
                ]
                iz, iy, ix = idx[::-1]
                ok = (
                    (iz[:, None, None] < shape[0])
                    & (iy[None, :, None] < shape[1])
                    & (ix[None, None, :] < shape[2])
                )
                expect = np.where(
                    ok,
                    pred[
                        np.ix_(
                            np.minimum(iz, shape[0] - 1),
                            np.minimum(iy, shape[1] - 1),
                            np.minimum(ix, shape[2] - 1),
                        )
                    ],
                    0,
                )
                if not np.array_equal(crop, expect):
                    raise AssertionError(
                        "restore_ties: SimpleITK's nearest neighbour is not floor(i * r + 0.5)"
                    )
            else:
                _check_no_ties(crop_xyz, ratios, name)
    data["tasks"] = np.asarray(list(TASKS))
    data["restore_names"] = np.asarray(list(RESTORE))
    np.savez_compressed(out_path, **data)
