"""Golden data of the training side (``--only training``): the original's own functions on synthetic inputs.

What :func:`generate` runs and stores (``data/training.npz``), each compared by ``tests/test_golden_training.py``
with what this project computes in its place:

* **Per-task settings**: the per-task probabilities of the original's ``config.py`` (``small_probs``,
  ``fore_probs``, ``scale_probs``, ``deform_probs``, ``rotate_probs``, ``mirror_probs``), read from the
  file as literals (the module itself is not importable: it reads the dataset at import).
* **Patch kinds and batch composition**: ``train.tb_load.gen_batch`` on a queue of synthetic draws
  (:func:`kind_queue`: which of "fore"/"small" each draw could give) for Task02_Heart (0.3 / 0.3) and
  Task09_Spleen (0 / 0) and batch sizes 1-9, seeded; the kind and queue item of every sample. The
  function's only random numbers are one ``np.random.uniform()`` per sample (checked here against the
  RNG state), so the test replays them from the seed.
* **Structure voxels of "fore"/"small" patches**: ``data_utils.augment_patch`` with 2³ patches (then the
  centre is the drawn voxel itself) and no augmentation, on :func:`voxel_case`: per seed the voxel of
  the large case (exact replay; "small" also as Task05_Prostate, whose small structure is label 1) and,
  from one seed, 3,000 consecutive draws of each kind in the small case (the distribution).
* **Patch centres**: ``augment_patch`` after ``tinies.pad2gePatch`` (as ``trQueue`` does), no
  augmentation, on :func:`centre_cases` (one volume smaller than the patch along y); per seed and kind
  the centre, read back from the plain crop of a volume whose values are their own flat index + 1.
* **Centre boxes**: ``data_utils.gen_center_bboxes`` of those labels.
* **Augmentation arguments**: the keyword arguments ``augment_patch`` passes to ``cc_augment``.
* **The grid of an augmented patch**: ``ccToolkits.cc_augment.cc_augment`` with scaling by exactly 1
  (a spatial transform that changes nothing) on :func:`grid_case`, a volume the size of the patch
  (so the "any" centre is fixed) whose values encode their position: its image and label.
* **Unified patch resize**: ``augment_patch``'s shared/universal resize of a whole task patch
  (:func:`resize_cases`; Hippocampus 40x56x40 to 128³, stored on every 5th voxel, and two small ones to
  16³ in full): images cubic, labels nearest.
* **Learning-rate rule, stop, validation, checkpoints, round robin**: the original's ``train.train``
  itself, 3 tasks x 1 step per task and epoch, with its batch loader, loss functions, evaluation and
  ``torch.save`` replaced by recorders and the loss of every step taken from :func:`lr_losses`; stored:
  the learning rate of every step, the mean loss of every epoch (as the original computed it), the task
  of every step, the epochs it validated and saved, its last epoch. Checked here: no plateau decision
  lies within 1e-9 of the 1e-4 threshold, so the verdicts cannot depend on floating-point noise.

Nothing of this project is imported here (see ``make_golden.py``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------------
# inputs (the tests call these too)
# ------------------------------------------------------------------------------------------------
KIND_TASKS = ("Task02_Heart", "Task09_Spleen")
KIND_BATCH_SIZES = (1, 2, 3, 4, 5, 9)
KIND_BATCHES = 40
VOXEL_SEEDS = 200
VOXEL_DRAWS = 3000
VOXEL_DRAW_SEED = 7
CENTRE_SEEDS = 60
#: (volume shape, patch) of the centre cases: y smaller than the patch (padded), an odd patch axis
CENTRE_GEOMETRY = (((10, 7, 12), (6, 9, 4)), ((14, 16, 11), (6, 8, 5)))
#: (task patch, model patch) of the unified-resize cases, and the stride the 128³ one is stored with
RESIZE_CASES = (((40, 56, 40), (128, 128, 128)), ((10, 24, 16), (16, 16, 16)), ((5, 30, 36), (16, 16, 16)))
RESIZE_STRIDE = 5
#: the original's train() run: tasks (round robin), epochs at most, validation and checkpoint schedule
LR_TASKS = ("Task02_Heart", "Task04_Hippocampus", "Task05_Prostate")
LR_MAX_EPOCH = 150
LR_VAL_FROM, LR_VAL_EVERY, LR_SAVE_EVERY = 30, 10, 5
KIND_CODES = {"any": 0, "fore": 1, "small": 2}


def kind_queue(task_index: int, batch_size: int) -> np.ndarray:
    """``(n, 2)`` bool: per queued draw whether its "fore" and "small" patches exist (both 60 %, "fore"
    only 25 %, neither 15 %: a case without foreground)."""
    rs = np.random.RandomState(1000 + 10 * task_index + batch_size)
    u = rs.random_sample(4 * batch_size * KIND_BATCHES + 64)
    return np.stack([u < 0.85, u < 0.6], axis=1)


def kind_seed(task_index: int, batch_size: int) -> int:
    """Seed of numpy's global RNG before the batches of one task and batch size."""
    return 500 + 10 * task_index + batch_size


def voxel_case(large: bool = False) -> tuple[np.ndarray, int]:
    """A uint8 label with 3 classes (small structure = 2, as for every task but Prostate) and the number
    of classes. Irregular shapes, so that no draw is a coincidence of symmetry. Small: (6, 7, 5), 5
    "small" voxels among 35 (the distribution); large: (14, 15, 16), more than 2,048 foreground voxels
    (the exact replay: more than the ``subset`` option keeps)."""
    if large:
        rs = np.random.RandomState(4)
        label = (rs.random_sample((14, 15, 16)) < 0.7).astype(np.uint8)
        label[rs.random_sample(label.shape) < 0.01] = 2
        return label, 3
    rs = np.random.RandomState(3)
    label = np.zeros((6, 7, 5), np.uint8)
    label[1:5, 2:6, 1:4] = (rs.random_sample((4, 4, 3)) < 0.7).astype(np.uint8)
    label[2, 3, 2] = label[3, 3, 2] = label[3, 4, 1] = label[4, 5, 3] = label[1, 2, 3] = 2
    label[0, 0, 4] = 1
    return label, 3


def centre_cases() -> list[tuple[np.ndarray, tuple[int, int, int], int]]:
    """Per :data:`CENTRE_GEOMETRY`: a label (3 classes, "small" = 2), the patch, the number of classes."""
    out = []
    for i, (shape, patch) in enumerate(CENTRE_GEOMETRY):
        rs = np.random.RandomState(40 + i)
        label = (rs.random_sample(shape) < 0.08).astype(np.uint8)
        label[0, 0, 0] = 1  # a voxel in a corner: offsets clipped at the border
        label[shape[0] - 1, shape[1] - 1, shape[2] - 1] = 2
        label[shape[0] // 2, 1, shape[2] // 3] = 2
        out.append((label, patch, 3))
    return out


def smooth_field(shape: tuple[int, ...], seed: int, passes: int = 3) -> np.ndarray:
    """A smooth random float64 volume in [0, 1] (box-filtered noise, NumPy only)."""
    rs = np.random.RandomState(seed)
    v = rs.random_sample(shape)
    for _ in range(passes):
        for axis in range(v.ndim):
            v = (np.roll(v, 1, axis) + v + np.roll(v, -1, axis)) / 3.0
    return (v - v.min()) / max(v.max() - v.min(), 1e-12)


def resize_case(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, values 1-4) and label (uint8, 3 classes) of the task patch of :data:`RESIZE_CASES`."""
    patch = RESIZE_CASES[index][0]
    image = (1.0 + 3.0 * smooth_field(patch, 60 + index)).astype(np.float32)
    field = smooth_field(patch, 70 + index)
    label = np.zeros(patch, np.uint8)
    label[field > 0.45] = 1
    label[field > 0.7] = 2
    return image, label


#: the grid case: volume = patch, every axis even
GRID_PATCH = (8, 6, 4)


def grid_case() -> tuple[np.ndarray, np.ndarray]:
    """Image ``1 + z + 10 y + 100 x`` (float32, linear) and label ``z + 8 y + 48 x`` (uint8: each voxel
    its own value) of shape :data:`GRID_PATCH`."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in GRID_PATCH], indexing="ij")
    return (1.0 + z + 10.0 * y + 100.0 * x).astype(np.float32), (z + 8 * y + 48 * x).astype(np.uint8)


def lr_losses() -> np.ndarray:
    """Loss of every step of epoch e (float64, one per epoch): a fast decay, then a plateau with noise,
    so that the rule keeps the rate for a while, then halves it on some epochs and not on others."""
    rs = np.random.RandomState(21)
    e = np.arange(1, LR_MAX_EPOCH + 1, dtype=np.float64)
    return 0.4 + 1.2 * np.exp(-e / 12.0) + rs.uniform(-4e-3, 4e-3, LR_MAX_EPOCH)


# ------------------------------------------------------------------------------------------------
# the original
# ------------------------------------------------------------------------------------------------
def config_literals(src: Path) -> dict[str, Any]:
    """The literal assignments of the original's ``config.py`` (read, not executed)."""
    tree = ast.parse((src / "config.py").read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError, SyntaxError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _config_task(original: Any, lit: dict[str, Any], task: str, num_class: int, patch: list[int]) -> Any:
    from tests.golden.original import task_config

    ct = task_config(task, num_class=num_class, labels={}, patch_size=patch, pixel_spacing=[1.0, 1.0, 1.0])
    for key, table in (
        ("small_prob", "small_probs"),
        ("fore_prob", "fore_probs"),
        ("scale_prob", "scale_probs"),
        ("deform_prob", "deform_probs"),
        ("rotate_prob", "rotate_probs"),
        ("mirror_prob", "mirror_probs"),
    ):
        setattr(ct, key, lit[table][task])
    return ct


def _no_augmentation(ct: Any) -> Any:
    ct.scale_prob = ct.deform_prob = ct.rotate_prob = ct.mirror_prob = 0.0
    return ct


class _ListQueue:
    """Stands in for the ``multiprocessing.Queue`` that ``gen_batch`` reads."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.taken = 0

    def qsize(self) -> int:
        return len(self.items) - self.taken

    def get(self) -> dict[str, Any]:
        self.taken += 1
        return self.items[self.taken - 1]


def _kinds(original: Any, lit: dict[str, Any], out: dict[str, np.ndarray]) -> None:
    for ti, task in enumerate(KIND_TASKS):
        ct = _config_task(original, lit, task, 3, [1, 1, 1])
        original.config.config_tasks = {task: ct}
        for b in KIND_BATCH_SIZES:
            avail = kind_queue(ti, b)
            items = []
            for i, (fore, small) in enumerate(avail):
                patches: dict[str, Any] = {}
                for kind, exists in (("any", True), ("fore", bool(fore)), ("small", bool(small))):
                    patches[kind] = (
                        {
                            "image": np.zeros((1, 1, 1, 1)),
                            "label": np.zeros((1, 1, 1)),
                            "weight": np.zeros((1, 1, 1)),
                            "augs": [i, KIND_CODES[kind]],
                        }
                        if exists
                        else None
                    )
                items.append(patches)
            loader = original.train.tb_load(task)
            loader.trainQueue = _ListQueue(items)
            np.random.seed(kind_seed(ti, b))
            got = []
            for _ in range(KIND_BATCHES):
                got.extend(loader.gen_batch(b, [1, 1, 1])[3])
            check = np.random.RandomState(kind_seed(ti, b))
            check.random_sample(len(got))
            assert np.array_equal(np.random.get_state()[1], check.get_state()[1]), (
                "gen_batch drew other numbers"
            )
            out[f"kinds_{task}_b{b}"] = np.asarray(got, dtype=np.int16)  # (samples, 2): queue item, kind


def _decode_voxels(
    original: Any, ct: Any, image: np.ndarray, label: np.ndarray, kind: str, n: int
) -> np.ndarray:
    data = {"ID": "case", "image": image[None], "label": label, "weight": (label >= 0).astype(np.float32)}
    got = np.empty(n, np.int32)
    for i in range(n):
        patch = original.data_utils.augment_patch(ct, data, ct.patch_size, ptype=kind)
        got[i] = int(round(float(patch["image"][0, 1, 1, 1]))) - 1
    return got


def _voxels(original: Any, lit: dict[str, Any], out: dict[str, np.ndarray]) -> None:
    original.config.trainMode = "independent"
    big, num_class = voxel_case(large=True)
    big_image = (np.arange(big.size, dtype=np.float32) + 1).reshape(big.shape)
    label, _ = voxel_case()
    image = (np.arange(label.size, dtype=np.float32) + 1).reshape(label.shape)
    ct = _no_augmentation(_config_task(original, lit, "Task04_Hippocampus", num_class, [2, 2, 2]))
    for kind in ("fore", "small"):
        per_seed = np.empty(VOXEL_SEEDS, np.int32)
        for s in range(VOXEL_SEEDS):
            np.random.seed(s)
            per_seed[s] = _decode_voxels(original, ct, big_image, big, kind, 1)[0]
        np.random.seed(VOXEL_DRAW_SEED)
        out[f"voxel_{kind}_per_seed"] = per_seed
        out[f"voxel_{kind}_draws"] = _decode_voxels(original, ct, image, label, kind, VOXEL_DRAWS)
        want = label > 0 if kind == "fore" else label == num_class - 1
        assert want.reshape(-1)[out[f"voxel_{kind}_draws"]].all()
    # Prostate's "small" structure is label 1 (the others': the highest label)
    ct = _no_augmentation(_config_task(original, lit, "Task05_Prostate", num_class, [2, 2, 2]))
    per_seed = np.empty(VOXEL_SEEDS, np.int32)
    for s in range(VOXEL_SEEDS):
        np.random.seed(s)
        per_seed[s] = _decode_voxels(original, ct, big_image, big, "small", 1)[0]
    assert (big.reshape(-1)[per_seed] == 1).all()
    out["voxel_small_prostate_per_seed"] = per_seed


def _centres(original: Any, lit: dict[str, Any], out: dict[str, np.ndarray]) -> None:
    original.config.trainMode = "independent"
    for ci, (label, patch, num_class) in enumerate(centre_cases()):
        ct = _no_augmentation(_config_task(original, lit, "Task04_Hippocampus", num_class, list(patch)))
        padded, pad = original.tinies.pad2gePatch(label, list(patch), data_channel=None)
        image = (np.arange(padded.size, dtype=np.float32) + 1).reshape(padded.shape)
        data = {
            "ID": "case",
            "image": image[None],
            "label": padded,
            "weight": (padded >= 0).astype(np.float32),
        }
        mid = tuple(int(p / 2) for p in patch)  # the crop's voxel at the centre (extract_roi_from_volume)
        for kind in ("any", "fore", "small"):
            centres = np.empty((CENTRE_SEEDS, 3), np.int64)
            for s in range(CENTRE_SEEDS):
                np.random.seed(1000 * ci + s)
                res = original.data_utils.augment_patch(ct, data, list(patch), ptype=kind)
                flat = int(round(float(res["image"][0][mid]))) - 1
                centres[s] = np.array(np.unravel_index(flat, padded.shape)) - np.asarray(pad)
            out[f"centre_{ci}_{kind}"] = centres
        boxes = original.data_utils.gen_center_bboxes(label, list(patch), ct)
        out[f"boxes_{ci}_fore"] = np.asarray(boxes["fore"], np.int64)
        out[f"boxes_{ci}_small"] = np.asarray(boxes["small"], np.int64)


def _augment_arguments(original: Any, lit: dict[str, Any], out: dict[str, np.ndarray]) -> None:
    original.config.trainMode = "independent"
    label, num_class = voxel_case()
    ct = _config_task(original, lit, "Task04_Hippocampus", num_class, [4, 4, 4])
    seen: dict[str, Any] = {}
    real = original.data_utils.cc_augment

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    original.data_utils.cc_augment = spy
    try:
        data = {"ID": "case", "image": label[None].astype(np.float32) + 1, "label": label, "weight": label}
        np.random.seed(0)
        original.data_utils.augment_patch(ct, data, ct.patch_size, ptype="any")
    finally:
        original.data_utils.cc_augment = real
    for key in ("alpha", "sigma", "angle_x", "angle_y", "angle_z", "scale"):
        out[f"aug_{key}"] = np.asarray(seen[key], np.float64)
    for key in ("p_el_per_sample", "p_scale_per_sample", "p_rot_per_sample"):
        out[f"aug_{key}"] = np.asarray(seen[key], np.float64)
    out["aug_patch_center_dist_from_border"] = np.asarray(seen["patch_center_dist_from_border"], np.int64)


def _grid(original: Any, out: dict[str, np.ndarray]) -> None:
    image, label = grid_case()
    ct = SimpleNamespace(task="Task02_Heart", num_class=256)
    np.random.seed(0)
    img, seg, augs = original.cc_augment.cc_augment(
        ct, image[None, None], label[None, None], "any", list(GRID_PATCH),
        patch_center_dist_from_border=[p // 2 for p in GRID_PATCH], do_elastic_deform=False, do_rotation=False,
        scale=(1.0, 1.0), p_el_per_sample=0, p_rot_per_sample=0, p_scale_per_sample=1,
    )  # fmt: skip
    assert augs == ["scale"]
    out["grid_image"] = np.asarray(img[0, 0], np.float64)
    out["grid_label"] = np.asarray(seg[0, 0], np.float64)


def _resize(original: Any, lit: dict[str, Any], out: dict[str, np.ndarray]) -> None:
    original.config.trainMode = "universal"
    for i, (patch, model_patch) in enumerate(RESIZE_CASES):
        original.config.patch_size = list(model_patch)
        image, label = resize_case(i)
        ct = _no_augmentation(_config_task(original, lit, "Task04_Hippocampus", 3, list(patch)))
        data = {"ID": "case", "image": image[None], "label": label, "weight": (label >= 0).astype(np.float32)}
        np.random.seed(0)
        res = original.data_utils.augment_patch(ct, data, list(model_patch), ptype="any")
        img, lab = np.asarray(res["image"][0]), np.asarray(res["label"])
        step = RESIZE_STRIDE if max(model_patch) > 64 else 1
        out[f"resize_{i}_image"] = img[::step, ::step, ::step].astype(np.float64)
        out[f"resize_{i}_label"] = lab[::step, ::step, ::step].astype(np.uint8)
        out[f"resize_{i}_label_counts"] = np.bincount(lab.astype(np.int64).ravel(), minlength=3)
    original.config.patch_size = [128, 128, 128]
    original.config.trainMode = "independent"


class _Recorder:
    """config.writer for the train() run: keeps the scalars it is given."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        self.scalars.setdefault(tag, []).append((int(step), float(value)))

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _train(original: Any, lit: dict[str, Any], out: dict[str, np.ndarray]) -> None:
    import torch

    tr, cfg = original.train, original.config
    losses = lr_losses()
    steps_of_task: list[str] = []
    state = {"epoch": 0}

    class Loader:
        def __init__(self, task: str) -> None:
            self.task = task

        def enQueue(self, *args: Any) -> None:
            pass

        def check_process(self) -> None:
            pass

        def gen_batch(self, batch_size: int, patch_size: list[int]) -> tuple[Any, ...]:
            steps_of_task.append(self.task)
            shape = [batch_size, 1, *patch_size]
            return (
                np.ones(shape),
                np.zeros([batch_size, *patch_size]),
                np.zeros(shape[:1] + shape[2:]),
                [["x"]] * batch_size,
            )

        def __len__(self) -> int:
            return cfg.step_per_epoch * cfg.max_epoch

    class Focal:
        def __init__(self, gamma: float) -> None:
            pass

        def __call__(self, output: Any, label: Any) -> Any:
            step = len(steps_of_task)
            epoch = (step - 1) // len(LR_TASKS) + 1
            state["epoch"] = epoch
            return torch.tensor(float(losses[epoch - 1]), dtype=torch.float64)

    evals: list[int] = []
    saves: list[int] = []
    model = torch.nn.Conv3d(1, 2, 1)
    saved = {
        "tb_load": tr.tb_load,
        "FocalLoss": tr.FocalLoss,
        "lovasz_softmax": tr.lovasz_softmax,
        "eval": tr.eval,
        "tqdm": tr.tqdm,
    }
    real_save = torch.save
    writer = _Recorder()
    cfg.writer = writer
    cfg.use_gpu = False
    cfg.trainMode = "independent"
    cfg.step_per_epoch = len(LR_TASKS)  # one step of every task per epoch
    cfg.max_epoch = LR_MAX_EPOCH
    cfg.start_val_epoch, cfg.val_epoch, cfg.save_epoch = LR_VAL_FROM, LR_VAL_EVERY, LR_SAVE_EVERY
    cfg.trLoss_win = lit["trLoss_win"]
    cfg.base_lr = lit["base_lr"]
    cfg.weight_decay = lit["weight_decay"]
    cfg.batch_size = 1
    cfg.patch_size = [1, 1, 1]
    cfg.log_dir = cfg.eval_out_dir = "/nonexistent"
    tr.tb_load = Loader
    tr.FocalLoss = Focal
    tr.lovasz_softmax = lambda probs, label, ignore=None: (probs * 0).sum()
    tr.eval = lambda args, archive, model, epoch, iterations: evals.append(int(epoch))
    tr.tqdm = lambda it, desc=None: it
    torch.save = lambda obj, path: saves.append(int(obj["epoch"]))
    args = SimpleNamespace(
        resume_ckp="", resume_epoch=0, tasks=list(LR_TASKS), fold=0, trainMode="independent", ckp=""
    )
    archive = {t: {"fold0": {"train": [], "val": []}} for t in LR_TASKS}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tr.train(args, archive, model)
    finally:
        torch.save = real_save
        for k, v in saved.items():
            setattr(tr, k, v)
        cfg.patch_size = [128, 128, 128]
        cfg.writer = None
    lr_steps = np.array([v for _, v in sorted(writer.scalars["data/lr"])], np.float64)
    epoch_losses = np.array([v for _, v in sorted(writer.scalars["data/loss_epoch"])], np.float64)
    last = state["epoch"]
    assert len(lr_steps) == len(LR_TASKS) * last and len(epoch_losses) == last < LR_MAX_EPOCH
    _assert_no_near_ties(epoch_losses, lit["trLoss_win"])
    out["lr_step_lr"] = lr_steps
    out["lr_epoch_loss"] = epoch_losses
    out["lr_step_task"] = np.array([LR_TASKS.index(t) for t in steps_of_task], np.int64)
    out["lr_eval_epochs"] = np.array(evals, np.int64)
    out["lr_saved_epochs"] = np.array(saves, np.int64)
    out["lr_last_epoch"] = np.array(last, np.int64)
    out["lr_schedule"] = np.array(
        [LR_MAX_EPOCH, LR_VAL_FROM, LR_VAL_EVERY, LR_SAVE_EVERY, lit["trLoss_win"]], np.int64
    )
    out["lr_base"] = np.array([lit["base_lr"], lit["weight_decay"]], np.float64)


def _assert_no_near_ties(epoch_losses: np.ndarray, window: int) -> None:
    """No comparison of the plateau rule lies within 1e-9 of its 1e-4 threshold."""
    averages = [np.mean(epoch_losses[e - window : e]) for e in range(window, len(epoch_losses) + 1)]
    gaps = [abs((a - b) - 1e-4) for a, b in zip(averages, averages[1:], strict=False)]
    assert min(gaps) > 1e-9, min(gaps)


def generate(original: Any, out_path: Path) -> None:
    """Run the original's functions (see the module docstring) and write ``out_path``."""
    src = Path(original.train.__file__).resolve().parent
    # the silent-logger stub answers every attribute, ``__file__`` too, which breaks ``inspect`` when
    # torch imports its compiler on the first Adam step: give it a real one
    logger = sys.modules.get("ccToolkits.logger")
    if logger is not None and not isinstance(logger.__dict__.get("__file__"), str):
        logger.__file__ = str(src / "ccToolkits" / "logger.py")
    lit = config_literals(src)
    out: dict[str, np.ndarray] = {}
    for name in ("small_probs", "fore_probs", "scale_probs", "deform_probs", "rotate_probs", "mirror_probs"):
        tasks = sorted(lit[name])
        out[f"config_{name}_tasks"] = np.array(tasks)
        out[f"config_{name}"] = np.array([float(lit[name][t]) for t in tasks], np.float64)
    _kinds(original, lit, out)
    _voxels(original, lit, out)
    _centres(original, lit, out)
    _augment_arguments(original, lit, out)
    _grid(original, out)
    _resize(original, lit, out)
    _train(original, lit, out)
    assert math.isclose(float(out["lr_base"][0]), 3e-4)
    np.savez_compressed(out_path, **out)
