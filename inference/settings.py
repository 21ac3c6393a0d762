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

WeightMode = Literal["linear", "linear_symmetric", "gaussian", "constant"]
WindowCount = Literal["original", "once"]
PadMode = Literal["ceil_both", "exact"]
UnifiedMode = Literal["volume", "patch"]
VolumeScaling = Literal["pad_floor", "round"]
BlendMode = Literal["logits", "probabilities"]
VolumeResize = Literal["cubic", "trilinear"]
AccumDtype = Literal["float64", "float32", "float16"]
ClosingBorder = Literal["erode", "keep"]
WeightMask = Literal["before", "before_after"]
NetworkBackend = Literal["torch", "onnxruntime"]

WEIGHT_MODES: tuple[str, ...] = get_args(WeightMode)
WINDOW_COUNTS: tuple[str, ...] = get_args(WindowCount)
PAD_MODES: tuple[str, ...] = get_args(PadMode)
UNIFIED_MODES: tuple[str, ...] = get_args(UnifiedMode)
VOLUME_SCALINGS: tuple[str, ...] = get_args(VolumeScaling)
BLEND_MODES: tuple[str, ...] = get_args(BlendMode)
VOLUME_RESIZES: tuple[str, ...] = get_args(VolumeResize)
ACCUM_DTYPES: tuple[str, ...] = get_args(AccumDtype)
CLOSING_BORDERS: tuple[str, ...] = get_args(ClosingBorder)
WEIGHT_MASKS: tuple[str, ...] = get_args(WeightMask)
NETWORK_BACKENDS: tuple[str, ...] = get_args(NetworkBackend)


@dataclass(frozen=True)
class InferenceSettings:
    """Every knob of sliding-window inference (defaults = the paper preset).

    Attributes:
        step_fraction: window step as a fraction of the patch (0.5 = half a patch).
        weight_mode: patch blending weights (:func:`inference.sliding_window.patch_weight_map`):
            ``linear`` (the original: centred at patch/2, ~0 at the first corner), ``linear_symmetric``
            (centred at (patch-1)/2, floored at 1e-3), ``gaussian``, ``constant``.
        window_count: ``original``: the windows the original's loop visits (centres every step from
            patch//2, clipped to size - patch//2), each counted as often as it is visited (the last
            window along an axis twice; an odd patch's last window reaches one voxel past the end,
            zero-filled); ``once``: the last window flush with the end, every window once.
        pad_mode: a volume smaller than the patch along an axis is zero-padded by ``ceil_both``
            (the original: ceil(shortfall / 2) on both sides, possibly one voxel more than the
            patch) or ``exact`` (shortfall // 2 before, the rest after); cropped back afterwards.
        blend: what the weighted windows add up: ``logits`` (the original; labels = argmax of the
            blended logits) or softmax ``probabilities``.
        mirror_tta: average over all mirrorings of ``mirror_axes`` (2**k forward passes).
        mirror_axes: spatial axes (0 = z, 1 = y, 2 = x) mirrored for TTA.
        batch_size: windows per forward pass.
        device: where the network runs (``cpu``, ``cuda``, ``cuda:N``).
        amp: autocast mode, ``off`` (float32, the preset), ``bf16``, ``fp16`` or ``auto``.
        backend: what runs the network: ``torch`` (the preset) or ``onnxruntime`` (CPU, fp32: the
            task's domain exported to ONNX in memory; :mod:`inference.backends` chooses for ``auto``).
        accum_dtype: dtype of the class-score accumulator: ``float64`` (the original's), ``float32``
            (half the memory), ``float16`` (a quarter).
        accum_device: where the accumulator lives (CPU by default: bounded GPU memory).
        unified_mode: shared/universal models whose model patch differs from the task patch:
            ``volume`` scales the whole case (paper), ``patch`` resizes every window.
        volume_scaling: how ``unified_mode="volume"`` sizes the scaled case: ``pad_floor`` (the
            original: pad to the task patch first (``pad_mode``), scaled size
            ``int(size * model_patch / task_patch)``, labels back to the padded shape, padding
            cropped) or ``round`` (no padding first, ``round(...)``, labels back to the shape).
        volume_resize: how ``unified_mode="volume"`` scales the case: ``cubic`` (the original, the
            same function as training's patch resize) or ``trilinear``.
        postprocess: apply the task's post-processing (:mod:`inference.postprocess`).
        closing_border: post-processing closing over the whole grid with SciPy's default border
            (``erode``, the original: foreground on the grid's faces is eroded) or without eroding
            at the faces (``keep``).
        weight_mask: predictions outside the weight map are removed ``before`` the closing (the
            original; the closing may then fill such voxels) or ``before_after`` (also after it).
        progress: show a progress bar over the windows.
    """

    step_fraction: float = 0.5
    weight_mode: WeightMode = "linear"
    window_count: WindowCount = "original"
    pad_mode: PadMode = "ceil_both"
    blend: BlendMode = "logits"
    mirror_tta: bool = False
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 2
    device: str = "cpu"
    amp: str = "off"
    backend: NetworkBackend = "torch"
    accum_dtype: AccumDtype = "float64"
    accum_device: str = "cpu"
    unified_mode: UnifiedMode = "volume"
    volume_scaling: VolumeScaling = "pad_floor"
    volume_resize: VolumeResize = "cubic"
    postprocess: bool = True
    closing_border: ClosingBorder = "erode"
    weight_mask: WeightMask = "before"
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.step_fraction <= 1.0:
            raise ValueError(f"step_fraction must be in (0, 1], got {self.step_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        choices = (
            ("weight_mode", WEIGHT_MODES),
            ("window_count", WINDOW_COUNTS),
            ("pad_mode", PAD_MODES),
            ("unified_mode", UNIFIED_MODES),
            ("volume_scaling", VOLUME_SCALINGS),
            ("blend", BLEND_MODES),
            ("volume_resize", VOLUME_RESIZES),
            ("accum_dtype", ACCUM_DTYPES),
            ("closing_border", CLOSING_BORDERS),
            ("weight_mask", WEIGHT_MASKS),
            ("backend", NETWORK_BACKENDS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        axes = tuple(int(a) for a in self.mirror_axes)
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"mirror_axes must be spatial axes 0, 1, 2 (z, y, x), got {self.mirror_axes}")
        object.__setattr__(self, "mirror_axes", axes)

    @property
    def torch_accum_dtype(self) -> torch.dtype:
        return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}[
            self.accum_dtype
        ]
