"""The encoder's residual connection, with hand-set weights: ``act(x + unit2(act(unit1(x))))``
(docs/paper_preset.md, "Network"). Dropping the residual keeps every shape and parameter count, so
only the values can tell.

The trick: zero every convolution of ``unit2`` (weights and biases). Its last per-task InstanceNorm
then normalises an all-zero map, which gives exactly that norm's bias ``b`` everywhere, whatever the
unit type (dense, separable, series or parallel adapter). So the block must return
``leaky_relu(x + b)`` for its own input ``x``; without the residual it would return the constant
``leaky_relu(b)``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from models.blocks import EncoderBlock
from models.conv_units import DenseUnit
from models.depthwise import DepthwiseConv3d
from models.norms import TaskNorm

B = -0.5  # unit2's output; negative so that the final LeakyReLU matters where x < 0.5
SLOPE = 0.01


def _silence_unit(unit: nn.Module, task: int, bias: float) -> None:
    """Zero every convolution of ``unit``; set its final norm's (task ``task``) bias to ``bias``."""
    with torch.no_grad():
        for m in unit.modules():
            if isinstance(m, (nn.Conv3d, DepthwiseConv3d)):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
        norm = unit.norm
        assert isinstance(norm, TaskNorm)
        norm.norms[task].weight.fill_(1.7)  # any scale: it multiplies zeros
        norm.norms[task].bias.fill_(bias)


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, SLOPE * x)


@pytest.mark.parametrize("fused", [True, False])
def test_encoder_block_adds_its_input_by_hand(fused: bool) -> None:
    torch.manual_seed(0)
    block = EncoderBlock(2, partial(DenseUnit, num_tasks=2))
    _silence_unit(block.unit2, task=1, bias=B)
    for m in block.modules():
        if hasattr(m, "use_fused"):
            m.use_fused = fused
    x = torch.linspace(-2.0, 2.0, 2 * 4 * 4 * 4).reshape(1, 2, 4, 4, 4)
    out = block(x, 1)
    # x = -2 -> 0.01 * (-2.5) = -0.025; x = 0 -> -0.005; x = 2 -> 1.5
    torch.testing.assert_close(out, _leaky(x + B), rtol=0, atol=1e-6)
    assert out[0, 0, 0, 0, 0].item() == pytest.approx(-0.025, abs=1e-6)
    assert out[0, 1, 3, 3, 3].item() == pytest.approx(1.5, abs=1e-6)
    # without the residual (the option) the same weights give the constant act(b)
    plain = EncoderBlock(2, partial(DenseUnit, num_tasks=2), residual=False)
    plain.load_state_dict(block.state_dict())
    torch.testing.assert_close(plain(x, 1), torch.full_like(x, SLOPE * B), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "mode, module",
    [("independent", None), ("shared", None), ("universal", "separable_adapter"),
     ("universal", "series_adapter"), ("universal", "parallel_adapter")],
)  # fmt: skip
def test_every_encoder_level_of_the_model_is_residual(mode: str, module: str | None) -> None:
    """In the built network, each level's encoder output is act(its input + unit2's output)."""
    torch.manual_seed(0)
    tasks = 1 if mode == "independent" else 2
    model = build_model(
        mode, [1] * tasks, [2] * tasks, module=module, base_channels=2, pools_per_axis=(1, 2, 2)
    )
    assert model.depth == 3
    t = tasks - 1
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for level, enc in enumerate(model.encoders):
        _silence_unit(enc.unit2, task=t, bias=B)
        enc.register_forward_hook(lambda _m, args, out, level=level: seen.__setitem__(level, (args[0], out)))
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        model(x, t)
    assert sorted(seen) == [0, 1, 2]
    for level, (inp, out) in seen.items():
        torch.testing.assert_close(out, F.leaky_relu(inp + B, SLOPE), rtol=0, atol=1e-6, msg=f"level {level}")
        assert (inp + B < 0).any() and (inp + B > 0).any()  # both branches of the activation are used
    # residual=False (the option) really drops it, with the same weights
    plain = build_model(mode, [1] * tasks, [2] * tasks, module=module, base_channels=2, pools_per_axis=(1, 2, 2),
                        residual=False)  # fmt: skip
    plain.load_state_dict(model.state_dict())
    got: list[torch.Tensor] = []
    plain.encoders[0].register_forward_hook(lambda _m, _a, out: got.append(out))
    with torch.no_grad():
        plain(x, t)
    torch.testing.assert_close(got[0], torch.full_like(got[0], SLOPE * B), rtol=0, atol=1e-6)
