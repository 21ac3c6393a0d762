"""Lovász-softmax and focal loss against hand-computed values."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import SegmentationLoss, focal_loss, lovasz_softmax, lovasz_softmax_flat


def _logits_from_p1(p1: list[float]) -> torch.Tensor:
    """2-class logits (1, 2, 4) whose softmax gives class-1 probabilities ``p1``."""
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).unsqueeze(0)


def _jaccard_loss_of_set(mispredicted: set[int], gt: set[int]) -> float:
    """Jaccard loss |M| / |G ∪ M| of a set M of mispredicted voxels (defines the Lovász extension)."""
    union = gt | mispredicted
    return len(mispredicted) / len(union) if union else 0.0


def _lovasz_brute(probas: np.ndarray, labels: np.ndarray, classes: str = "all") -> float:
    """Lovász extension from its definition (greedy chain of sets), mean over all classes (an absent
    class has Jaccard loss 1 for any non-empty set, so its loss is its largest error) or over the
    present ones.

    probas: (P, C); labels: (P,).
    """
    losses = []
    for c in range(probas.shape[1]):
        gt = {i for i in range(len(labels)) if labels[i] == c}
        if not gt and classes == "present":
            continue
        err = np.abs((labels == c).astype(float) - probas[:, c])
        order = sorted(range(len(err)), key=lambda i: -err[i])
        total, prev, taken = 0.0, 0.0, set()
        for i in order:
            taken.add(i)
            cur = _jaccard_loss_of_set(taken, gt)
            total += err[i] * (cur - prev)
            prev = cur
        losses.append(total)
    return float(np.mean(losses))


def test_lovasz_hand_computed_two_classes_four_voxels() -> None:
    # p(class 1) = [0.9, 0.6, 0.3, 0.2], labels [1, 0, 1, 0]
    # class 1: errors [0.1, 0.6, 0.7, 0.2] -> sorted 0.7(fg) 0.6(bg) 0.2(bg) 0.1(fg), |G| = 2
    #   J = 1/2, 2/3, 3/4, 4/4 -> increments 1/2, 1/6, 1/12, 1/4
    #   loss1 = 0.7/2 + 0.6/6 + 0.2/12 + 0.1/4 = 0.4916667
    # class 0: errors [0.1, 0.6, 0.7, 0.2] -> sorted 0.7(bg) 0.6(fg) 0.2(fg) 0.1(bg), |G| = 2
    #   J = 1/3, 2/3, 3/3, 4/4 -> increments 1/3, 1/3, 1/3, 0 -> loss0 = 1.5/3 = 0.5
    logits = _logits_from_p1([0.9, 0.6, 0.3, 0.2])
    labels = torch.tensor([[1, 0, 1, 0]])
    expected = (0.7 / 2 + 0.6 / 6 + 0.2 / 12 + 0.1 / 4 + 0.5) / 2
    got = lovasz_softmax(torch.softmax(logits, dim=1), labels)
    assert got.item() == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.4958333333, abs=1e-9)


def test_lovasz_matches_definition_and_present_classes() -> None:
    rng = np.random.default_rng(0)
    for trial in range(5):
        probas = rng.dirichlet(np.ones(3), size=7)
        labels = rng.integers(0, 2 if trial % 2 else 3, size=7)  # odd trials: class 2 absent
        for classes in ("all", "present"):
            got = lovasz_softmax_flat(
                torch.from_numpy(probas), torch.from_numpy(labels), classes=classes
            ).item()
            assert got == pytest.approx(_lovasz_brute(probas, labels, classes), abs=1e-9)
        if trial % 2:  # an absent class changes the default (all classes) but not "present"
            assert lovasz_softmax_flat(
                torch.from_numpy(probas), torch.from_numpy(labels)
            ).item() != pytest.approx(_lovasz_brute(probas, labels, "present"), abs=1e-6)
    # "all" includes the absent class (its loss = Lovász of the false positives only)
    probas = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    present = lovasz_softmax_flat(probas, labels, classes="present").item()
    all_ = lovasz_softmax_flat(probas, labels, classes="all").item()
    # class 2 absent: errors 0.2, 0.1; J = 1, 1 -> loss2 = 0.2
    assert all_ == pytest.approx((present * 2 + 0.2) / 3, abs=1e-12)


def test_lovasz_flattens_over_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 2, 3, 2))
    probas = torch.softmax(logits, dim=1)
    flat_p = probas.permute(0, 2, 3, 4, 1).reshape(-1, 3)
    ref = _lovasz_brute(flat_p.numpy(), target.reshape(-1).numpy())
    assert lovasz_softmax(probas, target).item() == pytest.approx(ref, abs=1e-9)
    # channel-axis float target as batchgenerators gives it
    assert lovasz_softmax(probas, target[:, None].double()).item() == pytest.approx(ref, abs=1e-9)
    # perfect one-hot prediction -> 0
    onehot = F.one_hot(target, 3).permute(0, 4, 1, 2, 3).double()
    assert lovasz_softmax(onehot, target).item() == pytest.approx(0.0, abs=1e-12)


def test_focal_closed_form() -> None:
    logits = _logits_from_p1([0.9, 0.6, 0.3, 0.2])
    labels = torch.tensor([[1, 0, 1, 0]])
    pt = [0.9, 0.4, 0.3, 0.8]  # probability of the true class per voxel
    expected = sum(-((1 - p) ** 2) * math.log(p) for p in pt) / 4
    assert focal_loss(logits, labels).item() == pytest.approx(expected, abs=1e-9)
    # gamma 0 is cross entropy
    assert focal_loss(logits, labels, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), abs=1e-9
    )


def _rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, *spatial) logits and (N[, 1], *spatial) labels -> float64 (P, C) rows and int (P,) labels,
    voxels in the same order (both losses are invariant to the order of the voxels)."""
    c = logits.shape[1]
    z = logits.detach().double().movedim(1, -1).reshape(-1, c).numpy()
    return z, target.detach().reshape(-1).round().long().numpy()


def _focal_np(z: np.ndarray, labels: np.ndarray, gamma: float = 2.0) -> float:
    """Focal loss by hand in float64: mean_i -(1 - p_i)^gamma log p_i, p_i = softmax(z_i)[y_i]."""
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    log_pt = z[np.arange(len(labels)), labels] - lse
    return float(np.mean(-((1.0 - np.exp(log_pt)) ** gamma) * log_pt))


def _softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _seg_loss_np(z: np.ndarray, labels: np.ndarray, wl: float = 1.0, wf: float = 1.0) -> float:
    """Independent reference of SegmentationLoss: brute-force Lovász of softmax + hand focal, float64."""
    return wl * _lovasz_brute(_softmax_np(z), labels) + wf * _focal_np(z, labels)


def test_segmentation_loss_matches_independent_reference_and_weights() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 2, 3, 2) * 2.0
    target = torch.randint(0, 3, (2, 1, 2, 3, 2)).float()  # (N, 1, ...) float like batchgenerators
    z, lab = _rows(logits, target)
    lov, foc = _lovasz_brute(_softmax_np(z), lab), _focal_np(z, lab)
    assert lov > 0.1 and foc > 0.1  # both terms matter
    assert SegmentationLoss()(logits, target).item() == pytest.approx(lov + foc, rel=1e-5)
    for wl, wf in itertools.product([0.0, 1.0, 0.5], [0.0, 1.0, 2.0]):
        got = SegmentationLoss(lovasz_weight=wl, focal_weight=wf)(logits, target).item()
        assert got == pytest.approx(wl * lov + wf * foc, rel=1e-5, abs=1e-7), (wl, wf)
    # gamma reaches the focal term: gamma 0 = Lovász + cross entropy
    ce = _focal_np(z, lab, gamma=0.0)
    assert SegmentationLoss(gamma=0.0)(logits, target).item() == pytest.approx(lov + ce, rel=1e-5)
    # the classes setting reaches the Lovász term: a batch without class 2 averages over 3 classes by
    # default (class 2 then costs its largest probability: every voxel is a false positive, J = 1)
    # and over the 2 present ones with classes="present"
    t01 = target.clamp(max=1)
    z01, lab01 = _rows(logits, t01)
    p01 = _softmax_np(z01)
    assert set(lab01.tolist()) == {0, 1}
    lov_present = _lovasz_brute(p01, lab01, "present")
    lov_all = lov_present * 2 / 3 + float(np.max(p01[:, 2])) / 3
    assert SegmentationLoss(focal_weight=0.0)(logits, t01).item() == pytest.approx(lov_all, rel=1e-5)
    got_present = SegmentationLoss(classes="present", focal_weight=0.0)(logits, t01).item()
    assert got_present == pytest.approx(lov_present, rel=1e-5)
    assert abs(lov_all - lov_present) > 1e-3


def test_segmentation_loss_computes_in_float32_for_bf16_logits() -> None:
    torch.manual_seed(2)
    logits = (torch.randn(1, 2, 3, 3, 3) * 3).bfloat16()
    target = torch.randint(0, 2, (1, 3, 3, 3))
    loss = SegmentationLoss()(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_seg_loss_np(*_rows(logits, target)), rel=1e-5)


def _numeric_grad(loss: Callable[[np.ndarray], float], z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a float64 loss of the logits rows ``z`` (P, C)."""
    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (loss(zp) - loss(zm)) / (2 * h)
    return g


def _focal_grad_detached_np(z: np.ndarray, labels: np.ndarray, gamma: float = 2.0) -> np.ndarray:
    """Gradient of the focal loss with the factor (1 - p_t)^gamma held constant, by hand:
    d/dz_j [-(1 - p_t)^gamma log p_t] = -(1 - p_t)^gamma (1[j = t] - p_j), mean over the P voxels."""
    p = _softmax_np(z)
    onehot = np.eye(z.shape[1])[labels]
    factor = (1.0 - p[np.arange(len(labels)), labels]) ** gamma
    return -factor[:, None] * (onehot - p) / len(labels)


def test_segmentation_loss_gradient_matches_finite_differences() -> None:
    """Preset: Lovász by finite differences + focal with a constant factor (by hand); with
    ``detach_focal_factor=False`` the whole loss by finite differences. The two differ."""
    torch.manual_seed(3)
    base = torch.randn(2, 3, 2, 2, 2) * 2.0
    target = torch.randint(0, 3, (2, 2, 2, 2))
    z, lab = _rows(base, target)
    lovasz_grad = _numeric_grad(lambda zz: _lovasz_brute(_softmax_np(zz), lab), z)
    expected = {
        True: lovasz_grad + _focal_grad_detached_np(z, lab),
        False: _numeric_grad(lambda zz: _seg_loss_np(zz, lab), z),
    }
    got = {}
    for detach in (True, False):
        logits = base.clone().requires_grad_(True)
        SegmentationLoss(detach_focal_factor=detach)(logits, target).backward()
        assert logits.grad is not None
        got[detach] = logits.grad.movedim(1, -1).reshape(z.shape).double().numpy()
        # float32 autograd vs float64 references
        np.testing.assert_allclose(got[detach], expected[detach], rtol=1e-4, atol=2e-6)
    assert np.abs(expected[True] - expected[False]).max() > 1e-3  # the setting matters
    assert np.abs(lovasz_grad).max() > 1e-2  # a non-trivial Lovász gradient
    # autograd's own check of both terms together in float64 (differentiable factor)
    x = torch.randn(1, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[[[0, 1], [2, 1]], [[0, 0], [2, 1]]]])
    assert torch.autograd.gradcheck(
        lambda t: lovasz_softmax(torch.softmax(t, 1), y) + focal_loss(t, y, detach_factor=False), (x,)
    )
    # gradient of the Lovász part alone matches finite differences
    x = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 1, 1, 0, 1]])
    assert torch.autograd.gradcheck(lambda t: lovasz_softmax(torch.softmax(t, 1), y), (x,))


def test_segmentation_loss_saturated_softmax() -> None:
    # logits 60 apart: softmax is one-hot up to ~1e-26, so the Lovász term is the Jaccard loss
    # 1 - |G ∩ M| / |G ∪ M| of the hard prediction (mean over all classes), each wrong voxel adds
    # its logit gap 60 to the focal sum, and the gradient of the true-class logit of a wrong voxel
    # is -1 / P (d/dz [-(1 - p)^2 log p] -> -1 as p -> 0), ~0 everywhere else that matters
    torch.manual_seed(4)
    shape = (2, 2, 3, 2)
    target = torch.randint(0, 3, shape)
    pred = target.clone()
    wrong = torch.rand(shape) < 0.4
    pred[wrong] = (target[wrong] + torch.randint(1, 3, (int(wrong.sum()),))) % 3
    logits = (60.0 * F.one_hot(pred, 3).movedim(-1, 1).float()).requires_grad_(True)
    loss = SegmentationLoss()(logits, target)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    n_vox = target.numel()
    jacc = []  # every class (the preset): an absent class costs 1 if it is predicted anywhere
    for c in range(3):
        g, m = target == c, pred == c
        jacc.append(1.0 - float((g & m).sum()) / float((g | m).sum()) if g.any() else float(m.any()))
    focal = 60.0 * float(wrong.sum()) / n_vox
    assert 0 < wrong.sum() < n_vox
    assert loss.item() == pytest.approx(float(np.mean(jacc)) + focal, rel=1e-5)
    assert loss.item() == pytest.approx(_seg_loss_np(*_rows(logits, target)), rel=1e-5)
    grad_true = logits.grad.gather(1, target.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(grad_true[wrong], torch.full_like(grad_true[wrong], -1.0 / n_vox))
    torch.testing.assert_close(grad_true[~wrong], torch.zeros_like(grad_true[~wrong]), atol=1e-8, rtol=0)
