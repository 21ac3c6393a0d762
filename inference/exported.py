"""Segmenting with an exported domain network (``python -m models.export``): ONNX or TorchScript.

An exported file holds one domain's network and, as metadata, the task's plans (preprocessing,
patch, classes, post-processing) and the model patch. :func:`load_exported_task` turns it into a
:class:`inference.predictor.TaskModel` whose ``model`` is an :class:`ExportedNetwork` (a network
function ``f(x, task_idx) -> logits`` for task index 0), so :class:`inference.predictor.Segmenter`
and ``predict.py --model FILE`` use it exactly as a checkpoint's model: same preprocessing, sliding
window, post-processing and geometry.

ONNX files run with ONNX Runtime on the CPU (the optional ``onnxruntime`` package; a clear error
names it when missing); TorchScript files on any torch device.
"""

from __future__ import annotations

import os

import torch

from inference.predictor import TaskModel
from models.export import ExportedModel, ExportError, load_exported
from models.runtime import resolve_device
from utils.triples import int3

__all__ = ["ExportedNetwork", "load_exported_task"]


class ExportedNetwork:
    """A network function ``f(x, task_idx) -> logits`` around an exported domain (task index 0).

    Checks what the exported graph cannot: the task index, the number of modalities and that the
    spatial size is a multiple of the total stride.
    """

    def __init__(self, exported: ExportedModel) -> None:
        self.exported = exported
        meta = exported.metadata
        self.task_name = str(meta["task"])
        self.in_channels = int(meta["in_channels"])
        self.num_classes = int(meta["num_classes"])
        self.divisible_by = tuple(int(s) for s in meta["divisible_by"])

    def __call__(self, x: torch.Tensor, task_idx: int = 0) -> torch.Tensor:
        """Args: x (N, modalities, D, H, W). Returns logits (N, classes, D, H, W) on x's device."""
        if task_idx != 0:
            raise IndexError(f"an exported domain ({self.task_name}) has one task, index 0; got {task_idx}")
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.task_name} takes (N, {self.in_channels}, D, H, W), got shape {tuple(x.shape)}"
            )
        bad = [int(s) for s, d in zip(x.shape[2:], self.divisible_by, strict=True) if int(s) % d]
        if bad:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not a multiple of the total stride {self.divisible_by}"
            )
        out = self.exported.run(x)
        return out.to(x.device)


def load_exported_task(
    path: str | os.PathLike[str], task: str | None = None, device: str = "cpu"
) -> TaskModel:
    """A :class:`TaskModel` for an exported domain file.

    Args:
        task: if given, must be the file's task name (a guard against segmenting with the wrong file).
        device: ``cpu`` / ``cuda[:N]`` / ``auto`` (TorchScript); ONNX models run on the CPU.

    Raises:
        ExportError: not an exported domain, onnxruntime missing, ONNX asked to run off the CPU;
        ValueError: the task name differs; RuntimeError: the device is not available.
    """
    dev = resolve_device(device)
    exported = load_exported(path, dev)
    meta = exported.metadata
    name = str(meta["task"])
    if task is not None and task != name:
        raise ValueError(f"{os.fspath(path)!r} holds task {name!r}, not {task!r}")
    plans = dict(meta["plans"])
    if int(plans.get("num_classes", meta["num_classes"])) != int(meta["num_classes"]):
        raise ExportError(
            f"{os.fspath(path)!r} inconsistent: plans say {plans['num_classes']} classes, "
            f"the network has {meta['num_classes']}"
        )
    mp = meta.get("model_patch")
    return TaskModel(ExportedNetwork(exported), 0, name, plans, int3(mp) if mp is not None else None)
