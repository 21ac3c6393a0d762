"""``--compile``: the network through torch.compile gives the eager network's outputs and gradients,
through the training step's switch.

The test compiles with the ``aot_eager`` backend: it checks what this project's code decides (that
dynamo captures the network, its task index and its hand-written autograd functions, and that
AOTAutograd's backward equals the eager one) in seconds, where inductor's C++ code generation takes
minutes on a cold 2-core CI machine. The inductor check itself is ``benchmarks/bench_kernels.py --configs separable_compiled``
(CPU result in docs/performance.md; run by benchmarks/run_gpu_checks.sh on the GPU).
"""

from __future__ import annotations

import copy

import pytest
import torch

from models import build_model
from training.losses import SegmentationLoss
from training.optim import make_optimizer
from training.step import StepOptions, train_step


@pytest.mark.slow
def test_compiled_training_step_equals_eager() -> None:
    """One training step of a small universal model (fused CPU kernels on, as the CPU preset runs),
    task 1 of two, compiled and eager: the same loss (1e-6 relative) and the same gradients (1e-6
    absolute; lr 0 keeps the weights equal)."""
    torch.manual_seed(0)
    eager = build_model("universal", [1, 2], [2, 3], module="separable_adapter", base_channels=2,
                        pools_per_axis=1)  # fmt: skip
    comp = copy.deepcopy(eager)
    image = torch.randn(2, 2, 4, 4, 4)
    label = torch.randint(0, 3, (2, 1, 4, 4, 4)).float()
    results = []
    for model, backend in ((eager, None), (comp, "aot_eager")):
        opt = make_optimizer(model.parameters(), lr=0.0)
        results.append(train_step(model, opt, SegmentationLoss(), image, label, 1,
                                  StepOptions(torch.device("cpu"), compile_backend=backend)))  # fmt: skip
    assert results[1].loss == pytest.approx(results[0].loss, rel=1e-6)
    grads = 0
    for (name, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None and b.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)
            grads += int(a.grad.abs().sum() > 0)
    assert grads > 10
    assert not any(k.startswith("_orig_mod") for k in comp.state_dict())  # the model itself is saved
