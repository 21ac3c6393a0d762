"""Model building per training mode, and new-domain adaptation (extending the model, or as the original code did)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.loading import build_model_from_checkpoint
from models.params import freeze_for_task, transferable_conv_weights
from models.unet import U2Net3D, build_model
from training.config import PRESET_MODEL_PATCH, PRESET_POOLS, TrainConfig
from training.data import TaskData
from utils.task_settings import pools_for_patch
from utils.triples import Int3, int3


def _optional_int3(values: Sequence[Any] | None) -> Int3 | None:
    if values is None:
        return None
    return int3(values)


@dataclass
class ModelSetup:
    """A model ready to train and what goes with it.

    Attributes:
        model: the network (CPU, train mode not yet set).
        task_names: the model's tasks in task-index order.
        task_plans: their plans (the checkpoint's ``tasks`` entries).
        model_patch: shared/universal model patch, None for independent models.
        trained_tasks: indices of the tasks this run trains (all, or the new domain only).
        new_task: index of the new domain when adapting, else None.
    """

    model: U2Net3D
    task_names: list[str]
    task_plans: list[dict[str, Any]]
    model_patch: Int3 | None
    trained_tasks: list[int]
    new_task: int | None = None

    def checkpoint_tasks(self) -> list[dict[str, Any]]:
        return [{"name": n, "plans": p} for n, p in zip(self.task_names, self.task_plans, strict=True)]


def check_patch_fits(patch: Sequence[int], pools: Sequence[int], what: str) -> None:
    bad = [(p, 2**k) for p, k in zip(patch, pools, strict=True) if p % 2**k]
    if bad:
        raise ValueError(
            f"{what} {list(patch)} does not fit pools {list(pools)}: each axis must be divisible by 2**pools "
            f"({', '.join(f'{p} % {d}' for p, d in bad)})"
        )


def build_fresh_model(config: TrainConfig, tasks: Sequence[TaskData]) -> ModelSetup:
    """A new model for ``tasks`` (torch seed ``config.torch_seed`` set just before building).

    independent: one task, its plans' pools (or ``config.pools``) and patch; shared/universal: one
    model for all tasks with ``config.pools`` (preset 5,5,5) and ``config.model_patch`` (preset 128³).
    """
    model_patch: Int3 | None = None
    if config.mode == "independent":
        if len(tasks) != 1:
            raise ValueError("an independent model has exactly one task")
        task = tasks[0]
        if config.pools:
            pools = [int(v) for v in config.pools]
        elif config.patch_size:  # a patch override: poolings that fit it
            pools = list(pools_for_patch(task.patch_size))
        else:
            pools = [int(v) for v in task.plans["pools_per_axis"]]
        check_patch_fits(task.patch_size, pools, f"{task.name} patch")
    else:
        pools = [int(v) for v in (config.pools or PRESET_POOLS)]
        model_patch = _optional_int3(config.model_patch or PRESET_MODEL_PATCH)
        check_patch_fits(config.model_patch or PRESET_MODEL_PATCH, pools, "model patch")
    torch.manual_seed(config.torch_seed)
    model = build_model(
        config.mode,
        [t.num_modalities for t in tasks],
        [t.num_classes for t in tasks],
        module=config.module,
        base_channels=config.base_channels,
        pools_per_axis=tuple(pools),
    )
    return ModelSetup(
        model=model,
        task_names=[t.name for t in tasks],
        task_plans=[dict(t.plans) for t in tasks],
        model_patch=model_patch,
        trained_tasks=list(range(len(tasks))),
    )


def adapt_to_new_task(
    ckpt: Mapping[str, Any], new_task: TaskData, *, init_from: str | None = None, torch_seed: int = 1
) -> ModelSetup:
    """New domain: the trained shared/universal model of ``ckpt`` plus ``new_task``'s parts.

    The old weights are loaded, the new task gets fresh heads and fresh (or, with ``init_from``,
    copied) norms/adapters, and every parameter except the new task's is frozen
    (``requires_grad=False``), so the old tasks' outputs cannot change.
    """
    mode = ckpt["model_config"]["train_mode"]
    if mode not in ("shared", "universal"):
        raise ValueError(f"--ckp must hold a shared or universal model to adapt, this one is {mode!r}")
    model, old_tasks = build_model_from_checkpoint(ckpt)
    names = [t["name"] for t in old_tasks]
    if new_task.name in names:
        raise ValueError(f"{new_task.name} is already a task of the checkpoint ({names}); name a new task")
    src = None
    if init_from is not None:
        if init_from not in names:
            raise ValueError(f"--init_from {init_from!r} is not a task of the checkpoint ({names})")
        src = names.index(init_from)
    torch.manual_seed(torch_seed)
    idx = model.add_task(new_task.num_modalities, new_task.num_classes, init_from=src)
    freeze_for_task(model, idx)
    return ModelSetup(
        model=model,
        task_names=[*names, new_task.name],
        task_plans=[dict(t["plans"]) for t in old_tasks] + [dict(new_task.plans)],
        model_patch=_optional_int3(ckpt.get("model_patch")),
        trained_tasks=[idx],
        new_task=idx,
    )


def adapt_like_original_code(
    ckpt: Mapping[str, Any], new_task: TaskData, *, torch_seed: int = 1
) -> ModelSetup:
    """New domain as the original code did it (``--adapt_scope original_code``): a NEW model holding
    only ``new_task``, built with the trained model's settings (torch seed ``torch_seed``), whose
    encoder/decoder units' shared convolution weights are copied from the trained model and frozen
    (:func:`models.params.transferable_conv_weights`); everything else — downsampling convolutions,
    upsampling units, biases, norms, adapters, heads — trains from a fresh initialisation.
    """
    mode = ckpt["model_config"]["train_mode"]
    if mode not in ("shared", "universal"):
        raise ValueError(f"--ckp must hold a shared or universal model to adapt, this one is {mode!r}")
    old, _ = build_model_from_checkpoint(ckpt)
    cfg = old.config
    torch.manual_seed(torch_seed)
    model = build_model(
        cfg.train_mode,
        [new_task.num_modalities],
        [new_task.num_classes],
        module=cfg.module,
        base_channels=cfg.base_channels,
        pools_per_axis=tuple(cfg.pools_per_axis),
        deep_supervision=cfg.deep_supervision,
        residual=cfg.residual,
    )
    copied = set(transferable_conv_weights(model))
    old_params = dict(old.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in copied:
                p.copy_(old_params[name])
            p.requires_grad_(name not in copied)
    return ModelSetup(
        model=model,
        task_names=[new_task.name],
        task_plans=[dict(new_task.plans)],
        model_patch=_optional_int3(ckpt.get("model_patch")),
        trained_tasks=[0],
    )


def setup_from_checkpoint(ckpt: Mapping[str, Any]) -> ModelSetup:
    """The model of a training checkpoint (to resume it): weights loaded, the trained tasks taken from
    its training state and, for a new-domain run, everything but the new task frozen again."""
    model, tasks = build_model_from_checkpoint(ckpt)
    ts = ckpt.get("train_state") or {}
    trained = [int(t) for t in ts.get("trained_tasks", range(len(tasks)))]
    new_task = ts.get("new_task")
    frozen = ts.get("frozen_parameters")
    if frozen is not None:  # exactly what the interrupted run froze
        names = set(frozen)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in names)
    elif new_task is not None:
        freeze_for_task(model, int(new_task))
    return ModelSetup(
        model=model,
        task_names=[t["name"] for t in tasks],
        task_plans=[dict(t["plans"]) for t in tasks],
        model_patch=_optional_int3(ckpt.get("model_patch")),
        trained_tasks=trained,
        new_task=None if new_task is None else int(new_task),
    )
