"""The Triton depthwise conv3d kernels (models/triton_depthwise.py) against F.conv3d, in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1, which must be set before triton is first imported:
tests/conftest.py sets it for the session on machines without CUDA, and this module for a run of this
file alone). Skipped without the triton package.

Float32 tolerances: outputs and input gradients within 1e-5 absolute (27-term sums of O(1) values,
accumulated in float32 in a different order), weight and bias gradients within 1e-4 absolute (sums
over every voxel of the batch, ~300 O(1) terms, split over programs then summed).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from models import build_model  # noqa: E402
from models.triton_depthwise import (  # noqa: E402
    TritonUnavailableError,
    depthwise_conv3d_triton,
    interpreter_enabled,
    resolve_depthwise_kernel,
)

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="TRITON_INTERPRET was set to 0")


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "splits"), [((2, 3, 5, 6, 7), 3), ((1, 2, 4, 3, 9), 1)])
def test_kernels_equal_conv3d_forward_and_gradients(shape: tuple[int, ...], splits: int) -> None:
    """Forward, input, weight and bias gradients equal F.conv3d's (groups = C, 'same' padding), with a
    split weight-gradient reduction (3 programs per channel) and without (1), borders everywhere."""
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(c, 1, 3, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(c, generator=gen, requires_grad=True)
    y = depthwise_conv3d_triton(x, w, b, splits=splits)
    ref = F.conv3d(x, w, b, padding=1, groups=c)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    g = torch.randn(ref.shape, generator=gen)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_separable_unit_with_triton_kernels_equals_native() -> None:
    """The switch: a universal model's forward with depthwise_kernel 'triton' equals 'native' (1e-5)."""
    torch.manual_seed(0)
    model = build_model("universal", [1], [2], module="separable_adapter", base_channels=2, pools_per_axis=1)
    model.set_fused_ops(False)
    x = torch.randn(1, 1, 4, 4, 4)
    with torch.no_grad():
        want = model(x, 0)
        model.set_depthwise_kernel("triton")
        got = model(x, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_switch_resolution() -> None:
    """'auto' keeps the native kernels until a GPU measurement says otherwise; 'triton' on a CPU is
    refused without the interpreter; unknown names are refused."""
    cpu = torch.device("cpu")
    assert resolve_depthwise_kernel("auto", cpu) == "native"
    assert resolve_depthwise_kernel("native", cpu) == "native"
    assert resolve_depthwise_kernel("triton", cpu) == "triton"  # the interpreter is on here
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with pytest.raises(TritonUnavailableError, match="CUDA"):
            resolve_depthwise_kernel("triton", cpu)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    with pytest.raises(ValueError, match="depthwise_kernel"):
        resolve_depthwise_kernel("fast", cpu)
    with pytest.raises(ValueError, match="depthwise kernel"):
        build_model("independent", [1], [2], base_channels=2, pools_per_axis=1).set_depthwise_kernel("x")
