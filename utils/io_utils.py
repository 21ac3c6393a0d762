"""The one atomic file writer of the project, and JSON reading.

Every file the project writes (arrays, JSON, CSV, NIfTI, checkpoints, rewritten logs) goes through
:func:`atomic_path`: the content is written to a temporary file in the destination folder, flushed
to disk (``fsync``), and moved onto the final name with :func:`os.replace` (atomic on POSIX and
Windows within one file system). A reader never sees a half-written file; an interrupted write
leaves at most a temporary file, which :func:`remove_stale_temporaries` deletes on the next run.

Temporary names follow one scheme, ``.u2tmp-<random>-<final name>``: hidden, recognisable, and
ending with the final name so that writers that pick the format from the suffix (SimpleITK's
``.nii.gz``) still work. Files are created with mode ``0666`` minus the process umask, exactly
like a plain ``open(path, "w")``; nothing is made owner-only behind the user's back.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import SimpleITK as sitk

__all__ = [
    "TMP_PREFIX",
    "atomic_link_or_copy",
    "atomic_path",
    "atomic_save_npy",
    "atomic_write",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_nifti",
    "read_json",
    "remove_stale_temporaries",
]

TMP_PREFIX = ".u2tmp-"

PathLike = str | os.PathLike[str]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path`` atomically.

    The temporary file already exists (empty, created with ``0666 & ~umask``) when the block
    starts; write it by name (any library) and leave the block. On an exception the temporary file
    is removed and ``path`` is untouched.

    Example::

        with atomic_path("seg/case_001.nii.gz") as tmp:
            sitk.WriteImage(image, str(tmp))
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = final.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}-{final.name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(final.parent)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a binary file object and put the result at ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_save_npy(path: PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as a plain ``.npy`` file (no pickles) atomically."""
    arr = np.ascontiguousarray(array)
    return atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, keys in the given order, trailing newline) atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_csv(path: PathLike, fieldnames: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write a CSV file (header + rows; missing keys left empty) atomically."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_nifti(image: sitk.Image, path: PathLike) -> Path:
    """Write a SimpleITK image (format from the suffix; ``.nii.gz`` compressed) atomically."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(path)


def atomic_link_or_copy(src: PathLike, dst: PathLike) -> Path:
    """Make ``dst`` a hard link to the finished file ``src`` (a copy where links are impossible),
    atomically: ``dst`` is either its old content or ``src``'s, never partial."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return Path(dst)


def read_json(path: PathLike) -> Any:
    """Read a JSON file (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``folder`` (not recursive).

    Only names of this module's scheme (``.u2tmp-*``) are touched. Call it where no other process
    is writing into ``folder`` at the same time. Returns the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
