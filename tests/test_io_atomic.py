"""The one atomic writer: permissions from the umask, stale temporaries, a full disk, refused NaN checkpoints."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from models import build_model
from training.state import (
    BEST,
    LATEST,
    NonFiniteWeightsError,
    TrainState,
    numbered_name,
    save_training_checkpoint,
)
from utils import io_utils
from utils.checkpoint import NonFiniteTensorError, load_checkpoint, save_checkpoint
from utils.io_utils import (
    TMP_PREFIX,
    DiskFullError,
    atomic_path,
    atomic_save_npy,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_nifti,
    remove_stale_temporaries,
)

CONFIG = {"train_mode": "independent", "in_channels": [1], "num_classes": [2], "base_channels": 4,
          "pools_per_axis": [1, 1, 1]}  # fmt: skip
TASKS = [{"name": "TaskA", "plans": {"num_classes": 2, "patch_size": [4, 4, 4]}}]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(**CONFIG)  # type: ignore[arg-type]


def _nifti() -> sitk.Image:
    return sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=["022", "027", "002"])
def test_written_files_get_their_mode_from_the_umask(umask: int, tmp_path: Path) -> None:
    """Every kind of file gets 0666 & ~umask, exactly like a plain open(path, "w") (mkstemp gave 0600)."""
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_csv(tmp_path / "a.csv", ["x"], [{"x": 1}])
        atomic_save_npy(tmp_path / "a.npy", np.zeros(3))
        atomic_write_nifti(_nifti(), tmp_path / "a.nii.gz")
        save_checkpoint(tmp_path / "a.pt", CONFIG, TASKS, _model().state_dict())
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == want
    for name in ("a.json", "a.csv", "a.npy", "a.nii.gz", "a.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, (name, oct(umask))


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    dead = [tmp_path / f"{TMP_PREFIX}dead1-x.npy", sub / f"{TMP_PREFIX}dead2-y.nii.gz"]
    for p in dead:
        p.write_bytes(b"partial")
    other = tmp_path / ".hidden_but_not_ours"
    other.write_bytes(b"keep")
    with atomic_path(tmp_path / "live.json") as live:  # a write under way (this or another process)
        assert remove_stale_temporaries(tmp_path) == [dead[0]]
        assert live.exists() and dead[1].exists() and other.exists()
        assert remove_stale_temporaries(tmp_path, recursive=True) == [dead[1]]
        assert live.exists()
        live.write_text("{}")
    assert (tmp_path / "live.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden_but_not_ours", "live.json", "sub"]


def test_full_disk_names_the_file_and_the_space_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, CONFIG, TASKS, _model().state_dict())
    before = path.read_bytes()

    def no_space(p: Path) -> None:  # the kernel reports a full disk at write/fsync time
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_utils, "_fsync_file", no_space)
    state = {k: v + 1 for k, v in _model().state_dict().items()}
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(path, CONFIG, TASKS, state)
    buf = io.BytesIO()
    torch.save(load_checkpoint(path) | {"state_dict": state}, buf)
    e = err.value
    assert e.errno == errno.ENOSPC and e.path == path
    assert e.needed is not None and abs(e.needed - len(buf.getvalue())) < 1024  # the serialised size
    assert str(path) in str(e) and "needs about" in str(e) and "previous version is unchanged" in str(e)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    # NIfTI: SimpleITK only says so in words; the estimate is the uncompressed size
    monkeypatch.undo()

    def itk_full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("itk::ERROR: NiftiImageIO: ... No space left on device")

    monkeypatch.setattr(io_utils.sitk, "WriteImage", itk_full)
    with pytest.raises(DiskFullError, match=r"seg\.nii\.gz.*needs about 472 bytes.*nothing was written"):
        atomic_write_nifti(_nifti(), tmp_path / "seg.nii.gz")  # 60 int16 voxels + 352 header bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_checkpoints_with_nan_weights_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    state = _model().state_dict()
    save_checkpoint(path, CONFIG, TASKS, state)
    before = path.read_bytes()
    key = next(k for k, v in state.items() if v.is_floating_point())
    bad = dict(state)
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match=rf"model\.pt.*state_dict\['{key}'\].*NaN or Inf"):
        save_checkpoint(path, CONFIG, TASKS, bad)
    with pytest.raises(NonFiniteTensorError, match="train_state"):
        save_checkpoint(
            path, CONFIG, TASKS, state, train_state={"optimizer": {"m": torch.tensor([float("inf")])}}
        )
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _save(ckpt_dir: Path, model: torch.nn.Module, epoch: int, **kw: bool) -> None:
    opt = torch.optim.Adam(model.parameters())
    save_training_checkpoint(ckpt_dir, model=model, tasks=TASKS, model_patch=None,  # type: ignore[arg-type]
                             state=TrainState(epoch=epoch, step=epoch), optimizer=opt, scaler=None, config={},
                             trained_tasks=[0], new_task=None, numbered=kw.get("numbered", False),
                             best=kw.get("best", False))  # fmt: skip


def test_latest_is_put_in_place_last_and_nan_weights_stop_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between an epoch's files leaves latest.pt at the previous epoch (which a resume then
    redoes, writing all of them), never a latest.pt whose numbered / best files are missing."""
    model = _model()
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, model, 1, numbered=True, best=True)
    assert {p.name for p in ckpt_dir.iterdir()} == {LATEST, BEST, numbered_name(1)}
    linked: list[str] = []
    real_link = io_utils.atomic_link_or_copy

    def crash_on_latest(src: Path, dst: Path) -> Path:
        if Path(dst).name == LATEST:
            raise KeyboardInterrupt("killed")
        linked.append(Path(dst).name)
        return real_link(src, dst)

    monkeypatch.setattr("training.state.atomic_link_or_copy", crash_on_latest)
    with pytest.raises(KeyboardInterrupt):
        _save(ckpt_dir, model, 2, numbered=True, best=True)
    assert linked == [BEST]  # numbered first (written), best linked, latest not yet
    assert load_checkpoint(ckpt_dir / LATEST)["train_state"]["state"]["epoch"] == 1
    monkeypatch.undo()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(
        NonFiniteWeightsError, match=r"after epoch 3 \(step 3\).*latest\.pt \(after epoch 1\)"
    ):
        _save(ckpt_dir, model, 3, numbered=True)
    assert not (ckpt_dir / numbered_name(3)).exists()
    assert load_checkpoint(ckpt_dir / LATEST)["train_state"]["state"]["epoch"] == 1
