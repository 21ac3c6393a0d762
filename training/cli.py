"""Command line shared by ``train_model_no_adapters.py`` and ``train_model_wt_adapters.py``.

The flags of the run settings are generated from :class:`training.config.TrainConfig` (one place for
every default and help text); the flags here are only those that are not run settings (what to
resume, what to predict afterwards, progress bars).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record

from models.loading import build_model_from_checkpoint
from models.runtime import keep_freed_memory_in_heap, resolve_device
from training.config import DATA, GROUPS, HARDWARE, WHAT, TrainConfig, add_config_arguments, config_kwargs
from training.data import TaskData, load_task_data, placeholder_task
from training.distributed import DistContext, init_from_env
from training.loop import Prepared, fit
from training.setup import (
    adapt_like_original_code,
    adapt_to_new_task,
    build_fresh_model,
    grow_task_classes,
    setup_from_checkpoint,
)
from training.state import (
    BEST,
    LATEST,
    RunError,
    existing_checkpoint,
    load_training_checkpoint,
    resolve_resume_path,
)
from training.validation import predict_cases_to_nifti, run_inference_settings, task_segmenter
from utils.checkpoint import load_checkpoint, task_index
from utils.io_utils import DiskFullError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser(
    prog: str, modes: Sequence[str], default_mode: str, description: str
) -> argparse.ArgumentParser:
    """The flags of the original scripts plus what users need (every flag explained in ``--help``)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    g = groups[WHAT]
    g.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="task folder names (e.g. Task02_Heart Task03_Liver); independent mode trains one model per "
        "task; with --ckp: the ONE new task to add to the trained model (with --add_classes_to: the task whose "
        "larger label set a trained domain takes)",
    )
    g.add_argument(
        "--trainMode",
        dest="mode",
        default=default_mode,
        choices=list(modes),
        help="independent = one model per task with its own plans (patch, pools, batch); shared = one "
        "U-Net for all tasks (task-specific heads and norms); universal = shared U-Net plus "
        "per-task adapters (--module)",
    )
    g.add_argument(
        "--resume_ckp",
        default="",
        metavar="CKPT_OR_DIR",
        help="continue an interrupted run exactly (weights, optimizer, epoch, step, random states, "
        "loss history, LR rule): a checkpoint file, a run folder (uses checkpoints/latest.pt), or "
        "'latest' (checkpoints/latest.pt of the run folder these flags lead to)",
    )
    g.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="resume the run if its run folder (the one these flags lead to) already holds a checkpoint, "
        "else start it (per task for independent models); without it, a run folder that holds a "
        "checkpoint is refused rather than overwritten",
    )
    g.add_argument(
        "--resume_epoch",
        type=int,
        default=0,
        metavar="N",
        help="with a run folder as --resume_ckp: resume from checkpoints/epoch_000N.pt; with a file: "
        "check that it was written after epoch N (0 = no check)",
    )
    add_config_arguments(groups)
    groups[DATA].add_argument(
        "--predict",
        nargs="*",
        choices=["val", "test"],
        default=None,
        metavar="WHAT",
        help="after training, segment with the best checkpoint and write label maps in the original "
        "geometry to <run>/predictions/<task>/: 'val' (the fold's validation cases, NIfTI; the default when "
        "--predict is given alone) and/or 'test' (<dataset_dir>/<task>/imagesTs, in the images' format)",
    )
    groups[HARDWARE].add_argument(
        "--no_progress",
        action="store_true",
        help="no progress bars (log lines still go to the console and train_log.txt)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run settings of parsed flags."""
    return TrainConfig(mode=args.mode, tasks=list(args.tasks), **config_kwargs(args))


def _task(config: TrainConfig, name: str, plans: dict[str, Any] | None = None) -> TaskData:
    return load_task_data(
        config.prep_dir,
        name,
        config.folds_path(),
        config.fold,
        patch_size=None if plans is not None else config.patch_size,
        pools=None if plans is not None else (config.pools if config.mode == "independent" else None),
        plans=plans,
    )


def _fresh(run_dir: Path) -> Path:
    """``run_dir`` for a fresh run, refused when it holds a checkpoint (it would be overwritten)."""
    latest = existing_checkpoint(run_dir)
    if latest is not None:
        raise RunError(
            f"run folder {run_dir} already holds a checkpoint of an earlier run ({latest}): continue it with "
            "--continue (or --resume_ckp latest), train into another folder (--out_tag, --results_dir), or "
            "delete the folder to start over"
        )
    return run_dir


def prepare_runs(
    config: TrainConfig, resume_ckp: str = "", resume_epoch: int = 0, *, continue_run: bool = False
) -> list[Prepared]:
    """One :class:`Prepared` run per model: fresh, new-domain (``config.ckp``) or resumed.

    Args:
        resume_ckp: resume from this checkpoint file or run folder, or ``"latest"`` (the run folder
            of ``config``).
        resume_epoch: with a folder, resume from its ``epoch_XXXX.pt``; with a file, check its epoch.
        continue_run: resume each model whose run folder holds a checkpoint, start the others.

    Raises:
        RunError: a fresh run whose folder already holds a checkpoint (it is never overwritten).
    """
    if resume_ckp:
        path = resolve_resume_path(resume_ckp, resume_epoch, config.run_dir())
        return [_resumed(config, path, resume_epoch)]
    if config.mode == "independent" and len(config.tasks) > 1:  # one model (and run folder) per task
        return [
            run
            for name in config.tasks
            for run in prepare_runs(
                TrainConfig.from_dict({**config.to_dict(), "tasks": [name]}), continue_run=continue_run
            )
        ]
    if continue_run:
        latest = existing_checkpoint(config.run_dir())
        if latest is not None:
            return [_resumed(config, latest, 0)]
    if config.ckp:
        if len(config.tasks) != 1:
            raise ValueError(f"--ckp adapts the model to ONE new task, got --tasks {config.tasks}")
        ckpt = load_checkpoint(config.ckp)
        mode = ckpt["model_config"]["train_mode"]
        if mode != config.mode:
            raise ValueError(f"--trainMode {config.mode} but --ckp holds a {mode} model")
        if mode == "universal" and ckpt["model_config"].get("module") != config.module:
            raise ValueError(f"--module {config.module} but --ckp uses {ckpt['model_config'].get('module')}")
        new = _task(config, config.tasks[0])
        if config.adapt_scope == "original_code":
            setup = adapt_like_original_code(ckpt, new, torch_seed=config.torch_seed)
            return [Prepared(config, [new], setup, _fresh(config.run_dir()))]
        if config.add_classes_to:
            setup = grow_task_classes(
                ckpt,
                new,
                config.add_classes_to,
                scope=config.add_classes_train,
                init=config.add_classes_init,
                torch_seed=config.torch_seed,
            )
        else:
            setup = adapt_to_new_task(ckpt, new, init_from=config.init_from, torch_seed=config.torch_seed)
        config.extension = setup.extension  # kept in config.json and every checkpoint of the run
        tasks = [
            new if i in setup.trained_tasks else placeholder_task(config.prep_dir, name, plans)
            for i, (name, plans) in enumerate(zip(setup.task_names, setup.task_plans, strict=True))
        ]
        return [Prepared(config, tasks, setup, _fresh(config.run_dir()))]
    tasks = [_task(config, n) for n in config.tasks]
    return [Prepared(config, tasks, build_fresh_model(config, tasks), _fresh(config.run_dir()))]


def _resumed(config: TrainConfig, path: Path, resume_epoch: int) -> Prepared:
    """The run that continues from the training checkpoint ``path``."""
    ckpt = load_training_checkpoint(path, resume_epoch)
    setup = setup_from_checkpoint(ckpt)
    if setup.extension is not None:  # config.json is rewritten: keep what the run added
        config.extension = setup.extension
    trained_names = [setup.task_names[t] for t in setup.trained_tasks]
    if trained_names != config.tasks:
        raise ValueError(
            f"--tasks {config.tasks} do not match the checkpoint's trained tasks {trained_names}"
        )
    mode = ckpt["model_config"]["train_mode"]
    if mode != config.mode:
        raise ValueError(f"--trainMode {config.mode} but the checkpoint holds a {mode} model")
    tasks = [
        _task(config, n, p) if i in setup.trained_tasks else placeholder_task(config.prep_dir, n, p)
        for i, (n, p) in enumerate(zip(setup.task_names, setup.task_plans, strict=True))
    ]
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else config.run_dir()
    return Prepared(config, tasks, setup, run_dir, ckpt)


def predict_run(
    prep: Prepared,
    what: Sequence[str],
    *,
    progress: bool = True,
    failed: list[tuple[Path, str]] | None = None,
) -> list[Path]:
    """Segment the trained tasks' validation cases ('val') and/or raw test images ('test') with the run's
    best checkpoint (latest if none) into ``<run>/predictions/<task>[/test]/``.

    ``failed``: collects the raw test images that could not be segmented, ``(path, reason)``.
    """
    ckpt_dir = prep.run_dir / "checkpoints"
    path = ckpt_dir / BEST if (ckpt_dir / BEST).is_file() else ckpt_dir / LATEST
    ckpt = load_checkpoint(path)
    device = resolve_device(prep.config.device)
    model, ck_tasks = build_model_from_checkpoint(ckpt)
    model.to(device).eval()
    settings = run_inference_settings(prep.config, device, postprocess=True, progress=progress)
    written: list[Path] = []
    for t in prep.setup.trained_tasks:
        task = prep.tasks[t]
        idx = task_index(ckpt, task.name)
        task.plans = dict(ck_tasks[idx]["plans"])
        segmenter = task_segmenter(model, task, idx, ckpt.get("model_patch"), settings)
        out = prep.run_dir / "predictions" / task.name
        if "val" in what:
            written += predict_cases_to_nifti(segmenter, task.val_cases, out)
        if "test" in what:
            test_dir = Path(prep.config.dataset_dir) / task.name / "imagesTs"
            if not test_dir.is_dir():
                print(f"--predict test: {test_dir} not found, skipped", file=sys.stderr)
                continue
            report = segmenter.predict_files([test_dir], out / "test")
            written += report.written
            if failed is not None:
                failed += report.failed
    return written


def main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    modes: Sequence[str],
    default_mode: str,
    description: str,
    tune_cpu_allocator: bool = False,
) -> int:
    """Parse the flags, train every run, predict when asked. Returns the exit status.

    ``tune_cpu_allocator``: keep freed memory in the heap for CPU runs
    (:func:`models.runtime.keep_freed_memory_in_heap`; process-wide, so only for the scripts' own
    processes).
    """
    parser = build_parser(prog, modes, default_mode, description)
    args = parser.parse_args(argv)
    if args.predict is not None and not args.predict:
        args.predict = ["val"]
    try:
        config = config_from_args(args)
        if config.mode == "independent" and args.resume_ckp and len(config.tasks) != 1:
            raise ValueError("--resume_ckp continues ONE run: give the single task of that independent model")
        if args.resume_ckp and args.continue_run:
            raise ValueError("give either --resume_ckp or --continue, not both")
        # under torchrun: join the process group (nccl on CUDA, gloo on the CPU); else one process
        ctx = init_from_env(config.device, config.dist_timeout)
    except (ValueError, RuntimeError) as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    try:
        return _train_runs(parser, args, config, ctx, prog, tune_cpu_allocator)
    finally:
        ctx.close()


def _run_fingerprint(prep: Prepared) -> tuple[str, int | None]:
    """What every process of a data-parallel run must agree on: the run folder and the step resumed from."""
    step = None if prep.resume_ckpt is None else int(prep.resume_ckpt["train_state"]["state"]["step"])
    return str(prep.run_dir), step


def _train_runs(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    config: TrainConfig,
    ctx: DistContext,
    prog: str,
    tune_cpu_allocator: bool,
) -> int:
    """Prepare the runs (every process alike), train them, predict when asked. Returns the exit status."""
    name = f"{prog} [rank {ctx.rank}]" if ctx.distributed else prog
    runs: list[Prepared] = []
    try:
        runs = prepare_runs(config, args.resume_ckp, args.resume_epoch, continue_run=args.continue_run)
        outcome: tuple[str, Any] = ("ok", [_run_fingerprint(p) for p in runs])
    except (ValueError, FileNotFoundError, KeyError, IndexError, RuntimeError) as e:
        outcome = ("error", str(e))
    try:  # data-parallel: every process must have prepared the same runs (same folders, same checkpoints)
        outcomes = ctx.all_gather_object(outcome, "the comparison of the prepared runs")
    except RunError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    failed = [(r, o[1]) for r, o in enumerate(outcomes) if o[0] == "error"]
    if failed:
        lines = [f"rank {r}: {msg}" if ctx.distributed else msg for r, msg in failed]
        # rank 0 reports every process's error; the others stop quietly
        parser.exit(2, "".join(f"{prog}: error: {line}\n" for line in lines) if ctx.is_main else None)
    differ = [r for r, o in enumerate(outcomes) if o != outcomes[0]]
    if differ:
        parser.exit(
            2,
            f"{name}: error: the processes prepared different runs (run folder, step resumed from): rank 0 "
            f"{outcomes[0][1]}, rank {differ[0]} {outcomes[differ[0]][1]}. Every node must see the same "
            "--prep_dir data and the same run folders and checkpoints: put --results_dir on a filesystem "
            "that all nodes share\n",
        )
    progress = not args.no_progress
    if tune_cpu_allocator and ctx.device.type == "cpu":
        keep_freed_memory_in_heap()  # ~25 % faster CPU steps (docs/performance.md)
    status = 0
    for prep in runs:
        if ctx.is_main:
            print(f"[{prog}] run folder: {prep.run_dir}", file=sys.stderr)
        try:
            fit(prep, progress=progress, dist=ctx)
            if args.predict:  # rank 0 segments, the others wait for it
                done = ctx.run_on_main(
                    functools.partial(_predict_and_report, prep, args.predict, progress, prog), "--predict"
                )
                status = max(status, done or 0)
        except (RunError, DiskFullError) as e:  # busy folder, NaN/Inf, full disk: a message, no traceback
            print(f"{name}: error: {e}", file=sys.stderr)
            return 1
    return status


def _predict_and_report(prep: Prepared, what: Sequence[str], progress: bool, prog: str) -> int:
    """``--predict`` after training: segment, print what was written and what failed. Returns the status."""
    failed: list[tuple[Path, str]] = []
    written = predict_run(prep, what, progress=progress, failed=failed)
    print(f"[{prog}] wrote {len(written)} prediction(s) to {prep.run_dir / 'predictions'}", file=sys.stderr)
    if failed:  # bad test images: listed like predict.py's, the others were done
        print(f"[{prog}] {len(failed)} input(s) failed:", file=sys.stderr)
        for path, why in failed:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


def script_main(prog: str, modes: Sequence[str], default_mode: str, description: str) -> None:
    """Entry point of the training scripts (their own process, so the CPU allocator may be tuned).

    Under torchrun, an uncaught exception is recorded for torchrun's failure summary (``record``).
    """
    raise SystemExit(
        record(main)(
            None,
            prog=prog,
            modes=modes,
            default_mode=default_mode,
            description=description,
            tune_cpu_allocator=True,
        )
    )
