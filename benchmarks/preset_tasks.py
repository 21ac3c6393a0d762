"""The paper's five training tasks as the benchmarks build them: modalities, classes, task patch and
pools, read from the settings table (:data:`utils.task_settings.PRESETS`) so that they cannot drift
from it; only the modality counts (from the MSD tasks' ``dataset.json``) are stated here."""

from __future__ import annotations

from dataclasses import dataclass

from utils.task_settings import PRESETS
from utils.triples import Int3

#: modalities per task (the MSD tasks' dataset.json; not part of the settings table)
_MODALITIES = {
    "Task02_Heart": 1,
    "Task03_Liver": 1,
    "Task04_Hippocampus": 1,
    "Task05_Prostate": 2,
    "Task07_Pancreas": 1,
}


@dataclass(frozen=True)
class PresetTask:
    """One of the five tasks: name, modalities, classes (background included), task patch, pools."""

    name: str
    modalities: int
    classes: int
    patch: Int3
    pools: Int3


def _preset_task(name: str) -> PresetTask:
    row = PRESETS[name]
    if row.patch_size is None or row.pools_per_axis is None or row.label_map is None:
        raise ValueError(f"{name}: the settings table has no fixed patch, pools and labels for it")
    classes = len({cls for _, cls in row.label_map})
    return PresetTask(name, _MODALITIES[name], classes, row.patch_size, row.pools_per_axis)


#: the five tasks of the paper's shared and universal models, in training order
FIVE_TASKS = tuple(_preset_task(name) for name in _MODALITIES)
FIVE_MODALITIES = [t.modalities for t in FIVE_TASKS]
FIVE_CLASSES = [t.classes for t in FIVE_TASKS]
