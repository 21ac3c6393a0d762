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
#: a new class copied from its parent starts this much below it in logits (:meth:`U2Net3D.add_classes`)
NEW_CLASS_LOGIT_OFFSET = 1.0


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
                ds_sum = upsample_nearest(ds_sum, y.shape[2:], by_expand=decoder.upsample_by_expand)
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

    def set_export_ops(self, enabled: bool) -> None:
        """Write operations the way an exported graph runs them fastest (the same values): plain
        PyTorch ops instead of the fused kernels (:meth:`set_fused_ops`) and nearest upsampling as
        broadcast + reshape (:func:`models.blocks.upsample_nearest`)."""
        self.set_fused_ops(not enabled)
        for m in self.modules():
            if isinstance(m, DecoderBlock):
                m.upsample_by_expand = enabled

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
            init_from: warm start: copy this existing task's own parameters (:meth:`copy_task_parts`:
                adapters, norms, the input head when the modality counts match, the class heads when
                the class counts match); the parts that do not fit start fresh. None: all fresh.
        Returns:
            the new task's index.
        """
        if init_from is not None and not 0 <= init_from < self.num_tasks:
            raise IndexError(f"init_from {init_from} out of range: the model has {self.num_tasks} task(s)")
        # the order of building and initialising decides the random draws: fixed, so that a seed gives
        # the same fresh parts as before warm starts existed
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
                m.add_task().apply(_init_weights)
        new_task = self.num_tasks
        for m in self.modules():
            if isinstance(m, (InputHeads, ClassHeads)):
                m.heads[new_task].apply(_init_weights)
        self.config = replace(
            self.config,
            in_channels=[*self.config.in_channels, int(in_channels)],
            num_classes=[*self.config.num_classes, int(num_classes)],
        )
        if init_from is not None:
            self.copy_task_parts(init_from, new_task)
        # the new modules must live where the old ones do
        ref = next(self.parameters())
        self.to(device=ref.device)
        return new_task

    def task_lists(self) -> list[TaskModuleList]:
        """Every :class:`TaskModuleList` of the model (heads, norms, adapters), in module order."""
        return [m for m in self.modules() if isinstance(m, TaskModuleList)]

    def task_parts_alike(self, src: int, dst: int) -> list[str]:
        """Module names (``name.dst``) of task ``dst``'s entries whose parameters have the shapes of task
        ``src``'s: the adapters and norms always; the input head when both tasks have the same number of
        modalities, the class heads (deep supervision and output) when they have the same number of
        classes. What :meth:`copy_task_parts` copies."""
        for t in (src, dst):
            if not 0 <= t < self.num_tasks:
                raise IndexError(f"task {t} out of range: the model has {self.num_tasks} task(s)")
        alike = []
        for name, m in self.named_modules():
            if isinstance(m, TaskModuleList):
                a, b = m[src].state_dict(), m[dst].state_dict()
                if a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a):
                    alike.append(f"{name}.{dst}")
        return alike

    def copy_task_parts(self, src: int, dst: int) -> list[str]:
        """Copy task ``src``'s own parameters into task ``dst`` wherever their shapes agree
        (:meth:`task_parts_alike`); the other entries of ``dst`` keep their values. Returns the names
        of the entries copied."""
        alike = set(self.task_parts_alike(src, dst))
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, TaskModuleList) and f"{name}.{dst}" in alike:
                    m[dst].load_state_dict(m[src].state_dict())
        return sorted(alike)

    def add_classes(
        self,
        task_idx: int,
        num_classes: int,
        parents: Sequence[int] | None = None,
        offset: float = NEW_CLASS_LOGIT_OFFSET,
    ) -> list[str]:
        """Grow task ``task_idx``'s label set to ``num_classes`` classes (background included).

        The class heads (deep supervision and output) get the new channels at the end; the existing
        channels keep their weights (convolution rows, biases and, in the deep-supervision heads, the
        per-channel norm's affine parameters). A new channel starts as a copy of its parent class's
        (``parents[i]`` for new class ``K_old + i``: the class whose voxels it takes over, e.g. liver for a
        tumour inside it, background for a structure from the background) with its output bias lowered by
        ``offset``, so that the model predicts exactly what it did until training moves the new class
        away; with ``parents=None`` the new channels start fresh (Kaiming-normal rows, zero bias, norm
        (1, 0)). Nothing else changes. Returns the module names of the grown heads.
        """
        if not 0 <= task_idx < self.num_tasks:
            raise IndexError(f"task_idx {task_idx} out of range: this model has {self.num_tasks} task(s)")
        old = self.config.num_classes[task_idx]
        if num_classes <= old:
            raise ValueError(f"task {task_idx} has {old} classes; growing it needs more, got {num_classes}")
        if parents is not None and (
            len(parents) != num_classes - old or not all(0 <= int(c) < old for c in parents)
        ):
            raise ValueError(
                f"parents must name one existing class (0..{old - 1}) per new class, got {parents}"
            )
        grown = []
        with torch.no_grad():
            for name, m in self.named_modules():
                if not isinstance(m, ClassHeads):
                    continue
                new = m._head(num_classes)
                new.apply(_init_weights)
                previous = m.heads[task_idx].state_dict()
                state = new.state_dict()
                for k, v in previous.items():  # every tensor of a head is indexed by class first
                    state[k][:old] = v
                    if parents is not None:
                        state[k][old:] = v[[int(c) for c in parents]]
                if parents is not None and m is self.output_heads:
                    state["bias"][old:] -= offset  # the logits' last term: the parent wins until trained
                new.load_state_dict(state)
                ref = next(m.heads[task_idx].parameters())
                m.heads[task_idx] = new.to(device=ref.device, dtype=ref.dtype)
                grown.append(f"{name}.heads.{task_idx}")
        counts = list(self.config.num_classes)
        counts[task_idx] = int(num_classes)
        self.config = replace(self.config, num_classes=counts)
        return grown


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
