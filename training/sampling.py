"""Training patch sampling for one task: which case, which centre, which kind of patch.

Reads the preprocessed training cases of ONE task (``prepData/<Task>/train/<case>_image.npy``
``(M, z, y, x)`` float32 and ``<case>_label.npy`` ``(z, y, x)`` uint8, see ``docs/formats.md``) with
``np.load(mmap_mode="r")`` and makes batches of task patches, each augmented by a
:class:`training.augmentation.SampleAugmenter` (sampling and augmentation meet here because a
"fore"/"small" patch whose augmentation lost the structure is drawn again).

Sampling (paper preset, ``docs/paper_preset.md``, "Patch sampling"):

* Cases are visited in shuffled order (a new permutation each pass); each loaded case gives
  ``draws_per_case = 2`` consecutive samples.
* Patch kinds: ``"any"`` (random centre), ``"fore"`` (centre near a foreground voxel) and ``"small"``
  (centre near a voxel of ``plans["small_label"]``); the centre rules of both modes are in
  :class:`PatchSampler`.
* Batch composition (:func:`choose_kind`, the original's ``tb_load.gen_batch``): one uniform number
  ``u`` per sample; the first ``min(B, ceil(B/3) + 1)`` samples must hold foreground: ``"small"`` when
  ``u < p_small`` and the case has that label, else ``"fore"`` (a case without any foreground is
  skipped for these samples). The others are ``"small"`` when ``u < p_small`` and the case has it,
  else ``"fore"`` when ``1 - u < p_fore`` and the case has foreground, else ``"any"``. ``p_small`` and
  ``p_fore`` are the task's (plans keys ``small_prob``/``fore_prob``: 0.3 / 0.3, Task09_Spleen 0 / 0,
  :func:`utils.task_settings.patch_kind_probs`). ``kinds`` reports the kind actually used.
* Structure voxels (``centre_voxels``): ``"all"`` (the preset, as the original's ``np.where`` +
  ``np.random.choice``) draws ``k`` uniformly among ALL the structure's voxels and finds the ``k``-th
  in raster order from per-slice cumulative counts (:func:`structure_voxel`: one label slice read per
  draw, no voxel list kept); ``"subset"`` draws from a cached, evenly spaced subset of at most
  ``max_points`` voxels. Per case the bounding boxes, per-slice counts and subsets are computed ONCE
  from the label array (:func:`compute_case_info`); pass them in (``case_info``) to avoid the scan.
* Patches are cut with zero padding (image 0, label 0) where they leave the volume.

Randomness: one ``np.random.RandomState`` per sampler, seeded from ``(seed, worker id)``; the
augmentation's draws come from numpy's global RNG seeded per batch from it
(:func:`training.augmentation.seeded_global_rng`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

import numpy as np

from training.augmentation import safe_jitter, seeded_global_rng
from utils.preprocessing import case_id_of
from utils.triples import Int3, int3

__all__ = [
    "CENTRE_VOXELS",
    "KINDS",
    "CaseInfo",
    "PatchSampler",
    "choose_kind",
    "compute_case_info",
    "extract_patch",
    "num_foreground_samples",
    "original_centre",
    "structure_voxel",
]


KINDS = ("any", "fore", "small")
#: how "fore"/"small" centres are drawn (see :class:`PatchSampler`)
CENTRE_MODES = ("original", "safe")
#: which voxels of the structure a "fore"/"small" centre is drawn around (see :class:`PatchSampler`)
CENTRE_VOXELS = ("all", "subset")


def num_foreground_samples(batch_size: int) -> int:
    """Samples at the start of a batch that must hold foreground: ``min(B, ceil(B/3) + 1)``."""
    return min(batch_size, math.ceil(batch_size / 3) + 1)


def choose_kind(
    u: float, require_fg: bool, has_fore: bool, has_small: bool, p_small: float, p_fore: float
) -> str:
    """The kind of one sample from its uniform number ``u`` (the original's ``tb_load.gen_batch``).

    "small" when ``u < p_small`` and the case has the small structure; otherwise, for a sample that
    must hold foreground, "fore" (a case without foreground gets "any": the sampler skips such cases
    for these samples); for the others "fore" when ``1 - u < p_fore`` (computed as the original did,
    so ``u`` on the border decides alike) and the case has foreground, else "any".
    """
    if u < p_small and has_small:
        return "small"
    if require_fg:
        return "fore" if has_fore else "any"
    if 1.0 - u < p_fore and has_fore:
        return "fore"
    return "any"


def structure_voxel(label: np.ndarray, cumcount: np.ndarray, k: int, value: int | None) -> np.ndarray:
    """The ``k``-th voxel, in raster (C) order, of a structure of ``label`` ``(z, y, x)``: the voxels
    ``> 0`` (``value`` None, "fore") or ``== value`` ("small"); the original's ``np.where(...)[k]``.

    ``cumcount`` ``(z,)``: cumulative per-slice voxel counts of that structure (:class:`CaseInfo`);
    only slice ``z`` of ``label`` (e.g. a memory map) is read. Returns ``(3,)`` int64 ``(z, y, x)``.
    """
    total = int(cumcount[-1]) if len(cumcount) else 0
    if not 0 <= k < total:
        raise IndexError(f"voxel {k} of a structure of {total}")
    z = int(np.searchsorted(cumcount, k, side="right"))
    before = int(cumcount[z - 1]) if z else 0
    plane = np.asarray(label[z])
    mask = plane > 0 if value is None else plane == value
    flat = int(np.flatnonzero(mask)[k - before])
    return np.array([z, flat // plane.shape[1], flat % plane.shape[1]], dtype=np.int64)


def original_centre(
    rs: np.random.RandomState, shape: Sequence[int], patch: Sequence[int], voxel: np.ndarray | None = None
) -> np.ndarray:
    """The original's patch centre (its ``cc_augment`` with ``random_crop``), ``(3,)`` int64 in the
    voxel coordinates of the volume of ``shape``; the patch starts at ``centre - patch // 2``.

    The volume is padded symmetrically (``ceil(pad / 2)`` per side, its ``pad2gePatch``) to at least
    the patch. Without ``voxel`` ("any"): per axis a centre in ``[p//2, padded - p//2)``; with the
    structure ``voxel`` ("fore"/"small", unpadded coordinates): a centre within ``p/2 - 1`` of it and
    in ``[p//2 - 1, padded - (p//2 - 1))``. Per axis one ``rs.randint(lo, hi)`` when ``hi > lo``
    (even when that range holds one value), else ``lo``: the original's draws, number for number.
    """
    shp = np.asarray(shape, dtype=np.int64)
    size = np.asarray(patch, dtype=np.int64)
    before = np.ceil(np.maximum(size - shp, 0) / 2).astype(np.int64)
    padded = shp + 2 * before
    half = size // 2
    centre = np.empty(3, dtype=np.int64)
    if voxel is None:
        for d in range(3):
            lo, hi = int(half[d]), int(padded[d] - half[d])
            centre[d] = lo if hi <= lo else rs.randint(lo, hi)
        return centre - before
    at = np.asarray(voxel, dtype=np.int64) + before
    for d in range(3):
        reach = size[d] / 2 - 1
        lo = int(max(half[d] - 1, at[d] - reach))
        hi = int(min(at[d] + reach, padded[d] - (half[d] - 1)))
        centre[d] = lo if hi <= lo else rs.randint(lo, hi)
    return centre - before


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
    src: list[EllipsisType | slice] = [Ellipsis]  # index (..., z, y, x) of the overlap in array
    dst: list[EllipsisType | slice] = [Ellipsis]  # and in out
    for st, sz, dim in zip(start, size, array.shape[-3:], strict=True):
        lo, hi = max(int(st), 0), min(int(st) + int(sz), dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(st), hi - int(st)))
    out[tuple(dst)] = array[tuple(src)]
    return out


@dataclass(frozen=True)
class CaseInfo:
    """Per-case sampling information, computed once from the label array.

    Attributes:
        shape: ``(z, y, x)`` of the case.
        fore_bbox: ``(3, 2)`` inclusive ``[min, max]`` voxel of the foreground (label > 0), or None.
        small_bbox: same for the small structure (label == small_label), or None.
        fore_points: ``(K, 3)`` int32 evenly spaced subset (raster order) of the foreground voxels.
        small_points: ``(K', 3)`` int32 subset of the small-structure voxels.
        fore_cumcount: ``(z,)`` int64 cumulative count of foreground voxels per z slice (its last
            value is the total), for uniform draws over all voxels (:func:`structure_voxel`).
        small_cumcount: ``(z,)`` the same for the small structure.
    """

    shape: Int3
    fore_bbox: np.ndarray | None
    small_bbox: np.ndarray | None
    fore_points: np.ndarray
    small_points: np.ndarray
    fore_cumcount: np.ndarray
    small_cumcount: np.ndarray


def _subset(coords: np.ndarray, max_points: int) -> np.ndarray:
    if len(coords) > max_points:
        coords = coords[np.linspace(0, len(coords) - 1, max_points).round().astype(np.int64)]
    return np.ascontiguousarray(coords, dtype=np.int32)


def _bbox(coords: np.ndarray) -> np.ndarray | None:
    if len(coords) == 0:
        return None
    return np.stack([coords.min(axis=0), coords.max(axis=0)], axis=1).astype(np.int64)


def compute_case_info(label: np.ndarray, small_label: int | None, max_points: int = 2048) -> CaseInfo:
    """Scan a label volume ``(z, y, x)`` once: bounding boxes, voxel subsets and per-slice counts (see
    :class:`CaseInfo`)."""
    lab = np.asarray(label)
    nz = np.nonzero(lab)
    fore = np.stack(nz, axis=1) if len(nz[0]) else np.zeros((0, 3), np.int64)
    if small_label is not None and small_label > 0 and len(fore):
        small = fore[lab[nz] == small_label]
    else:
        small = np.zeros((0, 3), np.int64)
    depth = int(lab.shape[0])
    return CaseInfo(
        shape=(depth, int(lab.shape[1]), int(lab.shape[2])),
        fore_bbox=_bbox(fore),
        small_bbox=_bbox(small),
        fore_points=_subset(fore, max_points),
        small_points=_subset(small, max_points),
        fore_cumcount=np.cumsum(np.bincount(fore[:, 0], minlength=depth)).astype(np.int64),
        small_cumcount=np.cumsum(np.bincount(small[:, 0], minlength=depth)).astype(np.int64),
    )


class PatchSampler:
    """Infinite patch sampler over the training cases of one task.

    :meth:`next_batch` returns ``{"data": float32 (B, M, *patch), "seg": float32 (B, 1, *patch),
    "kinds": list[str], "case_ids": list[str], "aug_retries": int, "aug_fallbacks": int}``: the
    augmented task patches (``augmenter`` given) or plain crops.

    Centres (``centre_mode``; docs/paper_preset.md, "Patch sampling"):

    * ``"original"`` (the preset, :func:`original_centre`): in the volume zero-padded (symmetrically)
      to at least the patch, "any" draws a centre so that the patch lies inside (a smaller volume sits
      in the middle); "fore"/"small" pick a random voxel of the structure and a centre up to
      ``patch/2 - 1`` voxels away from it (kept inside). With augmentation, a "fore"/"small" patch that lost its structure
      (or any patch that holds no image at all) is drawn again — new voxel, new centre, new
      augmentation — up to ``max_tries`` times, then cut without augmentation (``aug_retries`` and
      ``aug_fallbacks`` count both).
    * ``"safe"``: "any" centres anywhere the patch fits; "fore"/"small" centres a structure voxel
      plus a jitter of at most ``jitter`` (small enough that the voxel survives any augmentation:
      :func:`training.augmentation.safe_jitter`), clipped to the structure's bounding box; no redraws.

    Args:
        cases: case prefix paths ``.../train/<case>`` (see :func:`utils.preprocessing.list_cases`).
        patch_size: task patch ``(z, y, x)``.
        batch_size: B.
        small_label: label of the smallest structure (``plans["small_label"]``); None/0: no "small".
        extraction: region cut around each centre before augmentation; default ``patch_size``.
        augmenter: per-sample augmentation (:class:`training.augmentation.SampleAugmenter`) or None.
        centre_mode: ``"original"`` or ``"safe"`` (above).
        jitter: "safe" mode's largest centre offset; default ``patch // 2 - 1``.
        max_tries: "original" mode's augmented draws per sample before a plain crop (10).
        draws_per_case: samples drawn from each loaded case (2 in the preset).
        p_small, p_fore: kind probabilities (the task's plans, :func:`utils.task_settings.patch_kind_probs`:
            0.3 / 0.3, Task09_Spleen 0 / 0; see :func:`choose_kind`).
        seed: base seed; with ``worker_id`` it seeds ``RandomState(SeedSequence([seed, worker_id]))``.
        worker_id: index of the loader process this sampler runs in (0 in-process).
        case_info: precomputed :class:`CaseInfo` per case index (e.g. shared by every epoch's
            sampler); cases missing from it are scanned on first use.
        centre_voxels: the structure voxel a "fore"/"small" centre is drawn around: ``"all"`` (the
            preset: uniform over every voxel of the structure, :func:`structure_voxel`) or
            ``"subset"`` (uniform over the cached evenly spaced subset of ``max_points``).
        max_points: size of the cached structure-voxel subsets per case.
        output_size: size of the samples the augmenter returns (default ``patch_size``); the
            composed pipeline's augmenter returns the model patch
            (:class:`training.composed_augment.ComposedAugmenter`), and then the acceptance test of
            "fore"/"small" patches sees the model-patch sample.
        finish: applied to plain crops (no augmenter, or after ``max_tries``) so that they match the
            augmenter's output (the composed pipeline's resize); None: kept as cut. An augmenter or
            ``finish`` may return, instead of the data array, an object with an ``any()`` method
            (the GPU path's :class:`training.composed_augment.DevicePlan`); ``"data"`` is then the
            list of those objects.
    """

    def __init__(
        self,
        cases: Sequence[str | os.PathLike[str]],
        patch_size: Sequence[int],
        batch_size: int,
        *,
        small_label: int | None = None,
        extraction: Sequence[int] | None = None,
        augmenter: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
        centre_mode: str = "original",
        jitter: Sequence[int] | None = None,
        max_tries: int = 10,
        draws_per_case: int = 2,
        p_small: float = 0.3,
        p_fore: float = 0.3,
        seed: int = 1993,
        worker_id: int = 0,
        case_info: Mapping[int, CaseInfo] | None = None,
        centre_voxels: str = "all",
        max_points: int = 2048,
        output_size: Sequence[int] | None = None,
        finish: Callable[[np.ndarray, np.ndarray], tuple[Any, np.ndarray]] | None = None,
    ) -> None:
        case_paths = [str(c) for c in cases]
        if not case_paths:
            raise ValueError("no training cases given")
        if batch_size < 1 or draws_per_case < 1 or max_tries < 1:
            raise ValueError("batch_size, draws_per_case and max_tries must be >= 1")
        if centre_mode not in CENTRE_MODES:
            raise ValueError(f"centre_mode must be one of {CENTRE_MODES}, got {centre_mode!r}")
        if centre_voxels not in CENTRE_VOXELS:
            raise ValueError(f"centre_voxels must be one of {CENTRE_VOXELS}, got {centre_voxels!r}")
        self.cases = case_paths
        self.batch_size = int(batch_size)
        self.patch_size = int3(patch_size)
        self.extraction = int3(extraction or patch_size)
        if any(e < p or (e - p) % 2 for e, p in zip(self.extraction, self.patch_size, strict=True)):
            raise ValueError(
                f"extraction {self.extraction} must be >= patch {self.patch_size} with even difference"
            )
        self.augmenter = augmenter
        self.centre_mode = centre_mode
        self.centre_voxels = centre_voxels
        self.jitter = int3(jitter if jitter is not None else safe_jitter(self.patch_size, None))
        self.max_tries = int(max_tries)
        self.small_label = small_label if small_label else None
        self.draws_per_case = draws_per_case
        self.p_small = p_small
        self.p_fore = p_fore
        self.seed = int(seed)
        self.max_points = max_points
        self.output_size = int3(output_size or patch_size)
        self.finish = finish
        first = np.load(case_paths[0] + "_image.npy", mmap_mode="r")
        if first.ndim != 4:
            raise ValueError(f"{case_paths[0]}_image.npy must be (M, z, y, x), got shape {first.shape}")
        self.num_modalities = int(first.shape[0])
        self._info: dict[int, CaseInfo] = dict(case_info or {})
        self._warned_no_fg = False
        self.rs = np.random.RandomState(
            np.random.SeedSequence([self.seed, int(worker_id)]).generate_state(1)[0]
        )
        self._order: list[int] = []
        self._current: int | None = None
        self._draws_left = 0
        self._image: np.ndarray | None = None
        self._label: np.ndarray | None = None

    # -- state -------------------------------------------------------------------------------
    def case_info(self, index: int) -> CaseInfo:
        """Cached :class:`CaseInfo` of case ``index`` (scans its label on first use)."""
        info = self._info.get(index)
        if info is None:
            label = np.load(self.cases[index] + "_label.npy", mmap_mode="r")
            info = compute_case_info(label, self.small_label, self.max_points)
            self._info[index] = info
        return info

    def _advance_case(self) -> None:
        if not self._order:
            self._order = list(self.rs.permutation(len(self.cases)))
        self._current = int(self._order.pop(0))
        self._draws_left = self.draws_per_case
        path = self.cases[self._current]
        self._image = np.load(path + "_image.npy", mmap_mode="r")
        self._label = np.load(path + "_label.npy", mmap_mode="r")
        if self._image.shape[1:] != self._label.shape or self._image.shape[0] != self.num_modalities:
            raise ValueError(f"{path}: image {self._image.shape} and label {self._label.shape} do not match")

    def _next_draw(self, require_fg: bool) -> tuple[int, bool]:
        """Move to the case of the next draw; returns ``(case index, has_foreground)``."""
        for _ in range(len(self.cases) + 1):
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
        has_fore, has_small = info.fore_bbox is not None, info.small_bbox is not None
        return choose_kind(u, require_fg, has_fore, has_small, self.p_small, self.p_fore)

    def _structure_voxel(self, kind: str, info: CaseInfo) -> np.ndarray:
        """A random voxel ``(3,)`` of the current case's structure of ``kind`` (see ``centre_voxels``)."""
        if self.centre_voxels == "subset":
            points = info.small_points if kind == "small" else info.fore_points
            return points[self.rs.randint(len(points))].astype(np.int64)
        assert self._label is not None
        cumcount = info.small_cumcount if kind == "small" else info.fore_cumcount
        k = int(self.rs.randint(int(cumcount[-1])))  # the original's np.random.choice(n)
        return structure_voxel(self._label, cumcount, k, self.small_label if kind == "small" else None)

    def _centre(self, kind: str, info: CaseInfo) -> np.ndarray:
        """Patch centre ``(3,)`` in the volume's voxel coordinates; the task patch starts at
        ``centre - patch // 2`` (voxels outside the volume read as zero)."""
        if self.centre_mode == "original":
            return self._centre_original(kind, info)
        shape = np.asarray(info.shape)
        patch = np.asarray(self.patch_size)
        if kind == "any":
            free = shape - patch  # start range [0, free] (or [free, 0] if the volume is smaller)
            lo, hi = np.minimum(free, 0), np.maximum(free, 0)
            start = np.array([self.rs.randint(a, b + 1) for a, b in zip(lo, hi, strict=True)])
            return start + patch // 2
        bbox = info.small_bbox if kind == "small" else info.fore_bbox
        assert bbox is not None
        anchor = self._structure_voxel(kind, info)
        jit = np.array([self.rs.randint(-j, j + 1) for j in self.jitter])
        return np.clip(anchor + jit, bbox[:, 0], bbox[:, 1])

    def _centre_original(self, kind: str, info: CaseInfo) -> np.ndarray:
        """The original's rule (:func:`original_centre`): the structure voxel first, then the centre."""
        voxel = None if kind == "any" else self._structure_voxel(kind, info)
        return original_centre(self.rs, info.shape, self.patch_size, voxel)

    def _holds(self, kind: str, data: np.ndarray, seg: np.ndarray) -> bool:
        """The original's acceptance test of a patch: some image, and the structure of its kind."""
        if not data.any():
            return False
        if kind == "fore":
            return bool((seg > 0).any())
        if kind == "small":
            return bool((seg == self.small_label).any())
        return True

    def _cut(self, centre: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        assert self._image is not None and self._label is not None
        start = centre - np.asarray(size) // 2
        data = extract_patch(self._image, start, size, out=np.zeros((self.num_modalities, *size), np.float32))
        seg = extract_patch(self._label, start, size, out=np.zeros((1, *size), np.float32)[0])
        return data, seg[None]

    def _sample(self, kind: str, info: CaseInfo) -> tuple[Any, np.ndarray, int, bool]:
        """One patch of ``kind``: (data (M, *patch), seg (1, *patch), redraws, fell back to a plain crop)."""
        if self.augmenter is None:
            data, seg = self._plain(self._centre(kind, info))
            return data, seg, 0, False
        tries = self.max_tries if self.centre_mode == "original" else 1
        for attempt in range(tries):
            data, seg = self._cut(self._centre(kind, info), self.extraction)
            data, seg = self.augmenter(data, seg)
            if self.centre_mode != "original" or self._holds(kind, data, seg):
                return data, seg, attempt, False
        data, seg = self._plain(self._centre(kind, info))
        return data, seg, tries, True

    def _plain(self, centre: np.ndarray) -> tuple[Any, np.ndarray]:
        data, seg = self._cut(centre, self.patch_size)
        return self.finish(data, seg) if self.finish is not None else (data, seg)

    def next_batch(self) -> dict[str, Any]:
        b_size, patch = self.batch_size, self.output_size
        samples: list[Any] = []
        seg = np.zeros((b_size, 1, *patch), dtype=np.float32)
        kinds: list[str] = []
        case_ids: list[str] = []
        retries = fallbacks = 0
        n_fg = num_foreground_samples(b_size)
        with seeded_global_rng(int(self.rs.randint(0, 2**31 - 1))):  # the transforms' draws
            for b in range(b_size):
                u = float(self.rs.random_sample())
                idx, _ = self._next_draw(require_fg=b < n_fg)
                info = self.case_info(idx)
                kind = self._choose_kind(u, b < n_fg, info)
                sample, seg[b], redraws, fell_back = self._sample(kind, info)
                samples.append(sample)
                retries += redraws
                fallbacks += int(fell_back)
                kinds.append(kind)
                case_ids.append(case_id_of(self.cases[idx]))
        arrays = all(isinstance(x, np.ndarray) for x in samples)
        return {
            "data": np.stack(samples).astype(np.float32, copy=False) if arrays else samples,
            "seg": seg,
            "kinds": kinds,
            "case_ids": case_ids,
            "aug_retries": retries,
            "aug_fallbacks": fallbacks,
        }
