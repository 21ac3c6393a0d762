"""Depthwise (channel-wise) 3D convolution, the per-task adapter of the separable conv unit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fused import depthwise_conv3d
from models.triton_depthwise import depthwise_conv3d_triton

#: what :attr:`DepthwiseConv3d.kernel` accepts: PyTorch's kernels (with the fused CPU backward when
#: ``use_fused``) or the Triton kernels of :mod:`models.triton_depthwise`
DEPTHWISE_KERNELS = ("native", "triton")


class DepthwiseConv3d(nn.Module):
    """k×k×k convolution with one filter per channel (groups = channels), stride 1, "same" padding.

    Args:
        channels: number of channels C (input and output).
        kernel_size: cubic kernel size k (odd).
        bias: add a learned bias per channel.
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_normal_(self.weight)
        self.use_fused = True
        self.kernel = "native"  # or "triton" (U2Net3D.set_depthwise_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C, D, H, W). Returns: (N, C, D, H, W)."""
        if self.kernel == "triton":
            return depthwise_conv3d_triton(x, self.weight, self.bias)
        if self.use_fused:
            return depthwise_conv3d(x, self.weight, self.bias)
        return F.conv3d(x, self.weight, self.bias, padding=self.kernel_size // 2, groups=self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"
