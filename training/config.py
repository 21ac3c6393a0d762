"""Run settings of one training run: a JSON-able dataclass saved as ``config.json`` in the run folder.

:class:`TrainConfig` is the one place where a training setting and its default live: every field
(but ``mode`` and ``tasks``) carries its command-line flag and help text in its metadata, and
:mod:`training.cli` builds the scripts' argument parser from them (:func:`add_config_arguments`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from inference.backends import BACKENDS, PRECISIONS
from models.params import NEW_CLASS_SCOPES
from models.runtime import AMP_MODES
from models.triton_depthwise import DEPTHWISE_KERNEL_MODES
from models.unet import ADAPTER_MODULES, TRAIN_MODES
from utils.folds import default_folds_file
from utils.io_utils import atomic_write_json

#: model patch of shared/universal training in the paper preset
PRESET_MODEL_PATCH = (128, 128, 128)
#: pools per axis of the shared/universal model in the paper preset
PRESET_POOLS = (5, 5, 5)
#: batch size of shared/universal training in the paper preset
PRESET_SHARED_BATCH = 2
#: the network's name in run folder names (``res_u2net3d_{mode}``, as the original)
MODEL_NAME = "u2net3d"
SWITCH_CHOICES = ("auto", "on", "off")

WHAT = "what to train (flags of the original scripts)"
DATA = "data and outputs"
SCHEDULE = "schedule (defaults: the paper preset)"
METHOD = "method (defaults: the original's choices; each flag switches to the alternative)"
HARDWARE = "hardware and reproducibility"
GROUPS = (WHAT, DATA, SCHEDULE, METHOD, HARDWARE)
#: validation interval (epochs) of the paper preset per mode, when --val_every is not given
PRESET_VAL_EVERY = {"independent": 10, "shared": 20, "universal": 20}
#: what --adapt_scope accepts (docs/paper_preset.md, "New domain")
ADAPT_SCOPES = ("extend", "original_code")
#: how the head channels of a grown label set's new classes start (--add_classes_init)
NEW_CLASS_INITS = ("fresh", "parent")
#: how "fore"/"small" patch centres are drawn (training.sampling)
CENTRE_MODES = ("original", "safe")
#: which structure voxels "fore"/"small" centres are drawn around (training.sampling)
CENTRE_VOXELS = ("all", "subset")
#: when a run whose LR fell below --lr_stop stops (training.optim.PlateauHalving)
LR_STOP_ORDERS = ("original", "same_epoch")
#: how augmentation and the unified-patch resize interpolate (training.composed_augment)
AUGMENT_PIPELINES = ("two_step", "composed")
#: where augmented samples are interpolated (training.device_augment)
AUGMENT_DEVICES = ("cpu", "cuda")
#: image interpolation of the CPU augmentation's resampling (--augment_interp) -> spline order
AUGMENT_INTERP_ORDERS = {"cubic": 3, "linear": 1}


def _opt(default: Any, help: str, group: str, *, flag: str | None = None, **argparse_kwargs: Any) -> Any:
    """A config field with its command-line flag (``--<field name>`` unless ``flag`` is given).

    ``argparse_kwargs``: ``choices``, ``metavar``, ``nargs``, ``type``, ``const``, or
    ``negate="--no_x"`` for a True-by-default switch turned off by that flag.
    """
    meta = {"help": help, "group": group, "flag": flag, "argparse": argparse_kwargs}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data. Defaults = the paper preset.

    ``None`` means "from the task's plans" (independent) or "the preset" (shared/universal) and is
    resolved by the pieces that use it; ``config.json`` stores the values as given.
    """

    mode: str
    tasks: list[str]
    module: str | None = _opt(
        "separable_adapter",
        "universal mode's adapter: separable_adapter (the paper's depthwise adapters), series_adapter or "
        "parallel_adapter (residual adapters); ignored in the other modes",
        WHAT,
        choices=ADAPTER_MODULES,
    )
    ckp: str | None = _opt(
        None,
        "new domain: a trained shared/universal checkpoint; the model gets --tasks' parts, its old weights are "
        "loaded and frozen, and only the new task's parameters train",
        WHAT,
        metavar="CKPT",
    )
    init_from: str | None = _opt(
        None,
        "with --ckp (--adapt_scope extend): where the new domain's own parameters start: 'auto' = copied from "
        "the trained domain with the same modalities and the nearest foreground intensities (plans' "
        "intensity_stats), TASK = from that domain, 'none' = fresh; the adapters and norms are copied, the input "
        "head when the modality count matches, the class heads when the class count matches (default: auto; "
        "--adapt_scope original_code always starts fresh, as the original)",
        WHAT,
        metavar="auto|TASK|none",
    )
    add_classes_to: str | None = _opt(
        None,
        "with --ckp: grow the label set of this trained domain instead of adding a domain: --tasks names the ONE "
        "task with its images and the larger label set (every existing class kept at its number, new classes "
        "after them); the domain takes that task's name and plans, its heads get the new class channels",
        WHAT,
        metavar="TASK",
    )
    add_classes_train: str = _opt(
        "domain",
        "with --add_classes_to: what trains: 'domain' = the domain's own adapters, norms and heads; 'heads' = "
        "only its class heads; every other domain and the shared weights stay frozen either way",
        WHAT,
        choices=NEW_CLASS_SCOPES,
    )
    add_classes_init: str = _opt(
        "fresh",
        "with --add_classes_to: how a new class's head channels start: 'fresh' = a new random initialisation; "
        "'parent' = a copy of the class whose voxels it takes over (by raw label value: liver for a tumour fused "
        "into it before, else background), its logit 1 lower, so that the model first predicts what it did",
        WHAT,
        choices=NEW_CLASS_INITS,
    )
    fold: int = _opt(
        0, "cross-validation fold of --folds_file whose val cases are validated on", WHAT, type=int
    )
    out_tag: str = _opt("", "tag of the output folder: <results_dir>/res_u2net3d_{mode}_{tag}/{tasks}", WHAT)
    base_channels: int = _opt(
        16, "channels of the first U-Net level (16 in the paper)", WHAT, flag="--base_outChans", type=int
    )
    dataset_dir: str = _opt(
        "dataset",
        "raw task folders, MSD or nnU-Net v2 layout (--predict test segments their imagesTs; validation in the "
        "original geometry reads their labelsTr)",
        DATA,
    )
    prep_dir: str = _opt("prepData", "preprocessed data of preprocess_taskSep.py", DATA)
    folds_file: str | None = _opt(
        None,
        "fold splits JSON (default: <prep_dir>/fold_splits.json, written by preprocess_taskSep.py)",
        DATA,
        metavar="JSON",
    )
    results_dir: str = _opt("results", "root of the run folders", DATA)
    max_epoch: int = _opt(
        300, "epochs (training stops earlier when the LR drops below --lr_stop)", SCHEDULE, type=int
    )
    steps_per_epoch: int = _opt(
        300,
        "optimisation steps per epoch; shared/universal step k trains task (k-1) mod T",
        SCHEDULE,
        type=int,
    )
    batch_size: int | None = _opt(
        None,
        "patches per step (default: the task's plans for independent models, 2 for shared/universal)",
        SCHEDULE,
        type=int,
    )
    patch_size: list[int] | None = _opt(
        None,
        "patch sampled from every task's volumes (default: each task's plans); independent models then pool "
        "as often as the patch allows unless --pools is given",
        SCHEDULE,
        nargs=3,
        type=int,
        metavar=("Z", "Y", "X"),
    )
    model_patch: list[int] | None = _opt(
        None,
        "shared/universal: the model patch every task patch is resized to (default 128 128 128)",
        SCHEDULE,
        nargs=3,
        type=int,
        metavar=("Z", "Y", "X"),
    )
    pools: list[int] | None = _opt(
        None,
        "stride-2 poolings per axis (default: plans for independent, 5 5 5 for shared/universal)",
        SCHEDULE,
        nargs=3,
        type=int,
        metavar=("Z", "Y", "X"),
    )
    val_every: int | None = _opt(
        None,
        "validate every N epochs (0: only at the end; default: 10 for independent, 20 for shared/universal "
        "models, as the original)",
        SCHEDULE,
        type=int,
    )
    val_from: int = _opt(100, "first epoch of periodic validation", SCHEDULE, type=int)
    val_max_cases: int | None = _opt(
        None, "validate on at most N cases per task (default: all)", SCHEDULE, type=int
    )
    val_postprocess: bool = _opt(
        True, "validate without post-processing", SCHEDULE, negate="--no_val_postprocess"
    )
    save_every: int = _opt(
        5,
        "keep checkpoints/epoch_XXXX.pt every N epochs (latest.pt is written after every epoch)",
        SCHEDULE,
        type=int,
    )
    lr: float = _opt(3e-4, "Adam learning rate", SCHEDULE, type=float)
    weight_decay: float = _opt(5e-4, "Adam weight decay (L2 added to the gradient)", SCHEDULE, type=float)
    lr_window: int = _opt(
        20, "plateau rule: epochs in the moving average of the epoch losses", SCHEDULE, type=int
    )
    lr_min_delta: float = _opt(
        1e-4,
        "plateau rule: halve the LR when the moving average fell by less than this",
        SCHEDULE,
        type=float,
    )
    lr_factor: float = _opt(0.5, "plateau rule: factor applied to the LR on a plateau", SCHEDULE, type=float)
    lr_stop: float = _opt(1e-8, "stop training once the LR is below this", SCHEDULE, type=float)
    lr_stop_order: str = _opt(
        "original",
        "when the LR falls below --lr_stop: 'original' = train one more epoch at that rate, then validate, save "
        "and stop (the original checks the rate before the epoch's halving); 'same_epoch' = validate, save and "
        "stop after the epoch whose halving crossed it",
        SCHEDULE,
        choices=LR_STOP_ORDERS,
    )
    lr_anneal: float = _opt(
        0.0,
        "fraction of the run's steps (max_epoch x steps_per_epoch) at its end over which the LR falls to 0 along a "
        "half cosine, on top of the plateau rule (0: off, the preset; measured on the laptop demo without a gain: "
        "docs/training.md)",
        SCHEDULE,
        type=float,
        metavar="FRACTION",
    )
    skip_nonfinite: int = _opt(
        0,
        "skip up to N optimisation steps whose loss is NaN/Inf (not applied, each logged; counted over the "
        "whole run) before stopping; 0: stop at the first, keeping the last good checkpoint",
        SCHEDULE,
        type=int,
        metavar="N",
    )
    val_grid: str = _opt(
        "original",
        "validation Dice in the 'original' geometry against the raw labels of --dataset_dir (the original; "
        "cases whose raw label is missing are scored on the preprocessed grid) or on the 'preprocessed' grid",
        METHOD,
        choices=("original", "preprocessed"),
    )
    lovasz_classes: str = _opt(
        "all",
        "Lovász-softmax averaged over 'all' classes (the original) or only those 'present' in the batch",
        METHOD,
        choices=("all", "present"),
    )
    focal_factor_grad: bool = _opt(
        False,
        "let the gradient flow through the focal loss's (1 - p)^gamma factor (the original treats it as a "
        "constant)",
        METHOD,
    )
    grad_none: bool = _opt(
        False,
        "clear gradients to None between steps: in shared/universal runs the other tasks' parameters then stay "
        "still (the original zeroes gradients, so Adam's moments and the weight decay keep moving them)",
        METHOD,
    )
    mirror_flip_p: float = _opt(
        0.5,
        "mirroring: after the p 0.3 gate the last axis flips with this probability (the original: 0.5, an "
        "effective 0.15; 1.0 = flip whenever the gate fires)",
        METHOD,
        type=float,
    )
    centre_mode: str = _opt(
        "original",
        "'fore'/'small' patch centres: 'original' = a structure voxel plus an offset up to patch/2 - 1, the "
        "augmentation redrawn until the patch still holds the structure; 'safe' = an offset small enough that "
        "any augmentation keeps the structure (no redraws)",
        METHOD,
        choices=CENTRE_MODES,
    )
    centre_voxels: str = _opt(
        "all",
        "'fore'/'small' centres are drawn around a voxel of the structure picked uniformly among 'all' its voxels "
        "(the original) or among an evenly spaced 'subset' of at most 2,048 per case",
        METHOD,
        choices=CENTRE_VOXELS,
    )
    kind_probs: list[float] | None = _opt(
        None,
        "probabilities of 'small' and 'fore' training patches (default: the task's plans: 0 0 for Task09_Spleen, "
        "0.3 0.3 for the other tasks, as the original)",
        METHOD,
        nargs=2,
        type=float,
        metavar=("SMALL", "FORE"),
    )
    adapt_scope: str = _opt(
        "extend",
        "with --ckp: 'extend' = add the new domain's adapters, norms and heads to the trained model and freeze "
        "every shared weight (old domains bit-identical); 'original_code' = what the original code did: a new "
        "model of the new task only, with the encoder/decoder units' shared conv weights copied and frozen",
        METHOD,
        choices=ADAPT_SCOPES,
    )
    augment: bool = _opt(
        True, "no elastic/rotation/scaling/mirroring augmentation", SCHEDULE, negate="--no_augment"
    )
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (cuda when available)", HARDWARE)
    num_workers: int = _opt(
        2,
        "loader worker processes per task (0 = load in the training process, for debugging)",
        HARDWARE,
        type=int,
    )
    amp: str = _opt(
        "off",
        "mixed precision autocast: --amp alone = auto (bfloat16 where supported, else float16 on CUDA); "
        "off = fp32 (the paper preset)",
        HARDWARE,
        choices=AMP_MODES,
        nargs="?",
        const="auto",
    )
    infer_precision: str = _opt(
        "same",
        "arithmetic of validation and --predict: same = as training (--amp), fp32, bf16, fp16 (CUDA) or auto "
        "(bf16 where computed natively, else fp32; predict.py --precision)",
        HARDWARE,
        choices=("same", *PRECISIONS),
    )
    infer_backend: str = _opt(
        "torch",
        "what runs the network in validation and --predict: torch, onnxruntime (CPU, fp32) or auto "
        "(predict.py --backend)",
        HARDWARE,
        choices=BACKENDS,
    )
    channels_last: str = _opt(
        "auto",
        "channels_last_3d memory format (auto: on for CPU, where it is faster, off on CUDA)",
        HARDWARE,
        choices=SWITCH_CHOICES,
    )
    fused_ops: str = _opt(
        "auto",
        "hand-fused norm/depthwise kernels (auto: on for CPU without AMP)",
        HARDWARE,
        choices=SWITCH_CHOICES,
    )
    depthwise_kernel: str = _opt(
        "auto",
        "kernels of the separable adapters' depthwise convolutions: 'native' (PyTorch's), 'triton' (the Triton "
        "kernels of models/triton_depthwise.py; CUDA, needs the triton package) or 'auto' (Triton on CUDA only "
        "where measured faster: so far native everywhere, see docs/performance.md)",
        HARDWARE,
        choices=DEPTHWISE_KERNEL_MODES,
    )
    compile: bool = _opt(
        False,
        "run the network through torch.compile (inductor; each task compiles on its first step); same outputs "
        "up to float rounding (docs/performance.md)",
        HARDWARE,
    )
    augment_pipeline: str = _opt(
        "two_step",
        "shared/universal training: 'two_step' = augment at the task patch, then resize to the model patch (the "
        "original: two interpolations); 'composed' = the same random transforms and resize as one coordinate map, "
        "ONE interpolation per sample (faster; docs/data_pipeline.md)",
        METHOD,
        choices=AUGMENT_PIPELINES,
    )
    augment_interp: str = _opt(
        "cubic",
        "image interpolation of the CPU augmentation (the SpatialTransform of 'two_step', the one resampling of "
        "'composed'): 'cubic' = B-spline order 3 (the original), 'linear' = order 1, cheaper (composed: 1.9x "
        "the samples per second at the preset, docs/performance.md); the unified-patch resize of 'two_step' stays cubic, "
        "--augment_device cuda is trilinear anyway",
        METHOD,
        choices=tuple(AUGMENT_INTERP_ORDERS),
    )
    augment_device: str = _opt(
        "cpu",
        "where augmented samples are interpolated: 'cpu' (loader processes) or 'cuda' (the loader draws the "
        "transforms and labels; the images are resampled on the GPU in one grid_sample, trilinear: "
        "docs/data_pipeline.md)",
        HARDWARE,
        choices=AUGMENT_DEVICES,
    )
    seed: int = _opt(1993, "NumPy / data loader seed (preset 1993)", HARDWARE, type=int)
    torch_seed: int = _opt(1, "torch seed for the weight initialisation (preset 1)", HARDWARE, type=int)
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)", HARDWARE, type=int)
    deterministic: bool = _opt(
        False,
        "deterministic CUDA algorithms (slower; exact resume on GPU); CPU runs are deterministic anyway",
        HARDWARE,
    )
    log_images_every: int = _opt(
        0,
        "TensorBoard image/label/prediction slices of a training batch every N steps (0: off)",
        HARDWARE,
        type=int,
    )
    #: no flag: what a --ckp run added (new domain: its warm start; new classes: the domain and the classes),
    #: filled in when the run is prepared (training.setup), kept in config.json and the checkpoints
    extension: dict[str, Any] | None = None
    dist_timeout: int = _opt(
        1800,
        "under torchrun: seconds a collective of the training steps waits for the other processes before the "
        "job stops (a stuck or lost process then ends the job); waits for rank 0's validation, checkpoints and "
        "--predict are not limited by it",
        HARDWARE,
        type=int,
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"mode must be one of {TRAIN_MODES}, got {self.mode!r}")
        if not self.tasks:
            raise ValueError("at least one task is needed")
        self.tasks = [str(t) for t in self.tasks]
        if self.mode == "universal":
            self.module = self.module or "separable_adapter"
            if self.module not in ADAPTER_MODULES:
                raise ValueError(f"module must be one of {ADAPTER_MODULES}, got {self.module!r}")
        else:
            self.module = None
        for name in ("patch_size", "model_patch", "pools"):
            v = getattr(self, name)
            if v is not None:
                v = [int(x) for x in v]
                if len(v) != 3:
                    raise ValueError(f"{name} must be 3 integers (z, y, x), got {v}")
                setattr(self, name, v)
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if (
            self.infer_backend == "onnxruntime"
            and self.infer_precision not in ("auto", "fp32")
            and not (self.infer_precision == "same" and self.amp == "off")
        ):
            raise ValueError("--infer_backend onnxruntime runs in fp32: use --infer_precision fp32 (or auto)")
        for name in ("channels_last", "fused_ops"):
            if getattr(self, name) not in SWITCH_CHOICES:
                raise ValueError(f"{name} must be one of {SWITCH_CHOICES}, got {getattr(self, name)!r}")
        for name, allowed in (
            ("depthwise_kernel", DEPTHWISE_KERNEL_MODES),
            ("augment_pipeline", AUGMENT_PIPELINES),
            ("augment_device", AUGMENT_DEVICES),
            ("augment_interp", tuple(AUGMENT_INTERP_ORDERS)),
            ("infer_precision", ("same", *PRECISIONS)),
            ("infer_backend", BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.lr_anneal <= 1.0:
            raise ValueError(f"lr_anneal must be a fraction in [0, 1], got {self.lr_anneal}")
        if self.max_epoch < 0 or self.steps_per_epoch < 1:
            raise ValueError("max_epoch must be >= 0 and steps_per_epoch >= 1")
        if self.save_every < 1:
            raise ValueError("save_every must be >= 1")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if self.skip_nonfinite < 0:
            raise ValueError(f"skip_nonfinite must be >= 0, got {self.skip_nonfinite}")
        if self.dist_timeout < 1:
            raise ValueError(f"dist_timeout must be >= 1 second, got {self.dist_timeout}")
        if self.val_grid not in ("original", "preprocessed"):
            raise ValueError(f"val_grid must be 'original' or 'preprocessed', got {self.val_grid!r}")
        if self.lovasz_classes not in ("all", "present"):
            raise ValueError(f"lovasz_classes must be 'all' or 'present', got {self.lovasz_classes!r}")
        if self.centre_mode not in CENTRE_MODES:
            raise ValueError(f"centre_mode must be one of {CENTRE_MODES}, got {self.centre_mode!r}")
        if self.centre_voxels not in CENTRE_VOXELS:
            raise ValueError(f"centre_voxels must be one of {CENTRE_VOXELS}, got {self.centre_voxels!r}")
        if self.lr_stop_order not in LR_STOP_ORDERS:
            raise ValueError(f"lr_stop_order must be one of {LR_STOP_ORDERS}, got {self.lr_stop_order!r}")
        if self.kind_probs is not None:
            self.kind_probs = [float(v) for v in self.kind_probs]
            probs = self.kind_probs
            if len(probs) != 2 or min(probs) < 0.0 or sum(probs) > 1.0:
                raise ValueError(
                    f"kind_probs must be two probabilities with a sum <= 1, got {self.kind_probs}"
                )
        if self.adapt_scope not in ADAPT_SCOPES:
            raise ValueError(f"adapt_scope must be one of {ADAPT_SCOPES}, got {self.adapt_scope!r}")
        if not 0.0 <= self.mirror_flip_p <= 1.0:
            raise ValueError(f"mirror_flip_p must be in [0, 1], got {self.mirror_flip_p}")
        if self.mode == "independent" and self.ckp:
            raise ValueError("--ckp (new-domain adaptation) needs a shared or universal model")
        if self.add_classes_init not in NEW_CLASS_INITS:
            raise ValueError(
                f"add_classes_init must be one of {NEW_CLASS_INITS}, got {self.add_classes_init!r}"
            )
        if self.add_classes_train not in NEW_CLASS_SCOPES:
            raise ValueError(
                f"add_classes_train must be one of {NEW_CLASS_SCOPES}, got {self.add_classes_train!r}"
            )
        if self.add_classes_to and not self.ckp:
            raise ValueError(
                "--add_classes_to grows a domain of a trained model: give its checkpoint with --ckp"
            )
        if self.add_classes_to and self.init_from not in (None, "none"):
            raise ValueError(
                "--init_from starts a new domain; --add_classes_to keeps the domain's own parameters"
            )
        if self.adapt_scope == "original_code" and (
            self.add_classes_to or self.init_from not in (None, "none")
        ):
            raise ValueError(
                "--adapt_scope original_code starts the new domain as the original code did (a new model, fresh "
                "except the copied shared conv weights): --init_from and --add_classes_to need --adapt_scope extend"
            )

    # -- derived values -----------------------------------------------------------------------
    def run_name(self) -> str:
        """``res_u2net3d_{mode}[_{tag}]`` (the original's folder name)."""
        tag = f"_{self.out_tag}" if self.out_tag else ""
        return f"res_{MODEL_NAME}_{self.mode}{tag}"

    def run_dir(self) -> Path:
        """``results_dir/res_u2net3d_{mode}[_{tag}]/{task1_task2_...}``."""
        return Path(self.results_dir) / self.run_name() / "_".join(self.tasks)

    def folds_path(self) -> Path:
        """``folds_file``, or ``<prep_dir>/fold_splits.json`` when it is not given."""
        return Path(self.folds_file) if self.folds_file else default_folds_file(self.prep_dir)

    def uses_channels_last(self, device_type: str) -> bool:
        return self.channels_last == "on" or (self.channels_last == "auto" and device_type == "cpu")

    def uses_fused_ops(self, device_type: str) -> bool:
        if self.fused_ops == "auto":
            return device_type == "cpu" and self.amp == "off"
        return self.fused_ops == "on"

    @property
    def validation_interval(self) -> int:
        """``val_every``, or the preset's interval of the mode (10 independent, 20 shared/universal)."""
        return PRESET_VAL_EVERY[self.mode] if self.val_every is None else int(self.val_every)

    def should_validate(self, epoch: int) -> bool:
        """Periodic validation: epochs >= ``val_from`` divisible by the validation interval (0 = never)."""
        every = self.validation_interval
        return every > 0 and epoch >= self.val_from and epoch % every == 0

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
        atomic_write_json(path, self.to_dict())


# ----------------------------------------------------------------------------------------------
# the command line, generated from the fields
# ----------------------------------------------------------------------------------------------
def flag_fields() -> list[tuple[str, str]]:
    """``(field name, flag)`` of every field that has a command-line flag (all but mode and tasks)."""
    out = []
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        kw = f.metadata["argparse"]
        out.append((f.name, kw.get("negate") or f.metadata["flag"] or f"--{f.name}"))
    return out


def add_config_arguments(groups: Mapping[str, Any]) -> None:
    """Add one flag per :class:`TrainConfig` field (but mode and tasks) to the argument groups
    (keys: :data:`GROUPS`), with the field's default, help text and choices. The parsed
    ``Namespace`` attribute of each flag is the field name."""
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        meta = f.metadata
        kw = dict(meta["argparse"])
        default = f.default if f.default is not MISSING else None
        group = groups[meta["group"]]
        negate = kw.pop("negate", None)
        if negate:
            group.add_argument(negate, dest=f.name, action="store_false", default=default, help=meta["help"])
        elif isinstance(default, bool):
            group.add_argument(
                meta["flag"] or f"--{f.name}",
                dest=f.name,
                action="store_true",
                default=default,
                help=meta["help"],
            )
        else:
            group.add_argument(
                meta["flag"] or f"--{f.name}", dest=f.name, default=default, help=meta["help"], **kw
            )


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` keyword arguments of parsed flags (every field but mode and tasks)."""
    return {name: getattr(args, name) for name, _ in flag_fields()}
