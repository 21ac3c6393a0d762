"""Command line shared by ``train_model_no_adapters.py`` and ``train_model_wt_adapters.py``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from training.config import TrainConfig
from training.data import TaskData, load_task_data, placeholder_task
from training.loop import Prepared, fit, resolve_device
from training.setup import adapt_to_new_task, build_fresh_model, setup_from_checkpoint
from training.state import BEST, LATEST, load_training_checkpoint, resolve_resume_path
from utils.cpu_perf import keep_freed_memory_in_heap

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser(prog: str, modes: Sequence[str], default_mode: str, description: str) -> argparse.ArgumentParser:
    """The flags of the original scripts plus what users need (every flag explained in ``--help``)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)
    g = p.add_argument_group("what to train (flags of the original scripts)")
    g.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help="task folder names (e.g. Task02_Heart Task03_Liver); independent mode trains one model per "
                        "task; with --ckp: the ONE new task to add to the trained model")  # fmt: skip
    g.add_argument("--trainMode", default=default_mode, choices=list(modes),
                   help="independent = one model per task with its own plans (patch, pools, batch); shared = one "
                        "U-Net for all tasks (task-specific heads and norms); universal = shared U-Net plus "
                        "per-task adapters (--module)")  # fmt: skip
    g.add_argument("--module", default="separable_adapter",
                   choices=["separable_adapter", "series_adapter", "parallel_adapter"],
                   help="universal mode's adapter: separable_adapter (the paper's depthwise adapters), "
                        "series_adapter or parallel_adapter (residual adapters); ignored otherwise")  # fmt: skip
    g.add_argument("--ckp", default="", metavar="CKPT",
                   help="new domain: a trained shared/universal checkpoint; the model gets --tasks' parts, its "
                        "old weights are loaded and frozen, and only the new task's parameters train")  # fmt: skip
    g.add_argument("--init_from", default=None, metavar="TASK",
                   help="with --ckp: start the new task's norms/adapters as copies of this old task's "
                        "(default: fresh initialisation); heads are always fresh")  # fmt: skip
    g.add_argument("--resume_ckp", default="", metavar="CKPT_OR_DIR",
                   help="continue an interrupted run exactly (weights, optimizer, epoch, step, random states, "
                        "loss history, LR rule): a checkpoint file, or a run folder (uses checkpoints/latest.pt)")  # fmt: skip
    g.add_argument("--resume_epoch", type=int, default=0, metavar="N",
                   help="with a run folder as --resume_ckp: resume from checkpoints/epoch_000N.pt; with a file: "
                        "check that it was written after epoch N (0 = no check)")  # fmt: skip
    g.add_argument("--fold", type=int, default=0, help="cross-validation fold of --folds_file (validation cases)")
    g.add_argument("--model", default="u2net3d", choices=["u2net3d"], help="network (part of the output folder name)")
    g.add_argument("--out_tag", default="", help="tag of the output folder: results/res_u2net3d_{mode}_{tag}/{tasks}")
    g.add_argument("--base_outChans", type=int, default=16, help="channels of the first U-Net level (16 in the paper)")
    g.add_argument("--predict", nargs="*", choices=["val", "test"], default=None, metavar="WHAT",
                   help="after training, segment with the best checkpoint and write NIfTI label maps in the "
                        "original geometry to <run>/predictions/<task>/: 'val' (the fold's validation cases; "
                        "the default when --predict is given alone) and/or 'test' (<dataset_dir>/<task>/imagesTs)")  # fmt: skip

    g = p.add_argument_group("data and outputs")
    g.add_argument("--dataset_dir", default="dataset", help="raw MSD task folders (used by --predict test)")
    g.add_argument("--prep_dir", default="prepData", help="preprocessed data of preprocess_taskSep.py")
    g.add_argument("--folds_file", default=str(REPO_ROOT / "fold_splits.json"),
                   help="fold splits JSON written by preprocess_taskSep.py")  # fmt: skip
    g.add_argument("--results_dir", default="results", help="root of the run folders")

    g = p.add_argument_group("schedule (defaults: the paper preset)")
    g.add_argument("--max_epoch", type=int, default=300, help="epochs (training stops earlier when the LR drops below 1e-8)")
    g.add_argument("--steps_per_epoch", type=int, default=300,
                   help="optimisation steps per epoch; shared/universal step k trains task (k-1) mod T")  # fmt: skip
    g.add_argument("--batch_size", type=int, default=None,
                   help="patches per step (default: the task's plans for independent models, 2 for shared/universal)")  # fmt: skip
    g.add_argument("--patch_size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="patch sampled from every task's volumes (default: each task's plans); independent "
                        "models then pool as often as the patch allows unless --pools is given")  # fmt: skip
    g.add_argument("--model_patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="shared/universal: the model patch every task patch is resized to (default 128 128 128)")  # fmt: skip
    g.add_argument("--pools", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="stride-2 poolings per axis (default: plans for independent, 5 5 5 for shared/universal)")  # fmt: skip
    g.add_argument("--val_every", type=int, default=10, help="validate every N epochs (0: only at the end)")
    g.add_argument("--val_from", type=int, default=100, help="first epoch of periodic validation")
    g.add_argument("--val_max_cases", type=int, default=None, help="validate on at most N cases per task (default all)")
    g.add_argument("--no_val_postprocess", action="store_true", help="validate without post-processing")
    g.add_argument("--save_every", type=int, default=5,
                   help="keep checkpoints/epoch_XXXX.pt every N epochs (latest.pt is written after every epoch)")  # fmt: skip
    g.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="Adam weight decay")
    g.add_argument("--no_augment", action="store_true", help="no elastic/rotation/scaling/mirroring augmentation")

    g = p.add_argument_group("hardware and reproducibility")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--num_workers", type=int, default=2,
                   help="background loader processes per task (batchgenerators MultiThreadedAugmenter); 0 = load "
                        "in the training process (debugging)")  # fmt: skip
    g.add_argument("--amp", nargs="?", const="auto", default="off", choices=["off", "auto", "bf16", "fp16"],
                   help="mixed precision autocast: --amp alone = bfloat16 where supported, else float16 (CUDA); "
                        "off = fp32 (the paper preset)")  # fmt: skip
    g.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                   help="channels_last_3d memory format (auto: on for CPU, where it is faster, off on CUDA)")  # fmt: skip
    g.add_argument("--fused_ops", default="auto", choices=["auto", "on", "off"],
                   help="hand-fused norm/depthwise kernels (auto: on for CPU without AMP)")  # fmt: skip
    g.add_argument("--seed", type=int, default=1993, help="NumPy / data loader seed (preset 1993)")
    g.add_argument("--torch_seed", type=int, default=1, help="torch seed for the weight initialisation (preset 1)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA algorithms (slower; exact resume on GPU); CPU runs are deterministic anyway")  # fmt: skip
    g.add_argument("--log_images_every", type=int, default=1000,
                   help="TensorBoard image/GT/prediction slices of a training batch every N steps (0: off)")  # fmt: skip
    g.add_argument("--no_progress", action="store_true", help="no progress bars (log lines still go to the console and train_log.txt)")
    return p


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    return TrainConfig(
        mode=args.trainMode,
        tasks=list(args.tasks),
        module=args.module if args.trainMode == "universal" else None,
        model_name=args.model,
        out_tag=args.out_tag,
        base_channels=args.base_outChans,
        fold=args.fold,
        dataset_dir=args.dataset_dir,
        prep_dir=args.prep_dir,
        results_dir=args.results_dir,
        folds_file=args.folds_file,
        max_epoch=args.max_epoch,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        model_patch=args.model_patch,
        pools=args.pools,
        val_every=args.val_every,
        val_from=args.val_from,
        save_every=args.save_every,
        device=device,
        num_workers=args.num_workers,
        amp=resolve_amp(args.amp, torch.device(device)),
        channels_last=args.channels_last,
        fused_ops=args.fused_ops,
        seed=args.seed,
        torch_seed=args.torch_seed,
        lr=args.lr,
        weight_decay=args.weight_decay,
        augment=not args.no_augment,
        val_postprocess=not args.no_val_postprocess,
        val_max_cases=args.val_max_cases,
        ckp=args.ckp or None,
        init_from=args.init_from,
        deterministic=args.deterministic,
        threads=args.threads,
        log_images_every=args.log_images_every,
    )


def _task(config: TrainConfig, name: str, plans: dict | None = None) -> TaskData:
    return load_task_data(
        config.prep_dir, name, config.folds_file, config.fold,
        patch_size=None if plans is not None else config.patch_size,
        pools=None if plans is not None else (config.pools if config.mode == "independent" else None),
        plans=plans,
    )  # fmt: skip


def prepare_runs(config: TrainConfig, resume_ckp: str = "", resume_epoch: int = 0) -> list[Prepared]:
    """One :class:`Prepared` run per model: fresh, new-domain (``config.ckp``) or resumed."""
    if resume_ckp:
        path = resolve_resume_path(resume_ckp, resume_epoch)
        ckpt = load_training_checkpoint(path, resume_epoch)
        setup = setup_from_checkpoint(ckpt)
        trained_names = [setup.task_names[t] for t in setup.trained_tasks]
        if trained_names != config.tasks:
            raise ValueError(f"--tasks {config.tasks} do not match the checkpoint's trained tasks {trained_names}")
        mode = ckpt["model_config"]["train_mode"]
        if mode != config.mode:
            raise ValueError(f"--trainMode {config.mode} but the checkpoint holds a {mode} model")
        tasks = [
            _task(config, n, p) if i in setup.trained_tasks else placeholder_task(config.prep_dir, n, p)
            for i, (n, p) in enumerate(zip(setup.task_names, setup.task_plans, strict=True))
        ]
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else config.run_dir()
        return [Prepared(config, tasks, setup, run_dir, ckpt)]
    if config.ckp:
        from utils.checkpoint import load_checkpoint

        if len(config.tasks) != 1:
            raise ValueError(f"--ckp adapts the model to ONE new task, got --tasks {config.tasks}")
        ckpt = load_checkpoint(config.ckp)
        mode = ckpt["model_config"]["train_mode"]
        if mode != config.mode:
            raise ValueError(f"--trainMode {config.mode} but --ckp holds a {mode} model")
        if mode == "universal" and ckpt["model_config"].get("module") != config.module:
            raise ValueError(f"--module {config.module} but --ckp uses {ckpt['model_config'].get('module')}")
        new = _task(config, config.tasks[0])
        setup = adapt_to_new_task(ckpt, new, init_from=config.init_from, torch_seed=config.torch_seed)
        tasks = [placeholder_task(config.prep_dir, t["name"], t["plans"]) for t in ckpt["tasks"]] + [new]
        return [Prepared(config, tasks, setup, config.run_dir())]
    if config.mode == "independent":
        runs = []
        for name in config.tasks:
            cfg = TrainConfig.from_dict({**config.to_dict(), "tasks": [name]})
            task = _task(cfg, name)
            runs.append(Prepared(cfg, [task], build_fresh_model(cfg, [task]), cfg.run_dir()))
        return runs
    tasks = [_task(config, n) for n in config.tasks]
    return [Prepared(config, tasks, build_fresh_model(config, tasks), config.run_dir())]


def predict_run(prep: Prepared, what: Sequence[str], *, progress: bool = True) -> list[Path]:
    """Segment the trained tasks' validation cases ('val') and/or raw test images ('test') with the run's
    best checkpoint (latest if none) into ``<run>/predictions/<task>[/test]/``."""
    from training.validation import InferenceSettings, predict_cases_to_nifti
    from utils.checkpoint import build_model_from_checkpoint, load_checkpoint

    ckpt_dir = prep.run_dir / "checkpoints"
    path = ckpt_dir / BEST if (ckpt_dir / BEST).is_file() else ckpt_dir / LATEST
    ckpt = load_checkpoint(path)
    device = resolve_device(prep.config.device)
    model, _ = build_model_from_checkpoint(ckpt)
    model.to(device).eval()
    mp = ckpt.get("model_patch")
    settings = InferenceSettings(device=device, model_patch=tuple(mp) if mp else None,
                                 amp=prep.config.amp != "off", postprocess=True)  # fmt: skip
    written: list[Path] = []
    names = [t["name"] for t in ckpt["tasks"]]
    for t in prep.setup.trained_tasks:
        task = prep.tasks[t]
        idx = names.index(task.name)
        task.plans = dict(ckpt["tasks"][idx]["plans"])
        out = prep.run_dir / "predictions" / task.name
        if "val" in what:
            written += predict_cases_to_nifti(model, task, idx, task.val_cases, out, settings)
        if "test" in what:
            from utils.predict_api import LoadedTask, PredictOptions, predict_files

            test_dir = Path(prep.config.dataset_dir) / task.name / "imagesTs"
            if not test_dir.is_dir():
                print(f"--predict test: {test_dir} not found, skipped", file=sys.stderr)
                continue
            patch = tuple(int(v) for v in task.plans["patch_size"])
            loaded = LoadedTask(model, idx, task.name, task.plans, patch, settings.model_patch,  # type: ignore[arg-type]
                                task.num_classes)  # fmt: skip
            opts = PredictOptions(device=str(device), amp=settings.amp, progress=progress)
            report = predict_files(loaded, [test_dir], out / "test", opts)
            written += report.written
    return written


def main(argv: Sequence[str] | None, *, prog: str, modes: Sequence[str], default_mode: str, description: str) -> int:
    parser = build_parser(prog, modes, default_mode, description)
    args = parser.parse_args(argv)
    if args.predict is not None and not args.predict:
        args.predict = ["val"]
    try:
        config = config_from_args(args)
        if config.mode == "independent" and args.resume_ckp and len(config.tasks) != 1:
            raise ValueError("--resume_ckp continues ONE run: give the single task of that independent model")
        runs = prepare_runs(config, args.resume_ckp, args.resume_epoch)
    except (ValueError, FileNotFoundError, KeyError, IndexError, RuntimeError) as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    progress = not args.no_progress
    if config.device == "cpu":
        keep_freed_memory_in_heap()  # ~25 % faster CPU steps (utils/cpu_perf.py, docs/performance.md)
    for prep in runs:
        print(f"[{prog}] run folder: {prep.run_dir}", file=sys.stderr)
        fit(prep, progress=progress)
        if args.predict:
            written = predict_run(prep, args.predict, progress=progress)
            print(f"[{prog}] wrote {len(written)} prediction(s) to {prep.run_dir / 'predictions'}", file=sys.stderr)
    return 0


def script_main(prog: str, modes: Sequence[str], default_mode: str, description: str) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main(None, prog=prog, modes=modes, default_mode=default_mode, description=description))
