"""One optimisation step and the round-robin task schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.runtime import autocast


def task_for_step(step: int, tasks: Sequence[int]) -> int:
    """Round robin: global step ``k`` (1-based) trains ``tasks[(k - 1) mod len(tasks)]``."""
    if step < 1:
        raise ValueError(f"steps are counted from 1, got {step}")
    return tasks[(step - 1) % len(tasks)]


@dataclass(frozen=True)
class StepOptions:
    """How a step runs.

    Attributes:
        device: where the model lives.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for plain fp32 (preset).
        channels_last: feed inputs as ``channels_last_3d`` (the model must be converted too).
        grad_to_none: clear gradients to None between steps; False (the preset) zeroes them, as
            the original did.
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    grad_to_none: bool = False

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        return autocast(self.device, self.amp_dtype)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        if self.channels_last and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x


@dataclass
class StepResult:
    loss: float
    logits: torch.Tensor | None = None  # detached, only when asked for


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    label: torch.Tensor,
    task_idx: int,
    options: StepOptions,
    *,
    scaler: torch.amp.GradScaler | None = None,
    keep_logits: bool = False,
) -> StepResult:
    """Forward, loss, backward and optimiser update on one batch.

    Args:
        image: (B, M, z, y, x); label: (B, 1, z, y, x) or (B, z, y, x), integral values.
        scaler: a GradScaler for float16 autocast (None otherwise).
        keep_logits: return the detached logits (for image logging).
    Raises:
        FloatingPointError: the loss is not finite (the step is not applied).
    """
    x = options.to_input(image)
    y = label.to(options.device, non_blocking=True)
    # the original zeroed gradients (old zero_grad()): a parameter that once had a gradient keeps a
    # zero one, so Adam's moments and weight decay keep moving it at steps of other tasks
    optimizer.zero_grad(set_to_none=options.grad_to_none)
    with options.autocast():
        logits = model(x, task_idx)
    loss = loss_fn(logits.float(), y)  # the losses (sorting, log-softmax) in float32
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss.item()} (task {task_idx})")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return StepResult(float(loss.detach()), logits.detach() if keep_logits else None)
