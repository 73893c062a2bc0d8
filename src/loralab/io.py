"""Atomic file writes: every file a long job writes goes through here.

The content is written to a temporary file in the target's folder, flushed to disk, then renamed over
the target (os.replace is atomic on one file system), so an interrupted run never leaves a truncated
file under a final name, and an existing file survives a failed write. The file gets the mode any
other program would give it (0666 less the user's umask), not the temp file's private 0600.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import numpy as np

from loralab.errors import LoralabError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NEARLY_FULL_BYTES = 1 << 20  # free space under which a failed write is taken to be a full disk


class DiskFullError(LoralabError):
    """A write failed for lack of space; `path` is the file that could not be written."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def free_bytes(folder: str | Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, folder: str | Path) -> bool:
    """Did `exc`, raised while writing into `folder`, come from a full disk (or a quota / file size limit)?

    OSError carries the errno; safetensors' error says "os error 28" in its text; torch.save's zip
    writer says neither ("unexpected pos ..."), so for any other error the free space decides."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    if "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    free = free_bytes(folder)
    return isinstance(exc, (OSError, RuntimeError)) and free is not None and free < NEARLY_FULL_BYTES


def human_size(n: float) -> str:
    """5 bytes, 32.0 KiB, 3.0 MiB, 7.0 GiB."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def disk_full_error(path: str | Path, folder: str | Path | None = None) -> DiskFullError:
    path = Path(path)
    free = free_bytes(folder or path.parent)
    left = f"{human_size(free)} free" if free is not None else "free space unknown"
    return DiskFullError(f"disk full: could not write {path} ({left} on that disk). Nothing was half-written: "
                         "the files written before are intact. Free some space (or choose a folder on another "
                         "disk) and run again.", path)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a process killed while writing it
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, (KeyboardInterrupt, LoralabError)) and is_disk_full(e, path.parent)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise disk_full_error(path) from e
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_save_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """`np.savez(path, **arrays)` written atomically (uncompressed, as np.savez writes it).

    The archive goes to an open file: given a path that does not end in `.npz` (our temp file's), np.savez
    would append `.npz` to it.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
