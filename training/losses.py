"""Training losses of the 3D U²-Net paper preset: Lovász-softmax + focal loss.

Both losses take the raw network output ``logits`` of shape ``(N, C, *spatial)`` and an integer label
map ``target`` of shape ``(N, *spatial)`` or ``(N, 1, *spatial)`` (values ``0..C-1``; float label maps
with integral values, as batchgenerators produces them, are accepted and cast).

* Lovász-softmax (Berman et al., CVPR 2018) is evaluated on ``softmax(logits)``, flattened over the
  whole batch (``per_image=False``) and averaged over all classes (``classes="all"``, the original's
  choice; ``"present"`` averages over the classes in the batch's ground truth only).
* Focal loss (Lin et al., 2017) with ``gamma = 2`` on the logits, no class weights, mean over voxels;
  as in the original, the modulating factor ``(1 - p)^gamma`` is a constant for the gradient
  (computed from detached probabilities); ``detach_factor=False`` lets the gradient flow through it.
* :class:`SegmentationLoss` is their unweighted sum, as the original training script used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

#: what ``classes`` of the Lovász-softmax accepts: every class (the preset) or those present
LOVASZ_CLASSES = ("all", "present")

__all__ = [
    "LOVASZ_CLASSES",
    "flatten_logits",
    "focal_loss",
    "lovasz_softmax",
    "lovasz_softmax_flat",
    "SegmentationLoss",
]


def _target_to_long(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Bring ``target`` to shape ``(N, *spatial)`` and dtype int64.

    Accepts ``(N, *spatial)`` or ``(N, 1, *spatial)`` (channel axis as batchgenerators' ``seg``).
    """
    if target.dim() == logits.dim():
        if target.shape[1] != 1:
            raise ValueError(
                f"target with a channel axis must have 1 channel, got shape {tuple(target.shape)}"
            )
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if target.is_floating_point():
        target = torch.round(target)
    return target.long()


def flatten_logits(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` -> ``(N * prod(spatial), C)`` (voxels of all images in one row block)."""
    n, c = x.shape[:2]
    return x.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)


def lovasz_softmax_flat(probas: torch.Tensor, labels: torch.Tensor, classes: str = "all") -> torch.Tensor:
    """Lovász-softmax on flattened voxels.

    For every class ``c`` the per-voxel errors ``e_i = |1[y_i = c] - p_i(c)|`` are sorted in decreasing
    order; the loss of the class is the Lovász extension of the Jaccard loss evaluated at ``e``:
    ``sum_k e_(k) * (J(k) - J(k-1))`` with ``J(k)`` the Jaccard loss ``|M| / |G ∪ M|`` of the set ``M`` of
    the ``k`` largest errors and ``G`` the class's ground truth (``J(0) = 0``). The gradient vector
    ``J(k) - J(k-1)`` depends only on the ground-truth order and carries no gradient.

    Args:
        probas: ``(P, C)`` class probabilities per voxel.
        labels: ``(P,)`` int64 labels in ``0..C-1``.
        classes: ``"all"`` (average over every class, the paper preset) or ``"present"`` (over the
            classes occurring in ``labels``).

    Returns:
        Scalar tensor.
    """
    return _lovasz_class_rows(probas.t(), labels, classes)


def _lovasz_class_rows(probas: torch.Tensor, labels: torch.Tensor, classes: str) -> torch.Tensor:
    """:func:`lovasz_softmax_flat` on class rows: ``probas (C, P)``, ``labels (P,)``.

    Laid out for the GPU (``docs/performance.md``, "The loss"): every class's errors are one contiguous
    row, sorted along the last axis, and the running counts of ground-truth voxels come from ONE
    cumulative sum over the flattened ``(C * P,)`` integer vector — a 1-D scan, which CUDA runs as a
    parallel device-wide scan, where a scan along the voxel axis of a ``(P, C)`` tensor runs as C
    sequential GPU threads of P steps each. The counts are exact integers; no ``one_hot`` (whose
    range checks synchronise with the GPU).
    """
    if probas.numel() == 0:
        return probas.sum() * 0.0
    if classes not in LOVASZ_CLASSES:
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
    num_classes, num_voxels = probas.shape
    fg = labels.unsqueeze(0) == torch.arange(num_classes, device=labels.device).unsqueeze(1)  # (C, P)
    errors = (fg.to(probas.dtype) - probas).abs()
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)  # all classes at once
    with torch.no_grad():
        fg_sorted = torch.gather(fg, 1, order)
        running = torch.cumsum(fg_sorted.reshape(-1), 0, dtype=torch.int64).view(num_classes, num_voxels)
        totals = running[:, -1]
        before = torch.cat([totals.new_zeros(1), totals[:-1]])  # ground truth of the earlier classes
        tp_taken = running - before.unsqueeze(1)  # ground-truth voxels among the first k (k = 1..P)
        n_fg = tp_taken[:, -1:]  # |G| per class, (C, 1)
        taken = torch.arange(1, num_voxels + 1, device=probas.device)
        # after k voxels taken: true positives left = |G| - tp_taken, union = |G| + (k - tp_taken)
        tp_left = (n_fg - tp_taken).to(probas.dtype)
        union = (n_fg + taken - tp_taken).to(probas.dtype)
        jaccard = 1.0 - tp_left / union  # J(k), (C, P); union >= 1 from k = 1 on
        grad = torch.diff(jaccard, dim=1, prepend=torch.zeros_like(jaccard[:, :1]))
    per_class = (errors_sorted * grad).sum(dim=1)  # (C,)
    if classes == "present":
        return per_class[n_fg[:, 0] > 0].mean()
    return per_class.mean()


def lovasz_softmax(probas: torch.Tensor, target: torch.Tensor, classes: str = "all") -> torch.Tensor:
    """Lovász-softmax of probabilities ``(N, C, *spatial)`` against labels ``(N[, 1], *spatial)``.

    Flattened over the batch (``per_image=False``); see :func:`lovasz_softmax_flat`.
    """
    labels = _target_to_long(target, probas).reshape(-1)
    num_classes = probas.shape[1]
    # (C, N * voxels): the voxel order of flatten_logits, one row per class
    rows = probas.transpose(0, 1).reshape(num_classes, -1)
    return _lovasz_class_rows(rows, labels, classes)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, *, detach_factor: bool = True
) -> torch.Tensor:
    """Focal loss ``mean_i -(1 - p_i)^gamma * log p_i`` with ``p_i = softmax(logits)_i[y_i]``.

    Args:
        logits: ``(N, C, *spatial)``.
        target: ``(N[, 1], *spatial)`` labels in ``0..C-1``.
        gamma: focusing parameter (2 in the preset).
        detach_factor: treat the modulating factor ``(1 - p)^gamma`` as a constant (no gradient
            through it), as the original did; False differentiates it too.

    Returns:
        Scalar tensor (mean over all voxels of the batch).
    """
    labels = _target_to_long(target, logits)
    log_p = F.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)  # (N, *spatial)
    p = log_p.detach().exp() if detach_factor else log_p.exp()
    return (-((1.0 - p) ** gamma) * log_p).mean()


class SegmentationLoss(nn.Module):
    """Paper-preset loss: ``lovasz_weight * Lovász-softmax(softmax(logits)) + focal_weight * focal(logits)``.

    ``forward(logits (N, C, *spatial), target (N[, 1], *spatial)) -> scalar``. Computed in float32 even
    for half-precision logits.

    Args:
        gamma: focal loss focusing parameter.
        lovasz_weight, focal_weight: weights of the two terms (1 and 1 in the preset).
        classes: Lovász-softmax over ``"all"`` classes (preset) or the ``"present"`` ones.
        detach_focal_factor: the focal modulating factor is a constant for the gradient (preset).
    """

    def __init__(
        self,
        gamma: float = 2.0,
        lovasz_weight: float = 1.0,
        focal_weight: float = 1.0,
        classes: str = "all",
        detach_focal_factor: bool = True,
    ) -> None:
        super().__init__()
        if classes not in LOVASZ_CLASSES:
            raise ValueError(f"classes must be one of {LOVASZ_CLASSES}, got {classes!r}")
        self.gamma = gamma
        self.lovasz_weight = lovasz_weight
        self.focal_weight = focal_weight
        self.classes = classes
        self.detach_focal_factor = detach_focal_factor

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = logits.new_zeros(())
        # named ranges for torch.profiler (benchmarks/profile_train_step.py); free when not profiling
        if self.lovasz_weight:
            with record_function("loss/lovasz"):
                loss = loss + self.lovasz_weight * lovasz_softmax(
                    torch.softmax(logits, dim=1), target, classes=self.classes
                )
        if self.focal_weight:
            with record_function("loss/focal"):
                focal = focal_loss(logits, target, gamma=self.gamma, detach_factor=self.detach_focal_factor)
                loss = loss + self.focal_weight * focal
        return loss

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, lovasz_weight={self.lovasz_weight}, focal_weight={self.focal_weight}, "
            f"classes={self.classes!r}, detach_focal_factor={self.detach_focal_factor}"
        )
