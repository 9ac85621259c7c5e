"""Ctrl+C and SIGTERM during training: finish the step, save, stop."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


class StopSignals:
    """Ctrl+C / SIGTERM: the first asks the loop to save and stop; during a save, the second waits for it;
    the third exits at once (files on disk stay valid: every write is atomic)."""

    def __init__(self) -> None:
        self.requested = 0
        self.saving = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested += 1
        if self.requested >= 3:
            print("\nthird interrupt: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        if self.requested == 2 and self.saving:
            print("\nwaiting for the checkpoint being written; interrupt once more to exit at once",
                  file=sys.stderr, flush=True)
        elif self.requested == 1:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
