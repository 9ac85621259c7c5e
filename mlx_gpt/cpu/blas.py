"""A fast BLAS for MLX on Linux: the ``mlx[cpu]`` wheel bundles a reference BLAS (a few GFLOP/s for float32 matmul).

MLX resolves its BLAS symbols when ``mlx.core`` is first imported, so a library opened with ``RTLD_GLOBAL``
before that import takes over. This module therefore never imports mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

_CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

INSTALL_HINT = (
    "hint: MLX is using its bundled reference BLAS (slow float32 matmul); "
    "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) for ~30x faster training"
)


@dataclass
class Blas:
    """The BLAS MLX uses: a description for the banner, the hint to print (if any), and the library when it is one
    whose thread count can be set."""

    description: str
    hint: str | None = None
    library: ctypes.CDLL | None = None

    def set_num_threads(self, threads: int) -> bool:
        """Set the library's thread count; False when it cannot be set (no library, or no such entry point)."""
        try:
            self.library.openblas_set_num_threads(threads)
        except AttributeError:  # None, or not an OpenBLAS build with that entry point
            return False
        return True

    def num_threads(self) -> int | None:
        try:
            return int(self.library.openblas_get_num_threads())
        except AttributeError:
            return None


def _find_openblas() -> str | None:
    arch = platform.machine()
    for pattern in _CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def load_blas() -> Blas:
    """Load a system OpenBLAS ahead of MLX (``MLX_GPT_OPENBLAS``: 0 = don't, or the library's path)."""
    setting = os.environ.get("MLX_GPT_OPENBLAS", "").strip()
    if setting == "0":
        return Blas("MLX bundled reference BLAS (MLX_GPT_OPENBLAS=0)")
    if "mlx.core" in sys.modules:
        return Blas("MLX bundled BLAS (mlx was imported before the CPU plug-in was enabled: too late to load "
                    "OpenBLAS)", INSTALL_HINT)
    path = setting or _find_openblas()
    if path is None:
        return Blas("MLX bundled reference BLAS", INSTALL_HINT)
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return Blas(f"MLX bundled reference BLAS (could not load {path}: {exc})", INSTALL_HINT)
    return Blas(f"OpenBLAS ({path})", library=library)
