"""The training batch loader of one task: sampling + augmentation, in worker processes or in-process.

:class:`TrainLoader` is an infinite iterator of batches
``{"data": float32 tensor (B, M, *P), "seg": float32 tensor (B, 1, *P), "kinds": list[str],
"case_ids": list[str]}`` with ``P`` the model patch (shared/universal; patches are resized to it) or
the task patch. Each batch is cut and augmented sample by sample by a
:class:`training.sampling.PatchSampler` (with a :class:`training.augmentation.SampleAugmenter`), then
resized to the model patch (:class:`training.augmentation.UnifiedPatchResize`). Batches also carry
``"aug_retries"`` and ``"aug_fallbacks"``: how often an augmentation was drawn again because the
patch lost its structure, and how often a plain crop was used after ``max_tries`` draws.

With ``num_workers > 0`` the work runs in that many worker processes of a
``torch.utils.data.DataLoader`` (an iterable stream per worker, batches taken from the workers in
turn, ``prefetch`` batches queued per worker, optional pinned memory). Worker ``i`` seeds its
sampler from ``(seed, i)``, so the stream of batches depends only on ``seed`` and ``num_workers``;
``num_workers=0`` (in-process) gives the same stream as ``num_workers=1``.

Call :meth:`TrainLoader.close` (or use it as a context manager) to stop the worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.augmentation import (
    AugmentParams,
    SampleAugmenter,
    UnifiedPatchResize,
    extraction_size,
    safe_jitter,
)
from training.composed_augment import ComposedAugmenter
from training.device_augment import resample_batch
from training.sampling import CaseInfo, PatchSampler
from utils.task_settings import patch_kind_probs
from utils.triples import int3

__all__ = ["TrainLoader"]

Batch = dict[str, Any]


class _BatchStream(IterableDataset[Batch]):
    """Endless augmented batches of one sampler; in a DataLoader worker, seeded by the worker id."""

    def __init__(self, sampler_kwargs: Mapping[str, Any], resize: UnifiedPatchResize | None) -> None:
        super().__init__()
        self.sampler_kwargs = dict(sampler_kwargs)
        self.resize = resize

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        sampler = PatchSampler(**self.sampler_kwargs, worker_id=info.id if info is not None else 0)
        while True:
            batch = sampler.next_batch()
            if self.resize is not None:
                batch = self.resize(**batch)
            if isinstance(batch["data"], np.ndarray):  # else: the GPU path's plans (tensors inside)
                batch["data"] = torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32))
            batch["seg"] = torch.from_numpy(np.ascontiguousarray(batch["seg"], dtype=np.float32))
            yield batch


class TrainLoader:
    """Infinite iterator of augmented training batches of one task.

    Args:
        cases: case prefix paths ``prepData/<Task>/train/<case>`` (:func:`utils.preprocessing.list_cases`).
        plans: the task's plans (uses ``patch_size``, ``small_label`` and the patch-kind probabilities
            ``small_prob``/``fore_prob``, :func:`utils.task_settings.patch_kind_probs`).
        batch_size: B.
        model_patch: model patch ``(z, y, x)`` of shared/universal training; patches are resized to
            it. None: batches have the task patch size.
        num_workers: worker processes (0: everything in this process, for debugging).
        seed: base seed of the samplers (worker ``i`` uses ``(seed, i)``).
        augment: True (the preset's :class:`AugmentParams`), False (none) or custom parameters.
        centre_mode: how "fore"/"small" centres are drawn, ``"original"`` (redraws) or ``"safe"``
            (:class:`training.sampling.PatchSampler`).
        centre_voxels: the structure voxels those centres are drawn around: ``"all"`` (uniform over
            every voxel, the original) or ``"subset"`` (:class:`training.sampling.PatchSampler`).
        kind_probs: ``(p_small, p_fore)`` instead of the plans' (``--kind_probs``).
        case_info: the per-case label scans (:func:`training.sampling.compute_case_info`, by index
            into ``cases``), computed once per run and handed to every epoch's loader and worker.
        context: when augmenting, cut a larger region so rotated/scaled patches show real image
            content (:func:`training.augmentation.extraction_size`); False: the task patch only.
        draws_per_case: samples per loaded case (2 in the preset).
        prefetch: batches queued per worker.
        pin_memory: page-lock the batches (faster host-to-GPU copies).
        pipeline: ``"two_step"`` (the preset: augment at the task patch, then resize) or
            ``"composed"`` (one interpolation per sample at the model patch,
            :class:`training.composed_augment.ComposedAugmenter`).
        augment_device: resample the images on this device (``--augment_device cuda``,
            :mod:`training.device_augment`): the workers draw the transforms and make the labels, and
            this loader's ``next`` resamples the images there (``"data"`` is then on that device).
            None: everything in the workers (CPU).
    """

    def __init__(
        self,
        cases: Sequence[str | os.PathLike[str]],
        plans: Mapping[str, Any],
        batch_size: int,
        *,
        model_patch: Sequence[int] | None = None,
        num_workers: int = 0,
        seed: int = 1993,
        augment: bool | AugmentParams = True,
        case_info: Mapping[int, CaseInfo] | None = None,
        centre_mode: str = "original",
        centre_voxels: str = "all",
        kind_probs: Sequence[float] | None = None,
        context: bool = True,
        draws_per_case: int = 2,
        prefetch: int = 2,
        pin_memory: bool = False,
        pipeline: str = "two_step",
        augment_device: torch.device | None = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        patch = int3(plans["patch_size"])
        aug: AugmentParams | None
        if isinstance(augment, AugmentParams):
            aug = augment
        else:
            aug = AugmentParams() if augment else None
        if pipeline not in ("two_step", "composed"):
            raise ValueError(f"pipeline must be 'two_step' or 'composed', got {pipeline!r}")
        small = plans.get("small_label")
        p_small, p_fore = (
            (float(v) for v in kind_probs) if kind_probs is not None else patch_kind_probs(plans)
        )
        out = int3(model_patch) if model_patch is not None else patch
        augmenter: Any = SampleAugmenter(patch, aug) if aug is not None else None
        finish: Any = None
        if augment_device is not None or pipeline == "composed":
            composed = ComposedAugmenter(patch, out, aug or AugmentParams())
            if augment_device is not None:
                augmenter = composed.plan if aug is not None else None
                finish = composed.plan_resize
            else:
                augmenter = composed if aug is not None else None
                finish = composed.resize
        sampler_kwargs = dict(
            cases=[str(c) for c in cases],
            patch_size=patch,
            batch_size=batch_size,
            small_label=int(small) if small is not None else None,
            extraction=extraction_size(patch, aug if context else None),
            augmenter=augmenter,
            output_size=out if finish is not None else patch,
            finish=finish,
            centre_mode=centre_mode,
            centre_voxels=centre_voxels,
            p_small=p_small,
            p_fore=p_fore,
            jitter=safe_jitter(patch, aug),
            draws_per_case=draws_per_case,
            seed=seed,
            case_info=case_info,
        )
        resize = (
            UnifiedPatchResize(model_patch)
            if model_patch is not None and int3(model_patch) != patch and finish is None
            else None
        )
        stream = _BatchStream(sampler_kwargs, resize)
        self.num_workers = num_workers
        self.augment_device = augment_device
        self._iterator: Iterator[Batch] | None
        if num_workers == 0:
            self._iterator = iter(stream)
        else:
            loader = DataLoader(
                stream,
                batch_size=None,
                num_workers=num_workers,
                prefetch_factor=prefetch,
                pin_memory=pin_memory,
            )
            self._iterator = iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise RuntimeError("this TrainLoader is closed")
        batch = next(self._iterator)
        if self.augment_device is not None:
            batch["data"] = resample_batch(batch["data"], self.augment_device)
        return batch

    def close(self) -> None:
        """Stop the worker processes (idempotent). Dropping the DataLoader's iterator, its only
        reference, shuts its workers down and joins them."""
        self._iterator = None

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
