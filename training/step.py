"""One optimisation step and the round-robin task schedule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from models.runtime import autocast, compiled


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
        compile_backend: run the network's forward through ``torch.compile`` with this backend
            (``"inductor"``: ``--compile``); None (the preset) runs it eagerly.
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    grad_to_none: bool = False
    compile_backend: str | None = None
    #: the dtype of the input and of the loss: float32 (the preset); float64 only where tests compare
    #: two ways of computing one step and need them free of float32 rounding
    dtype: torch.dtype = torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        return autocast(self.device, self.amp_dtype)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).to(self.dtype)
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
    sync: Callable[[int, torch.Tensor], float] | None = None,
) -> StepResult:
    """Forward, loss, backward and optimiser update on one batch.

    Args:
        image: (B, M, z, y, x); label: (B, 1, z, y, x) or (B, z, y, x), integral values.
        scaler: a GradScaler for float16 autocast (None otherwise).
        keep_logits: return the detached logits (for image logging).
        sync: data-parallel runs: ``sync(task_idx, loss)`` sums the gradients (and ``loss``, this
            process's share) over the processes after the backward pass and returns the global loss
            (:class:`training.distributed.GradientSync`); every process then decides alike.
    Raises:
        FloatingPointError: the loss is not finite (the step is not applied).
    """
    # named ranges for torch.profiler (benchmarks/profile_train_step.py); free when not profiling
    with record_function("step/h2d"):
        x = options.to_input(image)
        y = label.to(options.device, non_blocking=True)
    # the original zeroed gradients (old zero_grad()): a parameter that once had a gradient keeps a
    # zero one, so Adam's moments and weight decay keep moving it at steps of other tasks
    optimizer.zero_grad(set_to_none=options.grad_to_none)
    net = compiled(model, options.compile_backend) if options.compile_backend else model
    with options.autocast(), record_function("step/forward"):
        logits = net(x, task_idx)
    with record_function("step/loss"):
        loss = loss_fn(logits.to(options.dtype), y)  # the losses (sorting, log-softmax) in float32
    with record_function("step/backward"):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    # The step's one host-device synchronisation, once forward, loss and backward are all queued
    # (docs/performance.md, "The training step"): the loss value, which also decides whether the
    # update is applied. A non-finite loss leaves gradients that the next zero_grad clears.
    with record_function("step/loss_value_sync"):
        value = float(loss.detach()) if sync is None else sync(task_idx, loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite training loss {value} (task {task_idx})")
    with record_function("step/optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return StepResult(value, logits.detach() if keep_logits else None)
