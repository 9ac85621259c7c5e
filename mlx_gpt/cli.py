"""What the command-line scripts share: argument types that reject bad values, and one-line errors."""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Callable

from .errors import MlxGptError


def _number(kind: type, text: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(_number(int, text))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(_number(int, text))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1) (dropout, Adam betas)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def open_unit_interval(text: str) -> float:
    """A number in (0, 1] (top_p)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def closed_unit_interval(text: str) -> float:
    """A number in [0, 1] (min_p)."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def any_int(text: str) -> int:
    return int(_number(int, text))


SEED_LIMIT = 2**64  # MLX and numpy take seeds in [0, 2**64)


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**64)."""
    value = int(_number(int, text))
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {text}")
    return value


class IntRange:
    """An argument type: an integer in [low, high]; the error names the limit that was crossed."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def __call__(self, text: str) -> int:
        value = int(_number(int, text))
        if value < self.low:
            raise argparse.ArgumentTypeError(f"must be >= {self.low}, got {text}")
        if value > self.high:
            raise argparse.ArgumentTypeError(f"must be at most {self.high:,} (the limit), got {text}")
        return value

    def __repr__(self) -> str:
        return f"IntRange({self.low}, {self.high})"


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main: library errors become ``error: ...`` on one line and exit 1.

    ``--debug`` anywhere on the command line shows the full traceback instead.
    """
    debug = "--debug" in sys.argv
    try:
        code = main()
    except MlxGptError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: still one line, with the way to see more
        if debug:
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"error: unexpected {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno}; "
              "rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
