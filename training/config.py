"""Run settings of one training run: a JSON-able dataclass saved as ``config.json`` in the run folder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

TRAIN_MODES = ("independent", "shared", "universal")
#: model patch of shared/universal training in the paper preset
PRESET_MODEL_PATCH = (128, 128, 128)
#: pools per axis of the shared/universal model in the paper preset
PRESET_POOLS = (5, 5, 5)
#: batch size of shared/universal training in the paper preset
PRESET_SHARED_BATCH = 2


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data. Defaults = the paper preset.

    ``None`` means "from the task's plans" (independent) or "the preset" (shared/universal) and is
    resolved by the pieces that use it; ``config.json`` stores the values as given.
    """

    mode: str
    tasks: list[str]
    module: str | None = None
    model_name: str = "u2net3d"
    out_tag: str = ""
    base_channels: int = 16
    fold: int = 0
    dataset_dir: str = "dataset"
    prep_dir: str = "prepData"
    results_dir: str = "results"
    folds_file: str = "fold_splits.json"
    max_epoch: int = 300
    steps_per_epoch: int = 300
    batch_size: int | None = None
    patch_size: list[int] | None = None
    model_patch: list[int] | None = None
    pools: list[int] | None = None
    val_every: int = 10
    val_from: int = 100
    save_every: int = 5
    device: str = "cpu"
    num_workers: int = 0
    amp: str = "off"  # "off" | "bf16" | "fp16"
    channels_last: str = "auto"  # "auto" (on for CPU) | "on" | "off"
    fused_ops: str = "auto"  # "auto" (on for CPU without AMP) | "on" | "off"
    seed: int = 1993
    torch_seed: int = 1
    lr: float = 3e-4
    weight_decay: float = 5e-4
    lr_window: int = 20
    lr_min_delta: float = 1e-4
    lr_factor: float = 0.5
    lr_stop: float = 1e-8
    augment: bool = True
    val_postprocess: bool = True
    val_max_cases: int | None = None
    ckp: str | None = None
    init_from: str | None = None
    deterministic: bool = False
    threads: int | None = None
    log_images_every: int = 0  # training image slices to TensorBoard every N steps (0: off)

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"mode must be one of {TRAIN_MODES}, got {self.mode!r}")
        if not self.tasks:
            raise ValueError("at least one task is needed")
        self.tasks = [str(t) for t in self.tasks]
        if self.mode == "universal":
            self.module = self.module or "separable_adapter"
        else:
            self.module = None
        for name in ("patch_size", "model_patch", "pools"):
            v = getattr(self, name)
            if v is not None:
                v = [int(x) for x in v]
                if len(v) != 3:
                    raise ValueError(f"{name} must be 3 integers (z, y, x), got {v}")
                setattr(self, name, v)
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {self.amp!r}")
        for name in ("channels_last", "fused_ops"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {getattr(self, name)!r}")
        if self.max_epoch < 0 or self.steps_per_epoch < 1:
            raise ValueError("max_epoch must be >= 0 and steps_per_epoch >= 1")
        if self.save_every < 1:
            raise ValueError("save_every must be >= 1")
        if self.mode == "independent" and self.ckp:
            raise ValueError("--ckp (new-domain adaptation) needs a shared or universal model")

    # -- derived values -----------------------------------------------------------------------
    @property
    def is_multi_task_model(self) -> bool:
        return self.mode != "independent"

    def run_name(self) -> str:
        """``res_{model}_{mode}[_{tag}]`` (the original's folder name)."""
        tag = f"_{self.out_tag}" if self.out_tag else ""
        return f"res_{self.model_name}_{self.mode}{tag}"

    def run_dir(self) -> Path:
        """``results_dir/res_{model}_{mode}[_{tag}]/{task1_task2_...}``."""
        return Path(self.results_dir) / self.run_name() / "_".join(self.tasks)

    def uses_channels_last(self, device_type: str) -> bool:
        return self.channels_last == "on" or (self.channels_last == "auto" and device_type == "cpu")

    def uses_fused_ops(self, device_type: str) -> bool:
        if self.fused_ops == "auto":
            return device_type == "cpu" and self.amp == "off"
        return self.fused_ops == "on"

    def should_validate(self, epoch: int) -> bool:
        """Periodic validation: epochs >= ``val_from`` divisible by ``val_every`` (0 = never)."""
        return self.val_every > 0 and epoch >= self.val_from and epoch % self.val_every == 0

    def should_save_numbered(self, epoch: int) -> bool:
        return epoch % self.save_every == 0

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike[str]) -> None:
        from utils.io_utils import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
