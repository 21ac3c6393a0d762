"""The 3D U²-Net: one U-Net for several tasks, in independent, shared or universal mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from models.blocks import ClassHeads, DecoderBlock, Downsample, EncoderBlock, InputHeads, upsample_nearest
from models.conv_units import (
    ConvUnit,
    DenseUnit,
    ParallelAdapterUnit,
    SeparableAdapterUnit,
    SeriesAdapterUnit,
    UnitParts,
)
from models.depthwise import DEPTHWISE_KERNELS, DepthwiseConv3d
from models.norms import TaskModuleList

TRAIN_MODES = ("independent", "shared", "universal")
ADAPTER_MODULES = ("separable_adapter", "series_adapter", "parallel_adapter")
DEEP_SUPERVISION_LEVELS = (2, 1)


@runtime_checkable
class _HasFusedOps(Protocol):
    """A module with a ``use_fused`` switch (isinstance checks the attribute, like ``hasattr``)."""

    use_fused: bool


def _widen(value: int | Sequence[int], name: str, length: int = 3) -> tuple[int, ...]:
    """An int, or a sequence of ``length`` ints, as a tuple of ``length`` ints."""
    if isinstance(value, int):
        return (value,) * length
    out = tuple(int(v) for v in value)
    if len(out) != length:
        raise ValueError(f"{name} must be an int or {length} ints (z, y, x), got {value!r}")
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Everything :func:`build_model` needs; plain JSON-able values (stored in checkpoints)."""

    train_mode: str
    in_channels: list[int]
    num_classes: list[int]
    module: str | None = None
    base_channels: int = 16
    pools_per_axis: list[int] = field(default_factory=lambda: [5, 5, 5])
    deep_supervision: bool = True
    residual: bool = True

    def __post_init__(self) -> None:
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        module = self.module
        if self.train_mode == "universal":
            module = module or "separable_adapter"
            if module not in ADAPTER_MODULES:
                raise ValueError(f"module must be one of {ADAPTER_MODULES}, got {module!r}")
        elif module not in (None, ""):
            raise ValueError(
                f"module={module!r} is only used by train_mode='universal' (got {self.train_mode!r})"
            )
        else:
            module = None
        object.__setattr__(self, "module", module)
        in_ch, n_cls = list(map(int, self.in_channels)), list(map(int, self.num_classes))
        if not in_ch or len(in_ch) != len(n_cls):
            raise ValueError(
                f"in_channels and num_classes need one entry per task and the same length, got "
                f"{self.in_channels!r} and {self.num_classes!r}"
            )
        if min(in_ch) < 1 or min(n_cls) < 2:
            raise ValueError(f"each task needs >= 1 modality and >= 2 classes, got {in_ch} and {n_cls}")
        if self.train_mode == "independent" and len(in_ch) != 1:
            raise ValueError(
                f"train_mode='independent' builds one model for one task (got {len(in_ch)} tasks); "
                "build one model per task, or use train_mode='shared'"
            )
        pools = list(_widen(self.pools_per_axis, "pools_per_axis"))
        if min(pools) < 0 or max(pools) < 1:
            raise ValueError(f"pools_per_axis must be >= 0 with at least one > 0, got {pools}")
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {self.base_channels}")
        object.__setattr__(self, "in_channels", in_ch)
        object.__setattr__(self, "num_classes", n_cls)
        object.__setattr__(self, "pools_per_axis", pools)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class U2Net3D(nn.Module):
    """3D U-Net with per-task heads and norms and, in universal mode, per-task adapters.

    Levels: ``depth = max(pools_per_axis) + 1``; level i has ``base_channels * 2**i`` channels.
    Call ``model(x, task_idx)`` with x of shape (N, in_channels[task_idx], D, H, W) and D, H, W
    divisible by ``model.total_strides``; it returns logits (N, num_classes[task_idx], D, H, W).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        pools = config.pools_per_axis
        self.depth = max(pools) + 1
        channels = [config.base_channels * 2**i for i in range(self.depth)]
        self.channels = channels
        # strides between level i and i+1: 2 on axes that still pool at that level.
        self.level_strides = [tuple(2 if i < p else 1 for p in pools) for i in range(self.depth - 1)]
        self.total_strides = tuple(2**p for p in pools)
        num_tasks = len(config.in_channels)
        make_unit = partial(_unit_class(config), num_tasks=num_tasks)

        self.input_heads = InputHeads(config.in_channels, channels[0])
        self.encoders = nn.ModuleList(EncoderBlock(c, make_unit, config.residual) for c in channels)
        self.downsamples = nn.ModuleList(
            Downsample(channels[i], channels[i + 1], self.level_strides[i], num_tasks)
            for i in range(self.depth - 1)
        )
        # decoders[i] works at level i (i = 0 .. depth-2), fed by level i+1.
        self.decoders = nn.ModuleList(
            DecoderBlock(channels[i + 1], channels[i], make_unit) for i in range(self.depth - 1)
        )
        self.ds_levels = (
            [lvl for lvl in DEEP_SUPERVISION_LEVELS if lvl <= self.depth - 2]
            if config.deep_supervision
            else []
        )
        self.ds_heads = nn.ModuleDict(
            {
                str(lvl): ClassHeads(channels[lvl], config.num_classes, with_norm_act=True)
                for lvl in self.ds_levels
            }
        )
        self.output_heads = ClassHeads(channels[0], config.num_classes, with_norm_act=False)
        self.apply(_init_weights)

    @property
    def num_tasks(self) -> int:
        return len(self.config.in_channels)

    def check_input(self, x: torch.Tensor, task_idx: int) -> None:
        """Raise a clear error for a wrong task index, channel count or spatial size."""
        if not 0 <= task_idx < self.num_tasks:
            raise IndexError(f"task_idx {task_idx} out of range: this model has {self.num_tasks} task(s)")
        if x.dim() != 5:
            raise ValueError(f"expected input (N, C, D, H, W), got shape {tuple(x.shape)}")
        want_c = self.config.in_channels[task_idx]
        if x.shape[1] != want_c:
            raise ValueError(
                f"task {task_idx} takes {want_c} modality channel(s), got input with {x.shape[1]}"
            )
        bad = [
            (axis, size, stride)
            for axis, size, stride in zip("DHW", x.shape[2:], self.total_strides, strict=True)
            if size % stride
        ]
        if bad:
            msgs = []
            for axis, size, stride in bad:
                lower = (size // stride) * stride
                options = ([lower] if lower > 0 else []) + [lower + stride]
                msgs.append(
                    f"axis {axis} has size {size}, not divisible by {stride} "
                    f"(2**pools); sizes that work: {' or '.join(map(str, options))}"
                )
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} does not fit pools_per_axis "
                f"{self.config.pools_per_axis}: " + "; ".join(msgs)
            )

    def forward_features(self, x: torch.Tensor, task_idx: int) -> tuple[torch.Tensor, UnitParts]:
        """Logits and the last conv unit's parts (shared and per-task feature maps, for visualisation).

        Args:
            x: (N, M, D, H, W) with M = in_channels[task_idx].
        Returns:
            logits (N, K, D, H, W) and the :class:`UnitParts` of the last decoder unit (C_0 channels).
        """
        self.check_input(x, task_idx)
        y = self.input_heads(x, task_idx)
        skips: list[torch.Tensor] = []
        for level in range(self.depth):
            y = self.encoders[level](y, task_idx)
            if level < self.depth - 1:
                skips.append(y)
                y = self.downsamples[level](y, task_idx)
        ds_sum: torch.Tensor | None = None
        parts: UnitParts | None = None
        for level in range(self.depth - 2, -1, -1):
            decoder = self.decoders[level]
            assert isinstance(decoder, DecoderBlock)  # nn.ModuleList items are typed as nn.Module
            parts = decoder.forward_parts(y, skips[level], task_idx)
            y = parts.out
            if ds_sum is not None:
                ds_sum = upsample_nearest(ds_sum, y.shape[2:])
            if level in self.ds_levels:
                ds = self.ds_heads[str(level)](y, task_idx)
                ds_sum = ds if ds_sum is None else ds_sum + ds
        logits = self.output_heads(y, task_idx)
        if ds_sum is not None:
            logits = logits + ds_sum
        assert parts is not None  # depth >= 2, so the decoder loop ran
        return logits, parts

    def forward(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        """Args: x: (N, in_channels[task_idx], D, H, W). Returns logits (N, num_classes[task_idx], D, H, W)."""
        return self.forward_features(x, task_idx)[0]

    def set_fused_ops(self, enabled: bool) -> None:
        """Use the hand-fused norm/depthwise kernels (default) or the plain PyTorch modules.

        Both compute the same function (the tests compare them); the fused ones are faster on CPU.
        """
        for m in self.modules():
            if isinstance(m, _HasFusedOps):  # i.e. hasattr(m, "use_fused")
                m.use_fused = enabled

    def set_depthwise_kernel(self, kernel: str) -> None:
        """Run the depthwise adapters (separable units) with PyTorch's kernels (``"native"``, default)
        or the Triton kernels of :mod:`models.triton_depthwise` (``"triton"``; CUDA). Same function
        (tested); models without depthwise convolutions are unaffected."""
        if kernel not in DEPTHWISE_KERNELS:
            raise ValueError(f"depthwise kernel must be one of {DEPTHWISE_KERNELS}, got {kernel!r}")
        for m in self.modules():
            if isinstance(m, DepthwiseConv3d):
                m.kernel = kernel

    def add_task(self, in_channels: int, num_classes: int, init_from: int | None = None) -> int:
        """Give the model a new task: new heads, norms and adapters; nothing else changes.

        Args:
            in_channels: the new task's number of modalities.
            num_classes: the new task's number of classes (background included).
            init_from: copy the per-task norms and adapters of this existing task instead of a fresh
                initialisation (heads are always fresh).
        Returns:
            the new task's index.
        """
        if init_from is not None and not 0 <= init_from < self.num_tasks:
            raise IndexError(f"init_from {init_from} out of range: the model has {self.num_tasks} task(s)")
        head_lists = set()
        for m in self.modules():
            if isinstance(m, InputHeads):
                m.add_task(in_channels)
                head_lists.add(id(m.heads))
            elif isinstance(m, ClassHeads):
                m.add_task(num_classes)
                head_lists.add(id(m.heads))
        for m in list(self.modules()):
            if isinstance(m, TaskModuleList) and id(m) not in head_lists:
                new = m.add_task(init_from)
                if init_from is None:
                    new.apply(_init_weights)
        new_task = self.num_tasks
        for m in self.modules():
            if isinstance(m, (InputHeads, ClassHeads)):
                m.heads[new_task].apply(_init_weights)
        self.config = replace(
            self.config,
            in_channels=[*self.config.in_channels, int(in_channels)],
            num_classes=[*self.config.num_classes, int(num_classes)],
        )
        # the new modules must live where the old ones do
        ref = next(self.parameters())
        self.to(device=ref.device)
        return new_task


def _unit_class(config: ModelConfig) -> type[ConvUnit]:
    if config.train_mode != "universal":
        return DenseUnit
    assert config.module is not None  # ModelConfig.__post_init__ sets it in universal mode
    return {
        "separable_adapter": SeparableAdapterUnit,
        "series_adapter": SeriesAdapterUnit,
        "parallel_adapter": ParallelAdapterUnit,
    }[config.module]


def _init_weights(m: nn.Module) -> None:
    """Kaiming-normal conv weights and zero biases (as the original); norms keep (1, 0)."""
    if isinstance(m, (nn.Conv3d, DepthwiseConv3d)):
        nn.init.kaiming_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(
    train_mode: str,
    in_channels: Sequence[int],
    num_classes: Sequence[int],
    *,
    module: str | None = None,
    base_channels: int = 16,
    pools_per_axis: int | Sequence[int] = (5, 5, 5),
    deep_supervision: bool = True,
    residual: bool = True,
) -> U2Net3D:
    """Build the 3D U²-Net.

    Args:
        train_mode: "independent" (one task), "shared" or "universal".
        in_channels: number of modalities of each task.
        num_classes: number of classes (background included) of each task.
        module: universal mode's adapter: "separable_adapter" (default), "series_adapter" or
            "parallel_adapter"; must be None in the other modes.
        base_channels: channels of the first level (16 in the paper preset).
        pools_per_axis: stride-2 poolings per axis (z, y, x), an int or three ints.
        deep_supervision: add the per-task deep-supervision maps of decoder levels 2 and 1.
        residual: residual encoder blocks.
    """
    config = ModelConfig(
        train_mode=train_mode,
        in_channels=list(in_channels),
        num_classes=list(num_classes),
        module=module,
        base_channels=base_channels,
        pools_per_axis=list(_widen(pools_per_axis, "pools_per_axis")),
        deep_supervision=deep_supervision,
        residual=residual,
    )
    return U2Net3D(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
