"""Which parameters are shared and which belong to one task; freezing and cost reports."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.blocks import ClassHeads, DecoderBlock, EncoderBlock
from models.norms import TaskModuleList


@dataclass(frozen=True)
class ParameterSplit:
    """Parameter names of a model, split into shared and per-task (index = task)."""

    shared: list[str]
    per_task: list[list[str]]


def split_parameters(model: nn.Module) -> ParameterSplit:
    """Split ``model.named_parameters()`` into shared ones and those of each task.

    A parameter belongs to task t when it lies below entry t of a :class:`TaskModuleList`
    (heads, norms, adapters); every other parameter is shared by all tasks.
    """
    owner: dict[str, int] = {}
    num_tasks = 0
    for prefix, module in model.named_modules():
        if isinstance(module, TaskModuleList):
            num_tasks = max(num_tasks, len(module))
            for t, entry in enumerate(module):
                for name, _ in entry.named_parameters():
                    owner[f"{prefix}.{t}.{name}" if prefix else f"{t}.{name}"] = t
    shared: list[str] = []
    per_task: list[list[str]] = [[] for _ in range(num_tasks)]
    for name, _ in model.named_parameters():
        if name in owner:
            per_task[owner[name]].append(name)
        else:
            shared.append(name)
    return ParameterSplit(shared, per_task)


@dataclass(frozen=True)
class ParameterCounts:
    """Numbers of scalars: the whole model, its shared part and each task's own part."""

    total: int
    shared: int
    per_task: list[int]


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total, shared and per-task (index = task) parameter counts of ``model``."""
    params = dict(model.named_parameters())
    split = split_parameters(model)
    return ParameterCounts(
        total=sum(p.numel() for p in params.values()),
        shared=sum(params[n].numel() for n in split.shared),
        per_task=[sum(params[n].numel() for n in names) for names in split.per_task],
    )


def freeze_for_task(model: nn.Module, task_idx: int) -> list[str]:
    """Train only task ``task_idx``'s parameters: everything else gets ``requires_grad=False``.

    Used to adapt a trained shared/universal model to a new domain. Returns the trainable names.
    """
    split = split_parameters(model)
    if not 0 <= task_idx < len(split.per_task):
        raise IndexError(f"task_idx {task_idx} out of range: the model has {len(split.per_task)} task(s)")
    trainable = set(split.per_task[task_idx])
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return sorted(trainable)


#: what trains when a domain's label set grows (:func:`freeze_for_new_classes`)
NEW_CLASS_SCOPES = ("domain", "heads")


def class_head_parameters(model: nn.Module, task_idx: int) -> list[str]:
    """Names of task ``task_idx``'s class-head parameters (deep-supervision and output heads)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ClassHeads):
            for name, _ in module.heads[task_idx].named_parameters():
                names.append(f"{prefix}.heads.{task_idx}.{name}")
    return names


def freeze_for_new_classes(model: nn.Module, task_idx: int, scope: str = "domain") -> list[str]:
    """Train what a grown label set of task ``task_idx`` needs; everything else gets ``requires_grad=False``.

    ``scope``: ``"domain"`` = all of the task's own parameters (adapters, norms, heads: as
    :func:`freeze_for_task`); ``"heads"`` = only its class heads (deep supervision and output, old and
    new channels). Either way every other task's parameters and the shared ones stay still, so the
    other tasks' outputs cannot change. Returns the trainable names.
    """
    if scope == "domain":
        return freeze_for_task(model, task_idx)
    if scope not in NEW_CLASS_SCOPES:
        raise ValueError(f"scope must be one of {NEW_CLASS_SCOPES}, got {scope!r}")
    trainable = set(class_head_parameters(model, task_idx))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return sorted(trainable)


def transferable_conv_weights(model: nn.Module) -> list[str]:
    """What the original code carried over to a new domain: the names of the shared convolution
    weights (not biases, not norms) of every encoder block's units and of every decoder block's
    fuse and output units — not of the strided downsampling convolutions, not of the decoders'
    upsampling units (docs/paper_preset.md, "New domain")."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, EncoderBlock):
            units = {"unit1": module.unit1, "unit2": module.unit2}
        elif isinstance(module, DecoderBlock):
            units = {"fuse_unit": module.fuse_unit, "out_unit": module.out_unit}
        else:
            continue
        for unit_name, unit in units.items():
            conv_name = next(n for n, m in unit.named_modules() if m is unit.shared_conv)
            names.append(f"{prefix}.{unit_name}.{conv_name}.weight")
    return names
