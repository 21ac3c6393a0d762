"""Settings, loss, network and folds against the original's own code and files (``tests/golden/data/model.npz``).

The data come from ``python -m tests.golden.make_golden --original .../u2net_torch_src --only model``
(``tests/golden/gen_model.py`` says what each entry is). Inputs and parameter values are rebuilt here from
the same seeds; only the original's outputs are stored.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models import build_model, count_parameters
from tests.golden import gen_model as gen
from training.augmentation import AugmentParams
from training.config import PRESET_MODEL_PATCH, PRESET_POOLS, TrainConfig
from training.loader import TrainLoader
from training.loop import batch_size_for
from training.losses import SegmentationLoss
from utils.folds import MSD_FOLDS_FILE, update_fold_file
from utils.task_settings import build_plans

DATA = Path(__file__).resolve().parent / "golden" / "data" / "model.npz"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    if not DATA.is_file():
        pytest.fail(f"{DATA} missing: python -m tests.golden.make_golden --original ... --only model")
    with np.load(DATA) as d:
        return {k: d[k] for k in d.files}


def _table(golden: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return dict(zip((str(t) for t in golden[f"cfg_{name}_tasks"]), golden[f"cfg_{name}"], strict=True))


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
def test_training_settings_are_the_originals(golden: dict[str, np.ndarray]) -> None:
    """Optimiser, schedule, LR window, validation per mode, shared batch/model patch/pools, base
    channels and seeds: the original's config.py and training scripts = TrainConfig's defaults."""
    g = {k[4:]: v for k, v in golden.items() if k.startswith("cfg_")}
    for mode in ("independent", "shared", "universal"):
        c = TrainConfig(mode=mode, tasks=["Task02_Heart"])
        assert c.lr == g["base_lr"] and c.weight_decay == g["weight_decay"]
        assert c.steps_per_epoch == g["step_per_epoch"] and c.max_epoch == g["max_epoch"]
        assert c.save_every == g["save_epoch"] and c.lr_window == g["trLoss_win"]
        assert c.val_from == g["start_val_epoch"]
        assert c.base_channels == g["base_outChans"]
        if mode == "independent":  # the original validated independent models per task: val_epochs
            assert set(g["val_epochs"]) == {c.validation_interval}
        else:
            assert c.validation_interval == g["val_epoch"]
            plans = {"batch_size": 9}  # a task's own batch is not used by a multi-task model
            assert batch_size_for(c, SimpleNamespace(plans=plans)) == g["batch_size"]  # type: ignore[arg-type]
        for script in gen.SEED_SCRIPTS:
            assert set(golden[f"seed_{script}_numpy"]) == {c.seed}, script
            assert set(golden[f"seed_{script}_torch"]) == {c.torch_seed}, script
    assert list(PRESET_MODEL_PATCH) == list(g["patch_size"])
    assert list(PRESET_POOLS) == list(g["num_pool_per_axis"])


def test_task_settings_and_augmentation_are_the_originals(golden: dict[str, np.ndarray]) -> None:
    """Per task: patch, pools, target spacing, batch (independent), patch-kind and augmentation
    probabilities and draws per loaded case = the original's config.py tables."""
    for task, patch in _table(golden, "patch_sizes").items():
        plans = build_plans(
            task, ["CT"], {0: "background", 1: "a", 2: "b"}, [[1.0, 1.0, 1.0]], [[64, 64, 64]]
        )
        assert plans["patch_size"] == list(patch), task
        assert plans["pools_per_axis"] == list(_table(golden, "nums_pool_per_axis")[task]), task
        assert plans["target_spacing"] == list(_table(golden, "pixel_spacings")[task]), task
        assert plans["batch_size"] == _table(golden, "batch_sizes")[task], task
        assert plans["small_prob"] == _table(golden, "small_probs")[task], task
        assert plans["fore_prob"] == _table(golden, "fore_probs")[task], task
        c = TrainConfig(mode="independent", tasks=[task])
        assert batch_size_for(c, SimpleNamespace(plans=plans)) == plans["batch_size"]  # type: ignore[arg-type]
    aug = AugmentParams()
    for name, value in (
        ("scale_probs", aug.p_scale),
        ("deform_probs", aug.p_elastic),
        ("rotate_probs", aug.p_rotation),
        ("mirror_probs", aug.p_mirror),
    ):
        assert set(golden[f"cfg_{name}"]) == {value}, name
    draws = inspect.signature(TrainLoader).parameters["draws_per_case"].default
    assert set(golden["cfg_num_patch_per_files"]) == {draws}


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def _loss_and_grad(loss_fn: SegmentationLoss, case: int) -> tuple[float, np.ndarray]:
    logits_np, labels_np = gen.loss_case(case)
    logits = torch.tensor(logits_np, requires_grad=True)
    loss = loss_fn(logits, torch.from_numpy(labels_np))
    loss.backward()
    assert logits.grad is not None
    return float(loss.item()), logits.grad.numpy()


@pytest.mark.parametrize("case", range(gen.LOSS_CASES))
def test_loss_value_and_gradient_equal_the_originals(golden: dict[str, np.ndarray], case: int) -> None:
    """SegmentationLoss() = the original's lovasz_softmax(softmax, ignore=10) + FocalLoss(gamma=2), value
    and gradient w.r.t. the logits, float32 (the original's Lovász runs in float32): case 0 a class absent
    from one sample, case 1 from the whole batch (it still counts: Lovász over all classes)."""
    value, grad = _loss_and_grad(SegmentationLoss(), case)
    np.testing.assert_allclose(value, golden[f"loss_{case}_value"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(grad, golden[f"loss_{case}_grad"], rtol=1e-5, atol=1e-7)


def test_loss_options_differ_from_the_original(golden: dict[str, np.ndarray]) -> None:
    """The non-preset options change what the test above compares (so it would see them)."""
    value, _ = _loss_and_grad(SegmentationLoss(classes="present"), 1)
    assert abs(value - float(golden["loss_1_value"])) > 1e-3
    _, grad = _loss_and_grad(SegmentationLoss(detach_focal_factor=False), 0)
    assert np.abs(grad - golden["loss_0_grad"]).max() > 1e-4


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
#: the original's unit-internal names -> this project's, per adapter (applied after the block prefix)
_UNIT_RULES = {
    "separable_adapter": (
        (r"adapOps\.(\d+)\.conv1\.", r"depthwise.\1."),
        (r"adapOps\.(\d+)\.op1\.0\.", r"depthwise_norm.norms.\1."),
        (r"pwise\.conv1\.", "pointwise."),
    ),
    "series_adapter": (
        (r"adapOps\.(\d+)\.op1\.0\.", r"adapters.\1.norm."),
        (r"adapOps\.(\d+)\.op1\.1\.", r"adapters.\1.conv."),
    ),
    "parallel_adapter": ((r"adapOps\.(\d+)\.op1\.", r"adapters.\1."),),
}


def project_name(original_name: str, module: str, pools: tuple[int, int, int]) -> str:
    """This project's state-dict key of the original's parameter ``original_name``."""
    depth = max(pools) + 1
    ds_levels = [i for i in range(depth - 2, 0, -1) if i < 3]  # the original's dSupers, in order
    n = original_name
    m = re.fullmatch(r"dSupers\.(\d+)\.(\d+)\.op1\.(0|1\.0)\.(\w+)", n)
    if m:
        part = "conv" if m[3] == "0" else "norm"
        return f"ds_heads.{ds_levels[int(m[1])]}.heads.{m[2]}.{part}.{m[4]}"
    for pattern, repl in (
        (r"in_tr_list\.(\d+)\.op1\.0\.", r"input_heads.heads.\1.conv."),
        (r"in_tr_list\.(\d+)\.op1\.1\.0\.", r"input_heads.heads.\1.norm."),
        (r"out_tr_list\.(\d+)\.conv1\.", r"output_heads.heads.\1."),
        (r"down_samps\.(\d+)\.op1\.", r"downsamples.\1."),
        (r"down_blocks\.(\d+)\.op(\d)\.", r"encoders.\1.unit\2."),
        (r"up_samps\.(\d+)\.op\.", r"decoders.\1.up_unit."),
        (r"up_blocks\.(\d+)\.op1\.", r"decoders.\1.fuse_unit."),
        (r"up_blocks\.(\d+)\.op2\.", r"decoders.\1.out_unit."),
    ):
        n, hit = re.subn("^" + pattern, repl, n)
        if hit:
            break
    for pattern, repl in _UNIT_RULES[module]:
        n = re.sub(pattern, repl, n)
    return re.sub(r"\.op\.(\d+)\.", r".norm.norms.\1.", n)  # the per-task norms of a conv unit


@pytest.mark.parametrize("index", range(len(gen.NET_CASES)), ids=gen.net_case_key)
def test_network_logits_equal_the_originals(golden: dict[str, np.ndarray], index: int) -> None:
    """The universal model with each adapter, loaded with the original's parameters (mapped by name),
    gives the original's logits for every task index (float64, 1e-10); the same parameter count and a
    one-to-one name mapping; with the fused CPU kernels and without."""
    module, pools, _ = gen.NET_CASES[index]
    key = gen.net_case_key(index)
    model = build_model(
        "universal",
        gen.NET_IN_CHANNELS,
        gen.NET_CLASSES,
        module=module,
        base_channels=gen.NET_BASE,
        pools_per_axis=pools,
    ).double()
    model.eval()
    own = model.state_dict()
    state = {}
    for name in (str(n) for n in golden[f"{key}_names"]):
        target = project_name(name, module, pools)
        assert target in own and target not in state, (name, target)
        state[target] = torch.from_numpy(gen.param_values(name, tuple(own[target].shape)))
    assert set(state) == set(own)
    model.load_state_dict(state)
    assert count_parameters(model) == int(golden[f"{key}_numel"])
    for fused in (False, True):
        model.set_fused_ops(fused)
        for task in range(len(gen.NET_CLASSES)):
            with torch.no_grad():
                logits = model(torch.from_numpy(gen.net_input(index, task)), task).numpy()
            expected = golden[f"{key}_task{task}"]
            assert logits.shape == expected.shape
            np.testing.assert_allclose(
                logits, expected, rtol=0, atol=1e-10, err_msg=f"task {task} fused {fused}"
            )


# ---------------------------------------------------------------------------------------------
# folds
# ---------------------------------------------------------------------------------------------
def test_shipped_folds_are_the_originals(golden: dict[str, np.ndarray], tmp_path: Path) -> None:
    """utils/msd_fold_splits.json holds the original's fold_splits.json (same canonical SHA-256), and the
    fold file preprocessing writes for a task with the original's cases holds exactly its entry."""
    shipped = json.loads(MSD_FOLDS_FILE.read_text(encoding="utf-8"))
    assert gen.canonical_sha256(shipped) == str(golden["folds_sha256"])
    cases = {}
    for task in (str(t) for t in golden["folds_tasks"]):
        fold0 = shipped[task]["fold0"]
        cases[task] = [
            re.sub(r"\.nii\.gz$", "", Path(str(c)).name) for c in list(fold0["train"]) + list(fold0["val"])
        ]
    path = tmp_path / "fold_splits.json"
    update_fold_file(path, cases)
    written = json.loads(path.read_text(encoding="utf-8"))
    for task, sha in zip(golden["folds_tasks"], golden["folds_task_sha256"], strict=True):
        assert gen.canonical_sha256(written[str(task)]) == str(sha), task
