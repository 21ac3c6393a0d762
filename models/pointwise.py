"""1×1×1 convolution computed as a matrix product over the channels of a channels-last tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(in_channels, out_channels, 1)`` (same parameters, same initialisation, same state dict).

    On a ``channels_last_3d`` input (with :attr:`use_fused`, the model's fast-ops switch) it runs as ONE
    matrix product: the tensor is physically ``(N, D, H, W, C)``, so ``F.linear`` over the last axis
    and a permuted view back give a channels-last output with no copy. PyTorch's CPU convolution
    instead computes a 1×1×1 kernel with batched matrix products in the contiguous layout, returns
    a contiguous output and sends the following depthwise and norm layers onto their slow
    mixed-layout paths (docs/performance.md, "What made the separable model fast on CPU", item 5). Other inputs use
    ``nn.Conv3d.forward``; both paths compute the same sums (float rounding aside).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.use_fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C_in, D, H, W). Returns: (N, C_out, D, H, W), channels-last if ``x`` is."""
        if (
            self.use_fused
            and x.dim() == 5
            and x.shape[1] > 1
            and x.is_contiguous(memory_format=torch.channels_last_3d)
            and not x.is_contiguous()
        ):
            w = self.weight.reshape(self.out_channels, self.in_channels)
            return F.linear(x.permute(0, 2, 3, 4, 1), w, self.bias).permute(0, 4, 1, 2, 3)
        return super().forward(x)
