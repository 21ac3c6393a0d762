"""Float16 autocast with the gradient scaler (``--amp`` on GPUs without bfloat16) and the scaler's state
in checkpoints.

PyTorch runs float16 autocast and ``GradScaler("cpu")`` on the CPU too, so the training step
(:func:`training.step.train_step`) is checked here without a GPU: a scaled float16 step must move the
weights like the float32 step (the scaler multiplies the loss before the backward pass and divides
the gradients before the update), an overflowing step must be skipped with the scale backed off,
and the scaler's state must survive a checkpoint and a resume. The project itself only selects
float16 on CUDA (:func:`models.runtime.resolve_amp`), so the CPU run of :func:`training.loop.fit`
forces the autocast dtype; the ``cuda`` test does the same with ``--amp fp16`` on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import training.loop as loop
from models import build_model
from tests.synthetic import make_synthetic_task, write_folds
from training.cli import prepare_runs
from training.config import TrainConfig
from training.losses import SegmentationLoss
from training.state import LATEST, TrainState, save_training_checkpoint
from training.step import StepOptions, train_step
from utils.checkpoint import load_checkpoint

TASK = "Task96_TinyAmp"
CPU = torch.device("cpu")


def _model_and_batch() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("independent", [1], [2], base_channels=4, pools_per_axis=(1, 1, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, 8, generator=g)
    y = (x > 0.3).long()
    return model, x, y


def _update(dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None) -> tuple[torch.Tensor, float]:
    """The weight change of one SGD step (SGD: the update is proportional to the gradient, so a scale
    left in the gradients would show), and the loss."""
    model, x, y = _model_and_batch()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = train_step(model, opt, SegmentationLoss(), x, y, 0, StepOptions(CPU, dtype), scaler=scaler)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return after - before, res.loss


def test_fp16_scaled_step_moves_the_weights_like_fp32() -> None:
    ref, loss32 = _update(None, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    got, loss16 = _update(torch.float16, scaler)
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert ref.norm() > 0
    # same step up to float16 rounding: not 4096 times larger (scale left in) nor 4096 times smaller
    assert (got - ref).norm() / ref.norm() < 0.05
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999
    assert scaler.get_scale() == 2.0**12 and scaler.state_dict()["_growth_tracker"] == 1  # one good step


def test_fp16_overflowing_step_is_skipped_and_the_scale_backs_off() -> None:
    """A scale of 2**40 overflows float16 gradients: the weights stay, the scale halves, the loss (of
    the unscaled forward pass) is still reported."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    delta, loss = _update(torch.float16, scaler)
    assert torch.count_nonzero(delta) == 0
    assert scaler.get_scale() == 2.0**39 and scaler.state_dict()["_growth_tracker"] == 0
    assert 0 < loss < 10


def test_scaler_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model, _, _ = _model_and_batch()
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=1024.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=3
    )
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 2})
    save_training_checkpoint(tmp_path, model=model, tasks=[{"name": TASK, "plans": {}}], model_patch=None,
                             state=TrainState(epoch=1, step=2), optimizer=opt, scaler=scaler, config={},
                             trained_tasks=[0], new_task=None, numbered=False, best=False)  # fmt: skip
    saved = load_checkpoint(tmp_path / LATEST)["train_state"]["scaler"]
    assert saved == {"scale": 1024.0, "growth_factor": 4.0, "backoff_factor": 0.25, "growth_interval": 3,
                     "_growth_tracker": 2}  # fmt: skip
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 1024.0
    # without a scaler (fp32, bf16) nothing is stored
    save_training_checkpoint(tmp_path / "b", model=model, tasks=[{"name": TASK, "plans": {}}], model_patch=None,
                             state=TrainState(), optimizer=opt, scaler=None, config={}, trained_tasks=[0],
                             new_task=None, numbered=False, best=False)  # fmt: skip
    assert load_checkpoint(tmp_path / "b" / LATEST)["train_state"]["scaler"] is None


# ---------------------------------------------------------------------------------------------
# a whole run: the scaler's state continues across a resume
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("amp")
    _, folds = make_synthetic_task(root / "prep", TASK, shape=(8, 12, 12), patch=(8, 8, 8), pools=(2, 2, 2),
                                   n_train=2, n_val=1, seed=4)  # fmt: skip
    write_folds(root / "folds.json", {TASK: folds})
    return root


def _config(data: Path, out: Path, device: str, amp: str) -> TrainConfig:
    return TrainConfig(mode="independent", tasks=[TASK], prep_dir=str(data / "prep"),
                       folds_file=str(data / "folds.json"), results_dir=str(out), base_channels=2, max_epoch=2,
                       steps_per_epoch=2, save_every=1, val_every=0, num_workers=0, device=device,
                       log_images_every=0, threads=1, val_grid="preprocessed", amp=amp)  # fmt: skip


def _fit_and_resume(
    cfg: TrainConfig,
) -> tuple[dict[int, float], dict[int, float], dict[str, Any], dict[str, Any]]:
    """Losses and final scaler state of an uninterrupted 2-epoch run and of a resume from its epoch 1."""
    full: dict[int, float] = {}
    (prep,) = prepare_runs(cfg)
    loop.fit(prep, progress=False, on_step=lambda s, v: full.__setitem__(s, v))
    ckdir = prep.run_dir / "checkpoints"
    end = load_checkpoint(ckdir / LATEST)["train_state"]["scaler"]
    epoch1 = load_checkpoint(ckdir / "epoch_0001.pt")["train_state"]["scaler"]
    assert epoch1 is not None and epoch1 != {**epoch1, "scale": 65536.0, "_growth_tracker": 0}  # it moved
    resumed: dict[int, float] = {}
    (again,) = prepare_runs(cfg, str(prep.run_dir), resume_epoch=1)
    loop.fit(again, progress=False, on_step=lambda s, v: resumed.__setitem__(s, v))
    return full, resumed, end, load_checkpoint(ckdir / LATEST)["train_state"]["scaler"]


def test_fit_fp16_resume_continues_the_scaler(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float16 autocast on the CPU: fit then makes a GradScaler("cpu"), as it makes one on CUDA
    monkeypatch.setattr(loop, "amp_dtype", lambda mode, device: torch.float16)
    full, resumed, end, end_resumed = _fit_and_resume(_config(data, tmp_path, "cpu", "off"))
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert resumed == {s: full[s] for s in (3, 4)}
    assert end_resumed == end  # a fresh scaler would have restarted from scale 65536, tracker 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_fp16_on_cuda_resume_continues_the_scaler(data: Path, tmp_path: Path) -> None:
    full, resumed, end, end_resumed = _fit_and_resume(_config(data, tmp_path, "cuda", "fp16"))
    assert sorted(resumed) == [3, 4]
    assert end_resumed == end
    assert all(abs(resumed[s] - full[s]) < 1e-3 for s in (3, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_scaled_step_on_cuda_matches_fp32() -> None:
    model, x, y = _model_and_batch()
    dev = torch.device("cuda")
    deltas = []
    for dtype in (None, torch.float16):
        m, _, _ = _model_and_batch()
        m.to(dev)
        before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12) if dtype else None
        train_step(m, opt, SegmentationLoss(), x, y, 0, StepOptions(dev, dtype), scaler=scaler)
        deltas.append(torch.cat([p.detach().flatten() for p in m.parameters()]) - before)
    ref, got = deltas
    assert (got - ref).norm() / ref.norm() < 0.05
