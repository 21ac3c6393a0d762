"""Golden data of inference: the original's sliding window, volume mode, post-processing and Dice.

Run by ``python -m tests.golden.make_golden --original PATH --only inference`` (imports nothing of this
project: the original's ``utils``/``models``/``config`` shadow the project's packages there).
``tests/test_golden_inference.py`` rebuilds the same inputs with the makers below and compares the
project's results with the stored outputs of the original's own functions:

* ``tinies.calPatchWeights``: the window weight map, several patch sizes (odd ones too);
* ``evaluate.batch_segmentation``: whole label maps of a tiny fixed network (:class:`TinyNet`, a 3x3x3
  convolution plus a per-voxel bias that makes the logits depend on the position inside the window),
  in independent mode (model patch = task patch) and in shared/universal volume mode (model patch
  differs; the universal model returns ``(logits, share_map, para_map)``), over volumes smaller than,
  equal to and larger than the patch, odd sizes and odd patches;
* ``evaluate.post_processing``: label maps with blobs touching the faces, several components, ties,
  zero weights, the Spleen half rule, a last class named tumour/cancer, keep-1 and keep-2 tasks;
* ``evaluate.multiClassDice``: Dice per class including empty classes.

Float rounding cannot decide a verdict: the sliding-window seeds are chosen so that at every voxel the
two best accumulated class scores of the original differ by more than ``MARGIN`` of their size
(the project adds the same float32 terms in another order, and in volume mode resizes with
another implementation of the same cubic map: differences near 1e-7 relative).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARGIN = 1e-4
"""Minimal relative gap between the best and second-best accumulated class score of every voxel."""

WEIGHT_PATCHES: tuple[tuple[int, int, int], ...] = (
    (8, 8, 8),
    (7, 9, 6),
    (5, 6, 7),
    (12, 10, 16),
    (3, 4, 5),
    (9, 9, 9),
)

# ----------------------------------------------------------------------------------------------
# sliding window cases: (name, mode, task patch, model patch, volume shape, modalities, classes,
# batch size)
# ----------------------------------------------------------------------------------------------
SW_CASES: tuple[
    tuple[str, str, tuple[int, int, int], tuple[int, int, int], tuple[int, int, int], int, int, int], ...
] = (
    ("ind_equal", "independent", (8, 8, 8), (8, 8, 8), (8, 8, 8), 1, 2, 2),
    ("ind_small_odd_shortfall", "independent", (8, 8, 8), (8, 8, 8), (5, 7, 19), 1, 3, 2),
    ("ind_odd_patch_larger", "independent", (7, 9, 6), (7, 9, 6), (13, 20, 11), 2, 3, 3),
    ("ind_mixed", "independent", (6, 10, 8), (6, 10, 8), (6, 23, 4), 1, 2, 2),
    ("ind_odd_patch_small", "independent", (9, 5, 7), (9, 5, 7), (3, 5, 16), 1, 3, 3),
    ("shared_down_up", "shared", (10, 12, 8), (8, 8, 8), (9, 17, 13), 1, 2, 2),
    ("shared_two_modalities", "shared", (6, 6, 10), (8, 8, 8), (7, 11, 9), 2, 3, 3),
    ("universal_equal", "universal", (12, 6, 16), (8, 8, 8), (12, 6, 16), 1, 2, 2),
    ("universal_odd_model_patch", "universal", (10, 6, 12), (7, 8, 9), (11, 5, 20), 1, 3, 2),
    # 49 * (8 / 49) = 7.999999999999999: the scaled case is shorter than the model patch
    ("universal_int_shorter", "universal", (49, 6, 6), (8, 8, 8), (49, 7, 5), 1, 2, 2),
)


class TinyNet(torch.nn.Module):
    """A fixed tiny network: 3x3x3 convolution (zero padding) + a per-voxel, per-class bias of the
    model patch's shape (so the logits depend on the position inside the window). Parameters come
    from ``np.random.RandomState(seed)`` (stable across machines and versions).

    ``universal``: return ``(logits, share_map, para_map)`` as the original's universal model.
    """

    def __init__(
        self, modalities: int, classes: int, patch: tuple[int, int, int], seed: int, universal: bool
    ) -> None:
        super().__init__()
        rng = np.random.RandomState(seed)
        self.conv = torch.nn.Conv3d(modalities, classes, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.from_numpy(rng.normal(0.0, 0.4, self.conv.weight.shape).astype(np.float32))
            )
            self.conv.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.5, classes).astype(np.float32)))
        self.register_buffer(
            "position", torch.from_numpy(rng.normal(0.0, 1.0, (classes, *patch)).astype(np.float32))
        )
        self.universal = universal

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.conv(x) + self.position
        if self.universal:
            return logits, logits.mean(), logits.std()
        return logits


def make_sw_inputs(case: int, seed: int) -> tuple[np.ndarray, TinyNet]:
    """The image (M, z, y, x) float32 and the network of sliding-window case ``case`` with ``seed``."""
    _, mode, _, model_patch, shape, modalities, classes, _ = SW_CASES[case]
    rng = np.random.RandomState(1000 * case + seed)
    image = rng.normal(0.0, 1.0, (modalities, *shape)).astype(np.float32)
    net = TinyNet(modalities, classes, model_patch, 7919 * case + seed, mode == "universal")
    return image, net.eval()


# ----------------------------------------------------------------------------------------------
# post-processing cases
# ----------------------------------------------------------------------------------------------
PP_TASKS: tuple[tuple[str, dict[str, str]], ...] = (
    ("Task02_Heart", {"0": "background", "1": "left atrium"}),
    ("Task03_Liver", {"0": "background", "1": "liver"}),  # the original dropped 'cancer'
    ("Task04_Hippocampus", {"0": "background", "1": "Anterior", "2": "Posterior"}),
    ("Task05_Prostate", {"0": "background", "1": "PZ", "2": "TZ"}),
    ("Task07_Pancreas", {"0": "background", "1": "pancreas", "2": "cancer"}),  # keep-1, last class cancer
    ("Task09_Spleen", {"0": "background", "1": "spleen"}),
    (
        "Task01_BrainTumour",
        {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    ),
    ("Task08_HepaticVessel", {"0": "background", "1": "Vessel", "2": "Tumour"}),
)
PP_CASES = 96
KEEP_ONE = ("Task02_Heart", "Task03_Liver", "Task07_Pancreas", "Task09_Spleen")


def _box(rng: np.random.RandomState, shape: tuple[int, ...], touch: bool) -> tuple[slice, slice, slice]:
    """A random box; ``touch``: it starts at index 0 or ends at the last index of a random axis."""
    sl = []
    for n in shape:
        size = int(rng.randint(1, max(2, n // 2)))
        start = int(rng.randint(0, n - size + 1))
        sl.append([start, start + size])
    if touch:
        axis = int(rng.randint(3))
        if rng.rand() < 0.5:
            sl[axis] = [0, sl[axis][1] - sl[axis][0]]
        else:
            sl[axis] = [shape[axis] - (sl[axis][1] - sl[axis][0]), shape[axis]]
    return slice(*sl[0]), slice(*sl[1]), slice(*sl[2])


def make_pp_inputs(case: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Post-processing case ``case``: (index into PP_TASKS, label map uint8 (z, y, x), weight map
    float32 (0/1, as the original's ``volume > 0``)).

    Every fourth case holds a tie: equal cubes of one class, apart from everything else.
    """
    rng = np.random.RandomState(5000 + case)
    task_idx = case % len(PP_TASKS)
    num_class = len(PP_TASKS[task_idx][1])
    shape = tuple(int(s) for s in rng.randint(8, 17, size=3))
    if case % 4 == 3:
        shape = (shape[0], shape[1], 16)  # room for the tie cubes on the last axis
    label = np.zeros(shape, dtype=np.uint8)
    for c in range(1, num_class):
        for _ in range(int(rng.randint(1, 5))):
            label[_box(rng, shape, touch=rng.rand() < 0.4)] = c
    holes = rng.rand(*shape) < 0.08
    label[holes] = 0
    if rng.rand() < 0.5:  # components that touch only at an edge or a corner
        z, y, x = (int(rng.randint(1, n - 2)) for n in shape)
        c = int(rng.randint(1, num_class))
        label[z, y, x] = c
        label[z + 1, y + 1, x + 1] = c
        label[z + 1, y + 1, x] = c if rng.rand() < 0.5 else label[z + 1, y + 1, x]
    if case % 4 == 3:  # a tie: 2 or 3 equal cubes of one class, one voxel apart from the rest
        c = int(rng.randint(1, num_class))
        label[label == c] = 0
        z0, y0 = int(rng.randint(1, shape[0] - 3)), int(rng.randint(1, shape[1] - 3))
        label[z0 - 1 : z0 + 3, y0 - 1 : y0 + 3, :] = 0
        for x0 in (1, 6, 11)[: 2 + int(rng.randint(2))]:
            label[z0 : z0 + 2, y0 : y0 + 2, x0 : x0 + 3] = c
        if rng.rand() < 0.5:  # a bigger one elsewhere: the tie is then between the 2nd and 3rd
            zb = 0 if z0 >= 5 else shape[0] - 3
            label[zb : zb + 3, 0:3, 0:4] = c
    weight = np.ones(shape, dtype=np.float32)
    if rng.rand() < 0.6:
        weight[_box(rng, shape, touch=True)] = 0.0
    if case % 4 == 3:
        weight[max(z0 - 1, 0) : z0 + 3, max(y0 - 1, 0) : y0 + 3, :] = 1.0
    return task_idx, label, weight


# ----------------------------------------------------------------------------------------------
# Dice cases
# ----------------------------------------------------------------------------------------------
DICE_CASES = 12


def make_dice_inputs(case: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(reference, prediction, number of classes); some classes empty in one or both."""
    rng = np.random.RandomState(9000 + case)
    num_class = 2 + case % 3
    shape = (6, 7, 8)
    gt = rng.randint(0, num_class, size=shape).astype(np.uint8)
    pred = gt.copy()
    flip = rng.rand(*shape) < 0.3
    pred[flip] = rng.randint(0, num_class, size=int(flip.sum()))
    if case % 4 == 1:
        pred[pred == num_class - 1] = 0  # class empty in the prediction
    if case % 4 == 2:
        gt[gt == num_class - 1] = 0  # class empty in the reference
    if case % 4 == 3:
        gt[gt == num_class - 1] = 0
        pred[pred == num_class - 1] = 0  # empty in both
    return gt, pred, num_class


# ----------------------------------------------------------------------------------------------
# running the original
# ----------------------------------------------------------------------------------------------
class _CaptureArgmax(types.ModuleType):
    """numpy stand-in for the original's ``evaluate`` module that records the class scores it argmaxes."""

    def __init__(self) -> None:
        super().__init__("numpy_capture")
        self.scores: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def argmax(self, a: Any, axis: Any = None, **kwargs: Any) -> Any:
        self.scores.append(np.array(a))
        return np.argmax(a, axis=axis, **kwargs)


def _relative_margin(scores: np.ndarray) -> float:
    """Smallest (best - second best) / max(|best|, |second|) over the voxels of (..., C) scores."""
    top = np.sort(scores, axis=-1)[..., -2:]
    scale = np.maximum(np.abs(top).max(axis=-1), 1e-300)
    return float(((top[..., 1] - top[..., 0]) / scale).min())


def _run_sw(original: types.SimpleNamespace, case: int, seed: int) -> tuple[np.ndarray, float]:
    name, mode, task_patch, model_patch, _, modalities, classes, batch = SW_CASES[case]
    image, net = make_sw_inputs(case, seed)
    cfg = original.config
    cfg.trainMode = mode
    cfg.patch_size = list(model_patch)
    cfg.batch_size = batch
    cfg.unifyPatch = "resize"
    cfg.patch_weights = original.tinies.calPatchWeights(list(model_patch))
    labels = {str(c): f"class{c}" for c in range(classes)}
    task = types.SimpleNamespace(
        task="TaskXX_Golden", num_class=classes, labels=labels, patch_size=list(task_patch)
    )
    capture = _CaptureArgmax()
    evaluate = original.evaluate
    saved = evaluate.np
    evaluate.np = capture
    try:
        with torch.no_grad():
            out = evaluate.batch_segmentation(task, image, net)
    finally:
        evaluate.np = saved
    (scores,) = capture.scores
    return np.asarray(out, dtype=np.uint8), _relative_margin(scores)


class _RecordingLogger(types.ModuleType):
    """logger stand-in that keeps the classes named by the original's only log call in
    ``post_processing``, the one inside its bare ``except`` (a class whose component step failed)."""

    def __init__(self) -> None:
        super().__init__("logger_capture")
        self.failed: list[int] = []

    def __getattr__(self, name: str) -> Any:
        def log(message: Any = "", *args: Any, **kwargs: Any) -> None:
            text = str(message)
            if "class:" in text:
                self.failed.append(int(text.split("class:")[1].split(",")[0]))

        return log


def _run_pp(original: types.SimpleNamespace, case: int) -> tuple[np.ndarray, int, dict[int, np.ndarray]]:
    """The original's output, a bitmask of the classes whose component step failed (ties), and the
    closed masks (after the Spleen rule) that its component functions received, by class."""
    task_idx, label, weight = make_pp_inputs(case)
    name, labels = PP_TASKS[task_idx]
    task = original.task_config(
        name, num_class=len(labels), labels=labels, patch_size=[8, 8, 8], pixel_spacing=[1.0, 1.0, 1.0]
    )
    evaluate = original.evaluate
    saved = {
        k: getattr(evaluate, k) for k in ("logger", "get_largest_one_component", "get_largest_two_component")
    }
    rec = _RecordingLogger()
    closed: dict[int, np.ndarray] = {}

    def spy(fn: Any) -> Any:
        def wrapped(img: np.ndarray, threshold: Any = None, tag: str = "") -> Any:
            closed[int(tag.rsplit("_label", 1)[1])] = np.array(img, dtype=bool)
            return fn(img, threshold, tag)

        return wrapped

    evaluate.logger = rec
    evaluate.get_largest_one_component = spy(saved["get_largest_one_component"])
    evaluate.get_largest_two_component = spy(saved["get_largest_two_component"])
    try:
        out = evaluate.post_processing(task, label, weight, "")
    finally:
        for k, v in saved.items():
            setattr(evaluate, k, v)
    failed = set(rec.failed)
    return np.asarray(out, dtype=np.uint8), sum(1 << c for c in failed), {c: closed[c] for c in failed}


def generate(original: types.SimpleNamespace, out_path: Path) -> None:
    from tests.golden.original import task_config

    original.task_config = task_config
    data: dict[str, np.ndarray] = {}
    for p in WEIGHT_PATCHES:
        data["weights_" + "x".join(map(str, p))] = original.tinies.calPatchWeights(list(p)).astype(np.float32)

    seeds, margins = [], []
    for case, spec in enumerate(SW_CASES):
        for seed in range(200):
            labels, margin = _run_sw(original, case, seed)
            if margin > MARGIN:
                break
        else:
            raise RuntimeError(f"no seed below 200 keeps every voxel of case {spec[0]} clear of near-ties")
        data[f"sw_{case}"] = labels
        seeds.append(seed)
        margins.append(margin)
        print(
            f"  sliding window {spec[0]}: seed {seed}, margin {margin:.2e}, labels {np.bincount(labels.ravel())}"
        )
    data["sw_seeds"] = np.asarray(seeds, dtype=np.int64)
    data["sw_margins"] = np.asarray(margins, dtype=np.float64)

    failed = []
    for case in range(PP_CASES):
        out, fail, closed = _run_pp(original, case)
        data[f"pp_{case}"] = out
        for c, mask in closed.items():
            data[f"pp_closed_{case}_{c}"] = mask
        failed.append(fail)
    data["pp_failed"] = np.asarray(failed, dtype=np.int64)
    print(f"  post-processing: {PP_CASES} cases, {sum(1 for f in failed if f)} with a tie (bare except)")

    dices = np.full((DICE_CASES, 4), np.nan)
    for case in range(DICE_CASES):
        gt, pred, num_class = make_dice_inputs(case)
        dices[case, :num_class] = original.evaluate.multiClassDice(gt, pred, num_class)
    data["dice"] = dices
    np.savez_compressed(out_path, **data)
