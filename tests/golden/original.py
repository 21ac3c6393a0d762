"""Import the original code base unmodified, as an oracle (used only by ``make_golden.py``).

The original reads a mutable module ``config`` and logs through ``ccToolkits.logger``; both are
replaced by stubs here (``stub_config`` and a silent logger), as are two small packages it imports
but never needs for the functions we call (``glob2``, ``termcolor``). Its ``.cuda()`` calls become
no-ops on a CPU machine, and ``np.int`` (removed from NumPy 2) is put back as ``int``. Nothing in the
original's files is changed.

scikit-image: the original pinned 0.14, whose ``resize`` did no anti-aliasing; today's default
anti-aliases when shrinking. ``load_original`` makes ``skimage.transform.resize`` default to
``anti_aliasing=False`` so that the oracle computes what the original computed.
"""

from __future__ import annotations

import glob as _glob
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np


class _SilentLogger(types.ModuleType):
    """ccToolkits.logger stand-in: every call is accepted and dropped."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # module protocol (``__file__``, ...): inspect and torch ask for these
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class _StubWriter:
    """config.writer stand-in (the original draws TensorBoard figures inside batch_segmentation)."""

    def __getattr__(self, name: str) -> Any:
        if name == "chooseSlices":
            return lambda *args, **kwargs: [0]
        return lambda *args, **kwargs: None


def stub_config() -> types.ModuleType:
    """A ``config`` module with the original's defaults for the attributes its functions read."""
    cfg = types.ModuleType("config")
    cfg.writer = _StubWriter()  # type: ignore[attr-defined]
    cfg.prepData_dir = "../prepData/"  # type: ignore[attr-defined]
    cfg.base_dir = "../dataset/"  # type: ignore[attr-defined]
    cfg.patch_size = [128, 128, 128]  # type: ignore[attr-defined]
    cfg.unifyPatch = "resize"  # type: ignore[attr-defined]
    cfg.patch_weights = None  # type: ignore[attr-defined]
    cfg.batch_size = 2  # type: ignore[attr-defined]
    cfg.trainMode = "independent"  # type: ignore[attr-defined]
    cfg.intensity_norm = "modality"  # type: ignore[attr-defined]
    cfg.post_processing = True  # type: ignore[attr-defined]
    cfg.step_per_epoch = 300  # type: ignore[attr-defined]
    cfg.max_epoch = 300  # type: ignore[attr-defined]
    cfg.trLoss_win = 20  # type: ignore[attr-defined]
    cfg.base_lr = 0.0003  # type: ignore[attr-defined]
    cfg.colorslist = ["#000000", "#00FF00", "#0000FF", "#FF0000", "#FFFF00"]  # type: ignore[attr-defined]
    cfg.test_flip = False  # type: ignore[attr-defined]
    return cfg


def task_config(
    task: str,
    *,
    num_class: int,
    labels: dict[str, str],
    patch_size: list[int],
    pixel_spacing: list[float],
    num_modality: int = 1,
) -> types.SimpleNamespace:
    """What the original's ``config.set_config_task`` would hold for a task (the fields its functions read)."""
    spleen = task == "Task09_Spleen"
    return types.SimpleNamespace(
        task=task,
        num_class=num_class,
        labels=labels,
        patch_size=list(patch_size),
        pixel_spacing=list(pixel_spacing),
        num_modality=num_modality,
        num_patch_per_file=2,
        scale_prob=0.5,
        small_prob=0.0 if spleen else 0.3,
        fore_prob=0.0 if spleen else 0.3,
        deform_prob=0.3,
        rotate_prob=0.3,
        mirror_prob=0.3,
        queue_size=5,
        nProc=1,
    )


def load_original(src: str | Path) -> types.SimpleNamespace:
    """Import the original's modules from ``src`` (its ``u2net_torch_src`` folder).

    Returns:
        namespace with ``config`` (the stub, mutable), ``utils``, ``tinies``, ``evaluate``,
        ``data_utils``, ``cc_augment`` (module ``ccToolkits.cc_augment``) and ``train``.
    """
    src = Path(src).resolve()
    if not (src / "evaluate.py").is_file():
        raise SystemExit(f"{src} is not the original's u2net_torch_src folder (no evaluate.py)")
    import skimage.transform
    import torch

    np.int = int  # type: ignore[attr-defined]  # removed in NumPy 2; the original's Dice uses it
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    resize = skimage.transform.resize
    if not getattr(resize, "_golden_no_aa", False):

        def resize_no_aa(*args: Any, anti_aliasing: Any = False, **kwargs: Any) -> Any:
            return resize(*args, anti_aliasing=anti_aliasing, **kwargs)

        resize_no_aa._golden_no_aa = True  # type: ignore[attr-defined]
        skimage.transform.resize = resize_no_aa  # type: ignore[assignment]

    cfg = stub_config()
    sys.modules["config"] = cfg
    glob2 = types.ModuleType("glob2")
    glob2.glob = _glob.glob  # type: ignore[attr-defined]
    sys.modules["glob2"] = glob2
    termcolor = types.ModuleType("termcolor")
    termcolor.colored = lambda text, *a, **k: text  # type: ignore[attr-defined]
    sys.modules["termcolor"] = termcolor
    cc = types.ModuleType("ccToolkits")
    cc.__path__ = [str(src / "ccToolkits")]  # type: ignore[attr-defined]
    sys.modules["ccToolkits"] = cc
    logger = _SilentLogger("ccToolkits.logger")
    sys.modules["ccToolkits.logger"] = logger
    cc.logger = logger  # type: ignore[attr-defined]
    sys.path.insert(0, str(src))
    mods = {
        name: importlib.import_module(name) for name in ("tinies", "utils", "data_utils", "evaluate", "train")
    }
    mods["cc_augment"] = importlib.import_module("ccToolkits.cc_augment")
    return types.SimpleNamespace(config=cfg, **mods)
