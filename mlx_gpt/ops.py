"""Attention for MLX's CPU backend, chosen per device.

Why: on a GPU (Metal or CUDA) ``mx.fast.scaled_dot_product_attention`` is one fused kernel. On the CPU
it falls back to MLX's ``softmax``, whose precompiled kernel evaluates ``exp`` one element at a time
(16 ns per element here: 0.4 s per layer's forward at the default config). Built from ``max``, ``exp`` and ``sum``
instead, the elementwise part runs in a kernel that ``mx.compile`` generates for this CPU (vectorised:
see ``backend.tune_cpu_jit``), and a hand-written vector-Jacobian product (``mx.custom_function``) reuses
the softmax output instead of differentiating the composition.

The rule per device: the CPU version applies only when MLX's default device is the CPU at the time the
model is traced, and only for more than one query per row (a decoding step takes the fused kernel, which
does a single query well). ``MLX_GPT_FAST_CPU_OPS=0`` in the environment turns it off (to compare, or to
rule it out). It matches the fused kernel to <= 1e-5 relative, values and gradients (tests/test_ops.py).
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx

FAST_CPU_OPS = os.environ.get("MLX_GPT_FAST_CPU_OPS", "1") != "0"


def on_cpu() -> bool:
    """Whether to take the CPU versions: MLX's default device (what a trace runs on) is the CPU."""
    return FAST_CPU_OPS and mx.default_device().type == mx.DeviceType.cpu


# Compiled: one fused elementwise kernel per call even outside a compiled training step.
@mx.compile
def _softmax_forward(x: mx.array) -> mx.array:
    e = mx.exp(x - mx.max(x, axis=-1, keepdims=True))
    return e * (1.0 / mx.sum(e, axis=-1, keepdims=True))


@mx.compile
def _softmax_backward(output: mx.array, cotangent: mx.array) -> mx.array:
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (as ``mx.softmax(x, axis=-1, precise=True)``), for the CPU."""
    return _softmax_forward(x)


@softmax.vjp
def _softmax_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return _softmax_backward(output, cotangent)


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any = "causal") -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` on a GPU; on the CPU, matmuls around ``softmax`` above.

    q: [B, heads, T_q, head_dim], k and v: [B, heads, T_k, head_dim]; ``mask`` as the fused kernel takes it.
    """
    if not on_cpu() or q.shape[-2] == 1:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        t_q, t_k = q.shape[-2], k.shape[-2]
        # query i (at position t_k - t_q + i) sees keys up to its own position
        mask = mx.arange(t_k - t_q, t_k)[:, None] >= mx.arange(t_k)[None]
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    return softmax(scores) @ v
