"""The seam between the core and platform plug-ins: attention, LayerNorm, the training step's streams, the banner.

The core calls these functions. Each is plain MLX (``mx.fast``) until a plug-in replaces it with ``override``;
the Linux CPU plug-in (``mlx_gpt.cpu``) does when it is enabled. A replacement must compute the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx

# An attention mask: None, "causal", or an array (additive, or boolean with True = attend) broadcastable to
# [batch, heads, query_len, key_len].
Mask = Any


def split_heads(qkv: mx.array, n_head: int) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v [B, n_head, T, head_dim] from the fused projection's output [B, T, 3C]."""
    B, T, _ = qkv.shape
    return tuple(t.reshape(B, T, n_head, -1).transpose(0, 2, 1, 3) for t in mx.split(qkv, 3, axis=-1))


def merge_heads(y: mx.array) -> mx.array:
    """[B, n_head, T, head_dim] -> [B, T, C]."""
    B, H, T, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def _plain_layer_norm(x: mx.array, weight: mx.array, bias: mx.array | None, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, weight, bias, eps)


def _plain_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _plain_causal_self_attention(qkv: mx.array, n_head: int) -> mx.array:
    q, k, v = split_heads(qkv, n_head)
    return merge_heads(attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), mask="causal"))


def _plain_step_streams(batch_size: int) -> list[mx.Stream] | None:
    return None


def _plain_describe() -> list[str]:
    return []


PLAIN: dict[str, Callable[..., Any]] = {
    "layer_norm": _plain_layer_norm,
    "attention": _plain_attention,
    "causal_self_attention": _plain_causal_self_attention,
    "step_streams": _plain_step_streams,
    "describe": _plain_describe,
}
_active: dict[str, Callable[..., Any]] = dict(PLAIN)


def override(**implementations: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """Replace some of these functions; returns the ones replaced, to hand back to ``override`` later."""
    unknown = set(implementations) - set(PLAIN)
    if unknown:
        raise ValueError(f"no such op: {', '.join(sorted(unknown))}")
    previous = {name: _active[name] for name in implementations}
    _active.update(implementations)
    return previous


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array | None, eps: float) -> mx.array:
    """LayerNorm over the last axis (``mx.fast.layer_norm``'s arguments)."""
    return _active["layer_norm"](x, weight, bias, eps)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
    """``mx.fast.scaled_dot_product_attention``: q [B, H, T_q, d], k and v [B, H, T_k, d] -> [B, H, T_q, d]."""
    return _active["attention"](q, k, v, scale, mask)


def causal_self_attention(qkv: mx.array, n_head: int) -> mx.array:
    """Causal self-attention [B, T, C] from the fused q/k/v projection's output [B, T, 3C] (no cache)."""
    return _active["causal_self_attention"](qkv, n_head)


def step_streams(batch_size: int) -> list[mx.Stream] | None:
    """The streams a training step splits each batch over (None: one, MLX's default stream)."""
    return _active["step_streams"](batch_size)


def describe() -> list[str]:
    """Lines for the training banner on what replaces the plain versions (none: [])."""
    return _active["describe"]()
