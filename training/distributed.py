"""Data-parallel training under ``torchrun``: the process group and what the training loop needs of it.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment), the training
scripts join one process group -- nccl on CUDA, gloo on the CPU -- and every process uses the GPU of
its ``LOCAL_RANK``. Without torchrun nothing here communicates: :func:`init_from_env` returns a
single-process context and the loop runs exactly as before.

What a data-parallel run does (``docs/training.md``, "Many GPUs and machines: torchrun"):

* **Round robin kept.** At every step all processes train the same task; each draws its own patches
  (loader seeds depend on the rank, :func:`training.data.epoch_seed`); ``--batch_size`` is per process.
* **The loss of the global batch.** The Lovász-softmax is computed over the voxels of the whole batch
  at once (it is not a mean over samples), so :class:`GlobalBatchLoss` gathers every process's
  probabilities and labels, evaluates the preset's loss on the global batch and gives each process
  its share: the shares' values add up to the global loss and their gradients to its gradient. W
  processes × batch b therefore make the same update as one process × batch W·b (tested, up to
  float rounding).
* **Gradients of the task's parameters only.** :class:`GradientSync` sums, in a few flat buckets,
  the gradients of the parameters that the step's task uses (the shared ones and the task's own).
  The other tasks' parameters have no gradient, or -- the preset zeroes gradients rather than freeing
  them -- a zero one, the same in every process, so they are not sent: no ``find_unused_parameters``
  graph search, no zeros on the wire, and Adam moves them exactly as in a single process.
* **Rank 0 alone writes and validates.** :meth:`DistContext.run_on_main` runs the log set-up,
  validation, checkpoints and ``--predict`` on rank 0 while the others wait for it (up to
  :data:`MAIN_ONLY_WAIT`); an error there reaches every process.
* **Bounded failures.** Every other collective gives up after ``--dist_timeout`` seconds, and a
  failed collective becomes a :class:`DistributedError` naming this rank; a process that dies closes
  its connections (gloo fails at once) and torchrun's agent stops the others and names the rank.

Imports: ``models`` and the training modules below the loop (losses, state); never ``training.loop``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from models.params import split_parameters
from models.runtime import resolve_device
from training.losses import SegmentationLoss, focal_loss, lovasz_softmax
from training.state import RunError

T = TypeVar("T")

#: environment variables torchrun sets for every process; all three present = a data-parallel run
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: default of ``--dist_timeout``: how long a collective of the training steps waits for the others
DEFAULT_TIMEOUT_S = 1800
#: how long the other processes wait while rank 0 alone works (validation, checkpoint, --predict);
#: a rank 0 that dies still ends the wait at once (its connections close)
MAIN_ONLY_WAIT = datetime.timedelta(hours=48)
#: gradient bucket size: a few all-reduces per step instead of one per parameter
BUCKET_BYTES = 32 * 2**20


class DistributedError(RunError):
    """A collective with the other processes failed or timed out, or rank 0 failed while the others waited."""


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set (torchrun sets them)."""
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_ENV)


def process_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    """The device of this process: ``--device`` as given for a single process; in a data-parallel
    run ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (``auto``: the CPU without CUDA).

    Raises:
        ValueError: ``cuda:N`` in a data-parallel run (each process takes its LOCAL_RANK's GPU).
        RuntimeError: CUDA asked for but not available, or fewer GPUs than local processes.
    """
    if not distributed:
        return resolve_device(name)
    if name != "auto" and torch.device(name).type == "cuda" and torch.device(name).index is not None:
        raise ValueError(
            f"--device {name} under torchrun: every process uses the GPU of its LOCAL_RANK; give --device "
            "cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but this machine shows {torch.cuda.device_count()} GPU(s): start at most "
            "that many processes per node (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@dataclass
class DistContext:
    """This process's place in the run: rank, world size, device and the process groups.

    A single-process context (``backend is None``) has rank 0, world size 1 and no process group;
    every method then does the single-process thing (no communication).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    wait_group: Any = None  # gloo group with the long timeout (rank-0-only phases, Python objects)
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """Whether this process is one of a data-parallel run (a process group exists)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run's files and validates."""
        return self.rank == 0

    # -- collectives ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def collective(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        """Turn a failed or timed-out collective into a :class:`DistributedError` naming this rank."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:  # DistBackendError, gloo's closed connections and timeouts
            limit = self.timeout_s if timeout_s is None else timeout_s
            raise DistributedError(
                f"rank {self.rank}: {what} with the other processes failed ({type(e).__name__}: "
                f"{str(e).strip()[:500]}). Another process of the job probably died or stopped responding "
                f"(torchrun's summary names it{self._missing_ranks()}); this wait was limited to {limit:g} s "
                "(--dist_timeout)"
            ) from e

    def _missing_ranks(self) -> str:
        """After a failed collective: which processes do not answer (gloo's monitored barrier, at most
        ``min(timeout, 30 s)``), as ``'; <who>'`` for the message, or ``''``."""
        if self.wait_group is None:
            return ""
        wait = datetime.timedelta(seconds=min(self.timeout_s, 30.0))
        try:
            dist.monitored_barrier(group=self.wait_group, timeout=wait, wait_all_ranks=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"; {first[:300]}"
        return ""

    def all_gather(self, tensor: torch.Tensor, what: str = "all-gather") -> list[torch.Tensor]:
        """Every process's ``tensor`` (same shape everywhere), in rank order."""
        if not self.distributed:
            return [tensor]
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with self.collective(what):
            dist.all_gather(out, tensor)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; returns it."""
        if self.distributed:
            with self.collective(what):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every process gets here (the long wait: one of them may be validating)."""
        if self.distributed:
            with self.collective(what, MAIN_ONLY_WAIT.total_seconds()):
                dist.barrier(group=self.wait_group)

    def broadcast_object(self, obj: T, what: str = "broadcast") -> T:
        """Rank 0's ``obj`` (any picklable object) in every process (the long wait)."""
        if not self.distributed:
            return obj
        box = [obj]
        with self.collective(what, MAIN_ONLY_WAIT.total_seconds()):
            dist.broadcast_object_list(box, src=0, group=self.wait_group)
        return box[0]

    def all_gather_object(self, obj: T, what: str = "all-gather") -> list[T]:
        """Every process's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self.collective(what, MAIN_ONLY_WAIT.total_seconds()):
            dist.all_gather_object(out, obj, group=self.wait_group)
        return out

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Give every process rank 0's weights (as DDP does at the start; they are equal already when
        every process built or loaded the same model, this makes it certain)."""
        if not self.distributed:
            return
        with torch.no_grad(), self.collective("broadcast of rank 0's weights"):
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    def run_on_main(self, fn: Callable[[], T], what: str) -> T | None:
        """Run ``fn`` on rank 0 only while the other processes wait (up to :data:`MAIN_ONLY_WAIT`).

        Returns ``fn()`` on rank 0, None elsewhere. An exception in ``fn`` is re-raised on rank 0 and
        becomes a :class:`DistributedError` naming rank 0 and ``what`` on the others, so every process
        stops with a message.
        """
        if not self.distributed:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:
                with contextlib.suppress(Exception):  # the original error matters, not this one
                    self.broadcast_object(f"{type(e).__name__}: {e}", what)
                raise
            self.broadcast_object(None, what)
            return result
        failure = self.broadcast_object(None, f"waiting for rank 0 ({what})")
        if failure is not None:
            raise DistributedError(f"rank {self.rank}: rank 0 failed during {what}: {failure}")
        return None

    def close(self) -> None:
        """Leave the process group (if this context created it)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def init_from_env(
    device_name: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, env: Mapping[str, str] | None = None
) -> DistContext:
    """The context of this process: a process group when torchrun started it, else a single process.

    Backend nccl on CUDA, gloo on the CPU; collectives of the training steps time out after
    ``timeout_s``; rank-0-only phases use a second (gloo) group that waits :data:`MAIN_ONLY_WAIT`.
    A process group that already exists is used as it is (and not destroyed by :meth:`close`).
    """
    env = os.environ if env is None else env
    if not launched_by_torchrun(env):
        return DistContext(device=resolve_device(device_name), timeout_s=timeout_s)
    rank, world_size, local_rank = (int(env[k]) for k in TORCHRUN_ENV)
    device = process_device(device_name, local_rank, True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owns:
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    wait_group = dist.new_group(backend="gloo", timeout=MAIN_ONLY_WAIT)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=str(dist.get_backend()),
        timeout_s=timeout_s,
        wait_group=wait_group,
        owns_group=owns,
    )


# ----------------------------------------------------------------------------------------------
# the step: the loss of the global batch, and the gradient sum of the step's task
# ----------------------------------------------------------------------------------------------
def _labels(target: torch.Tensor) -> torch.Tensor:
    """Integral label maps as uint8 (a quarter of float32's bytes on the wire)."""
    return (torch.round(target) if target.is_floating_point() else target).to(torch.uint8)


def lovasz_share(
    probas: torch.Tensor,
    all_probas: Sequence[torch.Tensor],
    all_targets: Sequence[torch.Tensor],
    rank: int,
    classes: str = "all",
) -> torch.Tensor:
    """This process's share of the Lovász-softmax of the global batch.

    ``all_probas`` / ``all_targets``: every process's probabilities ``(b, C, *spatial)`` and labels, in
    rank order (``probas`` is ``all_probas[rank]`` with its autograd graph). The loss of the
    concatenated batch is evaluated with :func:`training.losses.lovasz_softmax` (the preset's
    definition, batch-flattened) and differentiated with respect to every voxel's probabilities;
    the share is ``loss / W`` in value and ``sum(d loss / d probas[own voxels] * probas)`` in gradient
    (the loss is linear in the errors once they are sorted), so the shares of all processes add up
    to the loss and to its gradient.
    """
    world = len(all_probas)
    start = sum(int(p.shape[0]) for p in all_probas[:rank])
    glob = torch.cat([p.detach() for p in all_probas]).requires_grad_(True)
    with torch.enable_grad():
        value = lovasz_softmax(glob, torch.cat(list(all_targets)), classes=classes)
        (grad,) = torch.autograd.grad(value, glob)
    own = grad[start : start + probas.shape[0]]
    linear = (own * probas).sum()
    return value.detach() / world + (linear - linear.detach())


class GlobalBatchLoss:
    """The preset's loss (:class:`training.losses.SegmentationLoss`) of the global batch, as this
    process's share: ``loss_fn(logits, target)`` returns a scalar whose value is this process's part
    of the global loss and whose gradient is this process's part of the global gradient (the focal
    term, a mean over voxels, is the local mean / W; the Lovász term is :func:`lovasz_share`).
    Every process must call it once per step with a batch of the same shape. With one process it is
    the plain loss (nothing to exchange).
    """

    def __init__(self, loss: SegmentationLoss, ctx: DistContext) -> None:
        self.loss = loss
        self.ctx = ctx

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, ctx = self.loss, self.ctx
        if ctx.world_size == 1:
            return loss(logits, target)
        logits = logits.float()
        out = logits.new_zeros(())
        if loss.lovasz_weight:
            probas = torch.softmax(logits, dim=1)
            all_probas = ctx.all_gather(probas.detach(), "the loss's all-gather of probabilities")
            all_targets = ctx.all_gather(_labels(target), "the loss's all-gather of labels")
            share = lovasz_share(probas, all_probas, all_targets, ctx.rank, loss.classes)
            out = out + loss.lovasz_weight * share
        if loss.focal_weight:
            focal = focal_loss(logits, target, gamma=loss.gamma, detach_factor=loss.detach_focal_factor)
            out = out + loss.focal_weight * focal / ctx.world_size
        return out


def task_parameters(model: nn.Module, task_indices: Sequence[int]) -> dict[int, list[nn.Parameter]]:
    """The trainable parameters a step of each task uses (and so gives a gradient): the shared ones
    and the task's own (:func:`models.params.split_parameters`), in the model's order."""
    split = split_parameters(model)
    out: dict[int, list[nn.Parameter]] = {}
    for t in task_indices:
        used = set(split.shared) | set(split.per_task[t] if t < len(split.per_task) else [])
        out[t] = [p for n, p in model.named_parameters() if n in used and p.requires_grad]
    return out


def _buckets(grads: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``grads`` grouped into buckets of at most ``bucket_bytes`` (one dtype each)."""
    out: list[list[int]] = []
    size = 0
    for i, g in enumerate(grads):
        nbytes = g.numel() * g.element_size()
        if not out or size + nbytes > bucket_bytes or grads[out[-1][0]].dtype != g.dtype:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


class GradientSync:
    """Sum the gradients of the step's task over the processes, and the step's loss with them.

    ``sync(task_idx, loss)`` -- after the backward pass, before the optimizer step -- all-reduces the
    gradients of :func:`task_parameters` ``[task_idx]`` in flat buckets of at most
    :data:`BUCKET_BYTES` (launched together, then unpacked), the process's loss share riding in the
    last one, and returns the global loss. The parameters of other tasks are left as they are: no
    gradient, or a zero one, identical in every process. In a single process it only returns
    ``loss`` (also in a process group of one: nothing to exchange).
    """

    def __init__(
        self,
        ctx: DistContext,
        model: nn.Module,
        task_indices: Sequence[int],
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        self.ctx = ctx
        self.params = task_parameters(model, task_indices)
        self.bucket_bytes = int(bucket_bytes)

    def __call__(self, task_idx: int, loss: torch.Tensor) -> float:
        if self.ctx.world_size == 1:
            return float(loss)
        grads: list[torch.Tensor] = []
        for p in self.params[task_idx]:
            if p.grad is None:  # the same in every process: they all stop here
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} of task {task_idx} got no gradient: the model's "
                    "shared / per-task parameter split (models.params) does not match its forward pass"
                )
            grads.append(p.grad)
        groups = _buckets(grads, self.bucket_bytes) or [[]]
        flats, works = [], []
        with self.ctx.collective(f"the gradient all-reduce of task {task_idx}"):
            for k, idx in enumerate(groups):
                parts = [grads[i].reshape(-1) for i in idx]
                if k == len(groups) - 1:
                    dtype = parts[0].dtype if parts else loss.dtype
                    parts.append(loss.detach().reshape(1).to(dtype))
                flat = torch.cat(parts)
                flats.append(flat)
                works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
            for w in works:
                w.wait()
        for idx, flat in zip(groups, flats, strict=True):
            offset = 0
            for i in idx:
                g = grads[i]
                g.copy_(flat[offset : offset + g.numel()].view(g.shape))
                offset += g.numel()
        return float(flats[-1][-1])
