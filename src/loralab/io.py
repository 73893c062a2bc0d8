"""Atomic file writes: every file a long job writes goes through here.

The content is written to a temporary file in the target's folder, flushed to disk, then renamed over
the target (os.replace is atomic on one file system), so an interrupted run never leaves a truncated
file under a final name, and an existing file survives a failed write. The file gets the mode any
other program would give it (0666 less the user's umask), not the temp file's private 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import numpy as np


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
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
