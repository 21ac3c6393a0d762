"""preprocess_taskSep.py under faults: killed with SIGKILL half-way through writing an array, and
images with NaN/Inf or all-zero voxels.

After the kill, the outputs of the rerun are byte-identical to an uninterrupted run's, and in the
killed state no partial file counts as a finished case. ``tests/crashkit.py`` plants the fault (the
``n``-th ``numpy.save`` writes half its bytes and hangs); ``n`` is drawn from a fixed seed
(``U2NET_CRASH_SEED`` picks another one).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import preprocess_taskSep
from demo.data import generate_demo_data
from tests.crashkit import finish, kill_at_marker, launch
from utils.io_utils import TMP_PREFIX, read_json
from utils.preprocessing import list_cases

SCRIPT = "preprocess_taskSep.py"
TASKS = ("Task92_DemoHippoMR", "Task93_DemoProstateMR")
N_TRAIN, N_TEST = 3, 1
SEED = int(os.environ.get("U2NET_CRASH_SEED", "2"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_preprocessing_killed_mid_task_reruns_to_identical_outputs(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    generate_demo_data(dataset, seed=0, n_train=N_TRAIN, n_test=N_TEST, size=20, tasks=TASKS)
    args = ["--dataset_dir", str(dataset), "--nProc", "1", "--no_progress"]
    # the uninterrupted run (in this process)
    assert preprocess_taskSep.main([*args, "--prep_dir", str(tmp_path / "ref")]) == 0
    ref = _files(tmp_path / "ref")

    # SIGKILL half-way through the n-th array file (3 per training case, 2 per test case)
    n_arrays = len(TASKS) * (3 * N_TRAIN + 2 * N_TEST)
    n = random.Random(SEED).randint(2, n_arrays)
    prep = tmp_path / "prep"
    plan = {"fault": "np_save", "call": n, "marker": str(tmp_path / "marker")}
    kill_at_marker(
        launch(SCRIPT, [*args, "--prep_dir", str(prep)], cwd=tmp_path, plan=plan), tmp_path / "marker"
    )
    partial = list(prep.rglob(f"{TMP_PREFIX}*"))
    assert len(partial) == 1 and partial[0].name.endswith(".npy"), partial  # the half-written array
    # what counts as done is complete: every case with a sidecar has all its arrays, as in the reference
    for task in TASKS:
        for split in ("train", "test"):
            folder = prep / task / split
            if not folder.is_dir():
                continue
            for case in list_cases(prep / task, split):
                name = Path(case).name
                assert read_json(f"{case}.json") == read_json(
                    tmp_path / "ref" / task / split / f"{name}.json"
                )
                for kind in ("image", "weight", *(["label"] if split == "train" else [])):
                    rel = f"{task}/{split}/{name}_{kind}.npy"
                    np.testing.assert_array_equal(np.load(prep / rel), np.load(tmp_path / "ref" / rel))
    assert not (prep / "fold_splits.json").exists()  # written once the tasks are complete

    # the rerun finishes what is missing; the result is the uninterrupted run's, byte for byte
    rc, out = finish(launch(SCRIPT, [*args, "--prep_dir", str(prep)], cwd=tmp_path))
    assert rc == 0, out
    assert "already done" in out
    got = _files(prep)
    assert sorted(got) == sorted(ref)  # same files, no temporary one left
    for name, data in ref.items():
        assert got[name] == data, name


@pytest.mark.parametrize("kind", ["nan", "zero"])
def test_preprocessing_reports_bad_voxels_by_file(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN/Inf voxels and an all-zero image are refused where images are read, per case, by file name."""
    dataset = tmp_path / "dataset"
    (task_dir,) = generate_demo_data(dataset, seed=0, n_train=3, n_test=0, size=20, tasks=TASKS[:1])
    bad = sorted((task_dir / "imagesTr").glob("h*.nii.gz"))[1]
    img = sitk.ReadImage(str(bad))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if kind == "nan":
        arr[2, 3, 4] = np.nan
    else:
        arr[:] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(bad))
    rc = preprocess_taskSep.main(
        ["--dataset_dir", str(dataset), "--prep_dir", str(tmp_path / "prep"), "--nProc", "1", "--no_progress"]
    )
    assert rc == 1
    failed = capsys.readouterr().out.split("Failed cases:")[1]
    why = "1 voxel(s) are NaN or Inf" if kind == "nan" else "every voxel of the image (MRI) is 0"
    assert bad.name in failed and why in failed, failed
    train = tmp_path / "prep" / TASKS[0] / "train"
    assert len(list_cases(train.parent, "train")) == 2  # the others are done
    assert not list(train.glob(f"{bad.name[: -len('.nii.gz')]}*"))  # nothing of the bad case
