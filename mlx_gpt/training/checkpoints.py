"""The checkpoint folder (``out_dir``): timestamped checkpoints, ``latest.npz`` and ``best.npz``, rotation, the lock.

Rules (README, "Checkpoints"):
- A run writes ``gpt-YYYYmmdd-HHMMSS-stepN.npz`` and points ``latest.npz`` (and ``best.npz``) at it.
- Every checkpoint records its lineage: the runs it descends from, each with the last step taken from it. Pruning
  (``keep_last``) removes only files of this run's own lineage, older than the newest ``keep_last`` of them, and
  never the file the run resumed from; files of other runs or of abandoned branches are never touched.
- A new run (not ``--resume``) into a folder that holds checkpoints is refused unless forced; forced, it starts a
  new lineage beside the old files.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import KIND, Checkpoint, read_header
from ..errors import MlxGptError
from ..files import replace_with_copy

# gpt-<time>-step<N>.npz; a run that would take a name another run wrote in the same second adds its id
CHECKPOINT_PATTERN = re.compile(r"^gpt-\d{8}-\d{6}(?:-[0-9a-f]+)?-step(\d+)\.npz$")


def timestamped_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the timestamped checkpoints in ``out_dir``, oldest step first."""
    found = []
    for path in out_dir.glob("gpt-*.npz"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resumable(out_dir: Path) -> Path | None:
    """The newest timestamped checkpoint in ``out_dir`` that loads, if any (offered when latest.npz is bad)."""
    for _, path in reversed(timestamped_checkpoints(out_dir)):
        try:
            Checkpoint.load(path)
        except MlxGptError:
            continue
        return path
    return None


def new_lineage(parent: Checkpoint | None) -> list[list[Any]]:
    """The lineage of a run: its parent's, with the step it continues from, then a new id for this run."""
    ancestors = [list(entry) for entry in (parent.lineage if parent is not None else [])]
    if ancestors:
        ancestors[-1][1] = parent.iter
    return [*ancestors, [f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", None]]


def writer_of(path: Path) -> str | None:
    """The run that wrote the checkpoint ``path`` (the last entry of its lineage), or None when unknown."""
    try:
        return str(read_header(path, KIND)["lineage"][-1][0])
    except (MlxGptError, KeyError, IndexError, TypeError):
        return None


class OutDirLock:
    """An exclusive lock on ``out_dir`` (released by the OS when the process dies, so stale locks free themselves)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / ".lock"
        self._file: Any = None

    def __enter__(self) -> OutDirLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            self._file = open(self.path, "a+")
        except OSError as exc:
            raise MlxGptError(f"cannot use out_dir {self.path.parent}: {exc.strerror or exc}; "
                              "pass another --out_dir") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise MlxGptError(f"{self.path.parent} is in use by a training run (pid {holder}); "
                              "wait for it to finish or pass another --out_dir") from None
        try:  # the pid only names the holder in the message above; the flock is the lock
            self._file.seek(0)
            self._file.truncate()
            self._file.write(str(os.getpid()))
            self._file.flush()
        except OSError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


class CheckpointFolder:
    """One run's view of ``out_dir``: what it may write, replace and prune."""

    def __init__(self, out_dir: Path, keep_last: int, lineage: list[list[Any]], resumed_from: Path | None) -> None:
        self.out_dir, self.keep_last, self.lineage = out_dir, keep_last, lineage
        self.latest, self.best = out_dir / "latest.npz", out_dir / "best.npz"
        self.protected = {resumed_from.resolve()} if resumed_from is not None else set()
        self._cut = {run: last for run, last in lineage}  # run -> its last step in this lineage (None: no limit)
        self._writer: dict[Path, str | None] = {}  # the run that saved each file seen so far
        self._lock = OutDirLock(out_dir)
        self.writing: Path | None = None  # the checkpoint the last save wrote or tried to

    def open(self, resuming: bool, force: bool) -> CheckpointFolder:
        """Create and lock the folder, remove temp files of killed writers, refuse to start over old checkpoints."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MlxGptError(f"cannot create out_dir {self.out_dir}: {exc.strerror or exc}; "
                              "pass another --out_dir") from None
        self._lock.__enter__()
        for stale in self.out_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if not resuming and not force and (self.latest.exists() or timestamped_checkpoints(self.out_dir)):
            self.close()
            raise MlxGptError(f"{self.out_dir} already holds checkpoints; continue them with --resume, start a new "
                              "run beside them with --force (latest.npz and best.npz then follow the new run; "
                              "the old files are kept), or pass another --out_dir")
        return self

    def close(self) -> None:
        self._lock.__exit__()

    def save(self, checkpoint: Checkpoint, is_best: bool) -> Path:
        """Write a timestamped checkpoint, point latest.npz (and best.npz) at it, prune; OSError if a write fails."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.out_dir / f"gpt-{stamp}-step{checkpoint.iter}.npz"
        if path.exists() and self._writer.get(path) != self.lineage[-1][0]:
            path = self.out_dir / f"gpt-{stamp}-{self.lineage[-1][0].rsplit('-', 1)[1]}-step{checkpoint.iter}.npz"
        self.writing = path
        checkpoint.save(path)
        self._writer[path] = self.lineage[-1][0]
        replace_with_copy(path, self.latest)
        if is_best:
            replace_with_copy(path, self.best)
        self.prune()
        return path

    def _ours(self, step: int, path: Path) -> bool:
        if path not in self._writer:
            self._writer[path] = writer_of(path)
        run = self._writer[path]
        if run not in self._cut or path.resolve() in self.protected:
            return False
        last = self._cut[run]
        return last is None or step <= last

    def prune(self) -> None:
        """Remove this lineage's timestamped files older than its newest ``keep_last`` (0: keep all)."""
        if self.keep_last == 0:
            return
        ours = [path for step, path in timestamped_checkpoints(self.out_dir) if self._ours(step, path)]
        for old in ours[: -self.keep_last]:
            old.unlink(missing_ok=True)  # latest/best are separate links or copies: never touched

    def save_error(self, exc: OSError, iteration: int, last_saved: int | None) -> str:
        """A one-line message for a failed save: what failed, why, what to do, and what latest.npz still holds."""
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        where = exc.filename or self.writing or self.out_dir
        if exc.errno == errno.ENOSPC:
            hint = "free some disk space"
        elif exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) or self.latest.is_dir():
            hint = f"{where} is in the way (a folder?): move it aside"
        else:
            hint = "check the folder's permissions"
        return f"could not write checkpoint {where} at iter {iteration}: {reason}; {hint}; {self.holds(last_saved)}"

    def holds(self, last_saved: int | None) -> str:
        """What latest.npz holds for this run, whose last successful save was at ``last_saved``."""
        if last_saved is None or not self.latest.is_file():
            return f"{self.latest} holds no checkpoint of this run"
        return f"{self.latest} holds iter {last_saved}"

    def where(self, best_val_loss: float | None, log: Callable[[str], None]) -> None:
        """Say where the run's checkpoints are."""
        if self.latest.is_file():
            best = f"; best (val {best_val_loss:.4f}): {self.best}" if best_val_loss is not None else ""
            log(f"checkpoints: latest: {self.latest}{best}")
