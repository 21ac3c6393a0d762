"""predict.py under faults: killed mid-folder, bad inputs, bad checkpoints, unwritable output, a full disk."""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from demo.data import generate_task
from inference.predictor import PREDICT_SETTINGS_JSON as SETTINGS
from models import build_model
from tests.crashkit import finish, kill_at_marker, launch
from tests.synthetic import synthetic_plans
from utils import io_utils
from utils.checkpoint import save_checkpoint
from utils.io_utils import TMP_PREFIX

TASK = "Task92_DemoHippoMR"
OTHER = "Task93_DemoProstateMR"
SEED = int(os.environ.get("U2NET_CRASH_SEED", "2"))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """In-process predictions with one torch thread, as the subprocesses (see tests/crashkit.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny untrained 2-task checkpoint (TASK: 1 modality, 3 classes; OTHER: 2 modalities) and a
    folder of 4 raw test images of TASK."""
    root = tmp_path_factory.mktemp("predict_faults")
    task_dir = generate_task(TASK, root / "data", n_train=0, n_test=4, size=16)
    torch.manual_seed(0)
    config = {"train_mode": "shared", "in_channels": [1, 2], "num_classes": [3, 3], "module": None,
              "base_channels": 4, "pools_per_axis": [2, 2, 2], "deep_supervision": True, "residual": True}  # fmt: skip
    model = build_model(**config)  # type: ignore[arg-type]
    tasks = [
        {"name": TASK, "plans": synthetic_plans(TASK, 1, 3, [8, 8, 8], [2, 2, 2])},
        {"name": OTHER, "plans": synthetic_plans(OTHER, 2, 3, [8, 8, 8], [2, 2, 2])},
    ]
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, config, tasks, model.state_dict(), model_patch=[8, 8, 8])
    return ckpt, task_dir / "imagesTs"


def _args(ckpt: Path, inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [
        "--ckp",
        str(ckpt),
        "--task",
        TASK,
        "--input",
        *inputs,
        "--output",
        str(out),
        "--no_progress",
        *extra,
    ]


def _same_label_maps(a: Path, b: Path) -> None:
    x, y = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(x, get)() == getattr(y, get)(), get


def test_predict_killed_mid_folder_reruns_only_what_is_missing(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, inputs = setup
    names = sorted(p.name for p in inputs.iterdir())
    assert predict.main(_args(ckpt, [str(inputs)], tmp_path / "ref")) == 0  # uninterrupted, in this process
    # SIGKILL while the n-th label map is half-written
    n = random.Random(SEED).randint(2, len(names))
    out = tmp_path / "out"
    plan = {"fault": "nifti_write", "call": n, "marker": str(tmp_path / "marker")}
    kill_at_marker(
        launch("predict.py", _args(ckpt, [str(inputs)], out), cwd=tmp_path, plan=plan), tmp_path / "marker"
    )
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != SETTINGS)
    assert visible == names[: n - 1]  # finished cases only: the partial one is a hidden temporary file
    assert (out / SETTINGS).is_file()  # written before the first case
    assert [p.name.startswith(TMP_PREFIX) for p in out.iterdir() if p.name.startswith(".")] == [True]
    for name in visible:
        _same_label_maps(out / name, tmp_path / "ref" / name)
    before = {name: (out / name).stat().st_mtime_ns for name in visible}
    # the rerun keeps the finished ones, does the rest, leaves no temporary file
    rc, log = finish(launch("predict.py", _args(ckpt, [str(inputs)], out), cwd=tmp_path))
    assert rc == 0, log
    assert f"wrote {len(names) - n + 1} of {len(names)} label maps" in log
    assert f"{n - 1} label map(s) already in {out} were kept (--overwrite redoes them)" in log
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, SETTINGS])
    assert {name: (out / name).stat().st_mtime_ns for name in visible} == before
    for name in names:
        _same_label_maps(out / name, tmp_path / "ref" / name)
    # --overwrite redoes every case
    assert predict.main(_args(ckpt, [str(inputs)], out, "--overwrite")) == 0
    assert all((out / name).stat().st_mtime_ns != t for name, t in before.items())
    for name in names:
        _same_label_maps(out / name, tmp_path / "ref" / name)


def _write(path: Path, arr: np.ndarray, *, vector: bool = False) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(path))


def test_predict_bad_inputs_each_named_others_done(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, inputs = setup
    good = sorted(inputs.iterdir())[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in good:
        shutil.copy(p, folder / p.name)
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(good[0]))).astype(np.float32)
    _write(folder / "two_d.nii.gz", vol[5])
    img4 = sitk.JoinSeries([sitk.GetImageFromArray(vol), sitk.GetImageFromArray(vol)])  # 4D, 2 volumes
    sitk.WriteImage(img4, str(folder / "four_d.nii.gz"))
    nan, inf = vol.copy(), vol.copy()
    nan[3, 4, 5] = np.nan
    inf[1, 2, 3] = -np.inf
    _write(folder / "nan.nii.gz", nan)
    _write(folder / "inf.nii.gz", inf)
    _write(folder / "zero.nii.gz", np.zeros_like(vol))
    (folder / "not_nifti.nii.gz").write_bytes(b"this is a text file, not an image\n" * 20)
    data = good[1].read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("x")
    out = tmp_path / "out"
    rc = predict.main(_args(ckpt, [str(folder), str(folder / "notes.txt")], out))
    err = capsys.readouterr().err
    assert rc == 1
    expected = {
        "two_d.nii.gz": "found a 2D image",
        "four_d.nii.gz": "image has 2 modalities on its 4th axis but dataset.json lists 1 modalities (MOD0)",
        "nan.nii.gz": "1 voxel(s) are NaN or Inf (the first at (z, y, x) = (3, 4, 5))",
        "inf.nii.gz": "1 voxel(s) are NaN or Inf (the first at (z, y, x) = (1, 2, 3))",
        "zero.nii.gz": "every voxel of the image (MOD0) is 0",
        "not_nifti.nii.gz": "not a readable NIfTI file",
        "truncated.nii.gz": "truncated",
        "notes.txt": "unsupported file type .txt",
    }
    listing = err.split("input(s) failed:")[1]
    for name, why in expected.items():
        assert any(name in line and why in line for line in listing.splitlines()), (name, why, listing)
    assert f"{len(expected)} input(s) failed" in err and "wrote 2 of 10 label maps" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in good), SETTINGS]
    )  # nothing half-written


def test_predict_bad_checkpoints_and_output(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, inputs = setup
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    foreign = tmp_path / "foreign.pt"
    torch.save({"net": {"w": torch.zeros(2)}}, foreign)
    out = tmp_path / "out"
    for path, task, why in (
        (truncated, TASK, "it is truncated"),
        (foreign, TASK, "not a u2net3d checkpoint"),
        (ckpt, "Task01_Nope", f"it has ['{TASK}', '{OTHER}']: choose one of them"),
    ):
        assert (
            predict.main(["--ckp", str(path), "--task", task, "--input", str(inputs), "--output", str(out)])
            == 2
        )
        err = capsys.readouterr().err
        assert why in err and (str(path) in err or task in err), err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert predict.main(_args(ckpt, [str(inputs)], blocker / "seg")) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the output folder {blocker / 'seg'}" in err and "choose a writable folder" in err
    assert not out.exists()


def test_predict_full_disk_names_the_file_and_stops(
    setup: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt, inputs = setup
    names = sorted(p.name for p in inputs.iterdir())
    real = io_utils.sitk.WriteImage
    calls = []

    def full_on_second(image: sitk.Image, path: str, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(image, path, *args, **kwargs)

    monkeypatch.setattr(io_utils.sitk, "WriteImage", full_on_second)
    out = tmp_path / "out"
    assert predict.main(_args(ckpt, [str(inputs)], out)) == 1
    err = capsys.readouterr().err
    assert f"no space left on the device to write {out / names[1]}: the file needs about" in err
    assert err.count("not done: the disk is full") == len(names) - 2 and len(calls) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [names[0], SETTINGS]
    )  # the finished one, no partial file
