"""The training step as the GPU sees it (issue 11): the Lovász loss in a layout whose scans run in
parallel on CUDA, and one host-device synchronisation per step.

Both are checked on the CPU by recording the aten operations a step dispatches
(``TorchDispatchMode``): every ``.item()`` / ``float()`` / ``bool()`` of a tensor is an
``aten._local_scalar_dense`` call, which on CUDA waits for the GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from training.losses import SegmentationLoss, lovasz_softmax, lovasz_softmax_flat
from training.optim import make_optimizer
from training.step import StepOptions, train_step

CPU = torch.device("cpu")


class _Ops(TorchDispatchMode):
    """Records (op name, shapes and dim argument) of every dispatched aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]], Any]] = []
        self.read_back: list[int] = []  # data pointers of the tensors whose value was read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((str(func), shapes, args[1] if len(args) > 1 else None))
        if isinstance(args[0], torch.Tensor) and "_local_scalar_dense" in str(func):
            self.read_back.append(args[0].data_ptr())
        return func(*args, **(kwargs or {}))

    def named(self, fragment: str) -> list[tuple[str, list[tuple[int, ...]], Any]]:
        return [c for c in self.calls if fragment in c[0]]


def _lovasz_rows_reference(probas: torch.Tensor, labels: torch.Tensor, classes: str = "all") -> torch.Tensor:
    """The former (P, C) formulation (voxels along dim 0, one_hot, float scans along dim 0)."""
    num_classes = probas.shape[1]
    fg = F.one_hot(labels, num_classes).to(probas.dtype)
    errors = (fg - probas).abs()
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)
    with torch.no_grad():
        fg_sorted = torch.gather(fg, 0, order)
        n_fg = fg_sorted.sum(dim=0, keepdim=True)
        tp_left = n_fg - torch.cumsum(fg_sorted, dim=0)
        union = n_fg + torch.cumsum(1.0 - fg_sorted, dim=0)
        jaccard = 1.0 - tp_left / union
        grad = torch.diff(jaccard, dim=0, prepend=torch.zeros_like(jaccard[:1]))
    per_class = (errors_sorted * grad).sum(dim=0)
    return per_class[n_fg[0] > 0].mean() if classes == "present" else per_class.mean()


@pytest.mark.parametrize("classes", ["all", "present"])
def test_lovasz_class_rows_equal_the_voxel_rows_formulation(classes: str) -> None:
    """Same value and gradient as the former (P, C) formulation (float64, 1e-12), random data (no ties),
    a class absent from the labels included."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 6, 7, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 5, 6, 7), generator=gen)  # class 3 absent
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = lovasz_softmax(torch.softmax(a, 1), target, classes=classes)
    flat = torch.softmax(b, 1).permute(0, 2, 3, 4, 1).reshape(-1, 4)
    ref = _lovasz_rows_reference(flat, target.reshape(-1), classes)
    assert got.item() == pytest.approx(ref.item(), abs=1e-12)
    got.backward()
    ref.backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    # the public flat entry point is the same function
    assert lovasz_softmax_flat(flat.detach(), target.reshape(-1), classes).item() == pytest.approx(
        ref.item(), abs=1e-12
    )


def test_lovasz_scans_are_one_dimensional_and_never_synchronise() -> None:
    """The running counts are ONE 1-D scan (CUDA: a parallel device-wide scan; a scan along dim 0 of a
    (P, C) tensor is C sequential GPU threads of P steps — the former layout's slow path), the sort runs
    along the last axis, and the loss reads no value back (no one_hot range check)."""
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4)).float()
    with _Ops() as ops:
        loss = SegmentationLoss()(logits, target)
        loss.backward()
    scans = ops.named("cumsum")
    assert scans and all(len(shapes[0]) == 1 for _, shapes, _ in scans), scans
    sorts = ops.named("sort")
    assert sorts and all(dim in (1, -1) for _, _, dim in sorts), sorts
    assert not ops.named("_local_scalar_dense")


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_train_step_synchronises_once(amp: torch.dtype | None) -> None:
    """One value read back per step (the loss, after the backward is queued), where the former step read
    it twice (a finiteness check before the backward, the value after the update) plus one_hot's two."""
    torch.manual_seed(0)
    model = build_model("universal", [1, 2], [2, 3], module="separable_adapter", base_channels=4,
                        pools_per_axis=(2, 2, 2))  # fmt: skip
    opt = make_optimizer(model.parameters(), lr=1e-3)
    image = torch.randn(2, 2, 8, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    with _Ops() as ops:
        res = train_step(model, opt, SegmentationLoss(), image, label, 1, StepOptions(CPU, amp))
    # Adam's step counters live on the CPU even for a CUDA model (reading them costs no GPU wait)
    counters = {st["step"].data_ptr() for st in opt.state.values()}
    assert len(counters) > 10
    assert len([p for p in ops.read_back if p not in counters]) == 1
    assert res.loss > 0


def test_nonfinite_loss_is_not_applied() -> None:
    """The check moved after the backward: a NaN loss still raises and leaves every weight unchanged."""
    torch.manual_seed(0)
    model = build_model("independent", [1], [2], base_channels=4, pools_per_axis=(2, 2, 2))
    opt = make_optimizer(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return SegmentationLoss()(logits, target) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite training loss nan"):
        train_step(model, opt, nan_loss, torch.randn(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8), 0,
                   StepOptions(CPU))  # fmt: skip
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not opt.state  # Adam never stepped
