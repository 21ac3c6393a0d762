"""Checkpoint save/load round trip, errors, RNG states."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_model
from models.loading import build_model_from_checkpoint
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    rng_state_to_plain,
    save_checkpoint,
    task_index,
)

CONFIG = {
    "train_mode": "shared",
    "in_channels": [1, 2],
    "num_classes": [2, 3],
    "module": None,
    "base_channels": 4,
    "pools_per_axis": [2, 2, 2],
    "deep_supervision": True,
    "residual": True,
}
TASKS = [
    {"name": "TaskA", "plans": {"task": "TaskA", "num_classes": 2, "patch_size": [8, 8, 8]}},
    {"name": "TaskB", "plans": {"task": "TaskB", "num_classes": 3, "patch_size": [4, 8, 8]}},
]


def test_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(**CONFIG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(1, 2, 8, 8, 8)
    model(x, 1).sum().backward()
    opt.step()
    train_state = {
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "losses": [0.5, 0.25],
        "rng": rng_state_to_plain(),
    }
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, CONFIG, TASKS, model.state_dict(), model_patch=(8, 8, 8), train_state=train_state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]

    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "u2net3d" and ckpt["version"] == 1 and ckpt["model_patch"] == [8, 8, 8]
    assert ckpt["model_config"] == CONFIG and ckpt["tasks"] == TASKS
    assert ckpt["train_state"]["epoch"] == 3 and ckpt["train_state"]["losses"] == [0.5, 0.25]
    assert task_index(ckpt, "TaskB") == 1
    with pytest.raises(ValueError, match="TaskA"):
        task_index(ckpt, "TaskC")
    model2, tasks = build_model_from_checkpoint(ckpt)
    assert tasks == TASKS and not model2.training
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model2(x, 1), model(x, 1))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["train_state"]["optimizer"])


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    state = rng_state_to_plain()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(state, tmp_path / "rng.pt")
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pt.*not found"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt.*not a readable torch file"):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="other.pt.*not a u2net3d checkpoint"):
        load_checkpoint(other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "u2net3d", "x": np.zeros(2)}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pt.*weights_only"):
        load_checkpoint(unsafe)
    partial = tmp_path / "partial.pt"
    torch.save({"format": "u2net3d", "version": 1, "tasks": []}, partial)
    with pytest.raises(CheckpointError, match="partial.pt.*lacks keys"):
        load_checkpoint(partial)
