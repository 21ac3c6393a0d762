"""Evaluation charts: Dice per class across modes, and parameters (shared vs per domain) per mode."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reporting.figures import mode_colour, new_figure, save_png

__all__ = ["ModeParameters", "plot_dice_chart", "plot_parameter_chart"]

_DOMAIN_COLOURS = ("#8dd3c7", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#bc80bd")


def _short(task: str) -> str:
    """``Task92_DemoHippoMR`` -> ``DemoHippoMR`` (the number is noise on a chart)."""
    head, sep, tail = task.partition("_")
    return tail if sep and head.startswith("Task") else task


def plot_dice_chart(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars: one group per (task, class), one bar per mode, height = mean Dice.

    Args:
        rows: ``summary.csv`` rows (``mode, task, class, class_name, dice``, ...).
    """
    modes = list(dict.fromkeys(str(r["mode"]) for r in rows))
    groups = list(dict.fromkeys((str(r["task"]), int(r["class"]), str(r["class_name"])) for r in rows))
    dice = {(str(r["mode"]), str(r["task"]), int(r["class"])): float(r["dice"]) for r in rows}
    width_px = max(700, 110 + 26 * len(groups) * max(1, len(modes)) + 30 * len(groups))
    fig = new_figure(width_px, 460)
    ax = fig.subplots()
    n = max(1, len(modes))
    bar = 0.8 / n
    x = np.arange(len(groups), dtype=np.float64)
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for g, (task, c, _) in enumerate(groups):
            if (mode, task, c) in dice:
                xs.append(x[g] - 0.4 + bar * (i + 0.5))
                ys.append(dice[(mode, task, c)])
        bars = ax.bar(xs, ys, width=bar * 0.95, color=mode_colour(mode, i), label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(x, [f"{_short(t)}\n{c} {name}" for t, c, name in groups], fontsize=8)
    ax.set(ylabel="Dice (test cases)", ylim=(0.0, 1.08), title="Dice per class and mode")
    ax.grid(axis="y", alpha=0.3)
    if modes:
        ax.legend(fontsize=8, ncols=min(4, len(modes)), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    return save_png(fig, path)


@dataclass
class ModeParameters:
    """The parameters a mode needs for its domains: shared by several domains, and each domain's own.

    For a mode made of one-domain models (independent) every parameter is the domain's own.
    """

    mode: str
    shared: int = 0
    per_domain: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.shared + sum(self.per_domain.values())


def plot_parameter_chart(modes: Sequence[ModeParameters], path: str | os.PathLike[str]) -> Path:
    """Horizontal stacked bars, one per mode: the shared parameters, then each domain's own."""
    domains = list(dict.fromkeys(d for m in modes for d in m.per_domain))
    fig = new_figure(1000, 120 + 60 * max(1, len(modes)))
    ax = fig.subplots()
    y = np.arange(len(modes), dtype=np.float64)[::-1]
    shared = np.array([m.shared for m in modes], dtype=np.float64)
    ax.barh(y, shared, color="#7f7f7f", label="shared by the domains")
    left = shared.copy()
    for i, d in enumerate(domains):
        own = np.array([m.per_domain.get(d, 0) for m in modes], dtype=np.float64)
        ax.barh(y, own, left=left, color=_DOMAIN_COLOURS[i % len(_DOMAIN_COLOURS)], label=f"{_short(d)} only")
        left += own
    for yi, m in zip(y, modes, strict=True):
        ax.text(m.total, yi, f"  {m.total:,}", va="center", fontsize=8)
    ax.set_yticks(y, [m.mode for m in modes], fontsize=9)
    ax.set_xlim(0, max([m.total for m in modes], default=1) * 1.22)
    ax.set(xlabel="parameters", title="parameters per mode: shared vs per domain")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)
