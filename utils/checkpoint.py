"""Single-file checkpoints shared by training and inference (see ``docs/inference.md``).

A checkpoint is a plain dict saved with ``torch.save`` and loaded with
``torch.load(..., weights_only=True)`` (no pickled objects, no code execution)::

    {
      "format": "u2net3d",
      "version": 1,
      "model_config": {"train_mode": ..., "in_channels": [...], "num_classes": [...],
                       "module": ..., "base_channels": ..., "pools_per_axis": [...],
                       "deep_supervision": ..., "residual": ...},   # models.build_model kwargs
      "model_patch": [z, y, x] or None,       # shared/universal model patch; None = task patches
      "tasks": [{"name": "Task04_Hippocampus", "plans": {...plans.json...}}, ...],  # task_idx order
      "state_dict": model.state_dict(),
      "train_state": {...} or None,           # optional: optimizer state, epoch, rng states, ...
    }

Everything must be tensors or plain Python types (dict, list, tuple, str, int, float, bool, None);
use :func:`rng_state_to_plain` for random-number-generator states.
"""

from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.io_utils import atomic_write

__all__ = [
    "best_checkpoints",
    "choose_task",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "MODEL_CONFIG_KEYS",
    "NonFiniteTensorError",
    "first_nonfinite",
    "load_checkpoint",
    "make_checkpoint",
    "restore_rng_state",
    "rng_state_to_plain",
    "save_checkpoint",
    "task_index",
]

CHECKPOINT_FORMAT = "u2net3d"
CHECKPOINT_VERSION = 1
MODEL_CONFIG_KEYS: tuple[str, ...] = (
    "train_mode",
    "in_channels",
    "num_classes",
    "module",
    "base_channels",
    "pools_per_axis",
    "deep_supervision",
    "residual",
)
_REQUIRED_KEYS = ("format", "version", "model_config", "model_patch", "tasks", "state_dict")


class CheckpointError(ValueError):
    """A file is missing, unreadable or not a u2net3d checkpoint."""


class NonFiniteTensorError(ValueError):
    """A checkpoint was not written because a floating-point tensor holds NaN or Inf values.

    Attributes:
        path: the checkpoint that was not written (its previous version is unchanged).
        key: where the first such tensor sits, e.g. ``state_dict['head.0.weight']``.
    """

    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self.path = os.fspath(path)
        self.key = key
        super().__init__(
            f"refusing to write checkpoint {self.path!r}: {key} holds NaN or Inf values "
            "(the weights diverged); the file on disk, if any, is unchanged"
        )


def first_nonfinite(obj: Any, where: str = "") -> str | None:
    """Where the first floating-point tensor with a NaN/Inf value sits in nested dicts / lists
    (e.g. ``"['state_dict']['w']"``), or None when every one is finite."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return None if bool(torch.isfinite(obj).all()) else where or "tensor"
        return None
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = first_nonfinite(v, f"{where}[{k!r}]")
        if found is not None:
            return found
    return None


def make_checkpoint(
    model_config: Mapping[str, Any],
    tasks: Sequence[Mapping[str, Any]],
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_patch: Sequence[int] | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble (and validate) a checkpoint dict.

    Args:
        model_config: ``models.build_model`` keyword arguments (keys of ``MODEL_CONFIG_KEYS``;
            missing optional ones take build_model's defaults at load time).
        tasks: one ``{"name": str, "plans": dict}`` per task, in task-index order.
        state_dict: ``model.state_dict()``.
        model_patch: the model patch (z, y, x) of a shared/universal model, or None.
        train_state: optional training state (tensors / plain types only).
    """
    unknown = set(model_config) - set(MODEL_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown model_config keys {sorted(unknown)}; allowed: {MODEL_CONFIG_KEYS}")
    for k in ("train_mode", "in_channels", "num_classes"):
        if k not in model_config:
            raise ValueError(f"model_config lacks {k!r}")
    config = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in model_config.items()}
    task_list = []
    for t in tasks:
        if "name" not in t or "plans" not in t:
            raise ValueError(f"each task needs 'name' and 'plans', got keys {sorted(t)}")
        task_list.append({"name": str(t["name"]), "plans": dict(t["plans"])})
    if len(task_list) != len(config["in_channels"]) or len(task_list) != len(config["num_classes"]):
        raise ValueError(
            f"{len(task_list)} tasks but in_channels={config['in_channels']}, "
            f"num_classes={config['num_classes']}"
        )
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": config,
        "model_patch": None if model_patch is None else [int(s) for s in model_patch],
        "tasks": task_list,
        "state_dict": dict(state_dict),
        "train_state": None if train_state is None else dict(train_state),
    }


def save_checkpoint(
    path: str | os.PathLike[str],
    model_config: Mapping[str, Any],
    tasks: Sequence[Mapping[str, Any]],
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_patch: Sequence[int] | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a checkpoint (see :func:`make_checkpoint`) and write it atomically
    (:func:`utils.io_utils.atomic_write`). Returns the saved dict.

    Raises:
        NonFiniteTensorError: a weight (or optimizer state) holds NaN/Inf; nothing is written.
        utils.io_utils.DiskFullError: the disk filled up; the previous file is unchanged.
    """
    ckpt = make_checkpoint(model_config, tasks, state_dict, model_patch=model_patch, train_state=train_state)
    for key in ("state_dict", "train_state"):
        bad = first_nonfinite(ckpt[key], key)
        if bad is not None:
            raise NonFiniteTensorError(path, bad)
    atomic_write(path, lambda f: torch.save(ckpt, f))
    return ckpt


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint with ``torch.load(..., weights_only=True)``.

    Raises:
        CheckpointError: naming the file, when it is missing, not a torch file, holds objects that
            ``weights_only`` refuses, or is not a u2net3d checkpoint (wrong/missing keys).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: file not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip archive whose end (central directory) is missing
            raise CheckpointError(
                f"checkpoint {path!r}: not a readable torch file: it is truncated ({os.path.getsize(path)} "
                "bytes, the end of the archive is missing: an interrupted copy or download?); copy it again "
                "or use another checkpoint"
            )
        raise CheckpointError(
            f"checkpoint {path!r}: not a readable torch file (not a torch.save zip archive); give a "
            "checkpoint written by this project's training (checkpoints/latest.pt, best.pt, epoch_XXXX.pt)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, KeyError, UnpicklingError, ... by case
        first = str(e).splitlines()[0] if str(e) else ""
        if type(e).__name__ == "UnpicklingError":
            why = "it holds objects other than tensors and plain types (refused by weights_only=True)"
        else:
            why = "it is not a readable torch file"
        raise CheckpointError(f"checkpoint {path!r}: {why} ({type(e).__name__}: {first[:200]})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path!r}: expected a dict, found {type(ckpt).__name__}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path!r}: not a {CHECKPOINT_FORMAT} checkpoint (format={ckpt.get('format')!r}; "
            f"top-level keys {sorted(map(str, ckpt))[:10]}); give a checkpoint written by this project's "
            "training (a foreign or whole-model pickle cannot be loaded)"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: lacks keys {missing}")
    if int(ckpt["version"]) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r}: version {ckpt['version']} is newer than supported ({CHECKPOINT_VERSION})"
        )
    cfg = ckpt["model_config"]
    if not isinstance(cfg, dict) or any(k not in cfg for k in ("train_mode", "in_channels", "num_classes")):
        raise CheckpointError(f"checkpoint {path!r}: model_config lacks train_mode/in_channels/num_classes")
    tasks = ckpt["tasks"]
    if not isinstance(tasks, list) or not all(
        isinstance(t, dict) and "name" in t and "plans" in t for t in tasks
    ):
        raise CheckpointError(f"checkpoint {path!r}: 'tasks' must be a list of {{'name', 'plans'}} dicts")
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"checkpoint {path!r}: 'state_dict' is not a dict")
    ckpt.setdefault("train_state", None)
    return ckpt


def choose_task(ckpt: Mapping[str, Any], name: str | None) -> tuple[int, str]:
    """``(index, name)`` of the task called ``name``, or of the checkpoint's only task when ``name`` is
    None (ValueError asking for ``--task`` when there are several; see :func:`task_index`)."""
    names = [t["name"] for t in ckpt["tasks"]]
    if name is None:
        if len(names) != 1:
            raise ValueError(f"the checkpoint holds {len(names)} tasks {names}; choose one with --task")
        name = names[0]
    return task_index(ckpt, name), name


def best_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """The best checkpoint of a run folder (``checkpoints/best.pt``), or those of the run folders in
    ``folder`` (``*/checkpoints/best.pt``, sorted), e.g. one per task of an independent mode."""
    root = Path(folder)
    if (root / "checkpoints" / "best.pt").is_file():
        return [root / "checkpoints" / "best.pt"]
    return sorted(root.glob("*/checkpoints/best.pt"))


def task_index(ckpt: Mapping[str, Any], name: str) -> int:
    """Index of the task called ``name`` in a checkpoint (ValueError listing the tasks otherwise)."""
    names = [t["name"] for t in ckpt["tasks"]]
    if name in names:
        return names.index(name)
    raise ValueError(f"task {name!r} is not in this checkpoint; it has {names}: choose one of them")


# ----------------------------------------------------------------------------------------------
# RNG states as weights_only-safe values
# ----------------------------------------------------------------------------------------------
def rng_state_to_plain() -> dict[str, Any]:
    """States of Python ``random``, NumPy's global RNG and torch (CPU and every CUDA device) as
    tensors and plain types, loadable with ``weights_only=True``."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state_to_plain` (CUDA only when available and
    saved for as many devices)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state(
        (
            str(nps["name"]),
            keys.astype(np.uint32),
            int(nps["pos"]),
            int(nps["has_gauss"]),
            float(nps["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
