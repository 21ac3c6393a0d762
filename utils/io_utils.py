"""Atomic file writes for the pipeline's outputs (NumPy arrays and plain JSON).

Every file is first written under a temporary name in the destination folder and then moved onto
its final name with :func:`os.replace` (atomic on POSIX and Windows within one file system), so
a reader never sees a half-written file and an interrupted run leaves at most a stray temporary
file behind (names ``.<final name>.<random>.tmp``; see :func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

TMP_SUFFIX = ".tmp"


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save ``array`` as a plain ``.npy`` file (no pickles) atomically."""
    arr = np.ascontiguousarray(array)
    return _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, sorted as given, trailing newline) atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file (UTF-8) atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left in ``folder`` by an interrupted atomic write.

    Only names of the form ``.<name>.<random>.tmp`` (as written by this module) are removed.
    Returns the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
