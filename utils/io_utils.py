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

While a write is under way its temporary file is ``flock``-ed (POSIX), so
:func:`remove_stale_temporaries` deletes only the leftovers of dead processes and never the file
another process is still writing. A write that fails because the disk is full (``ENOSPC`` or a
quota) raises :class:`DiskFullError`, which names the file and about how much space it needed; the
previous version of the file is untouched and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import SimpleITK as sitk

if sys.platform != "win32":
    import fcntl

__all__ = [
    "TMP_PREFIX",
    "DiskFullError",
    "atomic_link_or_copy",
    "atomic_path",
    "atomic_save_npy",
    "atomic_write",
    "atomic_write_csv",
    "atomic_write_image",
    "atomic_write_json",
    "atomic_write_nifti",
    "check_writable_folder",
    "format_bytes",
    "is_disk_full",
    "read_json",
    "remove_stale_temporaries",
]

TMP_PREFIX = ".u2tmp-"

PathLike = str | os.PathLike[str]

#: errno values that mean "no room left for this write"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: how libraries that hide the errno (SimpleITK raises RuntimeError) word it
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full.

    Attributes:
        path: the file that was being written (its previous version, if any, is unchanged).
        needed: about how many bytes the write needed (None when unknown).
        free: bytes free on that file system after the failed write was cleaned up (None when unknown).
    """

    def __init__(self, path: Path, needed: int | None, free: int | None) -> None:
        self.path = Path(path)
        self.needed = needed
        self.free = free
        need = f"about {format_bytes(needed)}" if needed is not None else "an unknown amount of space"
        have = f"{format_bytes(free)} free there" if free is not None else "free space unknown"
        before = "its previous version is unchanged" if self.path.exists() else "nothing was written"
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device to write {self.path}: the file needs {need} ({have}); "
            f"{before}. Free some space (or write to another disk) and run again",
        )

    def __str__(self) -> str:
        return str(self.strerror)


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, for messages)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # not reached


def is_disk_full(error: BaseException) -> bool:
    """True for an ``OSError`` with ``ENOSPC``/``EDQUOT`` and for library errors that say so in words."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(error, RuntimeError) and any(t in str(error) for t in _DISK_FULL_TEXTS)


def _free_bytes(folder: Path) -> int | None:
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


class _ByteCounter:
    """A write-only file object that only counts bytes (to size a write that did not fit)."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        n = len(memoryview(data).cast("B"))
        self.count += n
        return n

    def flush(self) -> None:
        pass


def _serialised_size(write: Callable[[IO[bytes]], Any]) -> int | None:
    """Bytes ``write`` produces, found by running it on a counter (None when it needs a real file)."""
    counter = _ByteCounter()
    try:
        write(counter)  # type: ignore[arg-type]  # duck-typed sink
    except Exception:  # noqa: BLE001 - only an estimate for an error message
        return None
    return counter.count


def _lock_exclusive(fd: int) -> None:
    """Mark a temporary file as in use for as long as ``fd`` is open (no-op without ``fcntl``)."""
    if sys.platform != "win32":
        fcntl.flock(fd, fcntl.LOCK_EX)


def _in_use(path: Path) -> bool:
    """Whether a live process holds the lock of a temporary file (False when it cannot be told)."""
    if sys.platform == "win32":
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases our shared lock
    return False


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
def atomic_path(path: PathLike, *, size_hint: int | Callable[[], int | None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path`` atomically.

    The temporary file already exists (empty, created with ``0666 & ~umask``) when the block
    starts; write it by name (any library) and leave the block. On an exception the temporary file
    is removed and ``path`` is untouched. The temporary file is locked (``flock``) until the block
    ends, which tells :func:`remove_stale_temporaries` that it is not stale.

    Args:
        path: the final file.
        size_hint: the bytes the write needs (or a function computing them), only used for the
            message of a :class:`DiskFullError`.

    Raises:
        DiskFullError: the disk or quota filled up while writing (an ``OSError`` with ``ENOSPC``).

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
        break
    try:
        _lock_exclusive(fd)
        if sys.platform == "win32":  # a file open elsewhere cannot be renamed there
            os.close(fd)
            fd = -1
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, final)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            if is_disk_full(e) and not isinstance(e, DiskFullError):
                needed = size_hint() if callable(size_hint) else size_hint
                raise DiskFullError(final, needed, _free_bytes(final.parent)) from e
            raise
    finally:
        if fd >= 0:
            os.close(fd)
    _fsync_dir(final.parent)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a binary file object and put the result at ``path`` atomically.

    ``write`` must only write (it is run once more on a byte counter when the disk fills up, to say
    how much space the file needs).
    """
    with atomic_path(path, size_hint=lambda: _serialised_size(write)) as tmp, open(tmp, "wb") as f:
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
    voxel_bytes = (
        image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    )
    with atomic_path(path, size_hint=voxel_bytes + 352) as tmp:  # uncompressed: an upper bound
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(path)


def atomic_write_image(image: sitk.Image, path: PathLike) -> Path:
    """Write a SimpleITK image atomically in the format its suffix names (``.nii.gz``, ``.nii``, ``.mha``,
    ``.nrrd``; compressed where the format can be). Not ``.mhd``: its header names a separate data file,
    which a temporary name would break (write ``.mha``, the same format in one file)."""
    if str(path).lower().endswith(".mhd"):
        raise ValueError(
            f"{path}: .mhd headers name a separate data file; write .mha (MetaImage in one file)"
        )
    return atomic_write_nifti(image, path)


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


def check_writable_folder(folder: PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and make sure files can be created in it (an unnamed temporary
    file is made and dropped: nothing is left behind).

    Raises:
        OSError: of the original kind, with a message naming the folder, why, and what to do.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise type(e)(
            e.errno, f"cannot write to the {what} {folder} ({e.strerror or e}); choose a writable folder"
        ) from e
    return folder


def read_json(path: PathLike) -> Any:
    """Read a JSON file (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_temporaries(folder: PathLike, *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder``.

    Only names of this module's scheme (``.u2tmp-*``) are touched, and only those no live process
    is writing (their lock is free: the writer died), so it is safe while other processes write
    into the same folder (on POSIX; on Windows, call it only where nobody else writes there).

    Args:
        folder: where to look (a missing folder is fine).
        recursive: also look in every subfolder.
    Returns:
        the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    candidates = folder.rglob(f"{TMP_PREFIX}*") if recursive else folder.glob(f"{TMP_PREFIX}*")
    for p in sorted(candidates):
        if p.is_symlink() or not p.is_file() or _in_use(p):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed
