"""Model building per training mode; new-domain adaptation (extending the model with a cold or warm start, or as
the original code did); growing a trained domain's label set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.loading import build_model_from_checkpoint
from models.norms import TaskModuleList
from models.params import freeze_for_new_classes, freeze_for_task, parameter_counts, transferable_conv_weights
from models.unet import U2Net3D, build_model
from training.config import PRESET_MODEL_PATCH, PRESET_POOLS, TrainConfig
from training.data import TaskData
from utils.intensity import intensity_distance
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
        extension: what a ``--ckp`` run added (:func:`adapt_to_new_task`, :func:`grow_task_classes`;
            stored as the run config's ``extension``), else None.
    """

    model: U2Net3D
    task_names: list[str]
    task_plans: list[dict[str, Any]]
    model_patch: Int3 | None
    trained_tasks: list[int]
    new_task: int | None = None
    extension: dict[str, Any] | None = None

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


#: what ``--init_from`` does when not given (docs/training.md, "Adding a domain": measured on the demo)
DEFAULT_INIT_FROM = "auto"


@dataclass(frozen=True)
class InitChoice:
    """Where a new domain's own parameters start.

    Attributes:
        source: the trained task they are copied from, or None (fresh initialisation).
        how: why, in words (logged and stored in the run's config and checkpoints).
        request: what was asked: ``"auto"``, ``"none"`` or a task name.
    """

    source: str | None
    how: str
    request: str


def _modality_key(plans: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(m).strip().upper() for m in plans.get("modalities") or [])


def choose_init_source(
    request: str | None, new_plans: Mapping[str, Any], old_tasks: Sequence[Mapping[str, Any]]
) -> InitChoice:
    """Resolve ``--init_from`` (``request``; None = :data:`DEFAULT_INIT_FROM`) against the trained tasks.

    ``auto``: the candidates are the trained tasks with the same modality names in the same order
    (case-insensitive: CT -> CT), else those with the same number of modalities, else all; among
    them the one whose foreground intensities (plans' ``intensity_stats``,
    :func:`utils.intensity.intensity_distance`) are nearest the new task's. When the new task or a
    candidate has no statistics (plans written before they existed), the first candidate, and the
    reason says so.

    Args:
        new_plans: the new task's plans.
        old_tasks: the checkpoint's ``tasks`` (``{"name", "plans"}``), in task-index order.
    Raises:
        ValueError: a task name that the checkpoint does not hold.
    """
    req = DEFAULT_INIT_FROM if request is None else str(request)
    names = [str(t["name"]) for t in old_tasks]
    if req == "none":
        return InitChoice(None, "fresh initialisation (--init_from none)", req)
    if req != "auto":
        if req not in names:
            raise ValueError(
                f"--init_from {req!r} is not a task of the checkpoint ({names}); or use auto / none"
            )
        return InitChoice(req, f"{req} (--init_from {req})", req)
    key = _modality_key(new_plans)
    same = [i for i, t in enumerate(old_tasks) if _modality_key(t["plans"]) == key]
    count = [i for i, t in enumerate(old_tasks) if len(_modality_key(t["plans"])) == len(key)]
    if same:
        group, basis = same, f"same modalities {list(key)}"
    elif count:
        group, basis = (
            count,
            f"no trained task with modalities {list(key)}; same number of modalities ({len(key)})",
        )
    else:
        group, basis = (
            list(range(len(old_tasks))),
            f"no trained task with {len(key)} modalities (input head fresh)",
        )
    if len(group) == 1:
        return InitChoice(
            names[group[0]], f"auto: {names[group[0]]}, the only trained task with the {basis}", req
        )
    new_stats = new_plans.get("intensity_stats")
    dists = {i: intensity_distance(new_stats, old_tasks[i]["plans"].get("intensity_stats")) for i in group}
    missing = [names[i] for i, d in dists.items() if d is None]
    if missing:
        who = "the new task" if not new_stats else ", ".join(missing)
        return InitChoice(
            names[group[0]],
            f"auto: {names[group[0]]}, the first trained task with the {basis}; no intensity statistics in the "
            f"plans of {who} (preprocessed before they existed), so not the nearest by intensity",
            req,
        )
    best = min(group, key=lambda i: (dists[i], i))
    others = ", ".join(f"{names[i]} {dists[i]:.3f}" for i in group)
    return InitChoice(
        names[best],
        f"auto: {names[best]}, {basis}, nearest foreground intensities (distance {others})",
        req,
    )


def adapt_to_new_task(
    ckpt: Mapping[str, Any], new_task: TaskData, *, init_from: str | None = None, torch_seed: int = 1
) -> ModelSetup:
    """New domain: the trained shared/universal model of ``ckpt`` plus ``new_task``'s parts.

    The old weights are loaded; the new task's adapters, norms and heads start fresh or, with a warm
    start (``init_from``: ``"auto"``, a task name or ``"none"``, :func:`choose_init_source`), as copies
    of a trained task's (the input head when the modality count matches, the class heads when the class
    count matches); every parameter except the new task's is frozen (``requires_grad=False``), so the
    old tasks' outputs cannot change. ``setup.extension`` records the choice.
    """
    mode = ckpt["model_config"]["train_mode"]
    if mode not in ("shared", "universal"):
        raise ValueError(f"--ckp must hold a shared or universal model to adapt, this one is {mode!r}")
    model, old_tasks = build_model_from_checkpoint(ckpt)
    names = [t["name"] for t in old_tasks]
    if new_task.name in names:
        raise ValueError(
            f"{new_task.name} is already a task of the checkpoint ({names}); name a new task, or grow its "
            "label set with --add_classes_to"
        )
    choice = choose_init_source(init_from, new_task.plans, old_tasks)
    src = None if choice.source is None else names.index(choice.source)
    torch.manual_seed(torch_seed)
    idx = model.add_task(new_task.num_modalities, new_task.num_classes, init_from=src)
    copied = [] if src is None else model.task_parts_alike(src, idx)
    fresh = [f"{name}.{idx}" for name, m in model.named_modules() if isinstance(m, TaskModuleList)]
    fresh = [n for n in fresh if n not in copied]
    freeze_for_task(model, idx)
    return ModelSetup(
        model=model,
        task_names=[*names, new_task.name],
        task_plans=[dict(t["plans"]) for t in old_tasks] + [dict(new_task.plans)],
        model_patch=_optional_int3(ckpt.get("model_patch")),
        trained_tasks=[idx],
        new_task=idx,
        extension={
            "kind": "new_domain",
            "task": new_task.name,
            "index": idx,
            "init_from": choice.source,
            "init_request": choice.request,
            "init_how": choice.how,
            "copied": _summarise_parts(copied),
            "fresh": _summarise_parts(fresh),
        },
    )


def _summarise_parts(modules: Sequence[str]) -> list[str]:
    """Per-task entries grouped by kind, e.g. ``["depthwise adapters x18", "norms x37", "output head"]``."""
    kinds: dict[str, int] = {}
    for name in modules:
        if name.startswith("input_heads."):
            kind = "input head"
        elif name.startswith("output_heads."):
            kind = "output head"
        elif name.startswith("ds_heads."):
            kind = "deep-supervision heads"
        elif ".depthwise." in name or ".adapters." in name:
            kind = "adapters"
        else:
            kind = "norms"
        kinds[kind] = kinds.get(kind, 0) + 1
    return [f"{k} x{n}" if n > 1 else k for k, n in kinds.items()]


def _class_raw_values(plans: Mapping[str, Any]) -> dict[int, set[int]]:
    """Class -> the raw label values that the plans' ``label_map`` maps onto it."""
    out: dict[int, set[int]] = {}
    for raw, c in (plans.get("label_map") or {}).items():
        out.setdefault(int(c), set()).add(int(raw))
    return out


def check_label_growth(old_plans: Mapping[str, Any], new_plans: Mapping[str, Any], domain: str) -> list[int]:
    """The classes a new label set adds to a trained domain's; ValueError when it is not a growth.

    Classes are identified by number and by the raw label values mapped onto them (the plans'
    ``label_map``). The new set must keep every existing class c at number c, holding raw values of old
    class c only, its own value among them (a class that was a fusion may lose the parts that become new
    classes: a liver class "liver+tumour" becomes "liver" when the tumour gets its own class), and add
    classes after them.

    Returns:
        the added class numbers (``old K .. new K - 1``).
    """
    k_old, k_new = int(old_plans["num_classes"]), int(new_plans["num_classes"])
    old_names = old_plans.get("labels") or {}
    new_names = new_plans.get("labels") or {}

    def named(plans_names: Mapping[str, Any], c: int) -> str:
        return f"{c} ({plans_names.get(str(c), f'class{c}')})"

    if k_new < k_old:
        dropped = ", ".join(named(old_names, c) for c in range(k_new, k_old))
        raise ValueError(
            f"the new label set of {new_plans.get('task', '?')} has {k_new} classes, {domain} has {k_old}: it drops "
            f"class(es) {dropped}; a label set may only add classes after the existing ones"
        )
    if k_new == k_old:
        raise ValueError(
            f"the label set of {new_plans.get('task', '?')} adds no class to {domain} (both have {k_old} classes)"
        )
    old_raw, new_raw = _class_raw_values(old_plans), _class_raw_values(new_plans)
    if _modality_key(old_plans) != _modality_key(new_plans):
        raise ValueError(
            f"{new_plans.get('task', '?')} has modalities {list(new_plans.get('modalities') or [])}, {domain} "
            f"{list(old_plans.get('modalities') or [])}: growing a label set keeps the domain's images"
        )
    for c in range(1, k_old):
        before, after = old_raw.get(c, set()), new_raw.get(c, set())
        own = c if c in before else min(before, default=c)
        if not after or not after <= before or own not in after:
            where = (
                ", ".join(named(new_names, k) for k, v in sorted(new_raw.items()) if own in v) or "background"
            )
            raise ValueError(
                f"the new label set renumbers or drops class {named(old_names, c)} of {domain}: raw label {own} "
                f"was class {c}, now class {where} (new class {c} = raw {sorted(after) or 'none'}, was raw "
                f"{sorted(before)}); keep every existing class at its number and add new classes after them "
                f"(classes {k_old}..)"
            )
    return list(range(k_old, k_new))


def parent_classes(
    old_plans: Mapping[str, Any], new_plans: Mapping[str, Any], added: Sequence[int]
) -> list[int]:
    """For each added class, the old class whose voxels it takes over: the old class of its smallest raw
    label value (the plans' ``label_map``s; 0, the background, for a raw value the old set did not use)."""
    old_map = {int(k): int(v) for k, v in (old_plans.get("label_map") or {}).items()}
    new_raw = _class_raw_values(new_plans)
    return [old_map.get(min(new_raw.get(c, {0})), 0) for c in added]


def grow_task_classes(
    ckpt: Mapping[str, Any],
    task: TaskData,
    domain: str,
    *,
    scope: str = "domain",
    init: str = "fresh",
    torch_seed: int = 1,
) -> ModelSetup:
    """A trained domain's label set grows: the domain ``domain`` of ``ckpt`` takes ``task``'s name and
    plans (same images, more classes, :func:`check_label_growth`), its class heads get the new channels
    (the old channels' weights kept; the new ones fresh, or with ``init="parent"`` copied from their parent
    class, :func:`parent_classes`: :meth:`models.unet.U2Net3D.add_classes`), and only what ``scope``
    says trains (:func:`models.params.freeze_for_new_classes`): every other domain and the shared
    weights stay frozen, so their outputs cannot change. ``setup.extension`` records what was added.
    """
    mode = ckpt["model_config"]["train_mode"]
    if mode not in ("shared", "universal"):
        raise ValueError(f"--ckp must hold a shared or universal model to grow, this one is {mode!r}")
    model, old_tasks = build_model_from_checkpoint(ckpt)
    names = [t["name"] for t in old_tasks]
    if domain not in names:
        raise ValueError(f"--add_classes_to {domain!r} is not a task of the checkpoint ({names})")
    idx = names.index(domain)
    if task.name in names and task.name != domain:
        raise ValueError(
            f"{task.name} is another domain of the checkpoint ({names}); name the task of {domain}"
        )
    old_plans = dict(old_tasks[idx]["plans"])
    added = check_label_growth(old_plans, task.plans, domain)
    before = parameter_counts(model).per_task[idx]
    parents = parent_classes(old_plans, task.plans, added)
    if init not in ("parent", "fresh"):
        raise ValueError(f"init must be 'parent' or 'fresh', got {init!r}")
    torch.manual_seed(torch_seed)
    grown = model.add_classes(idx, task.num_classes, parents if init == "parent" else None)
    freeze_for_new_classes(model, idx, scope)
    plans = [dict(t["plans"]) for t in old_tasks]
    plans[idx] = dict(task.plans)
    labels = task.plans.get("labels") or {}
    return ModelSetup(
        model=model,
        task_names=[task.name if i == idx else n for i, n in enumerate(names)],
        task_plans=plans,
        model_patch=_optional_int3(ckpt.get("model_patch")),
        trained_tasks=[idx],
        extension={
            "kind": "new_classes",
            "task": task.name,
            "domain": domain,
            "index": idx,
            "classes_before": int(old_plans["num_classes"]),
            "classes_after": task.num_classes,
            "added_classes": {str(c): str(labels.get(str(c), f"class{c}")) for c in added},
            "old_labels": dict(old_plans.get("labels") or {}),
            "old_label_map": dict(old_plans.get("label_map") or {}),
            "added_params": int(parameter_counts(model).per_task[idx] - before),
            "grown_heads": grown,
            "train_scope": scope,
            "init": init,
            "parents": {str(c): int(p) for c, p in zip(added, parents, strict=True)},
        },
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
        extension=(ts.get("config") or {}).get("extension"),
    )
