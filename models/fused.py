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
# The Gram-matrix trick computes C*C products to get C of them; worth it only for large volumes.
_GRAM_MIN_VOXELS_PER_CHANNEL = 512


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """A zero-copy 3D view of x for per-(sample, channel) reductions, or None if x has neither layout.

    Returns ``(view, channels_last)``: (N, S, C) for channels_last_3d tensors, (N*C, 1, S) for
    contiguous ones, S being the number of voxels.
    """
    n, c = x.shape[:2]
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.permute(0, 2, 3, 4, 1).reshape(n, -1, c), True
    if x.is_contiguous():
        return x.reshape(n * c, 1, -1), False
    return None


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over D, H, W: (N, C, D, H, W) -> (N, C)."""
    rows = _rows(x)
    if rows is not None and rows[1]:  # reduce over the strided voxel axis as a matrix product
        view = rows[0]
        return torch.bmm(view.new_ones(view.shape[0], 1, view.shape[1]), view).squeeze(1)
    return x.sum(dim=_SPATIAL)


def _spatial_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over D, H, W of a * b, without a full-size temporary: (N, C, D, H, W) x 2 -> (N, C)."""
    ra, rb = _rows(a), _rows(b)
    n, c = a.shape[:2]
    if ra is not None and rb is not None and ra[1] == rb[1]:
        if ra[1]:
            if ra[0].shape[1] < _GRAM_MIN_VOXELS_PER_CHANNEL * c:  # small volume: a temporary is cheap
                return (a * b).sum(dim=_SPATIAL)
            # (N, C, S) @ (N, S, C): the diagonal is what we need; C is small where S is large
            return torch.bmm(ra[0].transpose(1, 2), rb[0]).diagonal(dim1=1, dim2=2)
        return torch.bmm(ra[0], rb[0].transpose(1, 2)).view(n, c)
    return (a * b).sum(dim=_SPATIAL)


def _pivot(x: torch.Tensor, samples_per_axis: int = 8) -> torch.Tensor:
    """A cheap estimate of each (sample, channel) mean, (N, C): the mean of a strided subsample of
    about ``samples_per_axis`` voxels per axis."""
    steps = [max(1, s // samples_per_axis) for s in x.shape[2:]]
    return x[:, :, :: steps[0], :: steps[1], :: steps[2]].mean(dim=_SPATIAL)


class _InstanceNormAct(torch.autograd.Function):
    """y = act((x - mean) / sqrt(var + eps) * weight + bias), statistics per (sample, channel).

    Normalisation does not change when a constant is subtracted per (sample, channel), so the
    input is first shifted by a cheap estimate of its mean (:func:`_pivot`). The statistics then
    come from sums and sums of squares of the shifted values, which stay accurate in float32 even
    for channels whose mean is large against their spread (summing squares of unshifted values
    would cancel catastrophically in ``E[x²] - mean²``). The shifted tensor replaces the input in
    the saved state, so it costs one pass and no extra memory; the final (N, C) arithmetic is in
    float64 and the output is one fused multiply-add pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, slope: float | None):
        n, c = x.shape[:2]
        count = max(x[0, 0].numel(), 1)
        xs = x - _pivot(x).view(n, c, 1, 1, 1)  # keeps x's memory format
        mean = _spatial_sum(xs).double() / count  # mean of the shifted values, near 0
        var = (_spatial_dot(xs, xs).double() / count - mean.square()).clamp_min_(0.0)
        rstd = torch.rsqrt(var + eps)
        scale = (rstd * weight.double()).to(x.dtype)
        shift = (bias.double() - mean * rstd * weight.double()).to(x.dtype)
        y = torch.addcmul(shift.view(n, c, 1, 1, 1), xs, scale.view(n, c, 1, 1, 1))
        if slope is not None:
            F.leaky_relu_(y, slope)
        ctx.slope = slope
        ctx.count = count
        ctx.save_for_backward(xs, y if slope is not None else None, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        # every formula below holds with x and its mean replaced by the shifted values and their mean
        x, y, mean, rstd, weight = ctx.saved_tensors
        n, c = x.shape[:2]
        # Gradients arriving through torch.cat or upsampling can be strided or in the other layout;
        # one copy into x's layout keeps every pass below on the fast contiguous path.
        g = grad_out.contiguous(memory_format=_format_of(x))
        if ctx.slope is not None:
            # LeakyReLU with a positive slope keeps the sign, so y > 0 exactly where its input > 0.
            g = torch.ops.aten.leaky_relu_backward(g, y, ctx.slope, True)
        m = ctx.count
        sum_g = _spatial_sum(g).double()  # (N, C)
        sum_gx = _spatial_dot(g, x).double()
        sum_g_xhat = (sum_gx - mean * sum_g) * rstd  # sum over voxels of g * xhat
        w = weight.double()
        grad_weight = sum_g_xhat.sum(dim=0).to(weight.dtype)
        grad_bias = sum_g.sum(dim=0).to(weight.dtype)
        # dx = w * rstd * (g - sum_g / m - xhat * sum_g_xhat / m) = a * g + b * x + c
        a = w * rstd
        b = -a * rstd * sum_g_xhat / m
        cc = -a * sum_g / m - b * mean
        shape = (n, c, 1, 1, 1)
        # A fresh CPU tensor costs several passes over memory (page faults and zeroing), so the
        # input gradient is built in place in g's buffer when g is ours (not grad_out itself).
        grad_x = g.mul_(a.to(x.dtype).view(shape)) if g is not grad_out else g * a.to(x.dtype).view(shape)
        grad_x.addcmul_(x, b.to(x.dtype).view(shape)).add_(cc.to(x.dtype).view(shape))
        return grad_x, grad_weight, grad_bias, None, None


def _format_of(x: torch.Tensor) -> torch.memory_format:
    c = x.shape[1]
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def instance_norm_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, slope: float | None = None
) -> torch.Tensor:
    """InstanceNorm3d(affine) followed by LeakyReLU(slope) if ``slope`` is given.

    Args:
        x: (N, C, D, H, W), any memory format (the output keeps it).
        weight, bias: (C,).
    """
    if not _fusable(x):
        y = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
        return y if slope is None else F.leaky_relu(y, slope)
    return _InstanceNormAct.apply(x, weight, bias, eps, slope)


def _fusable(x: torch.Tensor) -> bool:
    """The fused functions are written for full precision; under autocast the plain ops are used."""
    return x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)


class _DepthwiseConv3d(torch.autograd.Function):
    """Depthwise conv3d, stride 1, "same" padding, whose input gradient is itself a depthwise conv.

    The input gradient of a stride-1 correlation with kernel w is the correlation of the output
    gradient with w flipped in every spatial axis; PyTorch's forward kernel computes it several
    times faster than its generic backward on CPU.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int):
        ctx.padding = padding
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        channels, pad = weight.shape[0], ctx.padding
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad_out, weight.flip(2, 3, 4), None, padding=pad, groups=channels)
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(grad_out, x, weight, pad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


# Up to this many channels, the weight gradient is faster as a sum of 2D depthwise gradients
# (measured with oneDNN on CPU: 16 ch 79 -> 59 ms, 32 ch 273 -> 155 ms at 2x64^3; slower at 64 ch).
_WEIGHT_GRAD_2D_MAX_CHANNELS = 32


def _depthwise_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pad: int
) -> torch.Tensor:
    """Weight gradient of a stride-1 depthwise conv3d, shape (C, 1, k, k, k).

    For channels_last_3d CPU tensors with few channels it is computed slice by slice in z: the
    (z, y, x) correlation is a sum over kernel depth of 2D (y, x) correlations between z-shifted
    slabs, and each sample's slabs are zero-copy (D, C, H, W) channels_last 2D batches.
    """
    channels, k = weight.shape[0], weight.shape[-1]
    fmt = torch.channels_last_3d
    use_2d = (
        x.device.type == "cpu"
        and channels <= _WEIGHT_GRAD_2D_MAX_CHANNELS
        and x.is_contiguous(memory_format=fmt)
        and grad_out.is_contiguous(memory_format=fmt)
        and channels > 1
    )
    if not use_2d:
        return torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            None,
            [1, 1, 1],
            [pad] * 3,
            [1, 1, 1],
            False,
            [0, 0, 0],
            channels,
            [False, True, False],
        )[1]
    depth = x.shape[2]
    weight_2d = weight[:, :, 0]
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    for n in range(x.shape[0]):
        for kz in range(k):
            dz = kz - pad  # output slice z reads input slice z + dz
            lo, hi = max(0, -dz), min(depth, depth - dz)
            if hi <= lo:
                continue
            g2 = grad_out[n, :, lo:hi].transpose(0, 1)  # (d, C, H, W), channels_last 2D view
            x2 = x[n, :, lo + dz : hi + dz].transpose(0, 1)
            grad_w[:, :, kz] += torch.ops.aten.convolution_backward(
                g2,
                x2,
                weight_2d,
                None,
                [1, 1],
                [pad, pad],
                [1, 1],
                False,
                [0, 0],
                channels,
                [False, True, False],
            )[1]
    return grad_w.to(memory_format=torch.contiguous_format if weight.is_contiguous() else fmt)


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Args: x: (N, C, D, H, W); weight: (C, 1, k, k, k), k odd; bias: (C,) or None."""
    if not _fusable(x):
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])
    return _DepthwiseConv3d.apply(x, weight, bias, weight.shape[-1] // 2)
