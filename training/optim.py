"""Optimiser factory, the plateau learning-rate rule of the paper preset (docs/paper_preset.md, "Training")
and the optional final cosine anneal (``--lr_anneal``)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

PRESET_LR = 3e-4
PRESET_WEIGHT_DECAY = 5e-4
#: when training stops once the rate is below ``stop_below`` (:meth:`PlateauHalving.end_epoch`)
STOP_ORDERS = ("original", "same_epoch")


def make_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float = PRESET_LR, weight_decay: float = PRESET_WEIGHT_DECAY
) -> torch.optim.Adam:
    """Adam (lr 3e-4, weight decay 5e-4 in the preset) over the parameters that require gradients."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters")
    return torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def anneal_factor(step_index: int, total_steps: int, fraction: float) -> float:
    """Multiplier of the learning rate for step ``step_index`` (0-based) of a ``total_steps`` run.

    1 until the last ``fraction`` of the run, then a half cosine towards 0 (the run's last step still
    trains at a small positive rate). ``fraction`` 0 gives 1 everywhere (the preset). A pure function
    of the step, so a resumed run continues the same curve.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"anneal fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0 or total_steps <= 0:
        return 1.0
    span = fraction * total_steps
    start = total_steps - span
    if step_index < start:
        return 1.0
    progress = min((step_index - start + 1) / (span + 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class PlateauHalving:
    """Halve the learning rate when the moving average of the epoch losses stops falling.

    Keeps the mean training loss of each of the last ``window`` (20) epochs. Once ``window`` are
    kept, after each epoch their average is compared with the average one epoch earlier; if it
    fell by less than ``min_delta`` (1e-4) the rate is multiplied by ``factor`` (0.5). Training
    stops once the rate is below ``stop_below`` (1e-8), in the order of ``stop_order``:

    * ``"original"`` (the preset, the end of the original's ``train()``): after each epoch the rate
      that epoch trained with is checked FIRST; only if it is still >= ``stop_below`` may the epoch's
      halving follow. So the epoch whose halving crosses ``stop_below`` is followed by one more epoch
      at the tiny rate, after which training stops (that last loss is recorded, nothing halved).
    * ``"same_epoch"``: halve, then stop right away if the new rate is below ``stop_below``.

    Call :meth:`end_epoch` once per epoch with that epoch's mean loss; it returns whether training
    stops after this epoch (then :attr:`stopped`; the state round-trips through :meth:`state_dict`).
    :meth:`update` is the halving step alone.
    """

    def __init__(
        self,
        lr: float = PRESET_LR,
        *,
        window: int = 20,
        min_delta: float = 1e-4,
        factor: float = 0.5,
        stop_below: float = 1e-8,
        stop_order: str = "original",
    ) -> None:
        if window < 1 or not 0 < factor < 1:
            raise ValueError(f"need window >= 1 and 0 < factor < 1, got {window}, {factor}")
        if stop_order not in STOP_ORDERS:
            raise ValueError(f"stop_order must be one of {STOP_ORDERS}, got {stop_order!r}")
        self.lr = float(lr)
        self.window = int(window)
        self.min_delta = float(min_delta)
        self.factor = float(factor)
        self.stop_below = float(stop_below)
        self.stop_order = stop_order
        self.losses: deque[float] = deque(maxlen=self.window)
        self.last_average: float | None = None
        self.num_decays = 0
        self.stopped = False

    @property
    def should_stop(self) -> bool:
        """The rate is below ``stop_below`` (with ``stop_order="original"`` one more epoch trains)."""
        return self.lr < self.stop_below

    def end_epoch(self, epoch_loss: float) -> bool:
        """The end of an epoch that trained at :attr:`lr` with mean loss ``epoch_loss``: record it,
        maybe halve the rate (:meth:`update`); returns whether training stops now (see ``stop_order``)."""
        if self.stop_order == "original" and self.should_stop:
            self.losses.append(float(epoch_loss))  # the original appended it before its check
            self.stopped = True
            return True
        self.update(epoch_loss)
        self.stopped = self.stop_order == "same_epoch" and self.should_stop
        return self.stopped

    def update(self, epoch_loss: float) -> float:
        """Record one epoch's mean loss, maybe halve the rate; returns the (new) rate."""
        self.losses.append(float(epoch_loss))
        if len(self.losses) == self.window:
            # numpy's mean (pairwise sums), as the original computed it: the same bits at the threshold
            average = float(np.mean(np.asarray(self.losses, dtype=np.float64)))
            if self.last_average is not None and self.last_average - average < self.min_delta:
                self.lr *= self.factor
                self.num_decays += 1
            self.last_average = average
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "window": self.window,
            "min_delta": self.min_delta,
            "factor": self.factor,
            "stop_below": self.stop_below,
            "stop_order": self.stop_order,
            "losses": list(self.losses),
            "last_average": self.last_average,
            "num_decays": self.num_decays,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = float(state["lr"])
        self.window = int(state["window"])
        self.min_delta = float(state["min_delta"])
        self.factor = float(state["factor"])
        self.stop_below = float(state["stop_below"])
        self.losses = deque((float(v) for v in state["losses"]), maxlen=self.window)
        self.last_average = None if state["last_average"] is None else float(state["last_average"])
        self.num_decays = int(state.get("num_decays", 0))
        # checkpoints written before these keys existed: this rule's order; they stopped in the epoch
        # the rate ran out
        self.stop_order = str(state.get("stop_order", self.stop_order))
        self.stopped = bool(state.get("stopped", self.lr < self.stop_below))
