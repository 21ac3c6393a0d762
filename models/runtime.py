"""Running the network on a device: device choice, mixed precision, and the CPU allocator setting.

Shared by training and inference so that ``--device`` and ``--amp`` mean the same everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import weakref
from typing import Literal, cast

import torch
from torch import nn

#: what ``--amp`` accepts: ``auto`` = bfloat16 where supported, else float16 (CUDA)
AMP_MODES = ("off", "auto", "bf16", "fp16")
AmpMode = Literal["off", "auto", "bf16", "fp16"]
ResolvedAmp = Literal["off", "bf16", "fp16"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name as given, checked.

    Raises:
        RuntimeError: CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return dev


def resolve_amp(mode: str, device: torch.device) -> ResolvedAmp:
    """Turn ``"auto"`` into ``"bf16"`` or ``"fp16"`` for ``device``; check the others.

    Raises:
        ValueError: an unknown mode, or float16 asked for on a CPU.
    """
    if mode == "off":
        return "off"
    if mode == "bf16":
        return "bf16"
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("amp 'fp16' needs a CUDA device (use bf16 on CPU)")
        return "fp16"
    if mode == "auto":
        return "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"
    raise ValueError(f"amp must be one of {AMP_MODES}, got {mode!r}")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an amp mode (None = plain float32)."""
    resolved = resolve_amp(mode, device)
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolved]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` for ``dtype``, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def keep_freed_memory_in_heap(top_pad_bytes: int = 256 * 2**20) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (Linux only).

    Why: glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it with
    ``munmap`` when freed, so each new activation tensor of a 3D network (tens to hundreds of MiB)
    costs page faults and kernel zeroing — several passes over memory before the first useful one.
    Serving them from the heap and never trimming it makes a CPU training step of the 3D U²-Net
    about 25 % faster (see docs/performance.md). The process keeps its peak memory until it ends,
    which is what a training or prediction run does anyway.

    Returns:
        True if the setting was applied (glibc found), False otherwise (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, int(top_pad_bytes)) == 1
    return bool(ok)


_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def compiled(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model, backend=backend)``, made once per model and backend and kept while the
    model lives. The compiled wrapper shares the model's parameters; save, load and switch the model
    itself (its ``state_dict`` has no ``_orig_mod.`` prefixes). Each task index of a multi-task model
    is compiled on its first call (dynamo specialises on it); see docs/performance.md, "torch.compile".
    """
    per_backend = _COMPILED.setdefault(model, {})
    if backend not in per_backend:
        per_backend[backend] = cast(nn.Module, torch.compile(model, backend=backend))  # an OptimizedModule
    return per_backend[backend]
