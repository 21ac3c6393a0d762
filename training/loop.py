"""The epoch loop: round-robin steps, per-epoch loss and LR rule, validation, checkpoints."""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from inference.settings import InferenceSettings
from models.report import format_parameter_report, parameter_report
from models.runtime import amp_dtype, resolve_device
from models.triton_depthwise import resolve_depthwise_kernel
from training.augmentation import AugmentParams
from training.config import AUGMENT_INTERP_ORDERS, PRESET_SHARED_BATCH, TrainConfig
from training.data import TaskData, make_epoch_loader, scan_cases
from training.distributed import DistContext, GlobalBatchLoss, GradientSync
from training.losses import SegmentationLoss
from training.optim import PlateauHalving, anneal_factor, make_optimizer, set_lr
from training.run_log import RunLog, SilentLog
from training.setup import ModelSetup
from training.state import (
    LATEST,
    NonFiniteLossError,
    RunLock,
    TrainState,
    last_good_checkpoint,
    lock_run_folder,
    save_training_checkpoint,
)
from training.step import StepOptions, task_for_step, train_step
from training.validation import mean_dice, run_inference_settings, run_runtime, validate
from utils.checkpoint import restore_rng_state
from utils.io_utils import atomic_write_json, remove_stale_temporaries

#: settings that must match between an interrupted run and its resumption for identical batches
EXACT_RESUME_KEYS = (
    "seed",
    "num_workers",
    "steps_per_epoch",
    "batch_size",
    "patch_size",
    "model_patch",
    "augment",
    "mirror_flip_p",
    "centre_mode",
    "centre_voxels",
    "kind_probs",
    "augment_pipeline",
    "augment_device",
    "augment_interp",
)


@dataclass(frozen=True)
class EpochEnd:
    """What follows an epoch (docs/paper_preset.md, "Training"; the end of the original's ``train()``).

    Attributes:
        lr_used: the learning rate the epoch trained with.
        lr: the rate of the next epoch (after the LR rule).
        stop: the LR rule ends training after this epoch.
        last: the last epoch (``stop`` or ``max_epoch``).
        validate: periodic validation is due (:meth:`TrainConfig.should_validate`), or the last epoch.
        keep: a numbered checkpoint is kept: every ``save_every`` epochs, the last epoch, and the epoch
            whose halving took the rate below ``lr_stop`` (the original saved one then).
    """

    lr_used: float
    lr: float
    stop: bool
    last: bool
    validate: bool
    keep: bool


def make_lr_rule(config: TrainConfig) -> PlateauHalving:
    """The run's learning-rate rule from its settings (``--lr``, ``--lr_window``, ..., ``--lr_stop_order``)."""
    return PlateauHalving(
        config.lr,
        window=config.lr_window,
        min_delta=config.lr_min_delta,
        factor=config.lr_factor,
        stop_below=config.lr_stop,
        stop_order=config.lr_stop_order,
    )


def end_of_epoch(config: TrainConfig, lr_rule: PlateauHalving, epoch: int, epoch_loss: float) -> EpochEnd:
    """Apply the LR rule to epoch ``epoch``'s mean loss and say what follows (:class:`EpochEnd`).

    With ``--lr_stop_order original`` (the preset) the rate the epoch trained with is checked before
    the epoch's halving, as the original did: the epoch whose halving takes the rate below ``lr_stop``
    is followed by one more epoch at that rate, then the last validation, checkpoint and stop.
    """
    lr_used = lr_rule.lr
    stop = lr_rule.end_epoch(epoch_loss)
    last = stop or epoch == config.max_epoch
    ran_out = lr_rule.should_stop and lr_used >= lr_rule.stop_below
    return EpochEnd(
        lr_used=lr_used,
        lr=lr_rule.lr,
        stop=stop,
        last=last,
        validate=config.should_validate(epoch) or last,
        keep=config.should_save_numbered(epoch) or last or ran_out,
    )


@dataclass
class Prepared:
    """The pieces of a run, ready for :func:`fit`."""

    config: TrainConfig
    tasks: list[TaskData]  # index = model task index
    setup: ModelSetup
    run_dir: Path
    resume_ckpt: dict[str, Any] | None = None


def batch_size_for(config: TrainConfig, task: TaskData) -> int:
    """``--batch_size``, else the plans' batch (independent) or 2 (shared/universal)."""
    if config.batch_size:
        return int(config.batch_size)
    if config.mode == "independent":
        return int(task.plans.get("batch_size", 2))
    return PRESET_SHARED_BATCH


def augment_params(config: TrainConfig) -> AugmentParams | bool:
    """The run's augmentation settings (``False`` with ``--no_augment``): the preset's, with the run's
    mirroring probability and image interpolation."""
    if not config.augment:
        return False
    return AugmentParams(
        p_mirror_flip=config.mirror_flip_p, order_data=AUGMENT_INTERP_ORDERS[config.augment_interp]
    )


def configure_torch(config: TrainConfig, device: torch.device) -> None:
    if config.threads:
        torch.set_num_threads(int(config.threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _world_size_warnings(train_state: dict[str, Any], world_size: int) -> list[str]:
    """A resume with another number of processes than the checkpoint's run draws other batches."""
    old = int(train_state.get("world_size", 1))
    if old == world_size:
        return []
    return [
        f"the checkpoint was written by a run of {old} process(es), this one has {world_size}: the global "
        "batch and the batches differ from the interrupted run (an exact continuation needs the same number)"
    ]


def _resume_warnings(old: dict[str, Any], new: TrainConfig) -> list[str]:
    out = []
    for k in EXACT_RESUME_KEYS:
        if k in old and old[k] != getattr(new, k):
            out.append(
                f"{k} was {old[k]!r}, now {getattr(new, k)!r}: batches differ from the interrupted run"
            )
    return out


def fit(
    prep: Prepared,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    log: RunLog | None = None,
    dist: DistContext | None = None,
) -> TrainState:
    """Train (or continue training) one model until ``max_epoch`` or until the LR runs out.

    Args:
        prep: config, tasks, model setup, run folder and optionally the checkpoint to resume.
        progress: tqdm bars.
        on_step: called as ``on_step(global_step, loss)`` after every step (tests use it to
            simulate a crash).
        log: an open :class:`RunLog` (default: one for ``prep.run_dir``, closed at the end).
        dist: this process's place in a data-parallel run (:func:`training.distributed.init_from_env`;
            default: a single process on ``config.device``). Every process of the run calls ``fit``;
            rank 0 alone writes the run folder (lock, log, TensorBoard, CSVs, checkpoints) and validates.
    Returns:
        the final :class:`TrainState` (also stored in ``checkpoints/latest.pt``).
    """
    config, setup, run_dir = prep.config, prep.setup, prep.run_dir
    ctx = dist if dist is not None else DistContext(device=resolve_device(config.device))
    device = ctx.device
    configure_torch(config, device)
    model = setup.model
    dtype = amp_dtype(config.amp, device)
    channels_last = config.uses_channels_last(device.type)
    model.set_fused_ops(config.uses_fused_ops(device.type))
    model.set_depthwise_kernel(resolve_depthwise_kernel(config.depthwise_kernel, device))
    if config.augment_device == "cuda" and device.type != "cuda":
        raise ValueError(f"--augment_device cuda needs a CUDA training device, not {device}")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's Module.to stubs lack memory_format
    ctx.broadcast_parameters(model)  # data-parallel: every process starts from rank 0's weights
    optimizer = make_optimizer(model.parameters(), config.lr, config.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    lr_rule = make_lr_rule(config)
    state = TrainState()
    resume = prep.resume_ckpt
    if resume is None:  # the preset's seeds (torch's was set before the model was built)
        np.random.seed(config.seed)
        random.seed(config.seed)
    else:
        ts = resume["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        if not config.grad_none:
            # zeroed (not freed) gradients: every parameter that had a gradient (= has Adam state)
            # keeps a zero one, which Adam and the weight decay still apply; without it a resumed
            # shared/universal run would leave the other tasks' parameters still at its first steps
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p in optimizer.state and p.grad is None:
                        p.grad = torch.zeros_like(p)
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        state = TrainState.from_plain(ts["state"])
        lr_rule.load_state_dict(state.lr_rule)
        set_lr(optimizer, lr_rule.lr)
    own_log = log is None

    def open_run() -> tuple[RunLock, RunLog]:
        """Rank 0: lock the run folder and open the log (the other processes write nothing)."""
        lock = lock_run_folder(run_dir)  # a second live run into this folder is refused here
        run_log = log
        try:
            remove_stale_temporaries(run_dir, recursive=True)  # left by a run killed while writing a file
            if run_log is None:
                # TensorBoard drops what an interrupted attempt logged after the checkpoint we start from
                # (everything, for a fresh run into the folder of an attempt that died before its first one)
                run_log = RunLog(run_dir, purge_step=state.step + 1)
            run_log.truncate_val_csv(state.epoch)  # the same for the validation CSV
            if resume is not None:
                run_log.info(f"resumed after epoch {state.epoch} (step {state.step}, lr {lr_rule.lr:.3g})")
                warnings = _resume_warnings(resume["train_state"].get("config") or {}, config)
                for w in warnings + _world_size_warnings(resume["train_state"], ctx.world_size):
                    run_log.info(f"WARNING: {w}")
            config.save(run_dir / "config.json")
            report = parameter_report(model, setup.task_names, setup.new_task, extension=setup.extension)
            atomic_write_json(run_dir / "params.json", report)
            run_log.info(format_parameter_report(report))
        except BaseException:
            if own_log and run_log is not None:
                run_log.close()
            lock.release()
            raise
        return lock, run_log

    opened = ctx.run_on_main(open_run, "opening the run folder")
    lock, run_log = opened if opened is not None else (None, SilentLog(run_dir))
    try:
        if resume is not None:
            restore_rng_state(resume["train_state"]["rng"])
        return _epochs(
            prep,
            optimizer,
            scaler,
            lr_rule,
            state,
            run_log,
            StepOptions(
                device,
                dtype,
                channels_last,
                grad_to_none=config.grad_none,
                compile_backend="inductor" if config.compile else None,
            ),
            progress,
            on_step,
            ctx,
        )
    finally:
        if own_log:
            run_log.close()
        if lock is not None:
            lock.release()


def _epochs(
    prep: Prepared,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    lr_rule: PlateauHalving,
    state: TrainState,
    log: RunLog,
    options: StepOptions,
    progress: bool,
    on_step: Callable[[int, float], None] | None,
    ctx: DistContext,
) -> TrainState:
    config, tasks, setup = prep.config, prep.tasks, prep.setup
    model, device = setup.model, options.device
    trained = setup.trained_tasks
    names = setup.task_names
    if state.epoch >= config.max_epoch or lr_rule.stopped:
        why = "the learning rate ran out" if lr_rule.stopped else f"max_epoch {config.max_epoch}"
        log.info(f"nothing to train: {state.epoch} epochs done ({why})")
        return state
    segmentation_loss = SegmentationLoss(
        classes=config.lovasz_classes, detach_focal_factor=not config.focal_factor_grad
    )
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = segmentation_loss
    sync: GradientSync | None = None
    if ctx.distributed:  # each process's share of the global batch's loss; gradients summed over them
        loss_fn = GlobalBatchLoss(segmentation_loss, ctx)
        sync = GradientSync(ctx, model, trained)
    infer = run_inference_settings(config, device)
    log.info(f"validation: {run_runtime(config, device).describe()}")
    for t in trained:
        scan_cases(tasks[t])
    log.info(
        f"training {config.mode} model on {[names[t] for t in trained]} for epochs {state.epoch + 1}..{config.max_epoch} "
        f"x {config.steps_per_epoch} steps on {device} (amp {config.amp}, channels_last {options.channels_last}, "
        f"batch {[batch_size_for(config, tasks[t]) for t in trained]}, model patch {setup.model_patch}, "
        f"task patches {[list(tasks[t].patch_size) for t in trained]})"
    )
    if ctx.distributed:
        log.info(
            f"data parallel: {ctx.world_size} processes ({ctx.backend}), batch per process "
            f"{[batch_size_for(config, tasks[t]) for t in trained]}, global batch "
            f"{[batch_size_for(config, tasks[t]) * ctx.world_size for t in trained]}"
        )
    model.train()
    for epoch in range(state.epoch + 1, config.max_epoch + 1):
        t0 = time.perf_counter()
        loaders = {
            t: make_epoch_loader(
                tasks[t],
                t,
                epoch,
                batch_size=batch_size_for(config, tasks[t]),
                seed=config.seed,
                model_patch=setup.model_patch,
                num_workers=config.num_workers,
                augment=augment_params(config),
                centre_mode=config.centre_mode,
                centre_voxels=config.centre_voxels,
                kind_probs=config.kind_probs,
                pin_memory=device.type == "cuda",
                rank=ctx.rank,
                pipeline=config.augment_pipeline,
                augment_device=device if config.augment_device == "cuda" else None,
            )
            for t in trained
        }
        sums = dict.fromkeys(trained, 0.0)
        counts = dict.fromkeys(trained, 0)
        wait = 0.0
        redrawn = plain_crops = 0  # augmentations drawn again / plain crops of "fore"/"small" patches
        bar = tqdm(
            total=config.steps_per_epoch,
            desc=f"{config.mode} epoch {epoch}/{config.max_epoch}",
            disable=not (progress and ctx.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        lr_now = lr_rule.lr
        try:
            for i in range(config.steps_per_epoch):
                step = state.step + 1
                t = task_for_step(step, trained)
                lr_now = lr_rule.lr
                if config.lr_anneal > 0:
                    run_steps = config.max_epoch * config.steps_per_epoch
                    lr_now *= anneal_factor(
                        (epoch - 1) * config.steps_per_epoch + i, run_steps, config.lr_anneal
                    )
                    set_lr(optimizer, lr_now)
                tw = time.perf_counter()
                batch = next(loaders[t])
                wait += time.perf_counter() - tw
                redrawn += int(batch.get("aug_retries", 0))
                plain_crops += int(batch.get("aug_fallbacks", 0))
                want_img = ctx.is_main and config.log_images_every > 0 and step % config.log_images_every == 0
                try:
                    res = train_step(
                        model,
                        optimizer,
                        loss_fn,
                        batch["data"],
                        batch["seg"],
                        t,
                        options,
                        scaler=scaler,
                        keep_logits=want_img,
                        sync=sync,
                    )
                except FloatingPointError as e:  # NaN/Inf loss: the step was not applied
                    _skip_nonfinite_step(prep, state, log, epoch, step, names[t], e)  # raises past the budget
                    state.step = step
                    bar.update(1)
                    continue
                state.step = step
                sums[t] += res.loss
                counts[t] += 1
                log.scalar("loss/step", res.loss, step)
                log.scalar(f"loss/step_{names[t]}", res.loss, step)
                log.scalar("lr", lr_now, step)
                if want_img and res.logits is not None:
                    z = res.logits.shape[2] // 2
                    log.slices(
                        f"train/{names[t]}",
                        batch["data"][0, 0, z].cpu().numpy(),
                        batch["seg"][0, 0, z].numpy(),
                        res.logits[0, :, z].argmax(0).cpu().numpy(),
                        tasks[t].num_classes,
                        step,
                    )
                bar.update(1)
                bar.set_postfix(task=names[t][:18], loss=f"{res.loss:.4f}")
                if on_step is not None:
                    on_step(step, res.loss)
        finally:
            bar.close()
            for ld in loaders.values():
                ld.close()
        if ctx.distributed:  # the log reports the whole job: redraws summed, data wait averaged
            totals = ctx.all_reduce_sum(
                torch.tensor([redrawn, plain_crops, wait], dtype=torch.float64, device=device),
                "the epoch's counters",
            )
            redrawn, plain_crops = int(totals[0]), int(totals[1])
            wait = float(totals[2]) / ctx.world_size
        n = sum(counts.values())
        epoch_loss = sum(sums.values()) / max(n, 1)
        per_task = {names[t]: sums[t] / counts[t] for t in trained if counts[t]}
        end = end_of_epoch(config, lr_rule, epoch, epoch_loss)
        lr_used, new_lr = end.lr_used, end.lr
        lr_note = f" -> {new_lr:.3g}" if new_lr != lr_used else ""
        set_lr(optimizer, new_lr)
        state.epoch = epoch
        state.lr_rule = lr_rule.state_dict()
        state.loss_history.append(
            {"epoch": epoch, "step": state.step, "loss": epoch_loss, "per_task": per_task, "lr": lr_used}
        )
        log.scalar("loss/epoch", epoch_loss, state.step)
        for name, v in per_task.items():
            log.scalar(f"loss/epoch_{name}", v, state.step)
        train_time = time.perf_counter() - t0
        anneal_note = f" (annealed, last step {lr_now:.3g})" if config.lr_anneal > 0 and n else ""
        log.info(
            f"epoch {epoch}: loss {epoch_loss:.4f} ("
            + ", ".join(f"{k} {v:.4f}" for k, v in per_task.items())
            + f"), lr {lr_used:.3g}{lr_note}{anneal_note}, "
            f"{train_time:.1f}s ({100 * wait / max(train_time, 1e-9):.0f}% waiting for data; "
            f"augmentation redrawn {redrawn}x, {plain_crops} plain crop(s))"
        )
        if lr_rule.should_stop and not end.last:
            log.info(
                f"learning rate {new_lr:.3g} < {config.lr_stop:g}: one more epoch at it, then training stops"
            )

        # rank 0 only; the others wait for it without a time limit that a validation could reach
        ctx.run_on_main(
            functools.partial(
                _validate_and_save, prep, infer, state, log, optimizer, scaler, epoch, end, ctx.world_size
            ),
            f"the validation and checkpoint after epoch {epoch}",
        )
        state.finished = end.last
        if end.stop:
            rate = min(lr_used, new_lr)
            log.info(f"learning rate {rate:.3g} < {config.lr_stop:g}: training stops after epoch {epoch}")
            break
    return state


def _validate_and_save(
    prep: Prepared,
    infer: InferenceSettings,
    state: TrainState,
    log: RunLog,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    end: EpochEnd,
    world_size: int,
) -> None:
    """The end of an epoch: validation when due, then the checkpoint (rank 0 of a data-parallel run)."""
    config, setup = prep.config, prep.setup
    best = False
    if end.validate:
        best = _validate_and_log(prep, infer, state, log, epoch)
    state.finished = end.last
    # events up to this step reach the disk before the checkpoint that a resume starts from
    # (a resume purges the later ones), so a kill can lose no step
    log.flush()
    save_training_checkpoint(
        prep.run_dir / "checkpoints",
        model=setup.model,
        tasks=setup.checkpoint_tasks(),
        model_patch=setup.model_patch,
        state=state,
        optimizer=optimizer,
        scaler=scaler,
        config=config.to_dict(),
        trained_tasks=setup.trained_tasks,
        new_task=setup.new_task,
        numbered=end.keep,
        best=best,
        world_size=world_size,
    )


def _skip_nonfinite_step(
    prep: Prepared,
    state: TrainState,
    log: RunLog,
    epoch: int,
    step: int,
    task: str,
    error: FloatingPointError,
) -> None:
    """A step whose loss was NaN/Inf (not applied): log and count it while ``--skip_nonfinite``
    allows, else stop the run (the last checkpoint, written before this epoch, stays as it was).

    Raises:
        NonFiniteLossError: naming the epoch, step and task, the last good checkpoint and what to do.
    """
    allowed = prep.config.skip_nonfinite
    if len(state.skipped_steps) < allowed:
        state.skipped_steps.append({"epoch": epoch, "step": step, "task": task, "loss": str(error)})
        log.info(
            f"WARNING: epoch {epoch}, step {step}, task {task}: {error}; step skipped "
            f"({len(state.skipped_steps)} of {allowed} allowed by --skip_nonfinite)"
        )
        log.scalar("skipped_nonfinite_steps", len(state.skipped_steps), step)
        return
    ckpt_dir = prep.run_dir / "checkpoints"
    good = (
        f"the last good checkpoint {last_good_checkpoint(ckpt_dir)} is unchanged: resume it with "
        "--resume_ckp latest"
        if (ckpt_dir / LATEST).is_file()
        else "no checkpoint was written yet"
    )
    skipped = f" after {allowed} skipped step(s)" if allowed else ""
    msg = (
        f"non-finite training loss at epoch {epoch}, step {step}, task {task}{skipped}: {error}. Training "
        f"stopped; {good}. Lower --lr, try --amp off, check the task's data, or skip such steps with "
        "--skip_nonfinite N"
    )
    log.info(f"ERROR: {msg}")
    raise NonFiniteLossError(msg) from error


def _validate_and_log(
    prep: Prepared, infer: InferenceSettings, state: TrainState, log: RunLog, epoch: int
) -> bool:
    """Validate the trained tasks, log Dice (text, TensorBoard, CSV); returns whether this is the best."""
    config, tasks, setup = prep.config, prep.tasks, prep.setup
    t0 = time.perf_counter()
    results = validate(
        setup.model,
        tasks,
        setup.trained_tasks,
        setup.model_patch,
        infer,
        max_cases=config.val_max_cases,
        csv_dir=prep.run_dir / "eval" / f"epoch_{epoch:04d}",
        dataset_dir=config.dataset_dir if config.val_grid == "original" else None,
    )
    md = mean_dice(results)
    rows = []
    per_task: dict[str, dict[str, float]] = {}
    for t, res in zip(setup.trained_tasks, results, strict=True):
        task = tasks[t]
        per_task[task.name] = {}
        for c in range(1, task.num_classes):
            d = res.means.get(f"dice_{c}")
            if d is None:
                continue
            cname = task.class_names[c]
            per_task[task.name][str(c)] = d
            rows.append(
                {
                    "epoch": epoch,
                    "step": state.step,
                    "task": task.name,
                    "class": c,
                    "class_name": cname,
                    "dice": f"{d:.6f}",
                    "num_cases": len(res.rows),
                }
            )
            log.scalar(f"val_dice/{task.name}/{c}_{cname}", d, state.step)
        if res.example is not None:
            img, ref, pred = res.example
            log.slices(f"val/{task.name}", img, ref, pred, task.num_classes, state.step)
    log.append_val_rows(rows)
    log.scalar("val_dice/mean", md, state.step)
    state.val_history.append({"epoch": epoch, "step": state.step, "mean_dice": md, "per_task": per_task})
    best = not math.isnan(md) and (state.best_dice is None or md > state.best_dice)
    if best:
        state.best_dice, state.best_epoch = md, epoch
    detail = "; ".join(
        f"{name}: "
        + ", ".join(
            f"{tasks[setup.task_names.index(name)].class_names[int(c)]} {d:.3f}" for c, d in v.items()
        )
        for name, v in per_task.items()
    )
    log.info(
        f"validation after epoch {epoch}: mean Dice {md:.4f}{' (best)' if best else ''} [{detail}] "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    return best
