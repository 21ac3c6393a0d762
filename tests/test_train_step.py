"""One CPU bfloat16 training step, and a short training run whose loss falls."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model
from tests.synthetic import make_synthetic_task, write_folds
from training.cli import prepare_runs
from training.config import TrainConfig
from training.loop import fit
from training.losses import SegmentationLoss
from training.optim import make_optimizer
from training.step import StepOptions, train_step

CPU = torch.device("cpu")


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    label = torch.zeros(2, 1, 8, 8, 8)
    label[:, :, 2:6, 2:7, 1:5] = 1.0  # (B, 1, z, y, x) float, as the loader gives it
    image = label * 2.0 + 0.5 * torch.randn(2, 1, 8, 8, 8, generator=gen)
    return image, label


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cpu_bf16_train_step(channels_last: bool) -> None:
    torch.manual_seed(0)
    model = build_model("independent", [1], [2], base_channels=4, pools_per_axis=(2, 2, 2))
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    model_fp32 = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[torch.dtype] = []  # output dtype of every conv

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append(out.dtype)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) > 10
    for m in convs:
        m.register_forward_hook(hook)
    image, label = _tiny_batch()
    loss_fn = SegmentationLoss()
    opts = StepOptions(CPU, torch.bfloat16, channels_last=channels_last)
    res = train_step(model, make_optimizer(model.parameters(), lr=1e-3), loss_fn, image, label, 0, opts,
                     keep_logits=True)  # fmt: skip

    # the forward ran under bf16 autocast: every conv produced bf16, and so did the network
    assert res.logits is not None and res.logits.dtype == torch.bfloat16
    assert res.logits.shape == (2, 2, 8, 8, 8)
    assert len(seen) == len(convs) and set(seen) == {torch.bfloat16}
    # master weights and their gradients stay float32, every parameter moved
    assert np.isfinite(res.loss) and res.loss > 0
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        assert not torch.equal(p.detach(), before[name]), name
    # the same step in plain float32 gives a loss close to, but not bit-equal to, the bf16 one
    ref = train_step(model_fp32, make_optimizer(model_fp32.parameters(), lr=1e-3), loss_fn, image, label,
                     0, StepOptions(CPU, None, channels_last=channels_last))  # fmt: skip
    assert ref.loss != res.loss
    assert res.loss == pytest.approx(ref.loss, rel=0.05)


TASK = "Task96_TinyFalls"


@pytest.fixture(scope="module")
def falls_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("falls")
    _, fold = make_synthetic_task(root / "prep", TASK, shape=(12, 12, 12), patch=(8, 8, 8), pools=(2, 2, 2),
                                  n_train=4, n_val=1, seed=0)  # fmt: skip
    write_folds(root / "folds.json", {TASK: fold})
    return root


def _run_losses(data: Path, out: Path, lr: float) -> list[float]:
    cfg = TrainConfig(
        mode="independent", tasks=[TASK], prep_dir=str(data / "prep"), folds_file=str(data / "folds.json"),
        results_dir=str(out), base_channels=4, max_epoch=1, steps_per_epoch=20, save_every=1, val_every=0,
        num_workers=0, device="cpu", log_images_every=0, threads=1, lr=lr,
    )  # fmt: skip
    (prep,) = prepare_runs(cfg)
    got: dict[int, float] = {}
    fit(prep, progress=False, on_step=lambda s, loss: got.__setitem__(s, loss))
    assert sorted(got) == list(range(1, 21))
    return [got[s] for s in range(1, 21)]


def test_twenty_steps_lower_the_loss(falls_data: Path, tmp_path: Path) -> None:
    # lr 3e-3 (10x the preset, so that 20 steps of batch 2 suffice): measured first-5 mean ~1.0,
    # last-5 mean ~0.5; a learning rate of ~0 sees the same batches (same seeds), so comparing the two
    # runs step by step separates learning from batch-to-batch noise
    trained = _run_losses(falls_data, tmp_path / "trained", lr=3e-3)
    frozen = _run_losses(falls_data, tmp_path / "frozen", lr=1e-8)
    assert all(np.isfinite(trained))
    assert trained[0] == frozen[0]  # same initial weights, same first batch
    first, last = np.mean(trained[:5]), np.mean(trained[-5:])
    assert last < 0.75 * first, trained
    assert last < 0.75 * np.mean(frozen[-5:]), (trained, frozen)  # the fall comes from training


@pytest.mark.parametrize("grad_to_none", [False, True])
def test_zeroed_gradients_keep_other_tasks_moving(grad_to_none: bool) -> None:
    """The original zeroed gradients (not None): after a step of task 0, a step of task 1 still moves
    task 0's heads and norms through Adam's moments and weight decay; with gradients cleared to None
    they stay still. Shared parameters move either way."""
    torch.manual_seed(0)
    model = build_model("shared", [1, 1], [2, 2], base_channels=2, pools_per_axis=(1, 1, 1))
    opt = make_optimizer(model.parameters(), 1e-2, 5e-4)
    loss_fn = SegmentationLoss()
    options = StepOptions(torch.device("cpu"), grad_to_none=grad_to_none)
    x = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    y = (x > 0).long()
    train_step(model, opt, loss_fn, x, y, 0, options)
    task0 = {
        n: p.detach().clone() for n, p in model.named_parameters() if ".heads.0." in n or ".norms.0." in n
    }
    shared = model.encoders[0].unit1.conv.weight.detach().clone()
    assert task0
    train_step(model, opt, loss_fn, x, y, 1, options)
    moved = [n for n, p in model.named_parameters() if n in task0 and not torch.equal(p, task0[n])]
    assert (len(moved) == 0) == grad_to_none
    if not grad_to_none:
        assert len(moved) == len(task0)
    assert not torch.equal(model.encoders[0].unit1.conv.weight, shared)
