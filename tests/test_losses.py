"""Lovász-softmax and focal loss against hand-computed values."""

from __future__ import annotations

import itertools
import math

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


def _lovasz_brute(probas: np.ndarray, labels: np.ndarray) -> float:
    """Lovász extension from its definition (greedy chain of sets), mean over present classes.

    probas: (P, C); labels: (P,).
    """
    losses = []
    for c in range(probas.shape[1]):
        gt = {i for i in range(len(labels)) if labels[i] == c}
        if not gt:
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
        got = lovasz_softmax_flat(torch.from_numpy(probas), torch.from_numpy(labels)).item()
        assert got == pytest.approx(_lovasz_brute(probas, labels), abs=1e-9)
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


def test_segmentation_loss_sum_and_finite_gradients() -> None:
    torch.manual_seed(1)
    loss_fn = SegmentationLoss()
    for scale in (1.0, 60.0):  # includes saturated softmax
        logits = (torch.randn(2, 3, 3, 4, 2) * scale).requires_grad_(True)
        target = torch.randint(0, 3, (2, 1, 3, 4, 2)).float()  # (N, 1, ...) float like batchgenerators
        loss = loss_fn(logits, target)
        ref = lovasz_softmax(torch.softmax(logits, 1), target) + focal_loss(logits, target)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        loss.backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0 or scale > 1
    # gradient of the Lovász part matches finite differences
    x = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 1, 1, 0, 1]])
    assert torch.autograd.gradcheck(lambda t: lovasz_softmax(torch.softmax(t, 1), y), (x,))
    for combo in itertools.product([0.0, 1.0], repeat=2):
        fn = SegmentationLoss(lovasz_weight=combo[0], focal_weight=combo[1])
        assert torch.isfinite(fn(x.float(), y))
