"""The hand-fused CPU kernels of models/fused.py in float32 against plain PyTorch (float64 reference).

tests/test_models.py compares whole networks in float64 on tiny volumes, which never reach the
Gram-matrix branch of ``_spatial_dot`` (channels_last_3d, >= 512 voxels per channel per sample) nor
test float32 accuracy. Here every test runs the fused function in float32 (as training does) and
compares it with ``F.instance_norm`` + ``F.leaky_relu`` / ``F.conv3d(groups=C)`` evaluated in float64
on the same float32 data.

Float32 tolerances (``torch.testing.assert_close`` against the float64 reference; the measured
errors use about a tenth of them, a wrong formula misses them by orders of magnitude):

* instance norm (outputs and input gradients O(1)..O(10)): output and input gradient
  ``rtol=3e-5, atol=3e-5``; weight and bias gradients (sums over 2 x 4096 voxels, magnitude ~100)
  ``rtol=3e-5, atol=5e-4``;
* depthwise conv (values up to ~60): output and all gradients ``rtol=3e-6, atol=5e-5``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from models import fused

CL = torch.channels_last_3d
SLOPE = 0.01
EPS = 1e-5


@pytest.fixture
def bmm_shapes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """Records the output shape of every torch.bmm call (the Gram branch makes (N, C, C) products)."""
    shapes: list[tuple[int, ...]] = []
    real = torch.bmm

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "bmm", spy)
    yield shapes


@pytest.fixture
def conv_backward_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Records the dimension of the grad_output of every aten.convolution_backward call
    (4 = the 2D-slab weight gradient, 5 = the 3D one)."""
    dims: list[int] = []
    real = torch.ops.aten.convolution_backward

    def spy(*args: object, **kwargs: object) -> object:
        grad_out = args[0]
        assert isinstance(grad_out, torch.Tensor)
        dims.append(grad_out.dim())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", spy)
    yield dims


def _close(fn: Callable[..., None], got: torch.Tensor, ref: torch.Tensor, **tol: float) -> None:
    assert got.dtype == torch.float32
    fn(got.double(), ref, **tol)


# (shape, x layout, upstream-gradient layout, expected number of Gram products in forward + backward)
NORM_CASES = {
    "gram_channels_last": ((2, 4, 16, 16, 16), CL, CL, 2),
    "gram_grad_in_other_layout": ((2, 4, 16, 16, 16), CL, torch.contiguous_format, 2),
    "small_channels_last": ((2, 4, 8, 8, 8), CL, CL, 0),  # 512 < 512 * 4 voxels: a * b temporary
    "contiguous": ((2, 4, 16, 16, 16), torch.contiguous_format, torch.contiguous_format, 0),
}


@pytest.mark.parametrize("slope", [None, SLOPE], ids=["no_act", "leaky"])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_instance_norm_act_float32_matches_plain(
    case: str, slope: float | None, bmm_shapes: list[tuple[int, ...]]
) -> None:
    shape, x_fmt, g_fmt, gram_calls = NORM_CASES[case]
    n, c = shape[:2]
    voxels = shape[2] * shape[3] * shape[4]
    # the documented condition of the Gram branch, on the shapes used here
    assert (x_fmt == CL and voxels >= fused._GRAM_MIN_VOXELS_PER_CHANNEL * c) == (gram_calls > 0)
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(c, generator=gen) * 1.5 + 0.5  # per-channel std 0.5..2, mean -1..1
    shift = torch.rand(c, generator=gen) * 2 - 1
    x = torch.randn(shape, generator=gen) * scale.view(1, c, 1, 1, 1) + shift.view(1, c, 1, 1, 1)
    weight = torch.randn(c, generator=gen)
    bias = torch.randn(c, generator=gen) * 0.5
    g = torch.randn(shape, generator=gen)

    # float64 reference with the plain ops
    xd, wd, bd = (t.double().requires_grad_(True) for t in (x, weight, bias))
    yd = F.instance_norm(xd, weight=wd, bias=bd, eps=EPS)
    if slope is not None:
        # LeakyReLU has a kink at 0: where float32 rounding may flip the side, no gradient flows
        g[yd.detach().abs() < 1e-3] = 0.0
        yd = F.leaky_relu(yd, slope)
    yd.backward(g.double())

    xf = x.contiguous(memory_format=x_fmt).requires_grad_(True)
    wf, bf = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    bmm_shapes.clear()
    y = fused.instance_norm_act(xf, wf, bf, EPS, slope)
    y.backward(g.contiguous(memory_format=g_fmt))
    assert bmm_shapes.count((n, c, c)) == gram_calls
    assert y.is_contiguous(memory_format=x_fmt)  # the output keeps the input's layout
    assert xf.grad is not None and wf.grad is not None and bf.grad is not None
    _close(torch.testing.assert_close, y.detach(), yd.detach(), rtol=3e-5, atol=3e-5)
    _close(torch.testing.assert_close, xf.grad, xd.grad, rtol=3e-5, atol=3e-5)
    _close(torch.testing.assert_close, wf.grad, wd.grad, rtol=3e-5, atol=5e-4)
    _close(torch.testing.assert_close, bf.grad, bd.grad, rtol=3e-5, atol=5e-4)
    if slope is not None:  # negative outputs exist, so the comparison above covers the slope
        assert (yd.detach() < -1e-2).any()  # a ReLU (slope 0) would miss these by > atol


def test_instance_norm_float32_accuracy_with_large_channel_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 4, 32, 32, 32, generator=gen) + 10.0).contiguous(memory_format=CL)  # mean/std 10
    weight, bias = torch.ones(4), torch.zeros(4)
    ref = F.instance_norm(x.double(), eps=EPS)
    plain = F.instance_norm(x, weight=weight, bias=bias, eps=EPS)
    torch.testing.assert_close(plain.double(), ref, rtol=1e-4, atol=1e-4)  # PyTorch's own: fine
    got = fused.instance_norm_act(x, weight, bias, EPS, None)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# (channels, kernel, spatial shape, layout, expected grad_output dims of convolution_backward)
CONV_CASES = {
    "2d_slabs_k3": (4, 3, (5, 6, 7), CL, [4] * (2 * 3)),  # 2 samples x 3 kernel slices
    "2d_slabs_k5_thin": (4, 5, (2, 6, 7), CL, [4] * (2 * 3)),  # |dz| = 2 >= depth 2: two slices skipped
    "2d_slabs_max_channels": (
        fused._WEIGHT_GRAD_2D_MAX_CHANNELS,
        3,
        (4, 5, 6),
        CL,
        [4] * (2 * 3),
    ),
    "3d_too_many_channels": (fused._WEIGHT_GRAD_2D_MAX_CHANNELS + 1, 3, (4, 5, 6), CL, [5]),
    "3d_contiguous": (4, 3, (5, 6, 7), torch.contiguous_format, [5]),
    "3d_contiguous_k5": (6, 5, (5, 6, 7), torch.contiguous_format, [5]),
}


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_depthwise_conv3d_float32_matches_plain(
    case: str, with_bias: bool, conv_backward_calls: list[int]
) -> None:
    c, k, spatial, fmt, expected_calls = CONV_CASES[case]
    gen = torch.Generator().manual_seed(2)
    shape = (2, c, *spatial)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(c, 1, k, k, k, generator=gen)
    bias = torch.randn(c, generator=gen)
    g = torch.randn(shape, generator=gen)

    xd, wd, bd = (t.double().requires_grad_(True) for t in (x, weight, bias))
    yd = F.conv3d(xd, wd, bd if with_bias else None, padding=k // 2, groups=c)
    yd.backward(g.double())

    xf = x.contiguous(memory_format=fmt).requires_grad_(True)
    wf, bf = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    conv_backward_calls.clear()
    y = fused.depthwise_conv3d(xf, wf, bf if with_bias else None)
    y.backward(g.contiguous(memory_format=fmt))
    assert conv_backward_calls == expected_calls
    assert y.shape == shape and y.is_contiguous(memory_format=fmt)
    assert xf.grad is not None and wf.grad is not None
    tol = {"rtol": 3e-6, "atol": 5e-5}
    _close(torch.testing.assert_close, y.detach(), yd.detach(), **tol)
    _close(torch.testing.assert_close, xf.grad, xd.grad, **tol)
    _close(torch.testing.assert_close, wf.grad, wd.grad, **tol)
    if with_bias:
        assert bf.grad is not None
        _close(torch.testing.assert_close, bf.grad, bd.grad, **tol)
    else:
        assert bf.grad is None


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_matmul_path_matches_conv3d(bias: bool) -> None:
    """The channels-last matrix-product path of PointwiseConv3d computes nn.Conv3d's 1×1×1 convolution
    (float64 reference), its gradients too, and returns a channels-last output."""
    from models.pointwise import PointwiseConv3d

    torch.manual_seed(0)
    pw = PointwiseConv3d(6, 5, bias=bias).to(memory_format=CL)
    ref = torch.nn.Conv3d(6, 5, 1, bias=bias).double()
    ref.load_state_dict({k: v.double() for k, v in pw.state_dict().items()})
    x = torch.randn(2, 6, 5, 6, 7).contiguous(memory_format=CL).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y, y64 = pw(x), ref(x64)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y64)
    y.backward(g.float())
    y64.backward(g)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pw.weight.grad.double(), ref.weight.grad, rtol=1e-5, atol=1e-4)
    # the switch and a contiguous input take nn.Conv3d's own path
    with torch.no_grad():
        pw.use_fused = False
        torch.testing.assert_close(pw(x), F.conv3d(x, pw.weight, pw.bias), rtol=0, atol=0)
        pw.use_fused = True
        xc = x.contiguous()
        torch.testing.assert_close(pw(xc), F.conv3d(xc, pw.weight, pw.bias), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["universal", "shared"])
def test_channels_last_model_keeps_the_layout_through_every_unit(mode: str) -> None:
    """In a channels-last model every depthwise / norm input stays channels-last: a layer that returns a
    contiguous tensor (PyTorch's own 1×1×1 convolution did) sends the layers after it onto slow
    mixed-layout paths and copies (docs/performance.md, "What made the separable model fast on CPU", item 5)."""
    from models.norms import TaskNorm
    from models.unet import build_model

    kw = {"module": "separable_adapter"} if mode == "universal" else {}
    model = build_model(mode, [1, 1], [3, 2], base_channels=4, pools_per_axis=(2, 2, 2), **kw)
    model.to(memory_format=CL)
    seen: list[str] = []

    def check(name: str):
        def hook(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if x.dim() == 5 and x.shape[1] > 1:
                seen.append(name)
                assert x.is_contiguous(memory_format=CL), f"{name} got a {x.stride()} input"

        return hook

    for name, m in model.named_modules():
        if isinstance(m, TaskNorm) or type(m).__name__ == "DepthwiseConv3d":
            m.register_forward_pre_hook(check(name))
    x = torch.randn(2, 1, 16, 16, 16).contiguous(memory_format=CL)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # the training processes' setting (the layout of PyTorch's 1×1×1 conv depends on it)
    try:
        out = model(x, 0)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) > 10
    logits = out[0] if isinstance(out, (list, tuple)) else out
    assert logits.is_contiguous(memory_format=CL)
