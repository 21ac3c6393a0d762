"""Which numerical path segments: precision (fp32 / bf16 / fp16) and backend (PyTorch / ONNX Runtime).

``predict.py --precision auto|fp32|bf16|fp16 --backend auto|torch|onnxruntime`` (and training's
``--infer_precision`` / ``--infer_backend`` for validation and ``--predict``) end here:
:func:`choose_runtime` turns the request into a :class:`RuntimeChoice` with the reason for it,
:func:`runtime_network` builds the network function of the chosen backend.

What ``auto`` picks (docs/performance.md, "Fast inference paths", has the measurements):

* precision: ``bf16`` only where the hardware computes bfloat16 natively — a CUDA GPU that
  supports it without emulation, a CPU with AVX-512 BF16 or AMX (x86) or the BF16 extension
  (Arm) and oneDNN able to use it; never an emulated bf16 (slower than fp32). Otherwise ``fp32``.
* backend: ONNX Runtime on a CPU, in fp32, when ``onnxruntime`` is installed and the network is one
  where it was measured faster than PyTorch (:func:`onnxruntime_faster`: the dense U-Net and the
  universal separable model at least :data:`ORT_MIN_BASE` channels wide; at the demo's width 8
  per-operation overheads dominate, and the series/parallel adapters were not measured); PyTorch
  otherwise (GPUs, bf16).

Every fast path is held to the accuracy bar of ``tests/test_fast_paths.py`` (label maps agree with
fp32 PyTorch on >= 99.9 % of the voxels, per-class Dice within 0.002); ``fp32`` + ``torch`` is the
reference, and what the golden and exactness tests use.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

from models.export import extract_domain, onnx_bytes, onnx_runner, onnxruntime_session
from models.unet import U2Net3D

__all__ = [
    "BACKENDS",
    "ORT_MIN_BASE",
    "PRECISIONS",
    "OnnxRuntimeNetwork",
    "RuntimeChoice",
    "choose_runtime",
    "cpu_bf16_flags",
    "native_bf16",
    "onnxruntime_available",
    "onnxruntime_faster",
    "parse_bf16_flags",
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Backend = Literal["auto", "torch", "onnxruntime"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
BACKENDS: tuple[str, ...] = get_args(Backend)

#: the narrowest network (channels of the first level) for which ``auto`` picks ONNX Runtime on CPU
ORT_MIN_BASE = 16


def onnxruntime_faster(train_mode: str, module: str | None, base_channels: int) -> bool:
    """Whether ONNX Runtime segments faster than PyTorch on a CPU for this network, as measured by
    ``benchmarks/bench_inference.py`` (docs/performance.md): the dense U-Net (independent, shared) and
    the universal model with separable adapters, at least :data:`ORT_MIN_BASE` channels wide."""
    measured = train_mode in ("independent", "shared") or module in (None, "separable_adapter")
    return measured and base_channels >= ORT_MIN_BASE


#: CPU feature flags (``/proc/cpuinfo``) that mean native bfloat16 arithmetic
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def parse_bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The native-bfloat16 flags in the text of ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``)."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            found.update(flag for flag in value.split() if flag in _BF16_FLAGS)
    return tuple(sorted(found))


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bfloat16 feature flags this CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_bf16_flags(f.read())
    except OSError:
        return ()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (no emulation)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu":
        return False
    mkldnn_ok = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return mkldnn_ok and bool(cpu_bf16_flags())


def onnxruntime_available() -> bool:
    """Whether the optional ``onnxruntime`` package is installed."""
    return importlib.util.find_spec("onnxruntime") is not None


@dataclass(frozen=True)
class RuntimeChoice:
    """The resolved inference path and why it was chosen.

    Attributes:
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast dtype of the PyTorch backend).
        backend: ``torch`` or ``onnxruntime``.
        device: the torch device the network runs on (ONNX Runtime: ``cpu``).
        threads: CPU threads of the network (PyTorch's; ONNX Runtime gets as many).
        requested: what was asked for, e.g. ``precision=auto backend=auto``.
        reason: why, in words (printed by ``predict.py`` and stored in ``predict_settings.json``).
    """

    precision: str
    backend: str
    device: str
    threads: int
    requested: str
    reason: str

    @property
    def amp(self) -> str:
        """The autocast mode of :class:`inference.settings.InferenceSettings` (``off`` = fp32)."""
        return "off" if self.precision == "fp32" else self.precision

    def describe(self) -> str:
        engine = "ONNX Runtime" if self.backend == "onnxruntime" else "PyTorch"
        return f"{engine} {self.precision} on {self.device} ({self.threads} threads): {self.reason}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cpu_bf16_flags"] = list(cpu_bf16_flags())
        out["torch"] = torch.__version__
        if self.backend == "onnxruntime":
            import onnxruntime  # installed: the backend was chosen

            out["onnxruntime"] = onnxruntime.__version__
        return out


def choose_runtime(
    precision: str, backend: str, device: torch.device, *, ort_faster: bool = True
) -> RuntimeChoice:
    """Resolve ``auto`` and check explicit requests (module docstring).

    Args:
        precision: one of :data:`PRECISIONS`.
        backend: one of :data:`BACKENDS`.
        device: where the network runs (resolved, e.g. ``cpu``, ``cuda:0``).
        ort_faster: whether ONNX Runtime is the faster engine for this network on a CPU
            (:func:`onnxruntime_faster`); ``auto`` picks it only then.

    Raises:
        ValueError: an unknown value, or a combination this project does not run (fp16 on CPU,
            ONNX Runtime off the CPU or in reduced precision, onnxruntime not installed).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    requested = f"precision={precision} backend={backend}"
    threads = torch.get_num_threads()
    why: list[str] = []
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on a CPU)")
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(
                "backend onnxruntime runs on the CPU only (use --device cpu, or --backend torch)"
            )
        if precision in ("bf16", "fp16"):
            raise ValueError(f"backend onnxruntime runs in fp32 only (use --backend torch for {precision})")
        if not onnxruntime_available():
            raise ValueError("backend onnxruntime needs the onnxruntime package (pip install onnxruntime)")
    if precision == "auto":
        if backend != "onnxruntime" and native_bf16(device):
            precision = "bf16"
            flags = ", ".join(cpu_bf16_flags()) if device.type == "cpu" else "GPU"
            why.append(f"native bf16 ({flags})")
        else:
            precision = "fp32"
            why.append(
                "fp32 (ONNX Runtime asked for)"
                if backend == "onnxruntime"
                else f"no native bf16 on {device.type}"
            )
    if backend == "auto":
        if device.type != "cpu":
            backend = "torch"
        elif precision != "fp32":
            backend = "torch"
            why.append(f"PyTorch for {precision}")
        elif not onnxruntime_available():
            backend = "torch"
            why.append("onnxruntime not installed")
        elif not ort_faster:
            backend = "torch"
            why.append("PyTorch is the faster engine for this network")
        else:
            backend = "onnxruntime"
            why.append("onnxruntime installed")
    if not why:
        why.append("as asked")
    return RuntimeChoice(precision, backend, str(device), threads, requested, "; ".join(why))


class OnnxRuntimeNetwork:
    """A network function ``f(x, task_idx) -> logits`` that runs one task of a trained model with
    ONNX Runtime (CPU, fp32): the task's domain (:func:`models.export.extract_domain`) exported to
    ONNX in memory when built (a few seconds), no file written.

    Args:
        model: the trained model (not changed).
        task_idx: the task; calls with another index are refused.
        threads: ONNX Runtime's intra-op threads (default: PyTorch's thread count).
    """

    def __init__(self, model: U2Net3D, task_idx: int, threads: int | None = None) -> None:
        self.task_idx = int(task_idx)
        domain = extract_domain(model, self.task_idx)
        self.divisible_by = tuple(int(s) for s in domain.total_strides)
        self.session = onnxruntime_session(onnx_bytes(domain), threads)
        self._run = onnx_runner(self.session)

    def __call__(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        """Args: x (N, modalities, D, H, W), D, H, W multiples of the total stride. Returns float32
        logits (N, classes, D, H, W) on x's device."""
        if int(task_idx) != self.task_idx:
            raise IndexError(f"this ONNX Runtime network runs task {self.task_idx}, not {task_idx}")
        return self._run(x).to(x.device)
