"""Attention and LayerNorm for MLX's CPU backend, chosen per device.

On a GPU (Metal or CUDA) these are MLX's fused kernels. On the CPU (``on_cpu()``, decided when the model is traced):

- LayerNorm: ``mx.fast.layer_norm`` is there its fallback graph of reductions and elementwise kernels; ``layer_norm``
  takes the C++ kernel pair of ``csrc/layer_norm.cpp`` instead (one pass each way);
- causal self-attention of up to ``FUSED_ATTENTION_MAX_T`` tokens: ``causal_attention`` runs the C++ kernels of
  ``csrc/attention.cpp`` on the q/k/v projection's output as it lies, [B, T, 3C], writing [B, T, C], so the head
  transposes and their copies go too;
- any other attention (longer sequences, masks, a prefill after a cache): the blocked attention below, in MLX ops.

The C++ kernels are built on first use (``native.py``); where they cannot be, MLX's ops stand in. Everything here
matches MLX's fused kernels to <= 1e-5 relative, values and gradients (tests/test_ops.py).

Blocked attention. Why: on the CPU, ``mx.fast.scaled_dot_product_attention`` falls back to separate ops: a matmul,
MLX's precompiled ``softmax`` (which evaluates ``exp`` one element at a time, 16 ns per element here) and another
matmul, every one of them over the whole [T_q, T_k] score matrix, the masked half of a causal one included. The
version here does what a fused CPU kernel (PyTorch's flash attention) does, in MLX ops:

- causal attention runs in blocks of ~``QUERY_BLOCK`` queries, each against the keys it can see, so the masked
  upper triangle is mostly never computed (5/8 of the work at T = 256);
- the mask and the 1/sqrt(d) scale ride in the score matmul (``mx.addmm``), and the elementwise parts fuse into
  kernels that ``mx.compile`` builds for this CPU (vectorised ``exp``: see ``backend.tune_cpu_jit``);
- softmax normalisation is applied to the [T, d] output instead of the [T, T] weights, and the backward uses
  rowsum(dO * O) for rowsum(dP * P) (as flash attention does), both through a hand-written vector-Jacobian
  product (``mx.custom_function``) that reuses the forward's exponentials.

Measured at the default config's shape (32 x 6 heads, T = 256, d = 64, one thread, forward + backward, from the
model's [B, T, 3C] projection and back, both in one process): 184 ms, against 247 ms for matmul + softmax + matmul.
PyTorch's fused kernel takes 171 ms on contiguous q, k, v.

Neither CPU attention applies to a single query per row: a decoding step takes the fused kernel, which does one
query well. ``MLX_GPT_FAST_CPU_OPS=0`` in the environment turns all of this module's CPU versions off (to compare,
or to rule them out).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import mlx.core as mx
import numpy as np

from . import native

FAST_CPU_OPS = os.environ.get("MLX_GPT_FAST_CPU_OPS", "1") != "0"

# The C++ kernels (csrc/, see native.py) the functions here use on the CPU.
CPU_KERNELS = ("layer_norm", "attention")

# Queries per block of causal attention. Smaller blocks skip more of the masked triangle but make smaller,
# less efficient matmuls: at T = 256 (32 x 6 heads, d = 64, one thread) blocks of 256, 128, 64 and 32 took
# 237, 204, 204 and 244 ms forward + backward.
QUERY_BLOCK = 64


def on_cpu() -> bool:
    """Whether to take the CPU versions: MLX's default device (what a trace runs on) is the CPU."""
    return FAST_CPU_OPS and mx.default_device().type == mx.DeviceType.cpu


def query_blocks(t_q: int, causal: bool) -> list[tuple[int, int]]:
    """[start, end) of each block of queries: about QUERY_BLOCK each when causal, else one block."""
    n = max(1, round(t_q / QUERY_BLOCK)) if causal else 1
    bounds = [round(i * t_q / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@functools.lru_cache(maxsize=256)
def _causal_bias(first_position: int, t_q: int, t_k: int, dtype: mx.Dtype) -> mx.array:
    """Additive mask [t_q, t_k]: query i (at ``first_position + i``) sees the keys up to its own position.

    Made from numpy, so that it is data rather than ops in a compiled graph: ``mx.compile`` merges identical
    ops across CPU streams, and a mask computed on one stream would make the other wait for it at every block.
    """
    visible = np.arange(first_position, first_position + t_q)[:, None] >= np.arange(t_k)[None]
    return mx.array(np.where(visible, 0.0, -np.inf).astype(np.float32), dtype=dtype)


@functools.lru_cache
def _attention(scale: float, causal: bool) -> Any:
    """The attention function for one (scale, causal): ``f(q, k, v, bias)`` -> (output, saved arrays...).

    q: [B, H, T_q, d]; k, v: [B, H, T_k, d]; bias: an additive mask broadcastable to [.., T_q, T_k], or a
    scalar 0 (no mask, or causal: then each block makes its own). Queries sit at the last T_q positions of
    the keys (a prefill after a cache: T_q < T_k).
    """

    def blocks(t_q: int, t_k: int) -> list[tuple[int, int, int]]:
        """(first query, end query, keys seen) per block."""
        return [(a, z, t_k - t_q + z if causal else t_k) for a, z in query_blocks(t_q, causal)]

    @mx.custom_function
    def attention(q: mx.array, k: mx.array, v: mx.array, bias: mx.array) -> tuple[mx.array, ...]:
        t_q, t_k = q.shape[-2], k.shape[-2]
        # One contiguous copy each (the inputs are usually head-transposed views) that every block's matmuls
        # slice without copying again; the backward reuses them.
        q, k, v = mx.contiguous(q), mx.contiguous(k), mx.contiguous(v)
        outputs, exps, sums = [], [], []
        for a, z, n in blocks(t_q, t_k):
            block_bias = _causal_bias(t_k - t_q + a, z - a, n, q.dtype) if causal else bias
            scores = mx.addmm(block_bias, q[..., a:z, :], k[..., :n, :].swapaxes(-1, -2), alpha=scale)
            e = mx.exp(scores - mx.max(scores, axis=-1, keepdims=True))
            total = mx.sum(e, axis=-1, keepdims=True)
            # normalised here, on [T, d], rather than on the [T, T] weights; stored [B, T, H, d] (see below)
            outputs.append(((e @ v[..., :n, :]) * (1.0 / total)).swapaxes(1, 2))
            exps.append(e)
            sums.append(total)
        # Stored [B, T, H, d] and returned as a [B, H, T, d] view, so that the caller's transpose back to
        # [B, T, H * d] needs no copy.
        output = mx.concatenate(outputs, axis=1).swapaxes(1, 2)
        return (output, q, k, v, *exps, *sums)

    @attention.vjp
    def attention_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple[mx.array, ...]:
        bias = primals[3]
        d_out, (output, q, k, v) = cotangents[0], outputs[:4]
        t_q, t_k = q.shape[-2], k.shape[-2]
        spans = blocks(t_q, t_k)
        exps, sums = outputs[4:4 + len(spans)], outputs[4 + len(spans):]
        # rowsum(dP * P) = rowsum(dO * O): on [T, d], not [T, T]
        delta = mx.sum(d_out * output, axis=-1, keepdims=True)
        d_queries, d_k, d_v = [], None, None
        for (a, z, n), e, total in zip(spans, exps, sums, strict=True):
            inv_total = 1.0 / total
            d_out_block = d_out[..., a:z, :]
            d_p = d_out_block @ v[..., :n, :].swapaxes(-1, -2)
            # dS = P * (dP - delta), with P = e / total; masked entries have e = 0
            d_scores = e * ((d_p - delta[..., a:z, :]) * (inv_total * scale))
            d_queries.append((d_scores @ k[..., :n, :]).swapaxes(1, 2))
            d_k_block = d_scores.swapaxes(-1, -2) @ q[..., a:z, :]
            d_v_block = e.swapaxes(-1, -2) @ (d_out_block * inv_total)
            if d_k is None:
                d_k, d_v = d_k_block, d_v_block
            else:  # blocks see ever more keys: add over the keys seen so far, append the new ones
                seen = d_k.shape[-2]
                d_k = mx.concatenate([d_k + d_k_block[..., :seen, :], d_k_block[..., seen:, :]], axis=-2)
                d_v = mx.concatenate([d_v + d_v_block[..., :seen, :], d_v_block[..., seen:, :]], axis=-2)
        d_q = mx.concatenate(d_queries, axis=1).swapaxes(1, 2)
        return d_q, d_k, d_v, mx.zeros_like(bias)

    return attention


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any = "causal") -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` on a GPU; on the CPU, the blocked attention above.

    q: [B, heads, T_q, head_dim], k and v: [B, heads, T_k, head_dim]; ``mask`` as the fused kernel takes it
    ("causal", None, a boolean array (True = attend) or an additive one).
    """
    if not on_cpu() or q.shape[-2] == 1:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unknown mask {mask!r}")
    if mask is None or isinstance(mask, str):
        bias = mx.array(0.0, dtype=q.dtype)
    elif mask.dtype == mx.bool_:
        bias = mx.where(mask, mx.array(0.0, dtype=q.dtype), mx.array(-mx.inf, dtype=q.dtype))
    else:
        bias = mask.astype(q.dtype)
    return _attention(float(scale), isinstance(mask, str))(q, k, v, bias)[0]


@functools.lru_cache
def _layer_norm(eps: float, has_bias: bool) -> Any:
    """``f(x, weight[, bias])`` -> (y, mean, rstd, x as the kernels read it): the C++ kernels with the backward as
    their VJP."""
    kernels = native.load("layer_norm")

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
    """LayerNorm over the last axis (``mx.fast.layer_norm``'s arguments): on the CPU, the fused C++ kernels."""
    fused = (on_cpu() and x.dtype == weight.dtype == mx.float32 and (bias is None or bias.dtype == mx.float32)
             and weight.ndim == 1 and native.load("layer_norm") is not None)
    if not fused:
        return mx.fast.layer_norm(x, weight, bias, eps)
    return _layer_norm(float(eps), bias is not None)(x, weight, *([bias] if bias is not None else []))[0]


# The longest sequence the C++ attention takes: its loops beat the blocked attention's matmuls on short rows only.
FUSED_ATTENTION_MAX_T = 128


@functools.lru_cache
def _causal_attention(heads: int, scale: float) -> Any:
    """``f(qkv)`` -> (y, softmax weights, qkv as the kernels read it): the C++ kernels with the backward as their
    VJP."""
    kernels = native.load("attention")

    @mx.custom_function
    def attention(qkv: mx.array) -> tuple[mx.array, ...]:
        qkv = mx.contiguous(qkv)  # returned too, so that the backward reads this one rather than copying again
        return (*kernels.forward(qkv, heads, scale), qkv)

    @attention.vjp
    def attention_vjp(primal: mx.array, cotangents: tuple, outputs: tuple) -> mx.array:  # one primal: not a tuple
        y, weights, qkv = outputs
        return kernels.backward(qkv, weights, y, mx.contiguous(cotangents[0]), heads, scale)

    return attention


def causal_attention(qkv: mx.array, heads: int) -> mx.array | None:
    """Causal self-attention [B, T, C] straight from the fused projection's output ``qkv`` [B, T, 3C] (q, k, v side
    by side, heads side by side in each), by the C++ kernels; None where they do not apply (not the CPU, not
    float32, longer than FUSED_ATTENTION_MAX_T, or not built): then use ``scaled_dot_product_attention``."""
    if not (on_cpu() and qkv.dtype == mx.float32 and 1 < qkv.shape[1] <= FUSED_ATTENTION_MAX_T
            and native.load("attention") is not None):
        return None
    scale = 1.0 / math.sqrt(qkv.shape[-1] // (3 * heads))
    return _causal_attention(heads, scale)(qkv)[0]
