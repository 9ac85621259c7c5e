"""``python tests/slow_saves.py DELAY SCRIPT ARGS...``: run a root script with every atomic write paused for DELAY
seconds once its temporary file is complete and before the rename, so that the kill and signal tests can land
inside a save. A test-side wrapper: the library has no test hooks."""

import contextlib
import runpy
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mlx_gpt import files

delay, script = float(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[2:]
sys.path[0] = str(Path(script).resolve().parent)  # as if the script had been run directly
atomic_target = files.atomic_target


@contextlib.contextmanager
def slow_atomic_target(path: Path) -> Iterator[Path]:
    with atomic_target(path) as tmp:
        yield tmp
        # In short sleeps: a signal that another thread receives wakes no sleeping main thread, and a second one
        # before the main thread runs the handlers would merge with the first.
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            time.sleep(0.005)


files.atomic_target = slow_atomic_target
runpy.run_path(script, run_name="__main__")
