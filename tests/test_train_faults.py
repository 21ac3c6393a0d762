"""Training scripts under faults: NaN/Inf losses and weights, a full disk, a busy run folder, bad checkpoints.

Each case ends in a message naming what is wrong and what to do, a non-zero exit status, and an
intact, resumable last checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.synthetic import TINY_A, TINY_B, make_two_tiny_tasks
from training.cli import main, prepare_runs
from training.config import TrainConfig
from training.loop import fit
from training.losses import SegmentationLoss
from training.state import LATEST, LOCK_NAME, NonFiniteWeightsError, RunError, lock_run_folder, numbered_name
from utils import io_utils
from utils.checkpoint import load_checkpoint
from utils.io_utils import TMP_PREFIX

A, B = TINY_A, TINY_B
PROG = "train_model_no_adapters.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_two_tiny_tasks(tmp_path_factory.mktemp("faults"))


def _flags(data: Path, out: Path, *extra: str) -> list[str]:
    """Shared model on A and B: 3 epochs of 2 steps (step k trains A for odd k, B for even k)."""
    return ["--trainMode", "shared", "--tasks", A, B, "--prep_dir", str(data / "prep"),
            "--folds_file", str(data / "folds.json"), "--results_dir", str(out), "--base_outChans", "4",
            "--model_patch", "8", "8", "8", "--pools", "2", "2", "2", "--max_epoch", "3",
            "--steps_per_epoch", "2", "--save_every", "1", "--val_every", "0", "--num_workers", "0",
            "--threads", "1", "--device", "cpu", "--no_progress", *extra]  # fmt: skip


def _main(args: list[str]) -> int:
    return main(args, prog=PROG, modes=("independent", "shared"), default_mode="shared", description="")


def _run_dir(out: Path) -> Path:
    return out / "res_u2net3d_shared" / f"{A}_{B}"


def _epoch(path: Path) -> int:
    return int(load_checkpoint(path)["train_state"]["state"]["epoch"])


def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The loss of the given (1-based) steps of this process becomes NaN."""

    class NaNLoss(SegmentationLoss):
        calls = 0

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            type(self).calls += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if type(self).calls in steps else loss

    monkeypatch.setattr("training.loop.SegmentationLoss", NaNLoss)


def test_nonfinite_loss_stops_with_epoch_step_task_and_resumes(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _nan_loss_at(monkeypatch, {4})
    assert _main(_flags(data, tmp_path)) == 1
    err = capsys.readouterr().err
    run = _run_dir(tmp_path)
    latest = run / "checkpoints" / LATEST
    assert f"non-finite training loss at epoch 2, step 4, task {B}" in err, err
    assert f"the last good checkpoint {latest} (after epoch 1) is unchanged" in err
    assert "--skip_nonfinite" in err
    assert _epoch(latest) == 1 and not (run / "checkpoints" / numbered_name(2)).exists()
    monkeypatch.undo()
    assert _main(_flags(data, tmp_path, "--resume_ckp", "latest")) == 0
    assert _epoch(latest) == 3


def test_skip_nonfinite_skips_up_to_n_steps_then_stops(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _nan_loss_at(monkeypatch, {2, 5})
    assert _main(_flags(data, tmp_path / "a", "--skip_nonfinite", "2")) == 0
    ck = load_checkpoint(_run_dir(tmp_path / "a") / "checkpoints" / LATEST)
    skipped = ck["train_state"]["state"]["skipped_steps"]
    assert [(s["epoch"], s["step"], s["task"]) for s in skipped] == [(1, 2, B), (3, 5, A)]
    assert ck["train_state"]["state"]["step"] == 6 and ck["train_state"]["config"]["skip_nonfinite"] == 2
    log = (_run_dir(tmp_path / "a") / "train_log.txt").read_text()
    assert "epoch 3, step 5, task Task97_TinyA: non-finite training loss" in log and "2 of 2 allowed" in log
    _nan_loss_at(monkeypatch, {2, 3, 5})
    assert _main(_flags(data, tmp_path / "b", "--skip_nonfinite", "2")) == 1
    err = capsys.readouterr().err
    assert f"non-finite training loss at epoch 3, step 5, task {A} after 2 skipped step(s)" in err
    assert _epoch(_run_dir(tmp_path / "b") / "checkpoints" / LATEST) == 2
    with pytest.raises(ValueError, match="skip_nonfinite"):
        TrainConfig(mode="shared", tasks=[A], skip_nonfinite=-1)


def test_nan_weights_are_never_checkpointed(data: Path, tmp_path: Path) -> None:
    (prep,) = prepare_runs(TrainConfig(**_config_kwargs(data, tmp_path)))
    model = prep.setup.model

    def poison(step: int, loss: float) -> None:  # an update that left NaN weights (finite loss)
        if step == 4:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    with pytest.raises(NonFiniteWeightsError, match=r"after epoch 2 \(step 4\).*NaN or Inf.*after epoch 1"):
        fit(prep, progress=False, on_step=poison)
    ckpts = sorted(p.name for p in (prep.run_dir / "checkpoints").iterdir())
    assert ckpts == [numbered_name(1), LATEST] and _epoch(prep.run_dir / "checkpoints" / LATEST) == 1


def _config_kwargs(data: Path, out: Path) -> dict:
    return dict(mode="shared", tasks=[A, B], prep_dir=str(data / "prep"), folds_file=str(data / "folds.json"),
                results_dir=str(out), base_channels=4, model_patch=[8, 8, 8], pools=[2, 2, 2], max_epoch=3,
                steps_per_epoch=2, save_every=1, val_every=0, num_workers=0, threads=1, device="cpu")  # fmt: skip


def test_full_disk_while_checkpointing_keeps_the_previous_one(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = io_utils._fsync_file

    def full_at_epoch_2(path: Path) -> None:
        if path.name.endswith(numbered_name(2)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(io_utils, "_fsync_file", full_at_epoch_2)
    assert _main(_flags(data, tmp_path)) == 1
    err = capsys.readouterr().err
    ckpt_dir = _run_dir(tmp_path) / "checkpoints"
    assert f"no space left on the device to write {ckpt_dir / numbered_name(2)}: the file needs about" in err
    assert " MiB" in err or " KiB" in err
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [numbered_name(1), LATEST]  # no partial file
    assert _epoch(ckpt_dir / LATEST) == 1
    monkeypatch.undo()
    assert _main(_flags(data, tmp_path, "--continue")) == 0  # space freed: the run goes on
    assert _epoch(ckpt_dir / LATEST) == 3


def test_run_folder_lock_refusals_and_resume_flags(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    # a live run holds the folder: a second one is refused, writes nothing
    with lock_run_folder(run):
        assert _main(_flags(data, tmp_path)) == 1
        err = capsys.readouterr().err
        assert f"run folder {run} is in use by another training run (pid {os.getpid()}" in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    # the lock file of a dead run (its flock went with it) does not block
    (run / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 1, "host": "x", "started": "-", "command": "-"}))
    assert _main(_flags(data, tmp_path, "--max_epoch", "1", "--continue")) == 0  # no checkpoint: starts
    # a fresh run into a folder with a checkpoint is refused; --continue / --resume_ckp latest go on
    with pytest.raises(SystemExit) as ex:
        _main(_flags(data, tmp_path))
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert f"run folder {run} already holds a checkpoint" in err and "--continue" in err
    assert _main(_flags(data, tmp_path, "--max_epoch", "2", "--resume_ckp", "latest")) == 0
    assert _main(_flags(data, tmp_path, "--continue")) == 0
    assert _epoch(run / "checkpoints" / LATEST) == 3
    rows = (run / "val_dice.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3  # last epoch of each run
    # --resume_ckp latest where there is nothing to resume
    with pytest.raises(SystemExit):
        _main(_flags(data, tmp_path / "none", "--resume_ckp", "latest"))
    assert "--resume_ckp latest: run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main(_flags(data, tmp_path, "--resume_ckp", "latest", "--continue"))
    assert "either --resume_ckp or --continue" in capsys.readouterr().err


def test_bad_checkpoints_and_unwritable_results(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.pt"
    assert _main(_flags(data, tmp_path / "res", "--max_epoch", "1")) == 0
    good.write_bytes((_run_dir(tmp_path / "res") / "checkpoints" / LATEST).read_bytes())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    for path, why in ((truncated, "it is truncated"), (foreign, "not a u2net3d checkpoint")):
        for flag in ("--resume_ckp", "--ckp"):
            with pytest.raises(SystemExit) as ex:
                one_task = ["--tasks", B] if flag == "--ckp" else []  # --ckp: the new domain to add
                _main(_flags(data, tmp_path / "new", flag, str(path), *one_task))
            assert ex.value.code == 2
            err = capsys.readouterr().err
            assert str(path) in err and why in err, (flag, err)
    assert not (tmp_path / "new").exists()  # nothing written
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _main(_flags(data, blocker / "results")) == 1
    err = capsys.readouterr().err
    assert "cannot create or write the run folder" in err and str(blocker) in err
    assert issubclass(type(RunError("x")), RuntimeError) and not list(tmp_path.rglob(f"{TMP_PREFIX}*"))


def test_predict_after_training_lists_bad_test_images(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--predict test: a bad raw test image is listed at the end (exit status 1), the others are done."""
    test_dir = tmp_path / "dataset" / A / "imagesTs"
    test_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sitk.WriteImage(sitk.GetImageFromArray(rng.uniform(1, 2, (10, 12, 12)).astype(np.float32)),
                    str(test_dir / "good.nii.gz"))  # fmt: skip
    sitk.WriteImage(
        sitk.GetImageFromArray(rng.uniform(1, 2, (12, 12)).astype(np.float32)), str(test_dir / "flat.nii.gz")
    )
    args = _flags(data, tmp_path / "res", "--tasks", A, "--max_epoch", "1", "--steps_per_epoch", "1")
    assert _main([*args, "--dataset_dir", str(tmp_path / "dataset"), "--predict", "test"]) == 1
    err = capsys.readouterr().err
    assert (
        "1 input(s) failed:" in err
        and "flat.nii.gz: expected a 3D image" in err
        and "found a 2D image" in err
    )
    out = tmp_path / "res" / "res_u2net3d_shared" / A / "predictions" / A / "test"
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]
