"""Training curves of a run folder: loss per task, learning rate, validation Dice per class.

Sources (what ``training.run_log.RunLog`` writes, see docs/training.md "Outputs"):

* loss and learning rate: the TensorBoard events in ``<run>/tb/`` (scalars ``loss/step_<task>``,
  ``loss/epoch_<task>``, ``lr``), read with tensorboard's ``EventAccumulator`` (every event kept);
* validation Dice: ``<run>/val_dice.csv`` (one row per validation, task and class); the
  ``val_dice/<task>/<class>_<name>`` scalars of the events when a run has no CSV.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from reporting.figures import new_figure, save_png

__all__ = ["RunCurves", "find_runs", "plot_run_curves", "read_run"]

Series = list[tuple[int, float]]

_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass
class RunCurves:
    """The curves of one run; every series is ``[(global step, value), ...]`` in step order."""

    name: str
    run_dir: Path
    step_loss: dict[str, Series] = field(default_factory=dict)  # task -> loss of each step
    epoch_loss: dict[str, Series] = field(default_factory=dict)  # task -> mean loss of each epoch
    lr: Series = field(default_factory=list)
    val_dice: dict[str, Series] = field(default_factory=dict)  # "task: class name" -> Dice

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.step_loss) | set(self.epoch_loss))

    def series(self) -> list[Series]:
        """Every series of the run."""
        return [*self.step_loss.values(), *self.epoch_loss.values(), self.lr, *self.val_dice.values()]

    def is_empty(self) -> bool:
        return not (self.step_loss or self.epoch_loss or self.lr or self.val_dice)


def is_run_dir(folder: Path) -> bool:
    """A training run folder: it has TensorBoard events, a validation CSV or checkpoints."""
    return (
        (folder / "tb").is_dir() or (folder / "val_dice.csv").is_file() or (folder / "checkpoints").is_dir()
    )


def find_runs(folder: str | os.PathLike[str]) -> list[Path]:
    """``folder`` itself when it is a run folder, else its sub-folders that are (e.g. the per-task
    runs of ``res_u2net3d_independent_<tag>/``), sorted by name."""
    root = Path(folder)
    if is_run_dir(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_run_dir(p))


def _scalars(ea: EventAccumulator, tag: str) -> Series:
    by_step = {int(e.step): float(e.value) for e in ea.Scalars(tag)}  # a resumed run's last value wins
    return sorted(by_step.items())


def _val_from_csv(path: Path) -> dict[str, Series]:
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key = f"{row['task']}: {row['class']} {row['class_name']}"
            out.setdefault(key, {})[int(row["step"])] = float(row["dice"])
    return {k: sorted(v.items()) for k, v in sorted(out.items())}


def read_run(run_dir: str | os.PathLike[str]) -> RunCurves:
    """Read a run folder's curves (see the module docstring for the sources)."""
    run = Path(run_dir)
    curves = RunCurves(run.name, run)
    tb = run / "tb"
    val_tags: dict[str, Series] = {}
    if tb.is_dir():
        ea = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags().get("scalars", []):
            if tag.startswith("loss/step_"):
                curves.step_loss[tag[len("loss/step_") :]] = _scalars(ea, tag)
            elif tag.startswith("loss/epoch_"):
                curves.epoch_loss[tag[len("loss/epoch_") :]] = _scalars(ea, tag)
            elif tag == "lr":
                curves.lr = _scalars(ea, tag)
            elif tag.startswith("val_dice/") and tag.count("/") == 2:
                _, task, cls = tag.split("/")
                number, _, name = cls.partition("_")
                val_tags[f"{task}: {number} {name}"] = _scalars(ea, tag)
    csv_path = run / "val_dice.csv"
    curves.val_dice = _val_from_csv(csv_path) if csv_path.is_file() else dict(sorted(val_tags.items()))
    return curves


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    head = np.cumsum(v[: window - 1]) / np.arange(1, window)  # shorter windows at the start
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_run_curves(curves: RunCurves, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """One PNG (1500 x 420 px) with three panels: loss per task (each step, faint, its moving
    average, and the epoch means as dots), the learning rate, and the validation Dice per class."""
    fig = new_figure(1500, 420)
    ax_loss, ax_lr, ax_dice = fig.subplots(1, 3)
    for i, task in enumerate(curves.tasks):
        colour = _TAB10[i % len(_TAB10)]
        steps = curves.step_loss.get(task, [])
        if steps:
            x = [s for s, _ in steps]
            y = [v for _, v in steps]
            ax_loss.plot(x, y, color=colour, alpha=0.2, linewidth=0.8)
            ax_loss.plot(x, _moving_average(y, max(1, len(y) // 20)), color=colour, linewidth=1.6, label=task)
        epochs = curves.epoch_loss.get(task, [])
        if epochs:
            ax_loss.plot(
                [s for s, _ in epochs],
                [v for _, v in epochs],
                "o",
                color=colour,
                markersize=4,
                label=None if steps else task,
            )
    if curves.tasks:
        ax_loss.legend(fontsize=8)
    else:
        _empty(ax_loss, "loss")
    ax_loss.set(title="training loss per task", xlabel="step", ylabel="loss")
    if curves.lr:
        ax_lr.plot([s for s, _ in curves.lr], [v for _, v in curves.lr], color="black", linewidth=1.2)
        ax_lr.set_yscale("log")
    else:
        _empty(ax_lr, "learning rate")
    ax_lr.set(title="learning rate", xlabel="step")
    for i, (key, series) in enumerate(curves.val_dice.items()):
        ax_dice.plot(
            [s for s, _ in series],
            [v for _, v in series],
            "o-",
            color=_TAB10[i % len(_TAB10)],
            markersize=4,
            label=key,
        )
    if curves.val_dice:
        ax_dice.legend(fontsize=7, loc="lower right")
        for i, series in enumerate(curves.val_dice.values()):
            step, value = series[-1]
            ax_dice.annotate(
                f"{value:.3f}",
                (step, value),
                textcoords="offset points",
                xytext=(-6, 4 + 8 * (i % 2)),
                ha="right",
                fontsize=7,
                color=_TAB10[i % len(_TAB10)],
            )
    else:
        _empty(ax_dice, "validation Dice")
    ax_dice.set(title="validation Dice per class", xlabel="step", ylim=(0.0, 1.02))
    last = max((s for series in curves.series() for s, _ in series), default=0)
    for ax in (ax_loss, ax_lr, ax_dice):
        ax.grid(alpha=0.3)
        if last > 0:
            ax.set_xlim(0, last * 1.03)  # one step axis for all three panels
    fig.suptitle(title or curves.name, fontsize=10)
    # fixed margins: tight_layout measured every tick label and took most of the report's time
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.12, top=0.86, wspace=0.2)
    return save_png(fig, path)
