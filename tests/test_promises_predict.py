"""``predict.py`` promises (docs/inference.md) that a planted bug must break: two inputs with one file
name are an error (exit 1), and ``--tta``, ``--no_postprocess`` and ``--unified_mode`` each reach the
label maps. Mirror TTA is checked with a toy network that is not mirror-symmetric, by hand.

The toy network: class-0 logit 0, class-1 logit = the input one voxel further along z
(``x[z + 1]``, zero past the window's end). Mirroring z turns that into ``x[z - 1]``, so TTA over the 8
flips of (z, y, x) gives ``(x[z + 1] + x[z - 1]) / 2``; mirroring y or x alone changes nothing.

The test image (8, 16, 16), spacing (z 2, y 1, x 1) mm = the plans' target spacing, so preprocessing
crops and resamples nothing: body 1, a 4×4×4 cube and a 3×3×3 cube of 10. After z-scoring the cubes
are +4.64 and the body −0.22, so class 1 is exactly where the (shifted / averaged) cube values are.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

import predict
from inference.predictor import Segmenter, TaskModel
from inference.settings import InferenceSettings
from inference.sliding_window import NetworkFn
from tests.synthetic import synthetic_plans
from utils.checkpoint import choose_task, task_index

TASK = "Task95_ToyShift"
SHAPE = (8, 16, 16)
BIG = (slice(2, 6), slice(3, 7), slice(3, 7))  # 64 voxels
SMALL = (slice(2, 5), slice(10, 13), slice(10, 13))  # 27 voxels: removed by post-processing (keep 1)
OTHER_BIG = (slice(2, 6), slice(10, 14), slice(3, 7))  # the big cube of a second, different image


def shift_net(x: torch.Tensor, task_idx: int) -> torch.Tensor:
    """(N, 1, z, y, x) -> logits (N, 2, z, y, x): [0, x[z + 1]] (zero past the last slice)."""
    nxt = F.pad(x[:, :1, 1:], (0, 0, 0, 0, 0, 1))
    return torch.cat([torch.zeros_like(nxt), nxt], dim=1)


def _plans() -> dict:
    plans = synthetic_plans(TASK, 1, 2, SHAPE, (1, 2, 2))
    plans["target_spacing"] = [2.0, 1.0, 1.0]
    plans["keep_components"] = 1
    plans["normalisation"]["zero_mask"] = "none"
    return plans


def _toy_task(model_patch: tuple[int, int, int] | None = None, net: NetworkFn = shift_net) -> TaskModel:
    return TaskModel(net, 0, TASK, _plans(), model_patch)


def _write(path: Path, array: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 2.0))  # x, y, z
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _image() -> np.ndarray:
    img = np.ones(SHAPE, np.float32)
    img[BIG] = 10.0
    img[SMALL] = 10.0
    return img


def _mask(*boxes: tuple[slice, slice, slice]) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    for b in boxes:
        m[b] = 1
    return m


def _zs(box: tuple[slice, slice, slice], z0: int, z1: int) -> tuple[slice, slice, slice]:
    return (slice(z0, z1), box[1], box[2])


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """predict.py's checkpoint loading gives a toy network: ``net`` with ``model_patch`` (the test may
    change both)."""
    cfg: dict[str, Any] = {"net": shift_net, "model_patch": None}
    monkeypatch.setattr(
        TaskModel,
        "from_checkpoint",
        classmethod(lambda cls, *a, **k: _toy_task(cfg["model_patch"], cfg["net"])),
    )
    return cfg


def _run(tmp_path: Path, name: str, *flags: str, inputs: list[Path] | None = None) -> tuple[int, np.ndarray]:
    src = inputs or [_write(tmp_path / "in" / "case.nii.gz", _image())]
    out = tmp_path / name
    rc = predict.main(["--ckp", "unused.pt", "--input", *map(str, src), "--output", str(out), "--no_progress",
                       *flags])  # fmt: skip
    return rc, _read(out / "case.nii.gz")


# ---------------------------------------------------------------------------------------------
# --tta and --no_postprocess, by hand
# ---------------------------------------------------------------------------------------------
def test_predict_flags_by_hand(toy: dict, tmp_path: Path) -> None:
    # no TTA: class 1 one slice before each cube (x[z + 1] is a cube voxel); post-processing keeps the
    # largest component (keep_components 1): the small cube goes
    rc, plain = _run(tmp_path, "plain")
    assert rc == 0
    np.testing.assert_array_equal(plain, _mask(_zs(BIG, 1, 5)))
    rc, raw = _run(tmp_path, "raw", "--no_postprocess")
    assert rc == 0
    np.testing.assert_array_equal(raw, _mask(_zs(BIG, 1, 5), _zs(SMALL, 1, 4)))
    # TTA: (x[z+1] + x[z-1]) / 2 > 0 wherever either neighbour is a cube voxel (4.64 - 0.22 > 0): each
    # cube grows by one slice on both sides of z; the other flips change nothing
    rc, tta = _run(tmp_path, "tta", "--tta")
    assert rc == 0
    np.testing.assert_array_equal(tta, _mask(_zs(BIG, 1, 7)))
    rc, tta_raw = _run(tmp_path, "tta_raw", "--tta", "--no_postprocess")
    assert rc == 0
    np.testing.assert_array_equal(tta_raw, _mask(_zs(BIG, 1, 7), _zs(SMALL, 1, 6)))


def test_mirror_tta_probabilities_by_hand() -> None:
    """Class-1 probability = sigmoid(logit average over the flips), computed here with NumPy."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *SHAPE)).astype(np.float32)
    x = image[0].astype(np.float64)
    up = np.concatenate([x[1:], np.zeros((1, *SHAPE[1:]))])  # x[z + 1]
    down = np.concatenate([np.zeros((1, *SHAPE[1:])), x[:-1]])  # x[z - 1]

    def p1(settings: InferenceSettings) -> np.ndarray:
        return Segmenter(_toy_task(), settings).probabilities(image)[1]

    def sigmoid(a: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-a))

    np.testing.assert_allclose(p1(InferenceSettings()), sigmoid(up), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        p1(InferenceSettings(mirror_tta=True)), sigmoid((up + down) / 2), rtol=0, atol=1e-6
    )
    # only the mirrors of the listed axes: without z the shift is never mirrored
    np.testing.assert_allclose(
        p1(InferenceSettings(mirror_tta=True, mirror_axes=(1, 2))), sigmoid(up), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        p1(InferenceSettings(mirror_tta=True, mirror_axes=(0,))), sigmoid((up + down) / 2), rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# --unified_mode
# ---------------------------------------------------------------------------------------------
def parity_net(x: torch.Tensor, task_idx: int) -> torch.Tensor:
    """Logits [0, +1 on odd z of the window, -3 on even z], whatever the input."""
    n, _, z, y, xx = x.shape
    odd = (torch.arange(z) % 2 == 1).to(x.dtype)[:, None, None].expand(z, y, xx)
    return torch.stack([torch.zeros_like(odd), 4 * odd - 3])[None].expand(n, 2, z, y, xx)


def test_unified_mode_flag_reaches_the_result(toy: dict, tmp_path: Path) -> None:
    """A model patch (16, 16, 16) unlike the task patch (8, 16, 16), with the parity network.

    'volume' (default): the case is scaled to (16, 16, 16), segmented, and the labels scaled back with
    nearest neighbour, which takes the odd slices 1, 3, ..., 15 of the model grid: class 1 everywhere.
    'patch': each (8, 16, 16) window goes to the network at (16, 16, 16) and its logits come back
    trilinearly, i.e. the mean of slices 2z and 2z + 1: (1 - 3) / 2 < 0, class 0 everywhere.
    """
    toy.update(net=parity_net, model_patch=(16, 16, 16))
    src = _write(tmp_path / "in" / "case.nii.gz", _image())
    for flags, want in (((), 1), (("--unified_mode", "volume"), 1), (("--unified_mode", "patch"), 0)):
        rc, got = _run(tmp_path, "_".join(flags) or "default", "--no_postprocess", *flags, inputs=[src])
        assert rc == 0
        np.testing.assert_array_equal(got, np.full(SHAPE, want, np.uint8), err_msg=str(flags))


def test_flags_build_the_settings() -> None:
    parse = predict.build_parser().parse_args
    base = ["--ckp", "m.pt", "--input", "a.nii.gz", "--output", "out"]
    default = predict.settings_from_args(parse(base))
    assert (default.mirror_tta, default.postprocess, default.unified_mode) == (False, True, "volume")
    flagged = predict.settings_from_args(
        parse([*base, "--tta", "--no_postprocess", "--unified_mode", "patch"])
    )
    assert (flagged.mirror_tta, flagged.postprocess, flagged.unified_mode) == (True, False, "patch")
    assert flagged.mirror_axes == (0, 1, 2)  # all 8 flips


# ---------------------------------------------------------------------------------------------
# two inputs with one file name
# ---------------------------------------------------------------------------------------------
def test_two_inputs_with_one_file_name_fail(
    toy: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two different images named case.nii.gz (one in a folder, one given as a file): one is segmented,
    the other is reported as failed by name (exit 1) -- in either order of the arguments."""
    first = _write(tmp_path / "a" / "case.nii.gz", _image())
    other = np.ones(SHAPE, np.float32)  # a different image: the big cube elsewhere
    other[OTHER_BIG] = 10.0
    other[SMALL] = 10.0
    second = _write(tmp_path / "b" / "case.nii.gz", other)
    labels = {
        first: _mask(_zs(BIG, 1, 5), _zs(SMALL, 1, 4)),
        second: _mask(_zs(OTHER_BIG, 1, 5), _zs(SMALL, 1, 4)),
    }
    for k, inputs in enumerate(([tmp_path / "a", second], [second, tmp_path / "a"])):
        rc, got = _run(tmp_path, f"out{k}", "--no_postprocess", inputs=inputs)
        err = capsys.readouterr().err
        assert rc == 1 and "overwrite each other" in err and "1 input(s) failed" in err
        assert sorted(p.name for p in (tmp_path / f"out{k}").iterdir()) == [
            "case.nii.gz",
            "predict_settings.json",
        ]
        kept = first if np.array_equal(got, labels[first]) else second
        dropped = second if kept == first else first
        np.testing.assert_array_equal(got, labels[kept])  # one of the two, whole
        assert f"{dropped}:" in err and f"{kept}:" not in err  # the other one is the failure reported
    # the same file named twice (itself and its folder) is one input, not a conflict
    shutil.rmtree(tmp_path / "b")
    rc, _ = _run(tmp_path, "out_same", inputs=[first, tmp_path / "a"])
    assert rc == 0 and "failed" not in capsys.readouterr().err


def test_task_choice_of_a_checkpoint() -> None:
    """``--task`` may be left out when the checkpoint holds one task; with several it must name one."""
    two = {"tasks": [{"name": "Task01_A"}, {"name": "Task02_B"}]}
    assert choose_task(two, "Task02_B") == (1, "Task02_B")
    assert choose_task(two, "Task01_A") == (0, "Task01_A")
    assert choose_task({"tasks": [{"name": "Task03_C"}]}, None) == (0, "Task03_C")
    with pytest.raises(ValueError, match="choose one with --task"):
        choose_task(two, None)
    with pytest.raises(ValueError, match="Task01_A"):
        task_index(two, "Task09_Other")
    assert task_index(two, "Task02_B") == 1
