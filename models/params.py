"""Which parameters are shared and which belong to one task; freezing and cost reports."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
