"""How a case is segmented: the single settings object of the inference stage.

``predict.py`` builds one from its flags, training's validation from the run's settings; both hand
it to :class:`inference.predictor.Segmenter`. The defaults are the paper preset
(``docs/paper_preset.md``, "Inference and evaluation").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from models.runtime import AMP_MODES

WeightMode = Literal["linear", "gaussian", "constant"]
UnifiedMode = Literal["volume", "patch"]
BlendMode = Literal["logits", "probabilities"]
VolumeResize = Literal["cubic", "trilinear"]
AccumDtype = Literal["float32", "float16"]

WEIGHT_MODES: tuple[str, ...] = get_args(WeightMode)
UNIFIED_MODES: tuple[str, ...] = get_args(UnifiedMode)
BLEND_MODES: tuple[str, ...] = get_args(BlendMode)
VOLUME_RESIZES: tuple[str, ...] = get_args(VolumeResize)
ACCUM_DTYPES: tuple[str, ...] = get_args(AccumDtype)


@dataclass(frozen=True)
class InferenceSettings:
    """Every knob of sliding-window inference (defaults = the paper preset).

    Attributes:
        step_fraction: window step as a fraction of the patch (0.5 = half a patch).
        weight_mode: patch blending weights (:func:`inference.sliding_window.patch_weight_map`).
        blend: what the weighted windows add up: ``logits`` (the original; labels = argmax of the
            blended logits) or softmax ``probabilities``.
        mirror_tta: average over all mirrorings of ``mirror_axes`` (2**k forward passes).
        mirror_axes: spatial axes (0 = z, 1 = y, 2 = x) mirrored for TTA.
        batch_size: windows per forward pass.
        device: where the network runs (``cpu``, ``cuda``, ``cuda:N``).
        amp: autocast mode, ``off`` (float32, the preset), ``bf16``, ``fp16`` or ``auto``.
        accum_dtype: dtype of the class-score accumulator (``float16`` halves its memory).
        accum_device: where the accumulator lives (CPU by default: bounded GPU memory).
        unified_mode: shared/universal models whose model patch differs from the task patch:
            ``volume`` scales the whole case (paper), ``patch`` resizes every window.
        volume_resize: how ``unified_mode="volume"`` scales the case: ``cubic`` (the original, the
            same function as training's patch resize) or ``trilinear``.
        postprocess: apply the task's post-processing (:mod:`inference.postprocess`).
        progress: show a progress bar over the windows.
    """

    step_fraction: float = 0.5
    weight_mode: WeightMode = "linear"
    blend: BlendMode = "logits"
    mirror_tta: bool = False
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 2
    device: str = "cpu"
    amp: str = "off"
    accum_dtype: AccumDtype = "float32"
    accum_device: str = "cpu"
    unified_mode: UnifiedMode = "volume"
    volume_resize: VolumeResize = "cubic"
    postprocess: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.step_fraction <= 1.0:
            raise ValueError(f"step_fraction must be in (0, 1], got {self.step_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {self.weight_mode!r}")
        if self.unified_mode not in UNIFIED_MODES:
            raise ValueError(f"unified_mode must be one of {UNIFIED_MODES}, got {self.unified_mode!r}")
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {self.blend!r}")
        if self.volume_resize not in VOLUME_RESIZES:
            raise ValueError(f"volume_resize must be one of {VOLUME_RESIZES}, got {self.volume_resize!r}")
        if self.accum_dtype not in ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be one of {ACCUM_DTYPES}, got {self.accum_dtype!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        axes = tuple(int(a) for a in self.mirror_axes)
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"mirror_axes must be spatial axes 0, 1, 2 (z, y, x), got {self.mirror_axes}")
        object.__setattr__(self, "mirror_axes", axes)

    @property
    def torch_accum_dtype(self) -> torch.dtype:
        return torch.float16 if self.accum_dtype == "float16" else torch.float32
