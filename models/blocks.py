"""The network's level blocks: encoder (residual), downsampling, decoder, and the per-task heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.conv_units import NEGATIVE_SLOPE, ConvUnit, UnitFactory, UnitParts, leaky_relu
from models.norms import TaskModuleList, TaskNorm, norm_act
from models.pointwise import PointwiseConv3d
from utils.triples import int3


class ConvNorm(nn.Module):
    """A convolution followed by InstanceNorm (and LeakyReLU when a slope is given)."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv
        self.norm = nn.InstanceNorm3d(conv.out_channels, affine=True)
        self.use_fused = True

    def forward(self, x: torch.Tensor, slope: float | None = NEGATIVE_SLOPE) -> torch.Tensor:
        return norm_act(self.norm, self.conv(x), slope, self.use_fused)


class InputHeads(nn.Module):
    """Per task: 3×3×3 conv (modalities -> C) + InstanceNorm + act.

    Args:
        in_channels: number of modalities of each task.
        out_channels: C, the first level's channels.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.heads = TaskModuleList(lambda t: self._head(in_channels[t]), len(in_channels))

    def _head(self, modalities: int) -> ConvNorm:
        return ConvNorm(nn.Conv3d(modalities, self.out_channels, 3, padding=1))

    def add_task(self, modalities: int) -> None:
        self.heads.append(self._head(modalities))

    def forward(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        """Args: x: (N, M_t, D, H, W). Returns: (N, C, D, H, W)."""
        return self.heads[task_idx](x)


class EncoderBlock(nn.Module):
    """Two conv units, each followed by act; residual: act(x + unit2(act(unit1(x))))."""

    def __init__(self, channels: int, make_unit: UnitFactory, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.unit1 = make_unit(channels, channels, 3)
        self.unit2 = make_unit(channels, channels, 3)

    def forward(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        """Args: x: (N, C, D, H, W). Returns: (N, C, D, H, W)."""
        y = self.unit1(x, task_idx, act=True)
        if not self.residual:
            return self.unit2(y, task_idx, act=True)
        return leaky_relu(x + self.unit2(y, task_idx))


class Downsample(nn.Module):
    """TensorFlow-"SAME" padding, then a full 3×3×3 conv with per-axis strides, per-task norm, act.

    The conv is an ordinary full convolution shared by all tasks in every mode (as the original).

    Args:
        strides: (sz, sy, sx), each 1 or 2.
    """

    def __init__(self, in_channels: int, out_channels: int, strides: Sequence[int], num_tasks: int) -> None:
        super().__init__()
        self.strides = int3(strides)
        # F.pad takes (x_before, x_after, y_before, y_after, z_before, z_after); SAME padding for k=3:
        # stride 2 -> (0, 1), stride 1 -> (1, 1).
        pad: list[int] = []
        for s in reversed(self.strides):
            pad += [0, 1] if s == 2 else [1, 1]
        self.pad = tuple(pad)
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=self.strides)
        self.norm = TaskNorm(out_channels, num_tasks)

    def forward(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        """Args: x: (N, C_in, D, H, W). Returns: (N, C_out, D/sz, H/sy, W/sx)."""
        return self.norm(self.conv(F.pad(x, self.pad)), task_idx, NEGATIVE_SLOPE)


def upsample_nearest(x: torch.Tensor, size: Sequence[int], *, by_expand: bool = False) -> torch.Tensor:
    """Nearest-neighbour upsampling to an explicit size (integer factors per axis in this network).

    ``by_expand``: the same values written as a broadcast and reshapes (voxel i of the output copies
    input voxel i // factor, as ``F.interpolate`` does for integer factors). An exported ONNX graph
    then holds Expand/Reshape instead of Resize, which ONNX Runtime runs several times faster (on a
    CPU, Resize took a quarter of the universal model's time); PyTorch itself keeps ``F.interpolate``,
    which preserves the channels-last layout.
    """
    shape = [int(s) for s in x.shape[2:]]
    factors = [int(o) // i for o, i in zip(size, shape, strict=True)]
    if not by_expand or any(f * i != int(o) for f, i, o in zip(factors, shape, size, strict=True)):
        return F.interpolate(x, size=tuple(size), mode="nearest")
    fz, fy, fx = factors
    y = x[:, :, :, None, :, None, :, None].expand(-1, -1, -1, fz, -1, fy, -1, fx)
    return y.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class DecoderBlock(nn.Module):
    """Upsample, unit (C_low -> C) + act, concat with the skip, unit (2C -> C) + act, 1×1×1 unit + act."""

    def __init__(self, low_channels: int, channels: int, make_unit: UnitFactory) -> None:
        super().__init__()
        self.upsample_by_expand = False  # see upsample_nearest; set by U2Net3D.set_export_ops
        self.up_unit = make_unit(low_channels, channels, 3)
        self.fuse_unit = make_unit(2 * channels, channels, 3)
        self.out_unit: ConvUnit = make_unit(channels, channels, 1)

    def forward_parts(self, low: torch.Tensor, skip: torch.Tensor, task_idx: int) -> UnitParts:
        """Args: low: (N, C_low, d, h, w); skip: (N, C, D, H, W). Returns the last unit's parts."""
        up = self.up_unit(
            upsample_nearest(low, skip.shape[2:], by_expand=self.upsample_by_expand), task_idx, act=True
        )
        y = self.fuse_unit(torch.cat((up, skip), dim=1), task_idx, act=True)
        return self.out_unit.forward_parts(y, task_idx, act=True)

    def forward(self, low: torch.Tensor, skip: torch.Tensor, task_idx: int) -> torch.Tensor:
        return self.forward_parts(low, skip, task_idx).out


class ClassHeads(nn.Module):
    """Per task: 1×1×1 conv to the task's classes, optionally + InstanceNorm + act (deep supervision)."""

    def __init__(self, in_channels: int, num_classes: Sequence[int], with_norm_act: bool) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.with_norm_act = with_norm_act
        self.heads = TaskModuleList(lambda t: self._head(num_classes[t]), len(num_classes))

    def _head(self, classes: int) -> nn.Module:
        conv = PointwiseConv3d(self.in_channels, classes)
        return ConvNorm(conv) if self.with_norm_act else conv

    def add_task(self, classes: int) -> None:
        self.heads.append(self._head(classes))

    def forward(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        """Args: x: (N, C, D, H, W). Returns: (N, K_t, D, H, W)."""
        return self.heads[task_idx](x)
