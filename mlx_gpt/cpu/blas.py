"""The BLAS for MLX's matmuls on Linux: the ``mlx[cpu]`` wheel bundles a reference BLAS (a few GFLOP/s).

MLX resolves its BLAS symbols when ``mlx.core`` is first imported, so a library opened with ``RTLD_GLOBAL`` before
that import takes over. ``MLX_GPT_OPENBLAS`` chooses: unset, numpy's bundled OpenBLAS (``numpy_blas.py``), else a
system OpenBLAS, else MLX's own with a hint; ``numpy`` or ``system``: only that one; ``0``: MLX's own; a path: that
library. This module never imports mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data import cache_dir
from .numpy_blas import NumpyBlas, load_numpy_openblas

HINT = ("hint: MLX is using its bundled reference BLAS (slow float32 matmul); for ~30x faster training install a C "
        "compiler, which routes MLX to numpy's OpenBLAS (Debian/Ubuntu: apt-get install gcc), or a system OpenBLAS "
        "(apt-get install libopenblas0-pthread)")

# System OpenBLAS builds with plain CBLAS names, pthreads first (MLX's streams call BLAS from several threads).
SYSTEM_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass
class BlasChoice:
    """The BLAS MLX's matmuls use in this process, and how to set its threads."""

    description: str  # for the banner: which BLAS, and why when it is not the first choice
    hint: str | None = None  # a line to print when the BLAS is slow
    library: ctypes.CDLL | None = None  # the loaded library (None: MLX's own)
    set_num_threads: Callable[[int], None] | None = None  # None: threads cannot be set
    get_num_threads: Callable[[], int] | None = None


def find_system_openblas() -> str | None:
    """A system OpenBLAS (the distribution's package), or None."""
    arch = platform.machine()
    for pattern in SYSTEM_CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def load_system_openblas(path: str) -> BlasChoice | str:
    """Load an OpenBLAS (or another CBLAS) by path into the global scope, or say why not."""
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"could not load {path}: {exc}"
    # another CBLAS may have no thread setter
    return BlasChoice(f"OpenBLAS ({path})", library=library,
                      set_num_threads=getattr(library, "openblas_set_num_threads", None),
                      get_num_threads=getattr(library, "openblas_get_num_threads", None))


def _reference(reason: str, hint: bool = True) -> BlasChoice:
    return BlasChoice(f"MLX bundled reference BLAS ({reason})", hint=HINT if hint else None)


def choose_blas(setting: str, cache_root: Path) -> BlasChoice:
    """Load the BLAS that MLX's matmuls should use; call before ``import mlx.core``.

    ``setting`` (MLX_GPT_OPENBLAS): empty: numpy's OpenBLAS, else a system OpenBLAS, else MLX's own BLAS with a
    hint; ``numpy`` or ``system``: only that one (else MLX's own); ``0``: MLX's own; anything else: a library's path.
    """
    setting = setting.strip()
    if sys.platform == "darwin":
        return BlasChoice("Accelerate (bundled with MLX on macOS)")
    if not sys.platform.startswith("linux"):
        return BlasChoice("MLX default")
    if setting == "0":
        return _reference("MLX_GPT_OPENBLAS=0", hint=False)
    if "mlx.core" in sys.modules:
        return BlasChoice("MLX bundled BLAS (mlx was imported before the CPU plug-in was enabled, too late to choose "
                          "a BLAS)", hint=HINT)
    if setting not in ("", "numpy", "system"):
        loaded = load_system_openblas(setting)
        return loaded if isinstance(loaded, BlasChoice) else _reference(loaded)
    reasons = []
    if setting in ("", "numpy"):
        numpy_blas = load_numpy_openblas(cache_root)
        if isinstance(numpy_blas, NumpyBlas):
            return BlasChoice(numpy_blas.description, library=numpy_blas.library,
                              set_num_threads=numpy_blas.set_num_threads, get_num_threads=numpy_blas.get_num_threads)
        reasons.append(f"numpy's OpenBLAS not used: {numpy_blas}")
    if setting in ("", "system"):
        path = find_system_openblas()
        if path is not None:
            loaded = load_system_openblas(path)
            if isinstance(loaded, BlasChoice):
                loaded.description += "".join(f"; {reason}" for reason in reasons)
                return loaded
            reasons.append(loaded)
        else:
            reasons.append("no system OpenBLAS found")
    return _reference("; ".join(reasons))


def load_blas() -> BlasChoice:
    """Load the BLAS ``MLX_GPT_OPENBLAS`` asks for (see above); before ``mlx.core`` is imported."""
    return choose_blas(os.environ.get("MLX_GPT_OPENBLAS", ""), cache_dir() / "numpy-blas")
