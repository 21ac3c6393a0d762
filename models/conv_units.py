"""The stride-1 "conv unit" in its four forms: dense, and the three adapters of the universal model.

Every unit maps (N, C_in, D, H, W) -> (N, C_out, D, H, W) for a given task index and ends with a
per-task InstanceNorm; with ``act=True`` the LeakyReLU that follows the unit in the network is fused
into that norm.

| class | what one unit is |
|---|---|
| :class:`DenseUnit` | shared full conv + per-task norm (independent and shared models) |
| :class:`SeparableAdapterUnit` | per-task depthwise conv + norm + act, shared pointwise conv, per-task norm |
| :class:`SeriesAdapterUnit` | shared full conv, per-task (norm + 1×1×1 conv) added back, per-task norm |
| :class:`ParallelAdapterUnit` | shared full conv + per-task 1×1×1 conv of the same input, per-task norm |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.depthwise import DepthwiseConv3d
from models.norms import TaskModuleList, TaskNorm, norm_act
from models.pointwise import PointwiseConv3d

NEGATIVE_SLOPE = 0.01


def leaky_relu(x: torch.Tensor) -> torch.Tensor:
    """The activation used everywhere in the network: LeakyReLU(0.01)."""
    return F.leaky_relu(x, NEGATIVE_SLOPE)


def conv3d(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv3d:
    """A stride-1 k×k×k convolution with "same" padding (k = 1: :class:`PointwiseConv3d`)."""
    if kernel_size == 1:
        return PointwiseConv3d(in_channels, out_channels, bias=bias)
    return nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class UnitParts(NamedTuple):
    """What a unit computed: the output, and its shared and per-task feature maps (for visualisation)."""

    out: torch.Tensor
    shared: torch.Tensor
    task: torch.Tensor | None


class ConvUnit(nn.Module):
    """Base class: subclasses implement :meth:`forward_parts`."""

    in_channels: int
    out_channels: int
    kernel_size: int

    def forward(self, x: torch.Tensor, task_idx: int, act: bool = False) -> torch.Tensor:
        """Args: x: (N, C_in, D, H, W). Returns: (N, C_out, D, H, W), activated if ``act``."""
        return self.forward_parts(x, task_idx, act).out

    def forward_parts(self, x: torch.Tensor, task_idx: int, act: bool = False) -> UnitParts:
        raise NotImplementedError

    @property
    def shared_conv(self) -> nn.Conv3d:
        """The unit's convolution shared by every task (the pointwise one in the separable adapter)."""
        conv = getattr(self, "conv", None)
        if not isinstance(conv, nn.Conv3d):
            raise NotImplementedError(f"{type(self).__name__} does not name its shared convolution")
        return conv


def _slope(act: bool) -> float | None:
    return NEGATIVE_SLOPE if act else None


class DenseUnit(ConvUnit):
    """Full convolution (shared by all tasks) + per-task InstanceNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_tasks: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = conv3d(in_channels, out_channels, kernel_size)
        self.norm = TaskNorm(out_channels, num_tasks)

    def forward_parts(self, x: torch.Tensor, task_idx: int, act: bool = False) -> UnitParts:
        shared = self.conv(x)
        return UnitParts(self.norm(shared, task_idx, _slope(act)), shared, None)


class SeparableAdapterUnit(ConvUnit):
    """The proposed domain adapter: per-task depthwise conv + norm + act, shared pointwise conv + norm.

    Args:
        kernel_size: the unit's nominal kernel. ``depthwise_kernel`` defaults to 3 for every unit,
            1×1×1 units included, because that is what the original did (and what its published
            parameter count of 6,577,460 for the five-task model requires).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_tasks: int,
        depthwise_kernel: int | None = 3,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        dw_k = kernel_size if depthwise_kernel is None else depthwise_kernel
        self.depthwise = TaskModuleList(lambda _t: DepthwiseConv3d(in_channels, dw_k), num_tasks)
        self.depthwise_norm = TaskNorm(in_channels, num_tasks)
        self.pointwise = conv3d(in_channels, out_channels, 1)
        self.norm = TaskNorm(out_channels, num_tasks)

    @property
    def shared_conv(self) -> nn.Conv3d:
        return self.pointwise

    def forward_parts(self, x: torch.Tensor, task_idx: int, act: bool = False) -> UnitParts:
        task_feat = self.depthwise_norm(self.depthwise[task_idx](x), task_idx, NEGATIVE_SLOPE)
        shared = self.pointwise(task_feat)
        return UnitParts(self.norm(shared, task_idx, _slope(act)), shared, task_feat)


class _SeriesAdapter(nn.Module):
    """norm + 1×1×1 conv (C -> C) of one task, added back to its input by the unit."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=True)
        self.conv = conv3d(channels, channels, 1)

        self.use_fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(norm_act(self.norm, x, None, self.use_fused))


class SeriesAdapterUnit(ConvUnit):
    """Residual adapters in series (Rebuffi et al. 2017): shared conv, then a per-task 1×1×1 residual."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_tasks: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = conv3d(in_channels, out_channels, kernel_size)
        self.adapters = TaskModuleList(lambda _t: _SeriesAdapter(out_channels), num_tasks)
        self.norm = TaskNorm(out_channels, num_tasks)

    def forward_parts(self, x: torch.Tensor, task_idx: int, act: bool = False) -> UnitParts:
        shared = self.conv(x)
        task_feat = self.adapters[task_idx](shared)
        return UnitParts(self.norm(shared + task_feat, task_idx, _slope(act)), shared, task_feat)


class ParallelAdapterUnit(ConvUnit):
    """Residual adapters in parallel (Rebuffi et al. 2018): shared conv + per-task 1×1×1 conv of the input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_tasks: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = conv3d(in_channels, out_channels, kernel_size)
        self.adapters = TaskModuleList(lambda _t: conv3d(in_channels, out_channels, 1), num_tasks)
        self.norm = TaskNorm(out_channels, num_tasks)

    def forward_parts(self, x: torch.Tensor, task_idx: int, act: bool = False) -> UnitParts:
        shared = self.conv(x)
        task_feat = self.adapters[task_idx](x)
        return UnitParts(self.norm(shared + task_feat, task_idx, _slope(act)), shared, task_feat)


UnitFactory = Callable[[int, int, int], ConvUnit]
"""Builds a unit from (in_channels, out_channels, kernel_size); the task count is bound in."""
