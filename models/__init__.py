"""The 3D U²-Net and its parts. Start with :func:`build_model`."""

from models.unet import ADAPTER_MODULES, TRAIN_MODES, ModelConfig, U2Net3D, build_model, count_parameters

__all__ = ["ADAPTER_MODULES", "TRAIN_MODES", "ModelConfig", "U2Net3D", "build_model", "count_parameters"]
