"""Per-task settings: the paper preset as a data table, derived settings for any other task.

A task's settings end up in its ``plans.json`` (keys in ``docs/formats.md``). They come from:

1. the table :data:`PRESETS` (docs/paper_preset.md, "Per-task settings"), matched by
   the task folder name or, failing that, by the part after ``TaskXX_`` (so ``Task104_Hippocampus``
   gets the Hippocampus row). A row may be partial: the fields it leaves ``None`` are derived;
2. derivation from the data, the nnU-Net way: target spacing = median spacing of the training
   images (to 3 decimals on the original resampling grid, which rounds to that, else 4); patch =
   median resampled shape, shrunk along its physically longest axis until it fits a voxel budget;
   pools per axis = how often the patch halves while staying >= ``min_bottom`` voxels (at most
   ``max_pools``); patch rounded down to a multiple of 2**pools; batch from the budget; modalities
   and classes from ``dataset.json``;
3. explicit overrides (keyword arguments of :func:`build_plans`, ``preprocess_taskSep.py`` flags),
   which win over both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from utils.triples import float3, int3

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "NORMALISATION",
    "NORMALISATION_DERIVED",
    "ZERO_MASK_MODES",
    "PRESETS",
    "PREPROCESSING_KEYS",
    "RESAMPLE_GRIDS",
    "CT_CLIP_MODES",
    "LEGACY_RESAMPLE_GRID",
    "DEFAULT_KIND_PROBS",
    "TaskPreset",
    "build_plans",
    "class_names",
    "derive_batch_size",
    "derive_patch_and_pools",
    "estimate_resampled_shape",
    "find_preset",
    "median_shape",
    "median_spacing",
    "patch_kind_probs",
    "pools_for_patch",
]

#: patch voxel budget of the derivation (128**3, the size of the paper's largest patches)
DEFAULT_MAX_VOXELS = 128**3
#: smallest feature-map edge (voxels) at the bottom of the U-Net
DEFAULT_MIN_BOTTOM = 4
#: most stride-2 poolings per axis
DEFAULT_MAX_POOLS = 5
#: largest derived batch size
DEFAULT_MAX_BATCH = 8

#: intensity normalisation of docs/paper_preset.md, "Preprocessing", steps 3-4, exactly as the paper
#: (``zero_mask: "none"``: the weight map and the z-score use whatever the B-spline gives)
#: (``ct_clip_for: "all"``: the clip below ``ct_clip_min`` applies to every task, CT or not, as in the
#: original; ``"ct"``: to CT tasks only)
NORMALISATION: Mapping[str, Any] = MappingProxyType(
    {
        "clip_percentiles": (2, 98),
        "ct_clip_min": -1024,
        "ct_clip_for": "all",
        "zscore": "nonzero",
        "zero_mask": "none",
    }
)
#: the default for tasks outside the paper preset: the zero background of the original image
#: (zero voxels connected to the border, mapped with nearest neighbour) is 0 after resampling too. Cubic B-spline rings around a sharp
#: zero background (skull-stripped MR, synthetic data) and leaves tiny values of alternating sign
#: far into it, which would otherwise enter the weight map and the z-score statistics.
NORMALISATION_DERIVED: Mapping[str, Any] = MappingProxyType({**NORMALISATION, "zero_mask": "nearest"})
ZERO_MASK_MODES = ("none", "nearest")
#: which tasks the clip below ``ct_clip_min`` applies to; plans without the key (written before it
#: existed) mean ``"ct"``
CT_CLIP_MODES = ("all", "ct")

#: the grid a case is resampled to (plans key ``resample_grid``, docs/data_pipeline.md):
#: ``"original"``: the original's SimpleITK grid: same origin and direction as the image, the
#: spacings rounded to 3 decimals, size = int(n * spacing / target) (truncated), the last voxels
#: of the crop may fall outside it; ``"centred"``: the same physical extent as the crop, voxel
#: centres aligned (spacing stretched to fit round(n * spacing / target) voxels)
RESAMPLE_GRIDS = ("original", "centred")
#: what plans and sidecars without a ``resample_grid`` key (written before it existed) were made with
LEGACY_RESAMPLE_GRID = "centred"

#: plans keys that change the preprocessed arrays; preprocessed data made with other values is stale
PREPROCESSING_KEYS = ("modalities", "is_ct", "label_map", "target_spacing", "resample_grid", "normalisation")

_TUMOUR_NAME = re.compile(r"tumou?r|cancer|lesion|metasta", re.IGNORECASE)


@dataclass(frozen=True)
class TaskPreset:
    """One row of the settings table; ``None`` fields are derived from the data.

    ``label_map`` is given as (raw value, class) pairs; ``paper`` marks rows of the paper preset
    (their plans say ``source: "paper_preset"``).
    """

    target_spacing: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | None = None
    pools_per_axis: tuple[int, int, int] | None = None
    batch_size: int | None = None
    label_map: tuple[tuple[int, int], ...] | None = None
    keep_components: int | None = None
    small_label: int | None = None
    tumour_classes: tuple[int, ...] | None = None
    paper: bool = False
    note: str = field(default="", compare=False)
    zero_upper_half_x: bool = False  # post-processing: clear the upper half of the last axis first
    small_prob: float | None = None  # patch kinds (training.sampling); None: DEFAULT_KIND_PROBS
    fore_prob: float | None = None


_FUSE_2_INTO_1 = ((0, 0), (1, 1), (2, 1))

#: probabilities of "small" and "fore" patches (docs/paper_preset.md, "Patch sampling") of every task
#: whose row does not set them: the original's 0.3 / 0.3 (Task09_Spleen: 0 / 0)
DEFAULT_KIND_PROBS = (0.3, 0.3)

#: The settings table. Paper rows: docs/paper_preset.md; demo rows (``demo.data``) only fix the
#: label fusion and post-processing, so their spacing/patch/pools go through the derivation.
PRESETS: Mapping[str, TaskPreset] = MappingProxyType(
    {
        "Task02_Heart": TaskPreset(
            (1.37, 1.25, 1.25), (80, 192, 128), (4, 5, 5), 2, ((0, 0), (1, 1)), 1, None, (), True
        ),
        "Task03_Liver": TaskPreset(
            (1.0, 0.77, 0.77), (128, 128, 128), (5, 5, 5), 2, _FUSE_2_INTO_1, 1, None, (), True
        ),
        "Task04_Hippocampus": TaskPreset(
            (1.0, 1.0, 1.0), (40, 56, 40), (3, 3, 3), 9, ((0, 0), (1, 1), (2, 2)), 2, None, (), True
        ),
        "Task05_Prostate": TaskPreset(
            (3.6, 0.625, 0.625), (20, 192, 192), (2, 5, 5), 4, ((0, 0), (1, 1), (2, 2)), 2, 1, (), True
        ),
        "Task07_Pancreas": TaskPreset(
            (2.5, 0.8, 0.8), (96, 160, 128), (4, 5, 5), 2, _FUSE_2_INTO_1, 1, None, (), True
        ),
        "Task09_Spleen": TaskPreset(
            (5.0, 0.8, 0.8),
            (96, 160, 128),
            (4, 5, 5),
            2,
            ((0, 0), (1, 1)),
            1,
            None,
            (),
            True,
            zero_upper_half_x=True,  # the original cleared x >= W // 2: the spleen lies in the other half
            small_prob=0.0,  # the original's config: no "small"/"fore" oversampling for Spleen
            fore_prob=0.0,
        ),
        # demo tasks: fusion/post-processing like their real counterparts, the rest derived
        "Task91_DemoLiverCT": TaskPreset(label_map=_FUSE_2_INTO_1, keep_components=1, tumour_classes=()),
        "Task92_DemoHippoMR": TaskPreset(keep_components=2),
        "Task93_DemoProstateMR": TaskPreset(keep_components=2, small_label=1),
        "Task94_DemoSpleenCT": TaskPreset(keep_components=1),
        # Task91's cases with the tumour as class 2 (a grown label set); tumours: derived from the name
        "Task95_DemoLiverTumourCT": TaskPreset(keep_components=1),
    }
)


def _suffix(task_name: str) -> str:
    """``Task04_Hippocampus`` -> ``hippocampus`` (the part after the first underscore, lower case)."""
    return task_name.split("_", 1)[1].lower() if "_" in task_name else task_name.lower()


def find_preset(task_name: str, table: Mapping[str, TaskPreset] = PRESETS) -> tuple[str, TaskPreset] | None:
    """The table row for ``task_name``: exact key first, else the first key with the same name
    suffix (``Task104_Hippocampus`` -> ``Task04_Hippocampus``). ``None`` when nothing matches."""
    if task_name in table:
        return task_name, table[task_name]
    suffix = _suffix(task_name)
    for key, row in table.items():
        if _suffix(key) == suffix:
            return key, row
    return None


def patch_kind_probs(plans: Mapping[str, Any]) -> tuple[float, float]:
    """``(small_prob, fore_prob)`` of a task: the plans' keys; plans written before those keys existed
    get the values of their ``preset_row`` (so a Task09_Spleen prepared earlier still gets 0 / 0), else
    :data:`DEFAULT_KIND_PROBS`."""
    row = PRESETS.get(str(plans.get("preset_row") or ""))
    defaults = [
        DEFAULT_KIND_PROBS[i] if row is None or v is None else float(v)
        for i, v in enumerate((row.small_prob, row.fore_prob) if row is not None else (None, None))
    ]
    small = float(plans.get("small_prob", defaults[0]))
    fore = float(plans.get("fore_prob", defaults[1]))
    if not (0.0 <= small <= 1.0 and 0.0 <= fore <= 1.0 and small + fore <= 1.0):
        raise ValueError(f"patch kind probabilities must be in [0, 1] with a sum <= 1, got {small}, {fore}")
    return small, fore


# ---------------------------------------------------------------------------------------------
# derivation
# ---------------------------------------------------------------------------------------------


def median_spacing(spacings_zyx: Sequence[Sequence[float]], decimals: int = 4) -> tuple[float, float, float]:
    """Per-axis median of the cases' (z, y, x) spacings, rounded to ``decimals``."""
    arr = np.asarray(spacings_zyx, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != 3:
        raise ValueError(f"need a non-empty list of (z, y, x) spacings, got shape {arr.shape}")
    med = np.median(arr, axis=0)
    return float3(round(float(v), decimals) for v in med)


def estimate_resampled_shape(
    shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    target_spacing_zyx: Sequence[float],
    grid: str = "original",
) -> tuple[int, int, int]:
    """The (z, y, x) shape a (cropped) volume of ``shape_zyx`` voxels of ``spacing_zyx`` mm has after
    resampling to ``target_spacing_zyx`` on ``grid`` (:data:`RESAMPLE_GRIDS`), at least 1 per axis.

    ``"original"``: ``int(n * round(s, 3) / round(t, 3))``, truncated, in float64 as the original
    computed it (so 20 voxels of 0.625 mm at 0.8 mm give 15, not 16); ``"centred"``:
    ``round(n * s / t)``.
    """
    if grid not in RESAMPLE_GRIDS:
        raise ValueError(f"resample grid must be one of {RESAMPLE_GRIDS}, got {grid!r}")
    triples = zip(shape_zyx, spacing_zyx, target_spacing_zyx, strict=True)
    if grid == "original":
        return int3(max(1, int(float(n) * round(float(s), 3) / round(float(t), 3))) for n, s, t in triples)
    return int3(max(1, int(round(n * s / t))) for n, s, t in triples)


def median_shape(shapes_zyx: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """Per-axis median of (z, y, x) shapes, rounded to int."""
    arr = np.asarray(shapes_zyx, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != 3:
        raise ValueError(f"need a non-empty list of (z, y, x) shapes, got shape {arr.shape}")
    return int3(round(float(v)) for v in np.median(arr, axis=0))


def pools_for_patch(
    patch_zyx: Sequence[int], *, min_bottom: int = DEFAULT_MIN_BOTTOM, max_pools: int = DEFAULT_MAX_POOLS
) -> tuple[int, int, int]:
    """Poolings per axis: halve while the result stays >= ``min_bottom`` voxels, at most ``max_pools``.

    Reproduces the paper preset: (80,192,128) -> (4,5,5), (20,192,192) -> (2,5,5),
    (40,56,40) -> (3,3,3), (96,160,128) -> (4,5,5), (128,128,128) -> (5,5,5).
    """
    pools = []
    for size in patch_zyx:
        p = 0
        while p < max_pools and size / 2 ** (p + 1) >= min_bottom:
            p += 1
        pools.append(p)
    return int3(pools)


def derive_patch_and_pools(
    median_shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    min_bottom: int = DEFAULT_MIN_BOTTOM,
    max_pools: int = DEFAULT_MAX_POOLS,
    pools_per_axis: Sequence[int] | None = None,
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Patch size and pools per axis that fit the median resampled shape within ``max_voxels``.

    Start from the median shape; while the patch holds more than ``max_voxels`` voxels, shrink
    (by 5 %) the axis with the largest physical extent (patch x spacing), so the field of view
    stays as isotropic in mm as possible. Then pools per axis follow :func:`pools_for_patch`
    (unless given) and each axis is rounded down to a multiple of 2**pools.
    """
    patch = [max(1, int(s)) for s in median_shape_zyx]
    spacing = [float(s) for s in spacing_zyx]
    while math.prod(patch) > max_voxels:
        order = sorted(range(3), key=lambda i: patch[i] * spacing[i], reverse=True)
        for i in order:
            new = max(min_bottom, int(patch[i] * 0.95))
            if new < patch[i]:
                patch[i] = new
                break
        else:  # nothing can shrink any more
            break
    pools = (
        int3(pools_per_axis)
        if pools_per_axis is not None
        else pools_for_patch(patch, min_bottom=min_bottom, max_pools=max_pools)
    )
    patch = [max(2**p, (n // 2**p) * 2**p) for n, p in zip(patch, pools, strict=True)]
    return int3(patch), pools


def derive_batch_size(
    patch_zyx: Sequence[int], *, max_voxels: int = DEFAULT_MAX_VOXELS, max_batch: int = DEFAULT_MAX_BATCH
) -> int:
    """Batch size so that batch x patch voxels is about 2 x ``max_voxels`` (the paper's Liver/Heart
    use 2 patches of ~128**3), between 2 and ``max_batch``."""
    return int(min(max_batch, max(2, (2 * max_voxels) // max(1, math.prod(patch_zyx)))))


def class_names(raw_labels: Mapping[int, str], label_map: Mapping[int, int]) -> dict[str, str]:
    """Names of the classes used: class c is named after raw label c when that maps to c, else
    after the raw labels that map to it (joined by "+")."""
    classes = sorted(set(int(v) for v in label_map.values()) | {0})
    out: dict[str, str] = {}
    for c in classes:
        if label_map.get(c) == c and c in raw_labels:
            out[str(c)] = raw_labels[c]
        else:
            names = [raw_labels.get(r, str(r)) for r, v in sorted(label_map.items()) if v == c]
            out[str(c)] = "+".join(names) if names else f"class{c}"
    return out


def _positive_floats(value: Sequence[Any], name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in value)
    if len(vals) != 3 or any(not v > 0 for v in vals):
        raise ValueError(f"{name} must be 3 positive numbers (z, y, x), got {value!r}")
    return vals


def _ints(value: Sequence[Any], name: str, minimum: int) -> tuple[int, int, int]:
    vals = tuple(int(v) for v in value)
    if len(vals) != 3 or any(v < minimum for v in vals):
        raise ValueError(f"{name} must be 3 integers >= {minimum} (z, y, x), got {value!r}")
    return vals


def build_plans(
    task_name: str,
    modalities: Sequence[str],
    raw_labels: Mapping[int, str],
    case_spacings_zyx: Sequence[Sequence[float]],
    case_shapes_zyx: Sequence[Sequence[int]],
    *,
    resampled_shapes_zyx: Sequence[Sequence[int]] | None = None,
    target_spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    pools_per_axis: Sequence[int] | None = None,
    batch_size: int | None = None,
    label_map: Mapping[int, int] | Mapping[str, int] | None = None,
    keep_components: int | None = None,
    zero_upper_half_x: bool | None = None,
    small_prob: float | None = None,
    fore_prob: float | None = None,
    small_label: int | None = None,
    tumour_classes: Sequence[int] | None = None,
    zero_mask: str | None = None,
    resample_grid: str | None = None,
    ct_clip_for: str | None = None,
    use_preset: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    min_bottom: int = DEFAULT_MIN_BOTTOM,
    max_pools: int = DEFAULT_MAX_POOLS,
) -> dict[str, Any]:
    """The ``plans.json`` dict of a task (keys and meaning: ``docs/formats.md``).

    Args:
        task_name: task folder name.
        modalities: ``dataset.json`` modality names in channel order.
        raw_labels: ``dataset.json`` labels (raw value -> name).
        case_spacings_zyx: (z, y, x) spacing of every training image (from the headers).
        case_shapes_zyx: (z, y, x) shape of every training image (from the headers).
        resampled_shapes_zyx: the actual shapes after crop + resampling (e.g. from the case
            sidecars); used instead of the header-based estimate for the median shape.
        target_spacing, patch_size, pools_per_axis, batch_size, label_map, keep_components,
        zero_upper_half_x,
        small_label, tumour_classes: overrides; ``None`` = preset row or derived.
        small_prob, fore_prob: probabilities of "small" and "fore" training patches; ``None`` = the
            preset row's, else :data:`DEFAULT_KIND_PROBS`.
        zero_mask: ``"none"`` (paper) or ``"nearest"`` (default outside the paper preset), see
            :data:`NORMALISATION_DERIVED`.
        resample_grid: ``"original"`` (default) or ``"centred"``, see :data:`RESAMPLE_GRIDS`.
        ct_clip_for: ``"all"`` (default: every task, as the original) or ``"ct"``, see :data:`CT_CLIP_MODES`.
        use_preset: ``False`` ignores the table and derives everything.
        max_voxels, min_bottom, max_pools: knobs of the patch/pool derivation.

    Returns:
        plain-JSON dict (lists, not tuples), including ``overrides``: the keys given explicitly.
    """
    match = find_preset(task_name) if use_preset else None
    row = match[1] if match else TaskPreset()
    overrides: list[str] = []

    # --- labels -----------------------------------------------------------------------------
    if label_map is not None:
        lmap = {int(k): int(v) for k, v in label_map.items()}
        overrides.append("label_map")
    elif row.label_map is not None:
        lmap = {int(k): int(v) for k, v in row.label_map}
    else:
        lmap = {int(k): int(k) for k in raw_labels}
    lmap.setdefault(0, 0)
    classes = sorted(set(lmap.values()))
    if classes != list(range(len(classes))):
        raise ValueError(f"label_map {lmap} must map onto the contiguous classes 0..K-1, got {classes}")
    labels = class_names(raw_labels, lmap)
    num_classes = len(labels)

    # --- spacing and shapes -----------------------------------------------------------------
    if resample_grid is not None:
        if resample_grid not in RESAMPLE_GRIDS:
            raise ValueError(f"resample_grid must be one of {RESAMPLE_GRIDS}, got {resample_grid!r}")
        grid = str(resample_grid)
        overrides.append("resample_grid")
    else:
        grid = "original"
    if target_spacing is not None:
        spacing = _positive_floats(target_spacing, "target_spacing")
        overrides.append("target_spacing")
    elif row.target_spacing is not None:
        spacing = float3(row.target_spacing)
    else:
        # the original grid resamples to the spacing rounded to 3 decimals: derive it at that precision
        # so that plans, sidecars and the way back name the spacing the arrays have
        spacing = median_spacing(case_spacings_zyx, 3 if grid == "original" else 4)
    if resampled_shapes_zyx:
        med_shape = median_shape(resampled_shapes_zyx)
    elif case_shapes_zyx:
        med_shape = median_shape(
            [
                estimate_resampled_shape(sh, sp, spacing, grid)
                for sh, sp in zip(case_shapes_zyx, case_spacings_zyx, strict=True)
            ]
        )
    else:
        med_shape = (0, 0, 0)

    # --- patch, pools, batch ----------------------------------------------------------------
    pools_o = _ints(pools_per_axis, "pools_per_axis", 0) if pools_per_axis is not None else None
    patch_o = _ints(patch_size, "patch_size", 1) if patch_size is not None else None
    if pools_o is not None:
        overrides.append("pools_per_axis")
    if patch_o is not None:
        overrides.append("patch_size")
    row_patch = row.patch_size is not None and patch_o is None
    if patch_o is not None:
        patch = patch_o
        pools = pools_o or pools_for_patch(patch, min_bottom=min_bottom, max_pools=max_pools)
    elif row.patch_size is not None:
        patch = int3(row.patch_size)
        pools = pools_o or (
            int3(row.pools_per_axis)
            if row.pools_per_axis is not None
            else pools_for_patch(patch, min_bottom=min_bottom, max_pools=max_pools)
        )
    else:
        if not all(med_shape):
            raise ValueError(f"{task_name}: no training cases to derive a patch size from; give patch_size")
        patch, pools = derive_patch_and_pools(
            med_shape,
            spacing,
            max_voxels=max_voxels,
            min_bottom=min_bottom,
            max_pools=max_pools,
            pools_per_axis=pools_o,
        )
    if batch_size is not None:
        batch = int(batch_size)
        overrides.append("batch_size")
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch}")
    elif row.batch_size is not None and row_patch:
        batch = row.batch_size
    else:
        batch = derive_batch_size(patch, max_voxels=max_voxels)

    # --- post-processing and sampling ---------------------------------------------------------
    if keep_components is not None:
        keep = int(keep_components)
        overrides.append("keep_components")
    else:
        keep = row.keep_components if row.keep_components is not None else 2
    if keep not in (1, 2):
        raise ValueError(f"keep_components must be 1 or 2, got {keep}")
    if small_label is not None:
        small = int(small_label)
        overrides.append("small_label")
    else:
        small = row.small_label if row.small_label is not None else num_classes - 1
    if not 0 <= small < num_classes:
        raise ValueError(f"small_label {small} is not a class of {labels}")
    if zero_upper_half_x is not None:
        zero_half = bool(zero_upper_half_x)
        overrides.append("zero_upper_half_x")
    else:
        zero_half = row.zero_upper_half_x
    kind_probs = []
    for name, value, row_value, default in (
        ("small_prob", small_prob, row.small_prob, DEFAULT_KIND_PROBS[0]),
        ("fore_prob", fore_prob, row.fore_prob, DEFAULT_KIND_PROBS[1]),
    ):
        if value is not None:
            overrides.append(name)
        prob = float(value if value is not None else row_value if row_value is not None else default)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {prob}")
        kind_probs.append(prob)
    if sum(kind_probs) > 1.0:
        raise ValueError(f"small_prob + fore_prob must be <= 1, got {kind_probs}")
    if tumour_classes is not None:
        tumours = sorted(int(c) for c in tumour_classes)
        overrides.append("tumour_classes")
    elif row.tumour_classes is not None:
        tumours = sorted(row.tumour_classes)
    else:
        tumours = [int(c) for c, name in labels.items() if int(c) > 0 and _TUMOUR_NAME.search(name)]

    source = "paper_preset" if (match is not None and row.paper) else "derived"
    norm = dict(NORMALISATION if source == "paper_preset" else NORMALISATION_DERIVED)
    if zero_mask is not None:
        if zero_mask not in ZERO_MASK_MODES:
            raise ValueError(f"zero_mask must be one of {ZERO_MASK_MODES}, got {zero_mask!r}")
        norm["zero_mask"] = zero_mask
        overrides.append("zero_mask")
    if ct_clip_for is not None:
        if ct_clip_for not in CT_CLIP_MODES:
            raise ValueError(f"ct_clip_for must be one of {CT_CLIP_MODES}, got {ct_clip_for!r}")
        norm["ct_clip_for"] = ct_clip_for
        overrides.append("ct_clip_for")
    return {
        "task": task_name,
        "modalities": [str(m) for m in modalities],
        "is_ct": bool(modalities) and str(modalities[0]).strip().upper() == "CT",
        "labels": labels,
        "num_classes": num_classes,
        "label_map": {str(k): int(v) for k, v in sorted(lmap.items())},
        "target_spacing": [float(s) for s in spacing],
        "resample_grid": grid,
        "patch_size": [int(p) for p in patch],
        "pools_per_axis": [int(p) for p in pools],
        "batch_size": int(batch),
        "small_label": int(small),
        "tumour_classes": tumours,
        "keep_components": int(keep),
        "zero_upper_half_x": zero_half,
        "small_prob": kind_probs[0],
        "fore_prob": kind_probs[1],
        "normalisation": {k: (list(v) if isinstance(v, tuple) else v) for k, v in norm.items()},
        "source": source,
        "preset_row": match[0] if match else None,
        "median_resampled_shape": [int(s) for s in med_shape],
        "overrides": overrides,
    }
