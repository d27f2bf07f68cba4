"""Durable file writes: a crash leaves the old content or the new one, never a torn file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``path`` so that a crash leaves either the old or the new content: temp, fsync,
    rename, fsync the directory.

    ``durable=False`` skips the directory fsync: after a power cut the rename may be lost (the
    old content comes back), which is fine for progress records that only save re-fetching.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # a full disk: do not leave a torn temporary file behind
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
