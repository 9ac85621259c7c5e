"""The C++ kernels of ``csrc/`` (built by ``native.py``) as MLX functions with their backward as the VJP.

- LayerNorm: on the CPU ``mx.fast.layer_norm`` is its fallback graph of reductions and elementwise kernels; the
  kernel pair does each direction in one pass over the rows.
- Causal self-attention of up to ``FUSED_ATTENTION_MAX_T`` tokens, read from the q/k/v projection's output as it
  lies, [B, T, 3C], and written [B, T, C], so the head transposes and their copies go too.

Both match MLX's ops to <= 1e-5 relative, values and gradients (tests/test_cpu_plugin.py). Where a kernel is not
built (or not on the CPU), MLX's ops or the blocked attention stand in; for input that is not float32, MLX's ops.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import mlx.core as mx

from .. import ops
from . import native
from .blocked_attention import on_cpu

CPU_KERNELS = ("layer_norm", "attention")


@functools.lru_cache
def _layer_norm(eps: float, has_bias: bool) -> Any:
    """``f(x, weight[, bias])`` -> (y, mean, rstd, x as the kernels read it): the C++ kernels with the backward as
    their VJP."""
    kernels = native.load("layer_norm", build=False)

    @mx.custom_function
    def layer_norm(x: mx.array, weight: mx.array, *bias: mx.array) -> tuple[mx.array, ...]:
        x = mx.contiguous(x)  # returned too, so that the backward reads this one rather than copying again
        return (*kernels.forward(x, weight, bias[0] if has_bias else None, eps), x)

    @layer_norm.vjp
    def layer_norm_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple[mx.array, ...]:
        _, mean, rstd, x = outputs
        d_y = mx.contiguous(cotangents[0])
        return tuple(kernels.backward(x, primals[1], mean, rstd, d_y, has_bias))

    return layer_norm


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array | None, eps: float) -> mx.array:
    """``ops.layer_norm`` on the CPU: the C++ kernels, where built (float32)."""
    fused = (on_cpu() and x.dtype == weight.dtype == mx.float32 and (bias is None or bias.dtype == mx.float32)
             and weight.ndim == 1 and native.load("layer_norm", build=False) is not None)
    if not fused:
        return ops.PLAIN["layer_norm"](x, weight, bias, eps)
    return _layer_norm(float(eps), bias is not None)(x, weight, *([bias] if bias is not None else []))[0]


# The longest sequence the C++ attention takes: its loops beat the blocked attention's matmuls on short rows only,
# and it keeps the whole [T, T] weights for the backward.
FUSED_ATTENTION_MAX_T = 128


@functools.lru_cache
def _causal_attention(heads: int, scale: float) -> Any:
    """``f(qkv)`` -> (y, softmax weights, qkv as the kernels read it): the C++ kernels with the backward as their
    VJP."""
    kernels = native.load("attention", build=False)

    @mx.custom_function
    def attention(qkv: mx.array) -> tuple[mx.array, ...]:
        qkv = mx.contiguous(qkv)  # returned too, so that the backward reads this one rather than copying again
        return (*kernels.forward(qkv, heads, scale), qkv)

    @attention.vjp
    def attention_vjp(primal: mx.array, cotangents: tuple, outputs: tuple) -> mx.array:  # one primal: not a tuple
        y, weights, qkv = outputs
        return kernels.backward(qkv, weights, y, mx.contiguous(cotangents[0]), heads, scale)

    return attention


def causal_self_attention(qkv: mx.array, heads: int) -> mx.array:
    """``ops.causal_self_attention`` on the CPU: the C++ kernels straight from the fused projection's output ``qkv``
    [B, T, 3C] (q, k, v side by side, heads side by side in each), where they apply (float32, up to
    FUSED_ATTENTION_MAX_T tokens, built); else the blocked attention."""
    if not (on_cpu() and qkv.dtype == mx.float32 and 1 < qkv.shape[1] <= FUSED_ATTENTION_MAX_T
            and native.load("attention", build=False) is not None):
        return ops.PLAIN["causal_self_attention"](qkv, heads)
    scale = 1.0 / math.sqrt(qkv.shape[-1] // (3 * heads))
    return _causal_attention(heads, scale)(qkv)[0]
