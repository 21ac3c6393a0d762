"""Training state, checkpoints and exact resume.

Checkpoints use the single-file format of :mod:`utils.checkpoint` (``torch.load(weights_only=True)``)
with ``train_state`` holding everything needed to continue exactly::

    {"state": TrainState as plain dict, "optimizer": optimizer.state_dict(), "scaler": ... or None,
     "rng": utils.checkpoint.rng_state_to_plain(), "config": TrainConfig.to_dict(),
     "trained_tasks": [task indices], "new_task": index or None,
     "frozen_parameters": [names of the parameters that do not train],
     "world_size": processes of the run (1 without torchrun)}

Files in ``<run>/checkpoints/``: ``latest.pt`` (after every epoch), ``epoch_XXXX.pt`` (every
``save_every`` epochs and at the end) and ``best.pt`` (best mean validation Dice). Every file is
written atomically, once per epoch; the others are hard links to (or copies of) it, and
``latest.pt`` -- what a resume reads -- is always put in place last, so a run killed half-way through
the epoch's files resumes from the previous epoch and writes them all again. A checkpoint whose
weights or optimizer state hold NaN/Inf is never written.

A run holds ``<run>/run.lock`` (an ``flock``, released by the kernel when the process ends, even on
``kill -9``) while it trains: a second run into the same folder is refused, a resume of a dead run is
not. :class:`RunError` and its subclasses stop a run with a message for the user.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from models.unet import U2Net3D
from utils.checkpoint import NonFiniteTensorError, load_checkpoint, rng_state_to_plain, save_checkpoint
from utils.io_utils import atomic_link_or_copy

if sys.platform != "win32":
    import fcntl

LATEST = "latest.pt"
BEST = "best.pt"
#: the lock file of a run folder
LOCK_NAME = "run.lock"


class RunError(RuntimeError):
    """Stops a training run with a message meant for the user (the scripts print it, exit status 1)."""


class RunFolderBusyError(RunError):
    """Another live training run holds the run folder's lock."""


class NonFiniteLossError(RunError):
    """The loss was NaN/Inf more often than ``--skip_nonfinite`` allows."""


class NonFiniteWeightsError(RunError):
    """The weights (or optimizer state) hold NaN/Inf at the end of an epoch: no checkpoint was written."""


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
        skipped_steps: one ``{"epoch", "step", "task", "loss"}`` per step skipped for a NaN/Inf loss
            (``--skip_nonfinite``).
    """

    epoch: int = 0
    step: int = 0
    lr_rule: dict[str, Any] = field(default_factory=dict)
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    val_history: list[dict[str, Any]] = field(default_factory=list)
    best_dice: float | None = None
    best_epoch: int | None = None
    finished: bool = False
    skipped_steps: list[dict[str, Any]] = field(default_factory=list)

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
    world_size: int = 1,
) -> Path:
    """Write ``latest.pt`` (and the numbered / best files when asked). Returns the latest path.

    ``world_size``: processes of a data-parallel run (kept in ``train_state``: a resume with another
    number draws other batches).

    The checkpoint is serialised once, into the first of ``epoch_XXXX.pt``, ``best.pt``,
    ``latest.pt`` that is due; the others become links to it, ``latest.pt`` last.

    Raises:
        NonFiniteWeightsError: a weight or optimizer tensor is NaN/Inf (nothing is written).
        utils.io_utils.DiskFullError: the disk filled up (``latest.pt`` is the previous epoch's).
    """
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
        "frozen_parameters": [n for n, p in model.named_parameters() if not p.requires_grad],
        "world_size": int(world_size),
    }
    latest = ckpt_dir / LATEST
    names = [numbered_name(state.epoch)] if numbered else []
    names += [BEST] if best else []
    names.append(LATEST)  # last: a resume reads it, so it moves on only when the others are in place
    first = ckpt_dir / names[0]
    try:
        save_checkpoint(
            first,
            model.config.to_dict(),
            tasks,
            state_dict,
            model_patch=model_patch,
            train_state=train_state,
        )
    except NonFiniteTensorError as e:
        good = last_good_checkpoint(ckpt_dir)
        raise NonFiniteWeightsError(
            f"after epoch {state.epoch} (step {state.step}) {e.key} holds NaN or Inf values: the weights "
            f"diverged, so no checkpoint was written. The last good checkpoint: {good}; resume it with "
            "--resume_ckp latest, e.g. with a lower --lr (or --amp off)"
        ) from e
    for name in names[1:]:
        atomic_link_or_copy(first, ckpt_dir / name)
    return latest


def resolve_resume_path(
    resume: str | os.PathLike[str], resume_epoch: int = 0, run_dir: str | os.PathLike[str] | None = None
) -> Path:
    """``--resume_ckp`` may name a checkpoint file, a run folder or its ``checkpoints`` folder, or be
    ``latest``: the run folder the flags lead to (``run_dir``).

    With a folder, ``--resume_epoch N`` picks ``epoch_000N.pt``, otherwise ``latest.pt``.
    """
    if os.fspath(resume) == "latest" and not Path(resume).exists():
        if run_dir is None:
            raise ValueError("--resume_ckp latest needs the run folder (the same flags as the run)")
        p = Path(run_dir)
        if not p.is_dir():
            raise FileNotFoundError(
                f"--resume_ckp latest: run folder {p} not found; give the same --tasks, --trainMode, "
                "--out_tag and --results_dir as the run to resume"
            )
    else:
        p = Path(resume)
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        p = d / (numbered_name(resume_epoch) if resume_epoch > 0 else LATEST)
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint to resume from not found: {p} (a run writes checkpoints/latest.pt after its first "
            "epoch; start it without --resume_ckp, or with --continue)"
        )
    return p


def last_good_checkpoint(ckpt_dir: str | os.PathLike[str]) -> str:
    """``'<ckpt_dir>/latest.pt (after epoch N)'``, or ``'none was written yet'`` (for messages)."""
    latest = Path(ckpt_dir) / LATEST
    if not latest.is_file():
        return "none was written yet"
    try:
        epoch = f"after epoch {int(load_checkpoint(latest)['train_state']['state']['epoch'])}"
    except (ValueError, KeyError, TypeError):
        epoch = "unreadable"
    return f"{latest} ({epoch})"


def existing_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """``<run_dir>/checkpoints/latest.pt`` when it exists."""
    p = Path(run_dir) / "checkpoints" / LATEST
    return p if p.is_file() else None


# ----------------------------------------------------------------------------------------------
# the run folder's lock
# ----------------------------------------------------------------------------------------------
class RunLock:
    """The lock of a run folder, held while a run writes into it (see :func:`lock_run_folder`)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Give the folder free (closing the file releases the ``flock``; the file stays)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _holder(path: Path) -> str:
    """Who holds a lock, from what the holder wrote into the lock file."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say who it is"


def lock_run_folder(run_dir: str | os.PathLike[str]) -> RunLock:
    """Create the run folder if needed and take its lock (``<run_dir>/run.lock``) for this process.

    The lock is an ``flock`` on the file, so the kernel releases it when the process ends in any way
    (``kill -9`` included): a lock file left by a dead run never blocks a resume. The file records
    the holder (pid, host, start time, command) for the message another run gets. Without ``fcntl``
    (Windows) the folder is not locked.

    Raises:
        RunFolderBusyError: another live process holds the lock.
        RunError: the run folder cannot be created or written.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # not written atomically on purpose: the lock lives on this very file (inode)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunError(
            f"cannot create or write the run folder {run_dir} ({type(e).__name__}: {e.strerror or e}); "
            "choose a writable --results_dir"
        ) from e
    if sys.platform != "win32":
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusyError(
                f"run folder {run_dir} is in use by another training run ({_holder(path)}); wait for it to "
                "end (or stop it), or train into another folder (--out_tag, --results_dir). A run that died "
                f"does not hold {LOCK_NAME}: resume it with --continue"
            ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
    return RunLock(path, fd)


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
