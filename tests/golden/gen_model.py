"""Golden data of settings, loss, network and folds (``--only model``): the original's own code and files.

What :func:`generate` runs and stores (``data/model.npz``), each compared by ``tests/test_golden_model.py``
with what this project computes in its place:

* **Settings**: the original's ``config.py`` imported for real (its TensorBoard writer class stubbed):
  optimiser, schedule, validation and model values (:data:`CONFIG_SCALARS`) and the per-task tables
  (:data:`CONFIG_TASK_TABLES`); and the seeds of the two training scripts, found in their syntax trees
  (the ``np.random.seed(...)`` and ``torch.manual_seed(...)`` calls; the scripts are not run).
* **Loss**: ``loss.lovasz_loss.lovasz_softmax(softmax(logits), labels, ignore=10)`` +
  ``loss.focal_loss.FocalLoss(gamma=2)(logits, labels)`` as ``train.py`` calls them, on the float32 logits
  of :func:`loss_case` (float32 because the original's Lovász gradient is ``.float()`` and its
  ``torch.dot`` refuses mixed dtypes, so float64 logits cannot go through it): value and gradient with
  respect to the logits. Checked here: no two errors of a class lie within :data:`LOSS_MIN_GAP` of each
  other (for a class absent from the batch: its largest error from the next, the only one it weighs),
  so the sort order (and the gradient) cannot depend on floating-point noise.
* **Network**: ``models/u2net3d.py``'s universal model (the only mode the original can run) with each
  adapter and the pools of :data:`NET_CASES`, base 4 channels, two tasks (1 modality / 2 classes and
  2 modalities / 3 classes), deep supervision and residual blocks on, in float64, with every parameter
  set by :func:`param_values` from its (original) name; stored: its parameter names, its parameter
  count and its logits for each task index on :func:`net_input`. The parameters themselves are not
  stored: the test rebuilds them from the names.
* **Folds**: SHA-256 of the original repository's ``fold_splits.json`` parsed and dumped canonically
  (:func:`canonical_sha256`), of the whole file and of every task's entry.

Nothing of this project is imported here (see ``make_golden.py``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import sys
import types
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------------
# inputs (the tests call these too)
# ------------------------------------------------------------------------------------------------
CONFIG_SCALARS = (
    "base_lr",
    "weight_decay",
    "step_per_epoch",
    "max_epoch",
    "save_epoch",
    "trLoss_win",
    "start_val_epoch",
    "val_epoch",
    "batch_size",
    "patch_size",
    "num_pool_per_axis",
    "base_outChans",
)
CONFIG_TASK_TABLES = (
    "val_epochs",
    "batch_sizes",
    "patch_sizes",
    "nums_pool_per_axis",
    "pixel_spacings",
    "small_probs",
    "fore_probs",
    "scale_probs",
    "deform_probs",
    "rotate_probs",
    "mirror_probs",
    "num_patch_per_files",
)
SEED_SCRIPTS = ("train_model_no_adapters", "train_model_wt_adapters")
SEED_CALLS = {"numpy": ("np", "random", "seed"), "torch": ("torch", "manual_seed")}

#: loss cases: logits (N, C, D, H, W); case 0: class 2 absent from sample 0, case 1: from the whole batch
LOSS_SHAPE = (2, 3, 2, 3, 4)
LOSS_CASES = 2
LOSS_MIN_GAP = 1e-5

#: network cases: (adapter, pools per axis, input volume)
ADAPTERS = ("separable_adapter", "series_adapter", "parallel_adapter")
NET_GEOMETRY = (((2, 2, 2), (8, 8, 8)), ((1, 3, 3), (2, 16, 16)))
NET_CASES = tuple((m, pools, shape) for m in ADAPTERS for pools, shape in NET_GEOMETRY)
NET_BASE = 4
NET_IN_CHANNELS = (1, 2)
NET_CLASSES = (2, 3)


def loss_case(case: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits of shape :data:`LOSS_SHAPE` and int64 labels (N, D, H, W) with 3 classes."""
    rs = np.random.RandomState(20 + case)
    logits = (2.0 * rs.standard_normal(LOSS_SHAPE)).astype(np.float32)
    labels = rs.randint(0, 3, size=(LOSS_SHAPE[0], *LOSS_SHAPE[2:])).astype(np.int64)
    if case == 0:
        labels[0][labels[0] == 2] = 1
    else:
        labels[labels == 2] = 0
    return logits, labels


def net_case_key(index: int) -> str:
    module, pools, _ = NET_CASES[index]
    return f"net_{module.split('_')[0]}_{''.join(map(str, pools))}"


def net_input(index: int, task: int) -> np.ndarray:
    """float64 input (1, modalities of ``task``, *volume) of network case ``index``."""
    shape = NET_CASES[index][2]
    rs = np.random.RandomState(100 + 10 * index + task)
    return rs.standard_normal((1, NET_IN_CHANNELS[task], *shape))


def param_values(name: str, shape: Sequence[int]) -> np.ndarray:
    """float64 values of the parameter the original calls ``name``: seeded by the name (CRC-32);
    convolution weights ~ N(0, 2 / fan_in), norm weights 1 + N(0, 0.2²), biases N(0, 0.2²)."""
    rs = np.random.RandomState(zlib.crc32(name.encode()))
    z = rs.standard_normal(tuple(shape))
    if len(shape) > 1:
        return z * np.sqrt(2.0 / int(np.prod(shape[1:])))
    if name.endswith(".weight"):
        return 1.0 + 0.2 * z
    return 0.2 * z


def canonical_sha256(obj: Any) -> str:
    """SHA-256 of ``json.dumps(obj, sort_keys=True)``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# the original's side
# ------------------------------------------------------------------------------------------------
def _real_config(src: Path) -> types.ModuleType:
    """The original's config.py executed (its ``ccToolkits.MySummaryWriter`` import stubbed), under
    another name than the stub ``config`` that ``load_original`` installed."""
    writer = types.ModuleType("ccToolkits.MySummaryWriter")
    writer.MySummaryWriter = type("MySummaryWriter", (), {})  # type: ignore[attr-defined]
    previous = sys.modules.get("ccToolkits.MySummaryWriter")
    sys.modules["ccToolkits.MySummaryWriter"] = writer
    try:
        spec = importlib.util.spec_from_file_location("original_config_real", src / "config.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            sys.modules.pop("ccToolkits.MySummaryWriter", None)
        else:
            sys.modules["ccToolkits.MySummaryWriter"] = previous
    return module


def _call_path(func: ast.expr) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return tuple(reversed(parts))


def script_seeds(path: Path) -> dict[str, list[int]]:
    """The literal arguments of every ``np.random.seed`` / ``torch.manual_seed`` call of a script."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: dict[str, list[int]] = {k: [] for k in SEED_CALLS}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kind, target in SEED_CALLS.items():
                if _call_path(node.func) == target:
                    out[kind].append(int(ast.literal_eval(node.args[0])))
    return out


def _settings(src: Path, out: dict[str, np.ndarray]) -> None:
    cfg = _real_config(src)
    for name in CONFIG_SCALARS:
        out[f"cfg_{name}"] = np.asarray(getattr(cfg, name), np.float64)
    for name in CONFIG_TASK_TABLES:
        table = getattr(cfg, name)
        tasks = sorted(table)
        out[f"cfg_{name}_tasks"] = np.asarray(tasks)
        out[f"cfg_{name}"] = np.asarray([table[t] for t in tasks], np.float64)
    for script in SEED_SCRIPTS:
        for kind, values in script_seeds(src / f"{script}.py").items():
            out[f"seed_{script}_{kind}"] = np.asarray(values, np.int64)


def _loss(out: dict[str, np.ndarray]) -> None:
    import torch
    import torch.nn.functional as F

    lovasz = importlib.import_module("loss.lovasz_loss")
    focal = importlib.import_module("loss.focal_loss").FocalLoss(gamma=2)
    for case in range(LOSS_CASES):
        logits_np, labels_np = loss_case(case)
        # the sort order must not hang on float noise: every error of a class apart from the others
        p = np.exp(logits_np.astype(np.float64))
        p /= p.sum(axis=1, keepdims=True)
        for c in range(LOSS_SHAPE[1]):
            errors = np.sort(np.abs((labels_np == c) - p[:, c]).ravel())
            # a class absent from the batch weighs only its largest error: only that one must stand apart
            gaps = np.diff(errors) if (labels_np == c).any() else np.diff(errors[-2:])
            assert gaps.min() > LOSS_MIN_GAP, (case, c, gaps.min())
        logits = torch.tensor(logits_np, requires_grad=True)
        labels = torch.from_numpy(labels_np)
        loss = lovasz.lovasz_softmax(F.softmax(logits, dim=1), labels, ignore=10) + focal(logits, labels)
        loss.backward()
        assert logits.grad is not None
        out[f"loss_{case}_value"] = np.asarray(loss.item(), np.float64)
        out[f"loss_{case}_grad"] = logits.grad.numpy().astype(np.float32)


class _TupleScaleUpsample:
    """``torch.nn.Upsample`` replaced while the original builds its model: the original passes its
    scale factors as lists, which current PyTorch rejects; a list becomes a tuple, nothing else changes."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.original = torch.nn.Upsample

        class Upsample(self.original):  # type: ignore[misc, name-defined]
            def __init__(self, size: Any = None, scale_factor: Any = None, **kwargs: Any) -> None:
                if isinstance(scale_factor, list):
                    scale_factor = tuple(float(s) for s in scale_factor)
                super().__init__(size=size, scale_factor=scale_factor, **kwargs)

        self.patched = Upsample

    def __enter__(self) -> None:
        self.torch.nn.Upsample = self.patched

    def __exit__(self, *exc: Any) -> None:
        self.torch.nn.Upsample = self.original


def _network(original: Any, src: Path, out: dict[str, np.ndarray]) -> None:
    import torch

    cfg = original.config
    saved_modules = {k: sys.modules.get(k) for k in ("models", "models.u2net3d", "models.model_utils")}
    # the original's models/ has no __init__.py: a namespace package loses against any regular
    # package named models on sys.path (this project's), so the package is named explicitly
    pkg = types.ModuleType("models")
    pkg.__path__ = [str(src / "models")]  # type: ignore[attr-defined]
    sys.modules["models"] = pkg
    for k in ("models.u2net3d", "models.model_utils"):
        sys.modules.pop(k, None)
    names = ("trainMode", "module", "task_idx", "num_pool_per_axis", "base_outChans")
    names += ("deep_supervision", "residual", "instance_norm")
    saved_cfg = {k: getattr(cfg, k, None) for k in names}
    try:
        u2net3d = importlib.import_module("models.u2net3d")
        cfg.trainMode, cfg.deep_supervision, cfg.residual, cfg.instance_norm = "universal", True, True, True
        cfg.base_outChans = NET_BASE
        for index, (module, pools, _) in enumerate(NET_CASES):
            key = net_case_key(index)
            cfg.module, cfg.num_pool_per_axis, cfg.task_idx = module, list(pools), 0
            with _TupleScaleUpsample(torch):
                net = u2net3d.u2net3d(list(NET_IN_CHANNELS), NET_BASE, list(NET_CLASSES))
            net = net.double().eval()
            state = net.state_dict()
            net.load_state_dict(
                {k: torch.from_numpy(param_values(k, tuple(v.shape))) for k, v in state.items()}
            )
            out[f"{key}_names"] = np.asarray(list(state))
            out[f"{key}_numel"] = np.asarray(sum(p.numel() for p in net.parameters()), np.int64)
            for task in range(len(NET_CLASSES)):
                cfg.task_idx = task
                with torch.no_grad():
                    result = net(torch.from_numpy(net_input(index, task)))
                logits = result[0] if isinstance(result, tuple) else result
                out[f"{key}_task{task}"] = logits.numpy().astype(np.float64)
    finally:
        for k, v in saved_cfg.items():
            setattr(cfg, k, v)
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _folds(src: Path, out: dict[str, np.ndarray]) -> None:
    data = json.loads((src.parent / "fold_splits.json").read_text(encoding="utf-8"))
    tasks = sorted(data)
    out["folds_sha256"] = np.asarray(canonical_sha256(data))
    out["folds_tasks"] = np.asarray(tasks)
    out["folds_task_sha256"] = np.asarray([canonical_sha256(data[t]) for t in tasks])


def generate(original: Any, out_path: Path) -> None:
    """Run the original's code and files as described in the module docstring; write ``out_path``."""
    src = Path(original.train.__file__).resolve().parent
    out: dict[str, np.ndarray] = {}
    _settings(src, out)
    _loss(out)
    _network(original, src, out)
    _folds(src, out)
    np.savez_compressed(out_path, **out)
