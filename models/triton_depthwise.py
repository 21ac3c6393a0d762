"""Depthwise 3D convolution (stride 1, "same" padding) as Triton kernels: forward, input gradient and
weight gradient with a split reduction, behind the models' ``depthwise_kernel`` switch.

Why: the separable U²-Net's per-task adapters are depthwise k×k×k convolutions, and PyTorch's native
CUDA depthwise conv3d kernels (the weight gradient above all) are its known weak spot on the GPU
(``docs/performance.md``, "GPU"). Whether these kernels beat them is measured on a GPU by
``benchmarks/bench_depthwise.py`` (``benchmarks/run_gpu_checks.sh``); until then the training scripts'
``--depthwise_kernel auto`` keeps the native kernels.

The three kernels (NCDHW tensors, any float dtype in, float32 accumulation):

* forward: one program per (sample·channel, block of ``BLOCK`` voxels); each output voxel sums its
  k³ neighbours (masked at the borders = zero padding) times the channel's weights, plus the bias;
* input gradient: the correlation of the output gradient with the kernel flipped in every axis —
  the forward kernel again;
* weight gradient: ``dW[c, t] = sum over (n, voxels) of g * x shifted by tap t``, a reduction over
  N·D·H·W voxels per channel, split over ``splits`` programs per channel (grid ``(C, splits)``) that
  each write k³ partial sums; the partials are summed in float32 by PyTorch afterwards (deterministic:
  no atomics).

Triton is optional (``pip install triton``; the CUDA build of torch brings it on Linux). Without it,
:func:`depthwise_conv3d_triton` raises :class:`TritonUnavailableError`. With ``TRITON_INTERPRET=1`` set
before triton is first imported, the kernels run in Triton's interpreter on CPU tensors: how the tests
check them (``tests/test_triton_depthwise.py``; ``tests/conftest.py`` sets the variable on machines
without CUDA). The kernels are jitted on first use (:func:`_kernels`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = [
    "DEPTHWISE_KERNEL_MODES",
    "TRITON_FASTER_ON_CUDA",
    "TritonUnavailableError",
    "depthwise_conv3d_triton",
    "interpreter_enabled",
    "resolve_depthwise_kernel",
    "triton_available",
]

#: voxels per program of the forward kernel and per loop iteration of the weight-gradient kernel
_BLOCK = 512
#: weight-gradient programs per channel: enough to fill a GPU for C = 16 .. 256 channels
_DEFAULT_SPLITS = 64


class TritonUnavailableError(RuntimeError):
    """The Triton kernels were asked for where they cannot run."""


def triton_available() -> bool:
    """Triton is installed (importable)."""
    return triton is not None


def interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1``: kernels run in Triton's interpreter on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_runnable(device: torch.device) -> None:
    if triton is None:
        raise TritonUnavailableError(
            "depthwise_kernel 'triton' needs the triton package (pip install triton; the CUDA build of "
            "torch installs it on Linux)"
        )
    if device.type != "cuda" and not interpreter_enabled():
        raise TritonUnavailableError(
            f"the Triton depthwise kernels run on CUDA tensors (got {device.type}); TRITON_INTERPRET=1 "
            "runs them on the CPU for testing"
        )


# -- the kernels (plain functions, jitted on first use) -----------------------------------------------
def _dw_forward(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    C,
    D,
    H,
    W,
    HAS_BIAS: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    nc = tl.program_id(0)
    c = nc % C
    hw = H * W
    dhw = D * hw
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = r < dhw
    d = r // hw
    h = (r // W) % H
    w = r % W
    base = nc.to(tl.int64) * dhw
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pad = K // 2
    for kd in tl.static_range(K):
        dd = d + (kd - pad)
        ok_d = inside & (dd >= 0) & (dd < D)
        for kh in tl.static_range(K):
            hh = h + (kh - pad)
            ok_h = ok_d & (hh >= 0) & (hh < H)
            for kw in tl.static_range(K):
                ww = w + (kw - pad)
                ok = ok_h & (ww >= 0) & (ww < W)
                v = tl.load(x_ptr + base + dd * hw + hh * W + ww, mask=ok, other=0.0).to(tl.float32)
                wt = tl.load(w_ptr + c * (K * K * K) + (kd * K + kh) * K + kw).to(tl.float32)
                acc += v * wt
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    tl.store(y_ptr + base + r, acc.to(y_ptr.dtype.element_ty), mask=inside)


def _dw_weight_grad(
    x_ptr,
    g_ptr,
    part_ptr,
    N,
    C,
    D,
    H,
    W,
    per_split,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    s = tl.program_id(1)
    splits = tl.num_programs(1)
    hw = H * W
    dhw = D * hw
    total = N * dhw  # voxels of channel c over the batch
    pad = K // 2
    taps = tl.arange(0, TAPS)
    acc = tl.zeros([TAPS], dtype=tl.float32)
    start = s * per_split
    for off in range(0, per_split, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        inside = (i < total) & (i < start + per_split)
        n = i // dhw
        r = i % dhw
        d = r // hw
        h = (r // W) % H
        w = r % W
        base = (n * C + c).to(tl.int64) * dhw
        g = tl.load(g_ptr + base + r, mask=inside, other=0.0).to(tl.float32)
        for kd in tl.static_range(K):
            dd = d + (kd - pad)
            ok_d = inside & (dd >= 0) & (dd < D)
            for kh in tl.static_range(K):
                hh = h + (kh - pad)
                ok_h = ok_d & (hh >= 0) & (hh < H)
                for kw in tl.static_range(K):
                    ww = w + (kw - pad)
                    ok = ok_h & (ww >= 0) & (ww < W)
                    v = tl.load(x_ptr + base + dd * hw + hh * W + ww, mask=ok, other=0.0).to(tl.float32)
                    part = tl.sum(g * v, axis=0)
                    acc += tl.where(taps == (kd * K + kh) * K + kw, part, 0.0)
    tl.store(part_ptr + (c * splits + s) * TAPS + taps, acc)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The jitted kernels, made on first use."""
    assert triton is not None
    return triton.jit(_dw_forward), triton.jit(_dw_weight_grad)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, c, d, h, w = x.shape
    k = weight.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    fwd, _ = _kernels()
    grid = (n * c, triton.cdiv(d * h * w, _BLOCK))
    fwd[grid](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        c,
        d,
        h,
        w,
        HAS_BIAS=bias is not None,
        K=k,
        BLOCK=_BLOCK,
    )
    return y


def _weight_grad(x: torch.Tensor, g: torch.Tensor, k: int, splits: int) -> torch.Tensor:
    n, c, d, h, w = x.shape
    total = n * d * h * w
    splits = max(1, min(splits, triton.cdiv(total, _BLOCK)))
    per_split = triton.cdiv(triton.cdiv(total, splits), _BLOCK) * _BLOCK
    splits = triton.cdiv(total, per_split)
    taps = triton.next_power_of_2(k * k * k)
    partial = torch.empty(c, splits, taps, device=x.device, dtype=torch.float32)
    _, wgrad = _kernels()
    wgrad[(c, splits)](x, g, partial, n, c, d, h, w, per_split, K=k, TAPS=taps, BLOCK=_BLOCK)
    return partial.sum(dim=1)[:, : k * k * k].reshape(c, 1, k, k, k)


class _TritonDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, splits: int):
        x = x.contiguous()
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.splits = splits
        return _forward(x, weight, bias.contiguous() if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # correlation with the flipped kernel: the forward kernel
            grad_x = _forward(g, weight.flip(2, 3, 4).contiguous(), None)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, g, weight.shape[-1], ctx.splits).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=(0, 2, 3, 4), dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def depthwise_conv3d_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, splits: int = _DEFAULT_SPLITS
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=k // 2, groups=C)`` with the Triton kernels.

    Args:
        x: (N, C, D, H, W) on CUDA (or CPU with ``TRITON_INTERPRET=1``); any memory format (made
            contiguous).
        weight: (C, 1, k, k, k), k odd; bias: (C,) or None.
        splits: weight-gradient programs per channel (the split reduction).
    Under autocast, inputs and weights are cast to the autocast dtype as ``F.conv3d`` would be.

    Raises:
        TritonUnavailableError: triton is missing, or the tensor is not on CUDA (and no interpreter).
    """
    _check_runnable(x.device)
    if weight.shape[-1] % 2 != 1 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"expected a depthwise (C, 1, k, k, k) weight, k odd, got {tuple(weight.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type=device_type, enabled=False):
        out: torch.Tensor = _TritonDepthwise.apply(x, weight, bias, int(splits))
    return out


#: what the training scripts' ``--depthwise_kernel`` accepts
DEPTHWISE_KERNEL_MODES = ("auto", "native", "triton")
#: Whether the Triton kernels beat PyTorch's native CUDA depthwise kernels in the preset's training step
#: (``benchmarks/bench_depthwise.py`` on a GPU, run by ``benchmarks/run_gpu_checks.sh``). Not measured
#: on a GPU yet, so ``auto`` keeps the native kernels; set it from that measurement.
TRITON_FASTER_ON_CUDA = False


def resolve_depthwise_kernel(mode: str, device: torch.device) -> str:
    """``"native"`` or ``"triton"`` for a ``--depthwise_kernel`` mode on ``device``.

    ``auto``: Triton on CUDA only where it was measured faster (:data:`TRITON_FASTER_ON_CUDA`) and
    installed, else native. ``triton``: always, checked.

    Raises:
        TritonUnavailableError: ``triton`` asked for without the package, or for a CPU device without
            the interpreter (``TRITON_INTERPRET=1``).
        ValueError: an unknown mode.
    """
    if mode == "native":
        return "native"
    if mode == "auto":
        fast = TRITON_FASTER_ON_CUDA and device.type == "cuda" and triton_available()
        return "triton" if fast else "native"
    if mode == "triton":
        _check_runnable(device)
        return "triton"
    raise ValueError(f"depthwise_kernel must be one of {DEPTHWISE_KERNEL_MODES}, got {mode!r}")
