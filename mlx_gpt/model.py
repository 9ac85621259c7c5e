"""The GPT model: a decoder-only transformer with learned absolute positions (nanoGPT's shape).

Parameter names follow nanoGPT (``wte``, ``wpe``, ``h.N.attn.c_attn`` ...) so that checkpoints
map over one to one. The recipe's settings (``GPTConfig``: rotary positions, QK-norm, relu², zero-initialised
projections, a logit soft-cap, value and embedding shortcuts; see docs/recipe.md) change it where they are read.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from . import lean_backward, ops
from .config import GPTConfig
from .ops import Mask


def relu_squared(x: mx.array) -> mx.array:
    return mx.square(nn.relu(x))


ACTIVATION_FUNCTIONS = {
    "gelu": nn.gelu,  # exact, erf-based (PyTorch nn.GELU())
    "gelu_tanh": nn.gelu_approx,  # tanh approximation (PyTorch nn.GELU(approximate="tanh"))
    "relu": nn.relu,
    "relu2": relu_squared,  # the GPT-2 speedrun's (modded-nanogpt)
}

# Learned mixing weights, which init_weights leaves at their constructor's values
MIXING_WEIGHTS = ("value_lambda", "x0_lambdas")


def init_weights(module: nn.Module, residual_branches: int, zero_init_proj: bool = False) -> None:
    """nanoGPT's init: N(0, 0.02) weights, zero biases, unit LayerNorm gains, and the projections that write
    into the residual stream (``c_proj``) scaled by 1/sqrt(residual_branches) so its variance stays put (or zero,
    with ``zero_init_proj``: each block starts as the identity)."""
    residual_std = 0.02 / math.sqrt(residual_branches)

    def init(path: str, p: mx.array) -> mx.array:
        if path.rsplit(".", 1)[-1] in MIXING_WEIGHTS:
            return p
        if ".ln_" in f".{path}" or path.endswith("bias"):
            return mx.ones_like(p) if path.endswith("weight") else mx.zeros_like(p)
        if path.endswith("c_proj.weight"):
            return mx.zeros_like(p) if zero_init_proj else mx.random.normal(p.shape, scale=residual_std, dtype=p.dtype)
        return mx.random.normal(p.shape, scale=0.02, dtype=p.dtype)

    module.update(tree_map_with_path(init, module.parameters()))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and names), computed by ``ops.layer_norm`` (a plug-in may replace it)."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.layer_norm(x, self.weight, self.get("bias"), self.eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names); in training mode its backward computes the weight gradient as soon
    as it can (``lean_backward.linear``: the same values, less memory)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not self.training:
            return super().__call__(x)
        return lean_backward.linear(x, self.weight, self.get("bias"))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection.

    Causal by default; an encoder calls it with a padding mask only (bidirectional). Returns the output and this
    layer's values [B, T, C] for the new tokens (the first layer's feed ``value_residual``).
    """

    def __init__(self, config: GPTConfig, mixes_first_values: bool = False) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.config = config
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        if mixes_first_values:
            self.value_lambda = mx.array([0.5])  # how much of the first layer's values to take
        # The fused attention kernel has no dropout on attention weights; dropout applies to the
        # residual branch, as it does in most modern GPT code.
        self.resid_dropout = nn.Dropout(config.dropout)

    def __call__(self, x: mx.array, mask: Mask = "causal", cache: Any = None,
                 first_values: mx.array | None = None) -> tuple[mx.array, mx.array]:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        cfg = self.config
        values = qkv[..., 2 * C:]
        if cfg.qk_norm or cfg.position_encoding == "rope" or "value_lambda" in self:
            # queries and keys as one [B, T, 2 * n_head, head_dim] array: one call each for the norm and the rotation
            qk = qkv[..., : 2 * C].reshape(B, T, 2 * self.n_head, -1)
            if cfg.qk_norm:
                qk = mx.fast.rms_norm(qk, None, 1e-6)
            if cfg.position_encoding == "rope":
                qk = rotate(qk, cache.offset if cache is not None else 0, cfg.rope_base)
            if "value_lambda" in self:
                values = (1 - self.value_lambda) * values + self.value_lambda * first_values
            qkv = mx.concatenate([qk.reshape(B, T, 2 * C), values], axis=-1)
        if cache is None and isinstance(mask, str) and mask == "causal":
            y = ops.causal_self_attention(qkv, self.n_head)
        else:
            q, k, v = ops.split_heads(qkv, self.n_head)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            y = ops.merge_heads(ops.attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), mask=mask))
        return self.resid_dropout(self.c_proj(y)), values


def rotate(x: mx.array, offset: int, base: float) -> mx.array:
    """Rotary positions (``mx.fast.rope``, non-traditional: nn.RoPE's default) for heads laid out [B, T, H, D],
    the first token at position ``offset``."""
    return mx.fast.rope(x.swapaxes(1, 2), x.shape[-1], traditional=False, base=base, scale=1.0,
                        offset=offset).swapaxes(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to encoder keys/values (the source is all known: no causal mask)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_q = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def key_values(self, encoder_hidden_states: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values [B, n_head, S, head_dim] of ``encoder_hidden_states`` [B, S, C].

        Separate from ``__call__`` so that decoding computes them once per source, not once per token.
        """
        B, S, _ = encoder_hidden_states.shape
        k, v = mx.split(self.c_kv(encoder_hidden_states), 2, axis=-1)
        return tuple(t.reshape(B, S, self.n_head, -1).transpose(0, 2, 1, 3) for t in (k, v))

    def __call__(self, x: mx.array, encoder_kv: tuple[mx.array, mx.array], mask: Mask = None) -> mx.array:
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3)
        k, v = encoder_kv
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), mask=mask)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, 4x wide."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = ACTIVATION_FUNCTIONS[config.activation]

    def __call__(self, x: mx.array) -> mx.array:
        # in training, the activation's backward recomputes its intermediates (the same values, less memory)
        activation = lean_backward.recomputed(self.activation) if self.training else self.activation
        return self.dropout(self.c_proj(activation(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    With ``cross_attention=True`` (the decoder of an encoder-decoder model) a third residual
    sub-layer sits between the two: x + cross_attn(ln_cross(x), encoder keys/values).
    """

    def __init__(self, config: GPTConfig, cross_attention: bool = False, first: bool = False) -> None:
        super().__init__()
        if config.embed_shortcut:
            self.x0_lambdas = mx.array([1.0, 0.0])  # input = a * x + b * embeddings; starts as x
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, mixes_first_values=config.value_residual and not first)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        if cross_attention:
            self.ln_cross = LayerNorm(config.n_embd, bias=config.bias)
            self.cross_attn = CrossAttention(config)

    def __call__(self, x: mx.array, mask: Mask = "causal", cache: Any = None,
                 encoder_kv: tuple[mx.array, mx.array] | None = None, encoder_mask: Mask = None,
                 x0: mx.array | None = None, first_values: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """The block's output and its attention's values (see ``CausalSelfAttention``). ``encoder_kv``: the
        encoder's keys/values from ``cross_attn.key_values`` (computed once per source); ``encoder_mask``: which of
        them each query may see (e.g. not the source's PAD positions); ``x0``: the embeddings (``embed_shortcut``);
        ``first_values``: the first layer's values (``value_residual``)."""
        if "x0_lambdas" in self:
            x = self.x0_lambdas[0] * x + self.x0_lambdas[1] * x0
        y, values = self.attn(self.ln_1(x), mask=mask, cache=cache, first_values=first_values)
        x = x + y
        if encoder_kv is not None:
            x = x + self.cross_attn(self.ln_cross(x), encoder_kv, mask=encoder_mask)
        return x + self.mlp(self.ln_2(x)), values


class Transformer(nn.Module):
    """Token and position embeddings, a stack of blocks and a final LayerNorm: the trunk of the GPT and of the
    encoder-decoder's encoder and decoder (``mlx_gpt.seq2seq``)."""

    def __init__(self, config: GPTConfig, cross_attention: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position_encoding == "learned":  # rotary positions live in the attention instead
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = [Block(config, cross_attention, first=i == 0) for i in range(config.n_layer)]
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)

    def hidden_states(self, idx: mx.array, positions: mx.array, mask: Mask, caches: list[Any] | None = None,
                      encoder_kv: list[tuple[mx.array, mx.array]] | None = None,
                      encoder_mask: Mask = None) -> mx.array:
        """The final LayerNorm's output [B, T, C] for token ids ``idx`` [B, T] at ``positions``."""
        x = self.wte(idx) + self.wpe(positions) if "wpe" in self else self.wte(idx)
        x = x0 = self.drop(x)
        first_values = None
        for i, block in enumerate(self.h):
            x, values = block(x, mask=mask, cache=None if caches is None else caches[i],
                              encoder_kv=None if encoder_kv is None else encoder_kv[i], encoder_mask=encoder_mask,
                              x0=x0, first_values=first_values)
            first_values = values if i == 0 else first_values
        return self.ln_f(x)


class GPT(Transformer):
    """The trunk and an LM head (the token embedding, unless untied)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.config = config
        if not config.tie_weights:
            self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.lm_head_bias:
            self.lm_head_bias = mx.zeros((config.vocab_size,))
        # attention + MLP per block
        init_weights(self, residual_branches=2 * config.n_layer, zero_init_proj=config.zero_init_proj)

    def __call__(self, idx: mx.array, mask: Mask = "causal", cache: list[Any] | None = None) -> mx.array:
        """Logits [B, T, vocab] for token ids ``idx`` [B, T].

        ``cache`` (one per layer, see ``cache.py``) continues a sequence: positions start at the
        cache's offset. With rotary positions a sliding cache (``make_cache``) may go past block_size.
        """
        T = idx.shape[1]
        offset = cache[0].offset if cache is not None else 0
        if T > self.config.block_size or (offset + T > self.config.block_size and "wpe" in self):
            raise ValueError(f"sequence of {offset + T} tokens is longer than block_size {self.config.block_size}")
        x = self.hidden_states(idx, mx.arange(offset, offset + T), mask, cache)
        logits = self.wte.as_linear(x) if self.config.tie_weights else self.lm_head(x)
        if self.config.lm_head_bias:
            logits = logits + self.lm_head_bias
        if self.config.logit_softcap > 0:  # tanh soft-cap (the GPT-2 speedrun's): logits stay within +-cap
            logits = self.config.logit_softcap * mx.tanh(logits / self.config.logit_softcap)
        return logits

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; like nanoGPT, position embeddings are left out by default."""
        n = sum(p.size for _, p in tree_flatten(self.parameters()))
        return n - self.wpe.weight.size if non_embedding and "wpe" in self else n
