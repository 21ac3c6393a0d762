"""Golden tests: preprocessing and the way back to the original grid equal the original's.

The stored outputs come from the original's own ``utils.preprocess`` and
``utils.set_ND_volume_roi_with_bounding_box_range`` (``tests/golden/gen_preprocess.py``, which also
checks that none of them hangs on floating-point noise); the inputs are rebuilt here. Labels,
weights, crop boxes and shapes must be equal, normalised images equal within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

import preprocess_taskSep
from inference.geometry import restore_to_original, write_label_nifti
from tests.golden.gen_preprocess import RESTORE, TASKS, make_inputs, restore_label
from utils.preprocessing import preprocess_case, preprocess_image
from utils.task_settings import build_plans

GOLDEN = Path(__file__).resolve().parent / "golden" / "data" / "preprocess.npz"


@pytest.fixture(scope="module")
def golden() -> Any:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_inputs(tmp_path_factory.mktemp("golden_preprocess"))


@pytest.fixture(scope="module")
def prep_dir(inputs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    prep = tmp_path_factory.mktemp("golden_prep")
    args = ["--dataset_dir", inputs["dataset"], "--prep_dir", str(prep), "--nProc", "1", "--no_progress"]
    assert preprocess_taskSep.main([*args, "--no_folds"]) == 0
    return prep


def _box(golden: dict[str, np.ndarray], key: str) -> list[list[int]]:
    """The original's inclusive [bbmin, bbmax] as this project's half-open crop box."""
    bbmin, bbmax = golden[f"{key}/bbox"]
    return [[int(a), int(b) + 1] for a, b in zip(bbmin, bbmax, strict=True)]


@pytest.mark.parametrize("task", list(TASKS))
def test_preprocess_task_equals_original(task: str, golden: dict[str, np.ndarray], prep_dir: Path) -> None:
    case = TASKS[task]["case"]
    folder = prep_dir / task / "train"
    side = json.loads((folder / f"{case}.json").read_text())
    image = np.load(folder / f"{case}_image.npy")
    label = np.load(folder / f"{case}_label.npy")
    weight = np.load(folder / f"{case}_weight.npy")
    plans = json.loads((prep_dir / task / "plans.json").read_text())
    assert plans["resample_grid"] == "original" and side["resample_grid"] == "original"

    assert side["original_shape"] == golden[f"{task}/original_shape"].tolist()
    assert side["crop_box"] == _box(golden, task)
    expected = golden[f"{task}/image"]
    assert image.shape == expected.shape and side["resampled_shape"] == list(expected.shape[1:])
    np.testing.assert_array_equal(weight, golden[f"{task}/weight"])
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)
    # Liver: the original pipeline's label with the tumour fused into the liver (its preprocess_taskSep
    # fused after preprocessing); see test_liver_training_label_defect_as_an_option
    want = golden[f"{task}/label_fused"] if task == "Task03_Liver" else golden[f"{task}/label"]
    np.testing.assert_array_equal(label, want)


def test_preprocess_golden_inputs_cover_the_cases_that_matter(golden: dict[str, np.ndarray]) -> None:
    """The inputs exercise what differs from the centred grid: truncated sizes, output voxels beyond
    the input (Liver: 3 mm -> 1 mm), an int16 CT, a stray 254 and equal sizes (Hippocampus)."""
    liver = golden["Task03_Liver/image"][0]
    assert liver.shape[0] == 33  # int(11 * 3.0 / 1.0); the last slice lies beyond the input: 0 there
    assert np.all(golden["Task03_Liver/weight"][-1] == 0)
    assert golden["Task05_Prostate/image"].shape[1:] == (13, 29, 32)
    assert golden["Task04_Hippocampus/image"].shape[1:] == tuple(golden["Task04_Hippocampus/original_shape"])


def test_liver_training_label_defect_as_an_option(
    golden: dict[str, np.ndarray], inputs: dict[str, Any], prep_dir: Path
) -> None:
    """The original's own training label lost the tumour (values > 1 zeroed before the fusion);
    ``--label_map 0:0,1:1,2:0`` reproduces it exactly, the default fuses it into the liver."""
    plans = json.loads((prep_dir / "Task03_Liver" / "plans.json").read_text())
    plans["label_map"] = {"0": 0, "1": 1, "2": 0}
    image_path, label_path = inputs["cases"]["Task03_Liver"]
    _, label, _, _ = preprocess_case(image_path, label_path, plans)
    np.testing.assert_array_equal(label, golden["Task03_Liver/label"])
    lost = golden["Task03_Liver/label"] != golden["Task03_Liver/label_fused"]
    assert lost.sum() > 50 and np.all(golden["Task03_Liver/label_fused"][lost] == 1)


def _restore_plans(name: str, n_mod: int) -> dict[str, Any]:
    return build_plans(
        "Task99_Restore",
        ["MR"] * n_mod,
        {0: "background", 1: "a", 2: "b"},
        [],
        [],
        target_spacing=RESTORE[name]["target_spacing"],
        patch_size=[16, 16, 16],
    )


@pytest.mark.parametrize("name", list(RESTORE))
def test_restore_to_original_equals_original(
    name: str, golden: dict[str, np.ndarray], inputs: dict[str, Any], tmp_path: Path
) -> None:
    """Crop box, resampled shape, and the label map put back into the original grid and written as
    NIfTI (4D source with negative direction cosines; exact .5 ties rounded up; 0 beyond the map)."""
    path = inputs["restore"][name]
    source = sitk.ReadImage(path)
    n_mod = source.GetSize()[3] if source.GetDimension() == 4 else 1
    _, _, side = preprocess_image(path, _restore_plans(name, n_mod))
    assert side["crop_box"] == _box(golden, name)
    assert side["resampled_shape"] == golden[f"{name}/resampled_shape"].tolist()
    label = restore_label(name, tuple(side["resampled_shape"]))
    expected = golden[f"{name}/pasted"]
    np.testing.assert_array_equal(restore_to_original(label, side), expected)

    out = tmp_path / f"{name}.nii.gz"
    written = write_label_nifti(label, side, out)
    np.testing.assert_array_equal(written, expected)
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)
    if source.GetDimension() == 4:
        size = source.GetSize()
        source = sitk.Extract(source, (size[0], size[1], size[2], 0), (0, 0, 0, 0))
    np.testing.assert_allclose(back.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), source.GetDirection(), atol=1e-6)
