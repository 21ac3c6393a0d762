"""Per-task normalisation and the container that marks modules as task-specific."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar, overload

import torch
from torch import nn

from models.fused import instance_norm_act

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class TaskModuleList(nn.ModuleList, Generic[ModuleT]):
    """A list with one module per task; entry ``t`` belongs to task ``t`` alone.

    The parameter split of :mod:`models.params` treats every parameter below entry ``t`` as
    task ``t``'s and every parameter outside such lists as shared. ``factory(task_idx)`` builds a
    fresh entry, so :meth:`add_task` can grow the list when a new domain is added. The type
    parameter ``ModuleT`` is the entries' module type (what ``factory`` returns and indexing gives).
    """

    def __init__(self, factory: Callable[[int], ModuleT], num_tasks: int) -> None:
        super().__init__([factory(t) for t in range(num_tasks)])
        # A plain attribute (not a submodule): it is not part of the state_dict.
        self._factory = factory

    if TYPE_CHECKING:
        # Typing only (nn.ModuleList's own method runs): an entry has the factory's type.
        @overload
        def __getitem__(self, idx: slice) -> nn.ModuleList: ...
        @overload
        def __getitem__(self, idx: int) -> ModuleT: ...
        def __getitem__(self, idx: int | slice) -> ModuleT | nn.ModuleList: ...

    def add_task(self, init_from: int | None = None) -> ModuleT:
        """Append an entry for a new task; copy the weights of task ``init_from`` if given."""
        new = self._factory(len(self))
        if init_from is not None:
            new.load_state_dict(self[init_from].state_dict())
        self.append(new)
        return new

    def forward(self, *args, **kwargs):  # pragma: no cover - never called as a whole
        raise RuntimeError("TaskModuleList is indexed by task, e.g. modules[task_idx](x)")


class TaskNorm(nn.Module):
    """InstanceNorm3d(affine=True), one per task.

    Args:
        channels: number of channels C.
        num_tasks: number of tasks T.
    """

    def __init__(self, channels: int, num_tasks: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.norms = TaskModuleList(lambda _t: nn.InstanceNorm3d(channels, eps=eps, affine=True), num_tasks)
        self.use_fused = True

    def forward(self, x: torch.Tensor, task_idx: int, slope: float | None = None) -> torch.Tensor:
        """Normalise with task ``task_idx``'s norm, then LeakyReLU(slope) if ``slope`` is given.

        Args:
            x: (N, C, D, H, W). Returns a tensor of the same shape and memory format.
        """
        return norm_act(self.norms[task_idx], x, slope, self.use_fused)


def norm_act(
    norm: nn.InstanceNorm3d, x: torch.Tensor, slope: float | None, fused: bool = True
) -> torch.Tensor:
    """``norm`` then LeakyReLU(slope) (if given): fused, or with the plain PyTorch modules."""
    if fused:
        return instance_norm_act(x, norm.weight, norm.bias, norm.eps, slope)
    y = norm(x)
    return y if slope is None else torch.nn.functional.leaky_relu(y, slope)
