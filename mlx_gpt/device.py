"""Device choice: MLX's GPU (Metal or CUDA) first, its CPU as the fallback."""

from __future__ import annotations

import os
import platform

import mlx.core as mx

from .errors import MlxGptError


def has_gpu() -> bool:
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


def select_device(name: str = "auto") -> str:
    """Make ``gpu`` or ``cpu`` MLX's default device (``auto`` prefers the GPU); returns the one chosen."""
    if name not in ("auto", "gpu", "cpu"):
        raise MlxGptError(f"--device must be auto, gpu or cpu, got {name!r}")
    if name == "gpu" and not has_gpu():
        raise MlxGptError("--device gpu: this MLX build has no GPU (Metal or CUDA); use --device cpu")
    use_gpu = has_gpu() and name != "cpu"
    mx.set_default_device(mx.gpu if use_gpu else mx.cpu)
    return "gpu" if use_gpu else "cpu"


def current_device() -> str:
    """``gpu`` or ``cpu``: where MLX's default device puts the work now."""
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def describe_device(device: str) -> str:
    """The banner's device line."""
    if device == "gpu":
        kind = "Metal" if mx.metal.is_available() else "CUDA"
        return f"device: gpu ({kind}), mlx {mx.__version__}"
    return f"device: cpu ({platform.machine()}, {os.cpu_count()} cores), mlx {mx.__version__}"
