"""Training patch sampling and augmentation for one task (batchgenerators based).

Reads the preprocessed training cases of ONE task (``prepData/<Task>/train/<case>_image.npy``
``(M, z, y, x)`` float32 and ``<case>_label.npy`` ``(z, y, x)`` uint8, see ``docs/formats.md``) with
``np.load(mmap_mode="r")`` and produces batches as batchgenerators expects them:
``{"data": float32 (B, M, z, y, x), "seg": float32 (B, 1, z, y, x), "kinds": list[str],
"case_ids": list[str]}`` (torch tensors for ``data``/``seg`` after :class:`NumpyToTensor`).

Sampling (paper preset, REFERENCE.md "Training"):

* Cases are visited in shuffled order (a new permutation each pass); each loaded case gives
  ``draws_per_case = 2`` consecutive samples.
* Patch kinds: ``"any"`` (random centre; the task patch lies inside the volume where it fits),
  ``"fore"`` (centre within the foreground bounding box) and ``"small"`` (centre within the bounding
  box of ``plans["small_label"]``).
* Batch composition: the first ``min(B, ceil(B/3) + 1)`` samples must hold foreground: ``"small"``
  with p 0.3 when the case has that label, else ``"fore"`` (a case without any foreground is skipped
  for these samples). The others are ``"small"`` with p 0.3, ``"fore"`` with p 0.3, else ``"any"``
  (one uniform number ``u`` per sample: ``u < 0.3`` small, ``u >= 0.7`` fore; as in the original, a
  "small" draw in a case without the small label becomes "any", a "fore" draw in a case without
  foreground becomes "any"). ``kinds`` reports the kind actually used.
* "fore"/"small" centres: a voxel of the structure is picked (from a cached, evenly spaced subset of
  its voxels), moved by a uniform integer jitter of at most ``jitter`` voxels per axis and clipped to the
  structure's bounding box. So the centre always lies in the bounding box, and the picked voxel stays
  inside the final patch even after the worst-case rotation / down-scaling / elastic shift
  (:func:`safe_jitter`), which makes "must hold foreground" hold after augmentation as well. The
  original code picked a random foreground voxel with a jitter of ``patch/2 - 1`` and retried the
  augmentation until the patch held foreground.
* Per case the foreground and small-structure bounding boxes and voxel subsets are computed ONCE from
  the label array (one full scan on first use) and cached per loader (per worker process).
* Patches are cut with zero padding (image 0, label 0) where they leave the volume.

Augmentation (per sample, batchgenerators): ``SpatialTransform`` with elastic deformation (alpha
(0, 750), sigma (10, 13), p 0.3), rotation about the FIRST array axis (z of ``(z, y, x)``) by (0, 2π)
with p 0.3, scaling (0.75, 1.25) with p 0.5, ``random_crop=False`` (centre crop to the task patch),
constant-0 borders, cubic data / nearest seg. In batchgenerators' convention the spatial axes of
``(b, c, d0, d1, d2)`` are called x, y, z and ``angle_x`` builds the matrix that leaves coordinate 0
unchanged (``create_matrix_rotation_x_3d``), i.e. rotates in the (d1, d2) = (y, x) plane about axis 0;
so we set ``angle_x = (0, 2π)`` and ``angle_y = angle_z = (0, 0)``, as the original did.
When augmenting, the loader cuts a larger region around the centre (``extraction_size``: room for the
worst-case rotation and 1.25 up-scaling plus an elastic margin) so that rotated / scaled patches show
real image context, as in the original, which interpolated from the whole volume; the centre crop of
``SpatialTransform`` then returns the task patch. Then :class:`MirrorAxesTransform` mirrors the LAST
axis with p 0.3 (batchgenerators' ``MirrorTransform`` flips each axis with a further fixed p 0.5, so it
is not used). Then, for shared/universal training (``model_patch`` given), the unified-patch resize to
the model patch: batchgenerators ``ResizeTransform`` = ``skimage.transform.resize`` cubic (order 3,
pixel-centre aligned, ``clip=True``, no anti-aliasing; the original used the same function) for data and
nearest (order 0) for seg; measured ~0.5 s per sample for a 128³ output on one CPU core. Finally
``NumpyToTensor`` (in the main process when worker processes are used).

Randomness: one ``np.random.RandomState`` per loader, seeded from ``(seed, worker id)``. batchgenerators
transforms draw from numpy's global RNG, so the composed transform runs them with the global RNG
temporarily seeded from a per-batch seed the loader draws, then restores the previous global state:
batches (augmentation included) are a function of ``seed`` and the worker id only.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from batchgenerators.transforms.spatial_transforms import ResizeTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import NumpyToTensor

__all__ = [
    "AugmentParams",
    "CaseInfo",
    "MirrorAxesTransform",
    "PatchLoader",
    "SeededCompose",
    "SingleThreadedLoader",
    "TensorMultiThreadedAugmenter",
    "UnifiedPatchResize",
    "case_id_of",
    "compute_case_info",
    "extract_patch",
    "extraction_size",
    "fold_case_ids",
    "list_cases",
    "make_train_loader",
    "make_transforms",
    "num_foreground_samples",
    "safe_jitter",
]

Shape3 = tuple[int, int, int]
KINDS = ("any", "fore", "small")


# ----------------------------------------------------------------------------------------------
# case listing / folds
# ----------------------------------------------------------------------------------------------
def case_id_of(case: str | os.PathLike[str]) -> str:
    """Case id of a case prefix path ``.../train/<case>`` (the file name part)."""
    return Path(case).name


def list_cases(
    task_prep_dir: str | os.PathLike[str],
    split: str = "train",
    case_ids: Iterable[str] | None = None,
) -> list[str]:
    """Finished preprocessed cases of one task as case prefix paths ``<task_prep_dir>/<split>/<case>``.

    A case counts when its sidecar ``<case>.json`` (written last) and ``<case>_image.npy`` exist, and for
    ``split == "train"`` also ``<case>_label.npy``. Sorted by case id.

    Args:
        task_prep_dir: ``prepData/<Task>``.
        split: ``"train"`` or ``"test"``.
        case_ids: if given, keep only these cases (e.g. a fold's ``"train"`` list, see
            :func:`fold_case_ids`); raises ``ValueError`` when one of them is not preprocessed.
    """
    split_dir = Path(task_prep_dir) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no preprocessed split folder {split_dir}")
    found: dict[str, str] = {}
    for sidecar in split_dir.glob("*.json"):
        cid = sidecar.name[: -len(".json")]
        if cid.startswith("._"):
            continue
        if not (split_dir / f"{cid}_image.npy").is_file():
            continue
        if split == "train" and not (split_dir / f"{cid}_label.npy").is_file():
            continue
        found[cid] = str(split_dir / cid)
    if case_ids is None:
        return [found[k] for k in sorted(found)]
    wanted = sorted(set(case_ids))
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"{len(missing)} case(s) not preprocessed in {split_dir}: {missing[:10]}")
    return [found[c] for c in wanted]


def fold_case_ids(
    fold_splits: str | os.PathLike[str] | Mapping[str, Any],
    task: str,
    fold: int = 0,
    part: str = "train",
) -> list[str]:
    """Case ids of ``part`` (``"train"`` / ``"val"``) of ``fold`` for ``task`` from ``fold_splits.json``.

    ``fold_splits`` is the file path or its parsed content ``{"<Task>": [{"train": [...], "val": [...]},
    ...]}``. Ids are used as given; an id ending in ``.nii.gz`` is stripped to the case id.
    """
    if not isinstance(fold_splits, Mapping):
        with open(fold_splits) as f:
            fold_splits = json.load(f)
    if task not in fold_splits:
        raise KeyError(f"task {task!r} not in fold splits (have {sorted(fold_splits)})")
    folds = fold_splits[task]
    if not 0 <= fold < len(folds):
        raise IndexError(f"fold {fold} out of range: {task} has {len(folds)} folds")
    ids = folds[fold][part]
    return [Path(i).name[: -len(".nii.gz")] if str(i).endswith(".nii.gz") else str(i) for i in ids]


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentParams:
    """Augmentation settings; the defaults are the paper preset."""

    p_elastic: float = 0.3
    alpha: tuple[float, float] = (0.0, 750.0)
    sigma: tuple[float, float] = (10.0, 13.0)
    p_rotation: float = 0.3
    angle: tuple[float, float] = (0.0, 2.0 * math.pi)  # about array axis 0 (z)
    p_scale: float = 0.5
    scale: tuple[float, float] = (0.75, 1.25)
    p_mirror: float = 0.3
    mirror_axes: tuple[int, ...] = (2,)  # spatial axes (0 = z, 1 = y, 2 = x): the last one
    elastic_margin: int = 4  # voxels allowed for the elastic displacement (extraction and jitter)
    order_data: int = 3
    order_seg: int = 0

    @property
    def rotates(self) -> bool:
        return self.p_rotation > 0 and self.angle[0] != self.angle[1]

    @property
    def scale_max(self) -> float:
        return max(1.0, self.scale[1]) if self.p_scale > 0 else 1.0

    @property
    def scale_min(self) -> float:
        return min(1.0, self.scale[0]) if self.p_scale > 0 else 1.0

    @property
    def margin(self) -> int:
        return self.elastic_margin if self.p_elastic > 0 else 0


def extraction_size(patch_size: Sequence[int], aug: AugmentParams | None) -> Shape3:
    """Size ``(z, y, x)`` of the region the loader cuts around a centre before augmentation.

    Without augmentation the task patch itself. With augmentation: room for the largest scale
    (coordinates are multiplied by up to ``scale_max``), for a rotation in the (y, x) plane (the patch's
    (y, x) diagonal) and for the elastic margin on both sides; ``size - patch`` is kept even so the
    centre crop of ``SpatialTransform`` is centred on the sampled centre.
    """
    p = [int(v) for v in patch_size]
    if aug is None:
        return (p[0], p[1], p[2])
    s = aug.scale_max
    m = 2 * aug.margin
    ez = math.ceil(p[0] * s) + m
    if aug.rotates:
        diag = math.hypot(p[1], p[2])
        ey, ex = math.ceil(diag * s) + m, math.ceil(diag * s) + m
    else:
        ey, ex = math.ceil(p[1] * s) + m, math.ceil(p[2] * s) + m
    out = [ez, ey, ex]
    out = [max(o, pp) for o, pp in zip(out, p, strict=True)]
    out = [o + ((o - pp) % 2) for o, pp in zip(out, p, strict=True)]
    return (out[0], out[1], out[2])


def safe_jitter(patch_size: Sequence[int], aug: AugmentParams | None) -> Shape3:
    """Largest centre offset (voxels per axis) from a picked structure voxel that keeps the voxel inside
    the final patch.

    Without augmentation ``patch // 2 - 1`` (as the original). With augmentation the voxel must survive
    down-scaling by ``scale_min`` (it is seen ``1/scale`` farther from the centre), a rotation in the
    (y, x) plane (an offset ``(dy, dx)`` may turn onto one axis: radius ``sqrt(2) * jitter``) and the
    elastic margin.
    """
    half = [max(int(v) / 2.0 - 1.0, 0.0) for v in patch_size]
    if aug is None:
        return tuple(max(int(v) // 2 - 1, 0) for v in patch_size)  # type: ignore[return-value]
    s, m = aug.scale_min, aug.margin
    jz = math.floor(s * half[0] - m)
    if aug.rotates:
        r = min(half[1], half[2])
        jy = jx = math.floor((s * r - m) / math.sqrt(2.0))
    else:
        jy, jx = math.floor(s * half[1] - m), math.floor(s * half[2] - m)
    return (max(jz, 0), max(jy, 0), max(jx, 0))


def num_foreground_samples(batch_size: int) -> int:
    """Samples at the start of a batch that must hold foreground: ``min(B, ceil(B/3) + 1)``."""
    return min(batch_size, math.ceil(batch_size / 3) + 1)


def extract_patch(
    array: np.ndarray,
    start: Sequence[int],
    size: Sequence[int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Cut ``array[..., start:start+size]`` over the last 3 axes with zero padding outside the array.

    Args:
        array: ``(..., z, y, x)`` (e.g. a memory map; only the overlapping region is read).
        start: ``(3,)`` start voxel, may be negative or beyond the array.
        size: ``(3,)`` region size.
        out: optional zero-filled destination ``(..., *size)``; written in place.

    Returns:
        ``(..., *size)`` array (``out`` when given, else of ``array``'s dtype).
    """
    lead = array.shape[:-3]
    if out is None:
        out = np.zeros(lead + tuple(int(s) for s in size), dtype=array.dtype)
    src, dst = [], []
    for st, sz, dim in zip(start, size, array.shape[-3:], strict=True):
        lo, hi = max(int(st), 0), min(int(st) + int(sz), dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(st), hi - int(st)))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


# ----------------------------------------------------------------------------------------------
# per-case cache
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseInfo:
    """Per-case sampling information, computed once from the label array.

    Attributes:
        shape: ``(z, y, x)`` of the case.
        fore_bbox: ``(3, 2)`` inclusive ``[min, max]`` voxel of the foreground (label > 0), or None.
        small_bbox: same for the small structure (label == small_label), or None.
        fore_points: ``(K, 3)`` int32 evenly spaced subset (raster order) of the foreground voxels.
        small_points: ``(K', 3)`` int32 subset of the small-structure voxels.
    """

    shape: Shape3
    fore_bbox: np.ndarray | None
    small_bbox: np.ndarray | None
    fore_points: np.ndarray
    small_points: np.ndarray


def _subset(coords: np.ndarray, max_points: int) -> np.ndarray:
    if len(coords) > max_points:
        coords = coords[np.linspace(0, len(coords) - 1, max_points).round().astype(np.int64)]
    return np.ascontiguousarray(coords, dtype=np.int32)


def _bbox(coords: np.ndarray) -> np.ndarray | None:
    if len(coords) == 0:
        return None
    return np.stack([coords.min(axis=0), coords.max(axis=0)], axis=1).astype(np.int64)


def compute_case_info(label: np.ndarray, small_label: int | None, max_points: int = 2048) -> CaseInfo:
    """Scan a label volume ``(z, y, x)`` once: bounding boxes and voxel subsets (see :class:`CaseInfo`)."""
    lab = np.asarray(label)
    nz = np.nonzero(lab)
    fore = np.stack(nz, axis=1) if len(nz[0]) else np.zeros((0, 3), np.int64)
    if small_label is not None and small_label > 0 and len(fore):
        small = fore[lab[nz] == small_label]
    else:
        small = np.zeros((0, 3), np.int64)
    return CaseInfo(
        shape=(int(lab.shape[0]), int(lab.shape[1]), int(lab.shape[2])),
        fore_bbox=_bbox(fore),
        small_bbox=_bbox(small),
        fore_points=_subset(fore, max_points),
        small_points=_subset(small, max_points),
    )


# ----------------------------------------------------------------------------------------------
# data loader
# ----------------------------------------------------------------------------------------------
class PatchLoader(SlimDataLoaderBase):
    """Infinite patch loader over the training cases of one task.

    ``next(loader)`` returns ``{"data": float32 (B, M, *extraction), "seg": float32 (B, 1, *extraction),
    "kinds": list[str], "case_ids": list[str], "aug_seed": int}`` (``aug_seed`` is consumed by
    :class:`SeededCompose`). With ``extraction == patch_size`` (no augmentation) these are the patches.

    Args:
        cases: case prefix paths ``.../train/<case>`` (see :func:`list_cases`).
        patch_size: task patch ``(z, y, x)``.
        batch_size: B.
        small_label: label of the smallest structure (``plans["small_label"]``); None/0: no "small".
        extraction: region cut around each centre; default ``patch_size``.
        jitter: max centre offset from a picked structure voxel; default ``patch // 2 - 1``.
        draws_per_case: samples drawn from each loaded case (2 in the preset).
        p_small, p_fore: kind probabilities (0.3, 0.3).
        seed: base seed; worker ``i`` uses ``RandomState(SeedSequence([seed, i]))``.
        max_points: size of the cached structure-voxel subsets per case.
        num_workers: stored for batchgenerators (``number_of_threads_in_multithreaded``).
    """

    def __init__(
        self,
        cases: Sequence[str | os.PathLike[str]],
        patch_size: Sequence[int],
        batch_size: int,
        *,
        small_label: int | None = None,
        extraction: Sequence[int] | None = None,
        jitter: Sequence[int] | None = None,
        draws_per_case: int = 2,
        p_small: float = 0.3,
        p_fore: float = 0.3,
        seed: int = 1993,
        max_points: int = 2048,
        num_workers: int = 1,
    ) -> None:
        cases = [str(c) for c in cases]
        if not cases:
            raise ValueError("no training cases given")
        if batch_size < 1 or draws_per_case < 1:
            raise ValueError("batch_size and draws_per_case must be >= 1")
        super().__init__(cases, batch_size, num_workers)
        self.patch_size: Shape3 = tuple(int(v) for v in patch_size)  # type: ignore[assignment]
        self.extraction: Shape3 = tuple(int(v) for v in (extraction or patch_size))  # type: ignore[assignment]
        if any(e < p or (e - p) % 2 for e, p in zip(self.extraction, self.patch_size, strict=True)):
            raise ValueError(f"extraction {self.extraction} must be >= patch {self.patch_size} with even difference")
        self.jitter: Shape3 = tuple(  # type: ignore[assignment]
            int(v) for v in (jitter if jitter is not None else safe_jitter(self.patch_size, None))
        )
        self.small_label = small_label if small_label else None
        self.draws_per_case = draws_per_case
        self.p_small = p_small
        self.p_fore = p_fore
        self.seed = int(seed)
        self.max_points = max_points
        first = np.load(cases[0] + "_image.npy", mmap_mode="r")
        if first.ndim != 4:
            raise ValueError(f"{cases[0]}_image.npy must be (M, z, y, x), got shape {first.shape}")
        self.num_modalities = int(first.shape[0])
        self._info: dict[int, CaseInfo] = {}
        self._warned_no_fg = False
        self._reset_state(0)

    # -- state -------------------------------------------------------------------------------
    def _reset_state(self, thread_id: int) -> None:
        self.rs = np.random.RandomState(np.random.SeedSequence([self.seed, int(thread_id)]).generate_state(1)[0])
        self._order: list[int] = []
        self._current: int | None = None
        self._draws_left = 0
        self._image: np.ndarray | None = None
        self._label: np.ndarray | None = None

    def set_thread_id(self, thread_id: int) -> None:
        """Called by batchgenerators in each worker: reseeds this worker's RandomState."""
        super().set_thread_id(thread_id)
        self._reset_state(thread_id)

    def case_info(self, index: int) -> CaseInfo:
        """Cached :class:`CaseInfo` of case ``index`` (scans its label on first use)."""
        info = self._info.get(index)
        if info is None:
            label = np.load(self._data[index] + "_label.npy", mmap_mode="r")
            info = compute_case_info(label, self.small_label, self.max_points)
            self._info[index] = info
        return info

    def _advance_case(self) -> None:
        if not self._order:
            self._order = list(self.rs.permutation(len(self._data)))
        self._current = int(self._order.pop(0))
        self._draws_left = self.draws_per_case
        path = self._data[self._current]
        self._image = np.load(path + "_image.npy", mmap_mode="r")
        self._label = np.load(path + "_label.npy", mmap_mode="r")
        if self._image.shape[1:] != self._label.shape or self._image.shape[0] != self.num_modalities:
            raise ValueError(f"{path}: image {self._image.shape} and label {self._label.shape} do not match")

    def _next_draw(self, require_fg: bool) -> tuple[int, bool]:
        """Move to the case of the next draw; returns ``(case index, has_foreground)``."""
        for _ in range(len(self._data) + 1):
            if self._draws_left <= 0 or self._current is None:
                self._advance_case()
            assert self._current is not None
            has_fg = self.case_info(self._current).fore_bbox is not None
            if has_fg or not require_fg:
                break
            self._draws_left = 0  # skip a case without foreground for a must-hold-foreground sample
        else:
            if not self._warned_no_fg:
                warnings.warn("no training case has foreground; using 'any' patches", stacklevel=2)
                self._warned_no_fg = True
        assert self._current is not None
        self._draws_left -= 1
        return self._current, self.case_info(self._current).fore_bbox is not None

    # -- sampling ------------------------------------------------------------------------------
    def _choose_kind(self, u: float, require_fg: bool, info: CaseInfo) -> str:
        has_small = info.small_bbox is not None
        has_fore = info.fore_bbox is not None
        if require_fg:
            if u < self.p_small and has_small:
                return "small"
            return "fore" if has_fore else "any"
        if u < self.p_small:
            return "small" if has_small else "any"
        if u >= 1.0 - self.p_fore:
            return "fore" if has_fore else "any"
        return "any"

    def _centre(self, kind: str, info: CaseInfo) -> np.ndarray:
        """Patch centre ``(3,)``; the task patch starts at ``centre - patch // 2``."""
        shape = np.asarray(info.shape)
        patch = np.asarray(self.patch_size)
        if kind == "any":
            free = shape - patch  # start range [0, free] (or [free, 0] if the volume is smaller)
            lo, hi = np.minimum(free, 0), np.maximum(free, 0)
            start = np.array([self.rs.randint(a, b + 1) for a, b in zip(lo, hi, strict=True)])
            return start + patch // 2
        points, bbox = (
            (info.small_points, info.small_bbox) if kind == "small" else (info.fore_points, info.fore_bbox)
        )
        assert bbox is not None
        anchor = points[self.rs.randint(len(points))].astype(np.int64)
        jit = np.array([self.rs.randint(-j, j + 1) for j in self.jitter])
        return np.clip(anchor + jit, bbox[:, 0], bbox[:, 1])

    def generate_train_batch(self) -> dict[str, Any]:
        b_size, ext = self.batch_size, self.extraction
        data = np.zeros((b_size, self.num_modalities, *ext), dtype=np.float32)
        seg = np.zeros((b_size, 1, *ext), dtype=np.float32)
        kinds: list[str] = []
        case_ids: list[str] = []
        n_fg = num_foreground_samples(b_size)
        half_ext = np.asarray(ext) // 2
        for b in range(b_size):
            u = float(self.rs.random_sample())
            idx, _ = self._next_draw(require_fg=b < n_fg)
            info = self.case_info(idx)
            kind = self._choose_kind(u, b < n_fg, info)
            start = self._centre(kind, info) - half_ext
            assert self._image is not None and self._label is not None
            extract_patch(self._image, start, ext, out=data[b])
            extract_patch(self._label, start, ext, out=seg[b, 0])
            kinds.append(kind)
            case_ids.append(case_id_of(self._data[idx]))
        return {
            "data": data,
            "seg": seg,
            "kinds": kinds,
            "case_ids": case_ids,
            "aug_seed": int(self.rs.randint(0, 2**31 - 1)),
        }


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
class MirrorAxesTransform(AbstractTransform):
    """Per sample, with probability ``p_per_sample``, flip data and seg along ALL of ``axes``.

    ``axes`` are spatial axes of ``(b, c, z, y, x)``: 0 = z, 1 = y, 2 = x. (batchgenerators'
    ``MirrorTransform`` flips each axis with an extra fixed probability 0.5, so its effective
    probability would be ``0.5 * p_per_sample``.) Uses numpy's global RNG like batchgenerators.
    """

    def __init__(self, axes: Sequence[int] = (2,), p_per_sample: float = 0.3,
                 data_key: str = "data", label_key: str = "seg") -> None:
        self.axes = tuple(int(a) for a in axes)
        self.p_per_sample = p_per_sample
        self.data_key = data_key
        self.label_key = label_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict[self.data_key]
        seg = data_dict.get(self.label_key)
        flip_axes = tuple(a + 1 for a in self.axes)  # axes of one sample (c, z, y, x)
        for b in range(len(data)):
            if np.random.uniform() < self.p_per_sample:
                data[b] = np.flip(data[b], axis=flip_axes)
                if seg is not None:
                    seg[b] = np.flip(seg[b], axis=flip_axes)
        return data_dict


class UnifiedPatchResize(ResizeTransform):
    """Resize the task patch to the model patch (shared/universal modes).

    data: ``(B, M, *task_patch)`` -> ``(B, M, *model_patch)`` with ``skimage.transform.resize`` order 3;
    seg: nearest (order 0), returned as float32 like the rest of the pipeline.
    """

    def __init__(self, model_patch: Sequence[int], order: int = 3, order_seg: int = 0) -> None:
        super().__init__([int(v) for v in model_patch], order=order, order_seg=order_seg)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data_dict = super().__call__(**data_dict)
        data_dict[self.data_key] = data_dict[self.data_key].astype(np.float32, copy=False)
        if data_dict.get(self.label_key) is not None:
            data_dict[self.label_key] = data_dict[self.label_key].astype(np.float32, copy=False)
        return data_dict


class SeededCompose(AbstractTransform):
    """Compose that runs its transforms under numpy's global RNG seeded from ``data_dict[seed_key]``.

    The previous global RNG state is restored afterwards, so nothing outside is affected and the
    augmentation is determined by the loader's per-worker RandomState (which drew ``seed_key``). Without
    ``seed_key`` in the batch the transforms use the global RNG as is.
    """

    def __init__(self, transforms: Sequence[AbstractTransform], seed_key: str = "aug_seed") -> None:
        self.transforms = list(transforms)
        self.seed_key = seed_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        seed = data_dict.pop(self.seed_key, None)
        if seed is None:
            for t in self.transforms:
                data_dict = t(**data_dict)
            return data_dict
        saved = np.random.get_state()
        np.random.seed(int(seed))
        try:
            for t in self.transforms:
                data_dict = t(**data_dict)
        finally:
            np.random.set_state(saved)
        return data_dict

    def __repr__(self) -> str:
        return f"SeededCompose({self.transforms!r})"


def make_transforms(
    patch_size: Sequence[int],
    *,
    aug: AugmentParams | None = None,
    model_patch: Sequence[int] | None = None,
    to_tensor: bool = True,
) -> SeededCompose:
    """Transform pipeline: [SpatialTransform, MirrorAxesTransform] (if ``aug``), UnifiedPatchResize (if
    ``model_patch`` differs from ``patch_size``), NumpyToTensor (if ``to_tensor``)."""
    ts: list[AbstractTransform] = []
    patch = [int(v) for v in patch_size]
    if aug is not None:
        ts.append(
            SpatialTransform(
                patch,
                patch_center_dist_from_border=[p // 2 for p in patch],  # unused with random_crop=False
                do_elastic_deform=aug.p_elastic > 0,
                alpha=aug.alpha,
                sigma=aug.sigma,
                do_rotation=aug.p_rotation > 0,
                angle_x=aug.angle,  # about array axis 0 (see module docstring)
                angle_y=(0.0, 0.0),
                angle_z=(0.0, 0.0),
                do_scale=aug.p_scale > 0,
                scale=aug.scale,
                border_mode_data="constant",
                border_cval_data=0,
                order_data=aug.order_data,
                border_mode_seg="constant",
                border_cval_seg=0,
                order_seg=aug.order_seg,
                random_crop=False,
                p_el_per_sample=aug.p_elastic,
                p_scale_per_sample=aug.p_scale,
                p_rot_per_sample=aug.p_rotation,
            )
        )
        if aug.p_mirror > 0 and aug.mirror_axes:
            ts.append(MirrorAxesTransform(aug.mirror_axes, aug.p_mirror))
    if model_patch is not None and [int(v) for v in model_patch] != patch:
        ts.append(UnifiedPatchResize(model_patch))
    if to_tensor:
        ts.append(NumpyToTensor(keys=["data", "seg"], cast_to="float"))
    return SeededCompose(ts)


# ----------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------
class SingleThreadedLoader(SingleThreadedAugmenter):
    """``SingleThreadedAugmenter`` (debug mode, no worker process) with the ``_finish()`` /
    ``restart()`` interface of ``MultiThreadedAugmenter``."""

    def _finish(self, timeout: float = 10, force: bool = False) -> None:
        return None

    def restart(self) -> None:
        return None


class TensorMultiThreadedAugmenter(MultiThreadedAugmenter):
    """``MultiThreadedAugmenter`` whose batches are converted to torch tensors in the MAIN process.

    Worker processes send numpy arrays (plain pickles through the queue). Sending torch tensors from the
    workers would go through torch's shared-memory file-descriptor passing, which fails noisily when
    ``_finish()`` stops a worker while the results thread is still receiving its batch
    (``FileNotFoundError`` in ``resource_sharer``) and holds one descriptor per tensor in flight.
    ``torch.from_numpy`` here is zero-copy.
    """

    def __init__(self, *args: Any, to_tensor: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._to_tensor = NumpyToTensor(keys=["data", "seg"], cast_to="float") if to_tensor else None

    def __next__(self) -> dict[str, Any]:
        item = super().__next__()
        if self._to_tensor is not None:
            item = self._to_tensor(**item)
        return item


def _load_plans(plans: Mapping[str, Any] | str | os.PathLike[str]) -> Mapping[str, Any]:
    if isinstance(plans, Mapping):
        return plans
    with open(plans) as f:
        return json.load(f)


def make_train_loader(
    cases: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    plans: Mapping[str, Any] | str | os.PathLike[str],
    batch_size: int,
    *,
    model_patch: Sequence[int] | None = None,
    num_workers: int = 0,
    seed: int = 1993,
    augment: bool | AugmentParams = True,
    context: bool = True,
    draws_per_case: int = 2,
    num_cached_per_queue: int = 2,
    to_tensor: bool = True,
) -> Iterator[dict[str, Any]]:
    """Training batch iterator for one task.

    Args:
        cases: a case prefix list (:func:`list_cases`), a task folder ``prepData/<Task>`` (its
            ``train`` split) or a split folder holding ``<case>_image.npy`` files.
        plans: the task's ``plans.json`` content or path (uses ``patch_size`` and ``small_label``).
        batch_size: B.
        model_patch: model patch ``(z, y, x)`` of shared/universal training (e.g. ``(128, 128, 128)``);
            patches are resized to it. None: batches have the task patch size.
        num_workers: 0 -> :class:`SingleThreadedLoader` (in-process, debug); > 0 ->
            :class:`TensorMultiThreadedAugmenter` (a ``MultiThreadedAugmenter``) with that many worker
            processes, ``num_cached_per_queue`` batches per worker queue and worker seeds ``seed + i``;
            tensors are made in the main process.
        seed: base seed (worker ``i``'s loader uses ``(seed, i)``).
        augment: True (preset :class:`AugmentParams`), False (none) or custom :class:`AugmentParams`.
        context: when augmenting, cut a larger region so rotated/scaled patches show real image content
            (:func:`extraction_size`); False: cut the task patch only (corners fill with 0).
        draws_per_case: samples per loaded case (2).
        to_tensor: end with ``NumpyToTensor`` (float tensors).

    Returns:
        Infinite iterator of ``{"data": (B, M, *P), "seg": (B, 1, *P), "kinds", "case_ids"}`` with
        ``P = model_patch or plans["patch_size"]``; call ``._finish()`` to stop worker processes.
    """
    p = _load_plans(plans)
    patch = tuple(int(v) for v in p["patch_size"])
    if isinstance(cases, (str, os.PathLike)):
        root = Path(cases)
        if (root / "train").is_dir():
            case_list: list[str] = list_cases(root, "train")
        else:
            case_list = list_cases(root.parent, root.name)
    else:
        case_list = [str(c) for c in cases]
    aug: AugmentParams | None
    if augment is True:
        aug = AugmentParams()
    elif augment is False:
        aug = None
    else:
        aug = augment
    small = p.get("small_label")
    loader = PatchLoader(
        case_list,
        patch,
        batch_size,
        small_label=int(small) if small is not None else None,
        extraction=extraction_size(patch, aug if context else None),
        jitter=safe_jitter(patch, aug),
        draws_per_case=draws_per_case,
        seed=seed,
        num_workers=max(num_workers, 1),
    )
    if num_workers <= 0:
        transforms = make_transforms(patch, aug=aug, model_patch=model_patch, to_tensor=to_tensor)
        return SingleThreadedLoader(loader, transforms)
    return TensorMultiThreadedAugmenter(
        loader,
        make_transforms(patch, aug=aug, model_patch=model_patch, to_tensor=False),
        num_processes=num_workers,
        num_cached_per_queue=num_cached_per_queue,
        seeds=[seed + i for i in range(num_workers)],
        pin_memory=False,
        to_tensor=to_tensor,
    )
