"""Training state, checkpoints and exact resume.

Checkpoints use the single-file format of :mod:`utils.checkpoint` (``torch.load(weights_only=True)``)
with ``train_state`` holding everything needed to continue exactly::

    {"state": TrainState as plain dict, "optimizer": optimizer.state_dict(), "scaler": ... or None,
     "rng": utils.checkpoint.rng_state_to_plain(), "config": TrainConfig.to_dict(),
     "trained_tasks": [task indices], "new_task": index or None}

Files in ``<run>/checkpoints/``: ``latest.pt`` (after every epoch), ``epoch_XXXX.pt`` (every
``save_every`` epochs and at the end) and ``best.pt`` (best mean validation Dice). Every file is
written atomically; the numbered and best files are hard links to (or copies of) the latest one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.unet import U2Net3D
from utils.checkpoint import load_checkpoint, rng_state_to_plain, save_checkpoint
from utils.io_utils import atomic_link_or_copy

LATEST = "latest.pt"
BEST = "best.pt"


def numbered_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


@dataclass
class TrainState:
    """Counters and histories of a run (all plain values).

    Attributes:
        epoch: epochs completed.
        step: optimisation steps completed (global, 1-based when counting).
        lr_rule: :class:`training.optim.PlateauHalving` state.
        loss_history: one ``{"epoch", "step", "loss", "per_task": {name: loss}, "lr"}`` per epoch.
        val_history: one ``{"epoch", "step", "mean_dice", "per_task": {name: {class: dice}}}`` per validation.
        best_dice, best_epoch: best mean validation Dice so far.
        finished: training ended (max_epoch reached or the learning rate ran out).
    """

    epoch: int = 0
    step: int = 0
    lr_rule: dict[str, Any] = field(default_factory=dict)
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    val_history: list[dict[str, Any]] = field(default_factory=list)
    best_dice: float | None = None
    best_epoch: int | None = None
    finished: bool = False

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)


def save_training_checkpoint(
    ckpt_dir: Path,
    *,
    model: U2Net3D,
    tasks: list[dict[str, Any]],
    model_patch: tuple[int, ...] | None,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    config: dict[str, Any],
    trained_tasks: list[int],
    new_task: int | None,
    numbered: bool,
    best: bool,
) -> Path:
    """Write ``latest.pt`` (and the numbered / best files when asked). Returns the latest path."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    train_state = {
        "state": state.to_plain(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state_to_plain(),
        "config": config,
        "trained_tasks": list(trained_tasks),
        "new_task": new_task,
    }
    latest = ckpt_dir / LATEST
    save_checkpoint(
        latest,
        model.config.to_dict(),
        tasks,
        state_dict,
        model_patch=model_patch,
        train_state=train_state,
    )
    if numbered:
        atomic_link_or_copy(latest, ckpt_dir / numbered_name(state.epoch))
    if best:
        atomic_link_or_copy(latest, ckpt_dir / BEST)
    return latest


def resolve_resume_path(resume: str | os.PathLike[str], resume_epoch: int = 0) -> Path:
    """``--resume_ckp`` may name a checkpoint file, a run folder or its ``checkpoints`` folder.

    With a folder, ``--resume_epoch N`` picks ``epoch_000N.pt``, otherwise ``latest.pt``.
    """
    p = Path(resume)
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        p = d / (numbered_name(resume_epoch) if resume_epoch > 0 else LATEST)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {p}")
    return p


def load_training_checkpoint(path: str | os.PathLike[str], resume_epoch: int = 0) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_training_checkpoint` (checks ``--resume_epoch``)."""
    ckpt = load_checkpoint(path)
    ts = ckpt.get("train_state")
    if not ts or "state" not in ts or "optimizer" not in ts:
        raise ValueError(f"{path} holds no training state (is it an inference-only checkpoint?)")
    epoch = int(ts["state"]["epoch"])
    if resume_epoch > 0 and epoch != resume_epoch:
        raise ValueError(f"--resume_epoch {resume_epoch} given but {path} was written after epoch {epoch}")
    return ckpt
