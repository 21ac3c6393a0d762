"""Parameter report: what a model costs in total, shared and per task, against independent models."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.params import parameter_counts
from models.unet import U2Net3D, build_model, count_parameters
from utils.task_settings import PRESETS
from utils.triples import int3

#: (modalities, classes used) of the paper's tasks, for reports without preprocessed data.
PAPER_TASK_IO: dict[str, tuple[int, int]] = {
    "Task02_Heart": (1, 2),
    "Task03_Liver": (1, 2),
    "Task04_Hippocampus": (1, 3),
    "Task05_Prostate": (2, 3),
    "Task07_Pancreas": (1, 2),
    "Task09_Spleen": (1, 2),
}


@dataclass(frozen=True)
class TaskSpec:
    """What the network needs to know of a task."""

    name: str
    modalities: int
    num_classes: int
    pools_per_axis: tuple[int, int, int]


def task_spec(name: str, plans_dir: str | Path | None = None) -> TaskSpec:
    """A task's modalities, classes and pools: from ``plans_dir/<name>/plans.json`` when it exists,
    else from the paper preset (for the six paper tasks)."""
    if plans_dir is not None:
        plans_file = Path(plans_dir) / name / "plans.json"
        if plans_file.is_file():
            plans = json.loads(plans_file.read_text())
            return TaskSpec(
                name, len(plans["modalities"]), int(plans["num_classes"]), int3(plans["pools_per_axis"])
            )
    if name in PAPER_TASK_IO:
        mods, classes = PAPER_TASK_IO[name]
        pools = PRESETS[name].pools_per_axis
        assert pools is not None  # every paper task's preset row gives its pools
        return TaskSpec(name, mods, classes, pools)
    where = f" and no {Path(plans_dir) / name / 'plans.json'}" if plans_dir is not None else ""
    raise ValueError(
        f"unknown task {name!r}: not a paper task ({', '.join(PAPER_TASK_IO)}){where}; "
        "preprocess it first (preprocess_taskSep.py) and pass --plans_dir, or give "
        "--in_channels/--num_classes/--pools explicitly"
    )


def independent_total(specs: Sequence[TaskSpec], base_channels: int = 16) -> int:
    """Parameters of one independent model per task, each with its own pools."""
    return sum(
        count_parameters(
            build_model(
                "independent",
                [s.modalities],
                [s.num_classes],
                pools_per_axis=s.pools_per_axis,
                base_channels=base_channels,
            )
        )
        for s in specs
    )


def format_report(
    train_mode: str,
    specs: Sequence[TaskSpec],
    *,
    module: str | None = None,
    base_channels: int = 16,
    model_pools: Sequence[int] = (5, 5, 5),
) -> str:
    """A readable table of total / shared / per-task parameters and the ratio to independent models."""
    lines = []
    if train_mode == "independent":
        rows = []
        for s in specs:
            m = build_model(
                "independent",
                [s.modalities],
                [s.num_classes],
                pools_per_axis=s.pools_per_axis,
                base_channels=base_channels,
            )
            rows.append((s.name, count_parameters(m), s.pools_per_axis))
        lines.append(f"independent models (base {base_channels}):")
        for name, n, pools in rows:
            lines.append(f"  {name:<28} {n:>14,}  pools {tuple(pools)}")
        lines.append(f"  {'total':<28} {sum(r[1] for r in rows):>14,}")
        return "\n".join(lines)
    model = build_model(
        train_mode,
        [s.modalities for s in specs],
        [s.num_classes for s in specs],
        module=module,
        base_channels=base_channels,
        pools_per_axis=model_pools,
    )
    counts = parameter_counts(model)
    indep = independent_total(specs, base_channels)
    name = train_mode + (f" + {model.config.module}" if model.config.module else "")
    lines.append(f"{name} model, {len(specs)} task(s), base {base_channels}, pools {tuple(model_pools)}")
    lines.append(f"  {'total':<28} {counts.total:>14,}")
    lines.append(f"  {'shared':<28} {counts.shared:>14,}")
    for s, n in zip(specs, counts.per_task, strict=True):
        lines.append(f"  {'task ' + s.name:<28} {n:>14,}  ({n / counts.total:.2%} of the model)")
    lines.append(f"  {'independent models (sum)':<28} {indep:>14,}")
    lines.append(f"  ratio to independent models: {counts.total / indep:.2%}")
    if train_mode == "universal":
        shared_model = build_model(
            "shared",
            [s.modalities for s in specs],
            [s.num_classes for s in specs],
            base_channels=base_channels,
            pools_per_axis=model_pools,
        )
        lines.append(f"  ratio to the shared model:   {counts.total / count_parameters(shared_model):.2%}")
    return "\n".join(lines)


def parameter_report(
    model: U2Net3D,
    task_names: Sequence[str],
    new_task: int | None = None,
    *,
    extension: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Parameter counts: total, shared, per task, trainable and what a ``--ckp`` run added.

    Args:
        new_task: the index of a new domain (its cost is reported).
        extension: what the run added (``training.setup``: ``kind`` ``"new_domain"`` with its warm
            start, or ``"new_classes"`` with the grown domain, its added classes and parameters).
    """
    counts = parameter_counts(model)
    per_task = counts.per_task
    report: dict[str, Any] = {
        "train_mode": model.config.train_mode,
        "module": model.config.module,
        "total": counts.total,
        "shared": counts.shared,
        "per_task": {name: int(n) for name, n in zip(task_names, per_task, strict=True)},
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if new_task is not None:
        cost = int(per_task[new_task])
        old_total = counts.total - cost
        report["new_task"] = task_names[new_task]
        report["new_task_params"] = cost
        report["new_task_fraction_of_old_model"] = cost / old_total if old_total else float("nan")
    if extension is not None:
        report["extension"] = dict(extension)
    return report


def format_parameter_report(report: Mapping[str, Any]) -> str:
    """The report of :func:`parameter_report` as log lines."""
    lines = [
        f"parameters ({report['train_mode']}{'/' + report['module'] if report.get('module') else ''}): "
        f"total {report['total']:,}, shared {report['shared']:,}, trainable now {report['trainable']:,}"
    ]
    for name, n in report["per_task"].items():
        lines.append(f"  task-specific {name}: {n:,}")
    if "new_task" in report:
        lines.append(
            f"  new domain {report['new_task']} cost {report['new_task_params']:,} parameters "
            f"({100 * report['new_task_fraction_of_old_model']:.2f}% of the trained model)"
        )
    ext = report.get("extension") or {}
    if ext.get("kind") == "new_domain":
        start = "fresh" if ext.get("init_from") is None else f"copied from {ext['init_from']}"
        lines.append(f"  new domain's own parameters start {start}: {ext.get('init_how', '')}")
        if ext.get("copied"):
            lines.append(
                f"    copied: {', '.join(ext['copied'])}; fresh: {', '.join(ext.get('fresh') or []) or '-'}"
            )
    elif ext.get("kind") == "new_classes":
        added = ", ".join(f"{c} {n}" for c, n in (ext.get("added_classes") or {}).items())
        renamed = f" (was {ext['domain']})" if ext.get("domain") != ext.get("task") else ""
        lines.append(
            f"  domain {ext['task']}{renamed} grew from {ext['classes_before']} to {ext['classes_after']} classes: "
            f"added {added}; {ext['added_params']:,} parameters added (new class channels of "
            f"{len(ext.get('grown_heads') or [])} heads, {ext.get('init', 'fresh')}); training "
            + ("its class heads" if ext["train_scope"] == "heads" else "its adapters, norms and heads")
        )
    return "\n".join(lines)
