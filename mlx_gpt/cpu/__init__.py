"""The Linux CPU plug-in: the same results, faster, on MLX's CPU backend.

``enable()`` switches it on; the scripts call it first, before MLX is imported (the BLAS must be loaded before
``mlx.core``), and a library user can too. It

- routes MLX's matmuls to numpy's bundled OpenBLAS, or a system one, instead of MLX's reference BLAS
  (``blas.py``, ``numpy_blas.py``);
- has MLX's kernel compiler build for this CPU and widens MLX's evaluation order (``jit.py``: PATH, TMPDIR and
  MLX_BFS_MAX_WIDTH are set for this process and its children until ``disable()``);
- raises MLX's CPU buffer cache from 32 MB to 4 GB, so a step's activations are reused rather than page-faulted in;
- replaces ``mlx_gpt.ops``: LayerNorm and short causal attention by C++ kernels (``kernels.py``, built by
  ``native.py`` when ``build_kernels`` is asked for, as ``train.py`` does), other attention by the blocked
  attention (``blocked_attention.py``), and a training step split over one CPU stream per core (``streams.py``).

``disable()`` undoes all of it but the loaded BLAS, which a process cannot unload. ``MLX_GPT_CPU=0`` keeps it off.
Only Linux: elsewhere (Metal, or CUDA's own BLAS) ``enable()`` changes nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .blas import BlasChoice, load_blas
from .jit import EnvChanges, tune_jit, widen_eval_order

CPU_BUFFER_CACHE_BYTES = 4 << 30


@dataclass
class _Enabled:
    blas: BlasChoice
    jit: str
    env: EnvChanges
    previous_ops: dict[str, Callable[..., Any]] = field(default_factory=dict)
    previous_cache_limit: int | None = None
    previous_blas_threads: int | None = None
    streams_note: str | None = None


_enabled: _Enabled | None = None


def enable(build_kernels: bool = False, log: Callable[[str], None] | None = print) -> list[str]:
    """Switch the plug-in on (once per process); returns what it did, as the lines the training banner prints.

    ``build_kernels``: build the C++ kernels now if this machine has none yet (~10 s each, said through ``log``);
    otherwise only kernels built before are used, so that sampling never waits for a compiler.
    """
    global _enabled
    if os.environ.get("MLX_GPT_CPU", "").strip() == "0":
        return ["CPU plug-in: off (MLX_GPT_CPU=0)"]
    if not sys.platform.startswith("linux"):
        return []
    if _enabled is None:
        blas = load_blas()  # before mlx.core is imported below
        env = EnvChanges()
        jit = tune_jit(env)
        widen_eval_order(env)
        _enabled = _Enabled(blas, jit, env, previous_blas_threads=blas.get_num_threads and blas.get_num_threads())
        _replace_ops(_enabled)
    from . import kernels, native

    for name in kernels.CPU_KERNELS:
        native.load(name, build=build_kernels, log=log)
    return describe()


def _replace_ops(state: _Enabled) -> None:
    import mlx.core as mx

    from .. import ops
    from . import blocked_attention, kernels

    def step_streams(batch_size: int) -> list[mx.Stream] | None:
        from .streams import split_cores

        count, state.streams_note = split_cores(state.blas, batch_size)
        return [mx.new_stream(mx.cpu) for _ in range(count)] if count > 1 else None

    if mx.default_device().type == mx.DeviceType.cpu:
        state.previous_cache_limit = mx.set_cache_limit(CPU_BUFFER_CACHE_BYTES)
    state.previous_ops = ops.override(layer_norm=kernels.layer_norm, attention=blocked_attention.attention,
                                      causal_self_attention=kernels.causal_self_attention,
                                      step_streams=step_streams, describe=describe)


def describe() -> list[str]:
    """What the plug-in does in this process, one line per part (empty when it is not enabled)."""
    if _enabled is None:
        return []
    from . import kernels, native

    lines = [f"CPU plug-in: BLAS: {_enabled.blas.description}; MLX's kernels: {_enabled.jit}",
             f"CPU kernels: {native.describe(kernels.CPU_KERNELS)}"]
    if _enabled.streams_note:
        lines.append(_enabled.streams_note)
    if _enabled.blas.hint:
        lines.append(_enabled.blas.hint)
    return lines


def disable() -> None:
    """Undo ``enable()``: the plain ops, MLX's own compiler settings and buffer cache, the BLAS's thread count."""
    global _enabled
    if _enabled is None:
        return
    import mlx.core as mx

    from .. import ops

    ops.override(**_enabled.previous_ops)
    _enabled.env.restore()
    if _enabled.previous_cache_limit is not None:
        mx.set_cache_limit(_enabled.previous_cache_limit)
    if _enabled.previous_blas_threads is not None and _enabled.blas.set_num_threads is not None:
        _enabled.blas.set_num_threads(_enabled.previous_blas_threads)
    _enabled = None
