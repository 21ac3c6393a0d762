"""Hand-fused InstanceNorm (+ LeakyReLU) and depthwise-conv autograd functions, for CPU speed.

Why: PyTorch's InstanceNorm3d reshapes its input to (1, N*C, ...) and runs batch norm, which
copies every channels_last_3d tensor twice per call, and its depthwise conv3d backward is slow on
CPU. The separable U²-Net has two norms and one depthwise conv per unit, so those dominate its step
time. These functions compute exactly the same maths (tests compare them with the plain modules)
with fewer passes over memory and no layout changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SPATIAL = (2, 3, 4)


class _InstanceNormAct(torch.autograd.Function):
    """y = act((x - mean) / sqrt(var + eps) * weight + bias), statistics per (sample, channel)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, slope: float | None):  # type: ignore[override]
        count = x[0, 0].numel()
        mean = x.mean(dim=_SPATIAL, keepdim=True)
        # Centred two-pass variance (as PyTorch's own norm, robust when |mean| >> std); the
        # centred copy becomes the output buffer, so one full-size tensor is allocated in all.
        y = x - mean
        var = torch.linalg.vector_norm(y, dim=_SPATIAL, keepdim=True).square_().div_(max(count, 1))
        rstd = torch.rsqrt(var + eps)
        torch.addcmul(bias.view(1, -1, 1, 1, 1), y, rstd * weight.view(1, -1, 1, 1, 1), out=y)
        if slope is not None:
            F.leaky_relu_(y, slope)
        ctx.slope = slope
        ctx.count = count
        ctx.save_for_backward(x, y, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, y, mean, rstd, weight = ctx.saved_tensors
        if ctx.slope is not None:
            # LeakyReLU with a positive slope keeps the sign, so y > 0 exactly where its input > 0.
            g = torch.ops.aten.leaky_relu_backward(grad_out, y, ctx.slope, True)
        else:
            g = grad_out
        m = ctx.count
        sum_g = g.sum(dim=_SPATIAL, keepdim=True)  # (N, C, 1, 1, 1)
        gx = g * x
        sum_gx = gx.sum(dim=_SPATIAL, keepdim=True)
        # sum over voxels of g * xhat, with xhat = (x - mean) * rstd
        sum_g_xhat = (sum_gx - mean * sum_g) * rstd
        w = weight.view(1, -1, 1, 1, 1)
        grad_weight = sum_g_xhat.sum(dim=0).flatten()
        grad_bias = sum_g.sum(dim=0).flatten()
        # dx = w * rstd * (g - sum_g / m - xhat * sum_g_xhat / m) = a * g + b * x + c
        a = w * rstd
        b = -a * rstd * sum_g_xhat / m
        c = -a * sum_g / m - b * mean
        grad_x = torch.addcmul(c, x, b, out=gx)  # reuse the g*x buffer
        grad_x.addcmul_(g, a)
        return grad_x, grad_weight, grad_bias, None, None


def instance_norm_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, slope: float | None = None
) -> torch.Tensor:
    """InstanceNorm3d(affine) followed by LeakyReLU(slope) if ``slope`` is given.

    Args:
        x: (N, C, D, H, W), any memory format (the output keeps it).
        weight, bias: (C,).
    """
    return _InstanceNormAct.apply(x, weight, bias, eps, slope)


class _DepthwiseConv3d(torch.autograd.Function):
    """Depthwise conv3d, stride 1, "same" padding, whose input gradient is itself a depthwise conv.

    The input gradient of a stride-1 correlation with kernel w is the correlation of the output
    gradient with w flipped in every spatial axis; PyTorch's forward kernel computes it several
    times faster than its generic backward on CPU.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int):  # type: ignore[override]
        ctx.padding = padding
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        channels, pad = weight.shape[0], ctx.padding
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad_out, weight.flip(2, 3, 4), None, padding=pad, groups=channels)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1, 1], [pad] * 3, [1, 1, 1], False, [0, 0, 0], channels,
                [False, True, False],
            )[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Args: x: (N, C, D, H, W); weight: (C, 1, k, k, k), k odd; bias: (C,) or None."""
    return _DepthwiseConv3d.apply(x, weight, bias, weight.shape[-1] // 2)
