"""What a run writes besides checkpoints: a text log, TensorBoard events and the validation CSV."""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.io_utils import atomic_write_csv

VAL_CSV_FIELDS = ("epoch", "step", "task", "class", "class_name", "dice", "num_cases")


class RunLog:
    """Text log (``train_log.txt`` + console), TensorBoard (``tb/``) and ``val_dice.csv`` of a run.

    Args:
        run_dir: the run folder.
        tensorboard: write TensorBoard events.
        purge_step: on resume, TensorBoard drops events at and after this step (written by the
            interrupted run after its checkpoint), so curves do not double back.
        console: echo log lines to stderr (through tqdm, so progress bars stay intact).
    """

    def __init__(
        self, run_dir: Path, *, tensorboard: bool = True, purge_step: int | None = None, console: bool = True
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = f"u2net3d.train.{id(self)}"
        self.logger = logging.getLogger(name)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        fh = logging.FileHandler(self.run_dir / "train_log.txt", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.logger.addHandler(fh)
        self.console = console
        self.writer = None
        if tensorboard:
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)
        self.val_csv = self.run_dir / "val_dice.csv"

    # -- text -----------------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        self.logger.info(msg)
        if self.console:
            tqdm.write(msg, file=sys.stderr)

    # -- TensorBoard ----------------------------------------------------------------------------
    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def slices(
        self,
        tag: str,
        image: np.ndarray,
        label: np.ndarray,
        pred: np.ndarray | None,
        num_classes: int,
        step: int,
    ) -> None:
        """Image / ground truth / prediction of one axial slice side by side (grey values in [0, 1]).

        Args:
            image: (y, x) float slice; label, pred: (y, x) integer slices.
        """
        if self.writer is None:
            return
        img = np.asarray(image, dtype=np.float32)
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
        img = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
        scale = max(num_classes - 1, 1)
        panels: list[np.ndarray] = [img, np.asarray(label, np.float32) / scale]
        if pred is not None:
            panels.append(np.asarray(pred, np.float32) / scale)
        sep = np.ones((img.shape[0], 2), np.float32)
        row = np.concatenate([p for panel in panels for p in (panel, sep)][:-1], axis=1)
        self.writer.add_image(tag, row[None], step, dataformats="CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)

    # -- validation CSV -------------------------------------------------------------------------
    def truncate_val_csv(self, after_epoch: int) -> None:
        """Drop rows of epochs after ``after_epoch`` (written by a run that is now resumed earlier)."""
        rows = [r for r in self._read_val_rows() if int(r["epoch"]) <= after_epoch]
        if self.val_csv.is_file():
            atomic_write_csv(self.val_csv, VAL_CSV_FIELDS, rows)

    def append_val_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Add rows; the file is rewritten atomically (it stays small: a row per task, class and validation)."""
        atomic_write_csv(self.val_csv, VAL_CSV_FIELDS, [*self._read_val_rows(), *rows])

    def _read_val_rows(self) -> list[dict[str, str]]:
        if not self.val_csv.is_file():
            return []
        with open(self.val_csv, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


class SilentLog(RunLog):
    """The log of a data-parallel run's other processes: it writes nothing, anywhere (rank 0 writes
    the run's text log, TensorBoard events and CSVs)."""

    def __init__(self, run_dir: Path) -> None:  # creates no folder, file, logger or writer
        self.run_dir = Path(run_dir)
        self.console = False
        self.writer = None
        self.val_csv = self.run_dir / "val_dice.csv"

    def info(self, msg: str) -> None:
        pass

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def slices(
        self,
        tag: str,
        image: np.ndarray,
        label: np.ndarray,
        pred: np.ndarray | None,
        num_classes: int,
        step: int,
    ) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def truncate_val_csv(self, after_epoch: int) -> None:
        pass

    def append_val_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        pass
