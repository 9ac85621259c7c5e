"""Atomic file writes: a file on disk is either the old one or the complete new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process (``.NAME.PID.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (directly or by a child process such as a compiler).

    When the block succeeds the file is fsynced and renamed over ``path``; when it fails (or is interrupted) the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def replace_with_copy(source: str | Path, dest: str | Path) -> None:
    """Atomically make ``dest`` a copy of ``source`` (a hard link where the file system allows)."""
    with atomic_target(dest) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
