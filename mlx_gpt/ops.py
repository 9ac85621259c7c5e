"""Fast versions of the model's elementwise-heavy ops for MLX's CPU backend, chosen per device.

Why: on x86 Linux, MLX's CPU kernels evaluate transcendentals (``exp``, ``erf``, ``tanh``) one element at a
time through library calls (25-65 ns per element here), while a fused ``mx.compile`` kernel made only of
multiplies, adds, compares and selects is vectorised by the compiler (a few ns per element). So the ops
below rebuild ``exp`` and the normal CDF from those primitives, and give each op a hand-written
vector-Jacobian product (``mx.custom_function``): MLX's automatic VJP of the rebuilt op would differentiate
every multiply of the polynomial, which costs more than it saves.

The rule per device: the fast versions apply only when MLX's default device is the CPU at the time the
model is traced. On a GPU (Metal or CUDA) MLX's own kernels are fast, so the plain ops are used there
unchanged: ``nn.gelu``, ``mx.fast.scaled_dot_product_attention``. ``MLX_GPT_FAST_CPU_OPS=0`` in the
environment turns the CPU versions off too (to compare, or to rule them out).

Accuracy: every op here matches its reference to <= 1e-5 relative (values and gradients; see
tests/test_ops.py): ``exp`` to ~2e-7, the normal CDF's tail to ~1.2e-7 relative (Numerical Recipes'
Chebyshev fit of erfc).
"""

from __future__ import annotations

import math
import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

LOG2_E = 1.4426950408889634
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# exp(x) = 2**n e**r with n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, so r is exact to float32),
# |r| <= ln(2)/2; e**r = 1 + r + r**2 P(r) (Cephes' expf coefficients).
_LN2_HIGH, _LN2_LOW = 0.693359375, -2.12194440e-4
_EXP_REMAINDER = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1)
# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0, relative error < 1.2e-7 (Numerical Recipes, erfcc).
_ERFC_EXPONENT = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
                  0.37409196, 1.00002368, -1.26551223)


FAST_CPU_OPS = os.environ.get("MLX_GPT_FAST_CPU_OPS", "1") != "0"


def on_cpu() -> bool:
    """Whether to take the fast CPU versions: MLX's default device (what a trace runs on) is the CPU."""
    return FAST_CPU_OPS and mx.default_device().type == mx.DeviceType.cpu


def _horner(coefficients: tuple[float, ...], x: mx.array) -> mx.array:
    result = coefficients[0] * x + coefficients[1]
    for c in coefficients[2:]:
        result = result * x + c
    return result


def exp(x: mx.array) -> mx.array:
    """``exp(x)`` for x <= 88 from multiplies and adds (plus a bit-level 2**n); ~1e-7 relative; 0 below -87.3."""
    x = mx.clip(x, -88.0, 88.0)
    # n = round(x log2 e): float -> int truncates toward zero, so shift to positive first (biased_n = n + 127 > 0)
    biased_n = (x * LOG2_E + 127.5).astype(mx.int32)
    n = biased_n.astype(mx.float32) - 127.0
    r = (x - n * _LN2_HIGH) - n * _LN2_LOW
    e_r = 1.0 + r + r * r * _horner(_EXP_REMAINDER, r)
    two_n = mx.view(mx.left_shift(biased_n, 23), mx.float32)  # biased_n is the IEEE float32 exponent field
    return mx.where(x < -87.3, 0.0, two_n * e_r)


def normal_cdf(x: mx.array) -> mx.array:
    """Phi(x), the standard normal CDF, exact to ~1.2e-7 relative in both tails."""
    z = mx.abs(x) * INV_SQRT_2
    t = 1.0 / (1.0 + 0.5 * z)
    half_erfc = 0.5 * t * exp(_horner(_ERFC_EXPONENT, t) - z * z)  # = Phi(-|x|)
    return mx.where(x < 0, half_erfc, 1.0 - half_erfc)


# Each op body is compiled: one fused kernel per call even outside a compiled training step (when sampling,
# say, where dozens of separate elementwise ops per call would cost more than the erf they replace).
@mx.compile
def _gelu_forward(x: mx.array) -> mx.array:
    return x * normal_cdf(x)


@mx.compile
def _gelu_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    return cotangent * (normal_cdf(x) + x * INV_SQRT_2PI * exp(-0.5 * x * x))


@mx.custom_function
def _gelu_cpu(x: mx.array) -> mx.array:
    return _gelu_forward(x)


@_gelu_cpu.vjp
def _gelu_cpu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return _gelu_backward(x, cotangent)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as ``nn.gelu``; on the CPU built from vectorisable ops with a hand-written VJP."""
    return _gelu_cpu(x) if on_cpu() else nn.gelu(x)


@mx.compile
def _softmax_forward(x: mx.array) -> mx.array:
    e = exp(x - mx.max(x, axis=-1, keepdims=True))
    return e * (1.0 / mx.sum(e, axis=-1, keepdims=True))


@mx.compile
def _softmax_backward(output: mx.array, cotangent: mx.array) -> mx.array:
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


@mx.custom_function
def _softmax_cpu(x: mx.array) -> mx.array:
    return _softmax_forward(x)


@_softmax_cpu.vjp
def _softmax_cpu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return _softmax_backward(output, cotangent)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis; on the CPU with the vectorisable ``exp`` and a VJP that reuses the output."""
    return _softmax_cpu(x) if on_cpu() else mx.softmax(x, axis=-1, precise=True)


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any = "causal") -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` on a GPU; on the CPU, matmuls around the fast softmax.

    q: [B, heads, T_q, head_dim], k and v: [B, heads, T_k, head_dim]; ``mask`` as the fused kernel takes it.
    """
    if not on_cpu() or q.shape[-2] == 1:  # one query per row (a decoding step): nothing to gain, the fused kernel
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
