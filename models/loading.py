"""Building a model from a checkpoint dict (the file format itself lives in :mod:`utils.checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.unet import ModelConfig, U2Net3D

__all__ = ["build_model_from_checkpoint"]


def build_model_from_checkpoint(
    ckpt: Mapping[str, Any], *, strict: bool = True
) -> tuple[U2Net3D, list[dict]]:
    """Instantiate the checkpoint's ``model_config``, load its weights, set eval mode.

    Args:
        ckpt: a dict from :func:`utils.checkpoint.load_checkpoint`.
        strict: require the state dict to match the model exactly.

    Returns:
        (model on CPU in eval mode, the checkpoint's task list ``[{"name", "plans"}]``).
    """
    cfg = dict(ckpt["model_config"])
    model = U2Net3D(ModelConfig(**cfg))
    model.load_state_dict(ckpt["state_dict"], strict=strict)
    model.eval()
    return model, [dict(t) for t in ckpt["tasks"]]
