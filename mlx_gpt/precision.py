"""Compute precision: the dtype a run computes in (``auto``: one per device) and the casts to it.

Training keeps its weights and optimizer state in float32 (the master copy); the forward and backward run in the
compute dtype, on copies of the weights cast inside the differentiated function, so that the gradients come back
float32 through the cast. Measurements and the reasons for ``auto``'s choices: docs/precision.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .config import DTYPES
from .errors import MlxGptError

MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def auto_dtype(device: str) -> str:
    """What ``auto`` means on ``device`` ("gpu" or "cpu", see ``device.select_device``): float16 on Metal (every
    Apple GPU computes it natively), bfloat16 on CUDA (float32's range: no loss scaling), float32 on the CPU (MLX's
    CPU matmuls in bfloat16 or float16 are 40-85x slower than float32's BLAS)."""
    if device == "gpu":
        return "float16" if mx.metal.is_available() else "bfloat16"
    return "float32"


def resolve_dtype(name: str, device: str) -> str:
    """The concrete dtype name for ``name`` (one of DTYPES, or auto) on ``device``."""
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise MlxGptError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {name!r}")
    return name


def mlx_dtype(name: str) -> mx.Dtype:
    """The MLX dtype of a concrete dtype name."""
    if name not in MLX_DTYPES:
        raise MlxGptError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return MLX_DTYPES[name]


def cast_floats(tree: Any, dtype: mx.Dtype) -> Any:
    """``tree`` (of arrays) with its floating-point arrays cast to ``dtype``; other arrays as they are."""

    def cast(a: mx.array) -> mx.array:
        return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) and a.dtype != dtype else a

    return tree_map(cast, tree)


@contextlib.contextmanager
def weights_cast(model: nn.Module, dtype: mx.Dtype) -> Iterator[None]:
    """``model`` with its floating weights cast to ``dtype`` inside the block (as they are if already so), and its
    own weights back afterwards."""
    own = model.parameters()
    model.update(cast_floats(own, dtype))
    try:
        yield
    finally:
        model.update(own)


def describe(dtype: str, requested: str | None = None) -> str:
    """The banner's precision line for a run computing in ``dtype`` (``requested``: what was asked, e.g. auto)."""
    asked = f" (--dtype {requested})" if requested and requested != dtype else ""
    if dtype == "float32":
        return f"precision: float32{asked}"
    line = f"precision: {dtype} forward and backward{asked}; float32 weights, optimizer state, loss and softmax"
    return line + ("; dynamic loss scaling" if dtype == "float16" else "")
