"""Attention in blocks of queries, in MLX ops: what a fused CPU attention kernel does, for MLX's CPU backend.

On the CPU, ``mx.fast.scaled_dot_product_attention`` falls back to a matmul, MLX's precompiled softmax (scalar
``exp``) and another matmul, every one over the whole [T_q, T_k] score matrix, the masked half of a causal one
included. Here, as PyTorch's flash attention does on a CPU:

- causal attention runs in blocks of ~``QUERY_BLOCK`` queries, each against the keys it can see, so the masked
  upper triangle is mostly never computed;
- the mask and the 1/sqrt(d) scale ride in the score matmul (``mx.addmm``), and the elementwise parts fuse into
  kernels that ``mx.compile`` builds for this CPU (see ``jit.py``);
- softmax normalisation is applied to the [T, d] output instead of the [T, T] weights, and the backward uses
  rowsum(dO * O) for rowsum(dP * P), both through a hand-written VJP that reuses the forward's exponentials.

It matches the fused kernel to <= 1e-5 relative, values and gradients (tests/test_cpu_plugin.py); the timings are
in docs/performance.md.
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx
import numpy as np

from .. import ops


def on_cpu() -> bool:
    """Whether MLX's default device (what a trace runs on) is the CPU: only there do the plug-in's versions apply."""
    return mx.default_device().type == mx.DeviceType.cpu


# Queries per block of causal attention: smaller blocks skip more of the masked triangle but make smaller, less
# efficient matmuls (docs/performance.md has the sizes tried).
QUERY_BLOCK = 64


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


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: ops.Mask) -> mx.array:
    """``ops.attention`` on the CPU: the blocked attention above (the fused kernel elsewhere, for one query per
    row, which it does well, and for half precision, whose softmax MLX's computes in float32)."""
    if not on_cpu() or q.shape[-2] == 1 or q.dtype != mx.float32:
        return ops.PLAIN["attention"](q, k, v, scale, mask)
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unknown mask {mask!r}")
    if mask is None or isinstance(mask, str):
        bias = mx.array(0.0, dtype=q.dtype)
    elif mask.dtype == mx.bool_:
        bias = mx.where(mask, mx.array(0.0, dtype=q.dtype), mx.array(-mx.inf, dtype=q.dtype))
    else:
        bias = mask.astype(q.dtype)
    return _attention(float(scale), isinstance(mask, str))(q, k, v, bias)[0]
