"""The 3D U²-Net and its parts. Start with :func:`build_model`.

One module per building-block family (``conv_units``, ``blocks``, ``norms``, ``depthwise``, ``pointwise``,
``fused``; ``triton_depthwise``: Triton kernels of the depthwise convolution, ``triton`` optional and
imported only there), the network (``unet``), the shared / per-task parameter split (``params``), parameter
reports (``report``, ``python -m models``), building a model from a checkpoint (``loading``),
running it on a device (``runtime``: device, mixed precision, CPU allocator, ``torch.compile``) and exporting one domain
as a standalone ONNX / TorchScript network (``export``, ``python -m models.export``; ``onnx`` and
``onnxruntime`` are optional and imported only there).

Imports: ``utils`` (and third-party libraries); never ``training``, ``inference`` or ``demo``.
"""

from models.unet import ADAPTER_MODULES, TRAIN_MODES, ModelConfig, U2Net3D, build_model, count_parameters

__all__ = ["ADAPTER_MODULES", "TRAIN_MODES", "ModelConfig", "U2Net3D", "build_model", "count_parameters"]
