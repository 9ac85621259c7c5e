"""Compute backend: a fast BLAS for MLX on Linux, device choice, and facts for the banner.

The ``mlx[cpu]`` wheel for Linux bundles a reference BLAS that runs float32 matmul at a few
GFLOP/s. MLX resolves its BLAS symbols when ``mlx.core`` is first imported, so a system OpenBLAS
opened with ``RTLD_GLOBAL`` *before* that import takes over (~30x faster here). This module must
therefore not import ``mlx`` at module level; ``mlx_gpt/__init__.py`` calls ``load_blas()`` first.

Environment:
    MLX_GPT_OPENBLAS=0        do not load a system BLAS
    MLX_GPT_OPENBLAS=/path    load this library instead of searching
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import sys
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

# Freed CPU buffers MLX keeps for reuse (its default is 32 MB); see select_device().
CPU_BUFFER_CACHE_BYTES = 4 << 30

# What load_blas() found: a short description for the banner, whether to print the hint, and the library.
blas_description = "not checked"
blas_hint: str | None = None
_openblas: ctypes.CDLL | None = None


def _find_openblas() -> str | None:
    arch = platform.machine()
    for pattern in _CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def load_blas() -> str:
    """Load a system OpenBLAS ahead of MLX on Linux; returns (and records) what is in use."""
    global blas_description, blas_hint
    if sys.platform == "darwin":
        blas_description = "Accelerate (bundled with MLX on macOS)"
        return blas_description
    if not sys.platform.startswith("linux"):
        blas_description = "MLX default"
        return blas_description
    setting = os.environ.get("MLX_GPT_OPENBLAS", "").strip()
    if setting == "0":
        blas_description = "MLX bundled reference BLAS (MLX_GPT_OPENBLAS=0)"
        return blas_description
    if "mlx.core" in sys.modules:
        blas_description = "MLX bundled BLAS (mlx was imported before mlx_gpt, too late to load OpenBLAS)"
        return blas_description
    path = setting or _find_openblas()
    if path is None:
        blas_description = "MLX bundled reference BLAS"
        blas_hint = INSTALL_HINT
        return blas_description
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        blas_description = f"MLX bundled reference BLAS (could not load {path}: {exc})"
        blas_hint = INSTALL_HINT
        return blas_description
    global _openblas
    _openblas = library
    blas_description = f"OpenBLAS ({path})"
    return blas_description


def share_cores(processes_here: int) -> str | None:
    """Give each of ``processes_here`` processes on this machine its share of the cores for OpenBLAS.

    Every OpenBLAS process starts one thread per core; several processes of one data-parallel job on one
    machine would then fight over the cores (measured here: 2 ranks on 2 cores ran at half the speed of
    1 thread each). Returns a line for the banner, or None when nothing was changed.
    """
    if _openblas is None or processes_here <= 1 or os.environ.get("OPENBLAS_NUM_THREADS"):
        return None  # no OpenBLAS of ours, nothing to share, or the user chose
    threads = max(1, (os.cpu_count() or 1) // processes_here)
    try:
        _openblas.openblas_set_num_threads(threads)
    except AttributeError:  # not an OpenBLAS build with that entry point
        return None
    return f"BLAS threads: {threads} per process ({processes_here} processes share this machine's cores)"


def processes_on_this_machine(rank: int) -> int:
    """How many ranks of an ``mlx.launch`` job run on this machine (from the ring backend's hostfile, where
    each rank is listed with its IP addresses, or MPI's local size); 1 when it cannot tell."""
    if os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").isdigit():
        return int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    try:
        ranks = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        addresses = [tuple(sorted(entry.rsplit(":", 1)[0] for entry in rank_entries)) for rank_entries in ranks]
        return addresses.count(addresses[rank])
    except (KeyError, OSError, ValueError, TypeError, AttributeError, IndexError):
        return 1


def select_device(name: str = "auto") -> str:
    """Make ``gpu`` (Metal or CUDA) or ``cpu`` MLX's default device; ``auto`` prefers the GPU."""
    import mlx.core as mx

    from .errors import MlxGptError

    if name not in ("auto", "gpu", "cpu"):
        raise MlxGptError(f"--device must be auto, gpu or cpu, got {name!r}")
    has_gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    if name == "gpu" and not has_gpu:
        raise MlxGptError("--device gpu: this MLX build has no GPU (Metal or CUDA); use --device cpu")
    use_gpu = has_gpu and name != "cpu"
    mx.set_default_device(mx.gpu if use_gpu else mx.cpu)
    if not use_gpu:
        # MLX keeps only 32 MB of freed CPU buffers for reuse: every larger activation is then fresh memory that
        # the OS must fault in page by page, ~10x the cost of the arithmetic on it. Keep a step's worth instead.
        mx.set_cache_limit(CPU_BUFFER_CACHE_BYTES)
    return "gpu" if use_gpu else "cpu"


def describe_device(device: str) -> str:
    """One line for the banner: the device, the GPU kind, and the BLAS on the CPU."""
    import mlx.core as mx

    if device == "gpu":
        kind = "Metal" if mx.metal.is_available() else "CUDA"
        return f"device: gpu ({kind}), mlx {mx.__version__}"
    return f"device: cpu ({platform.machine()}, {os.cpu_count()} cores), mlx {mx.__version__}, BLAS: {blas_description}"
