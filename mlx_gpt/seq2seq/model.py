"""An encoder-decoder transformer: a bidirectional encoder and a GPT-style decoder with cross-attention.

Padding masks are boolean [B, L] arrays, True at real tokens and False at PAD (``pad_batch`` makes
them). Positions are counted over real tokens only, so where a sequence is padded (left, right, or by
how much) never changes the outputs at its real positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import GPTConfig, dataclass_from_dict
from ..errors import MlxGptError
from ..model import Transformer, init_weights
from ..ops import Mask
from .cache import DecoderCache, KVCache


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Shape of the encoder-decoder. Source and target have their own vocabularies and lengths."""

    src_vocab_size: int
    tgt_vocab_size: int
    src_block_size: int = 64
    tgt_block_size: int = 32
    n_encoder_layer: int = 2
    n_decoder_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    activation: str = "gelu"

    def __post_init__(self) -> None:
        # The blocks are GPT blocks: their configs check every field (types, n_embd % n_head, dropout, activation).
        self.encoder_config()
        self.decoder_config()

    def encoder_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.src_vocab_size, block_size=self.src_block_size, n_layer=self.n_encoder_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         activation=self.activation)

    def decoder_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.tgt_vocab_size, block_size=self.tgt_block_size, n_layer=self.n_decoder_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         activation=self.activation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> Seq2SeqConfig:
        return dataclass_from_dict(cls, values)


# ----------------------------------------------------------------------------- masks


def check_padding_mask(mask: mx.array, name: str, shape: tuple[int, int]) -> mx.array:
    """``mask`` as bool [B, L], after checking its shape and that every row has a real token.

    A row with no real token leaves attention nothing to attend to (the kernel would return
    garbage or NaN), so it is an error here instead. This evaluates the mask: call it outside
    ``mx.compile`` (the models take ``check_masks=False`` for compiled steps on trusted batches).
    """
    if tuple(mask.shape) != tuple(shape):
        raise MlxGptError(f"{name} has shape {tuple(mask.shape)} but the ids have shape {tuple(shape)}; "
                          "pass one True/False per token (True at real tokens)")
    mask = mask.astype(mx.bool_)
    empty = mx.logical_not(mx.any(mask, axis=-1))
    if mx.any(empty).item():
        rows = [i for i, e in enumerate(empty.tolist()) if e][:10]
        raise MlxGptError(f"{name}: row(s) {rows} are all PAD, so attention over them is undefined; "
                          "drop empty sequences from the batch (every row needs at least one real token)")
    return mask


def padded_positions(padding_mask: mx.array) -> mx.array:
    """Position ids [B, L] counting real tokens only (PAD positions repeat a neighbour's: they are ignored)."""
    return mx.maximum(mx.cumsum(padding_mask.astype(mx.int32), axis=1) - 1, 0)


def causal_padding_mask(tgt_padding_mask: mx.array) -> mx.array:
    """Self-attention mask bool [B, 1, T, T]: causal, and no attending to the target's PAD positions.

    Each position may always see itself, so a PAD query (e.g. at the front of a left-padded row)
    still has one key and stays finite; real queries never see a PAD key.
    """
    T = tgt_padding_mask.shape[1]
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    keys = tgt_padding_mask[:, None, None, :] | mx.eye(T, dtype=mx.bool_)
    return causal & keys


def key_padding_mask(padding_mask: mx.array) -> mx.array:
    """Mask bool [B, 1, 1, S] that hides the PAD keys from every query (bidirectional/cross attention)."""
    return padding_mask[:, None, None, :]


# ----------------------------------------------------------------------------- the model


def _check_length(length: int, block_size: int, what: str) -> None:
    if length > block_size:
        raise MlxGptError(f"{what} of {length} tokens is longer than its block size {block_size}; "
                          "shorten it or train a model with a larger block size")


class Encoder(Transformer):
    """The GPT trunk with bidirectional self-attention; hidden states [B, S, C]."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        cfg = config.encoder_config()
        super().__init__(cfg)
        self.block_size = cfg.block_size

    def __call__(self, src_ids: mx.array, src_padding_mask: mx.array | None = None,
                 check_masks: bool = True) -> mx.array:
        B, S = src_ids.shape
        _check_length(S, self.block_size, "the source")
        if src_padding_mask is None:
            positions, mask = mx.arange(S), None
        else:
            if check_masks:
                src_padding_mask = check_padding_mask(src_padding_mask, "src_padding_mask", (B, S))
            positions, mask = padded_positions(src_padding_mask), key_padding_mask(src_padding_mask)
        return self.hidden_states(src_ids, positions, mask)


class Decoder(Transformer):
    """The GPT trunk with cross-attention in every block; its LM head is its token embedding (tied)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        cfg = config.decoder_config()
        super().__init__(cfg, cross_attention=True)
        self.block_size = cfg.block_size

    def cross_inputs(self, encoder_hidden_states: mx.array, src_padding_mask: mx.array | None = None,
                     check_masks: bool = True) -> tuple[list[tuple[mx.array, mx.array]], Mask]:
        """Per layer, the cross-attention keys/values of ``encoder_hidden_states`` [B, S, C]; and the mask
        that hides the source's PAD positions from every query."""
        B, S, _ = encoder_hidden_states.shape
        if src_padding_mask is not None and check_masks:
            src_padding_mask = check_padding_mask(src_padding_mask, "src_padding_mask", (B, S))
        cross_kv = [block.cross_attn.key_values(encoder_hidden_states) for block in self.h]
        return cross_kv, None if src_padding_mask is None else key_padding_mask(src_padding_mask)

    def make_cache(self, encoder_hidden_states: mx.array, src_padding_mask: mx.array | None = None,
                   check_masks: bool = True) -> DecoderCache:
        """A cache for decoding against one batch of sources: the cross-attention keys/values are computed
        here, once, and every later step reuses them."""
        cross_kv, cross_mask = self.cross_inputs(encoder_hidden_states, src_padding_mask, check_masks)
        return DecoderCache([KVCache(max_size=self.block_size) for _ in self.h], cross_kv, cross_mask)

    def __call__(self, tgt_input_ids: mx.array, encoder_hidden_states: mx.array | None = None,
                 tgt_padding_mask: mx.array | None = None, src_padding_mask: mx.array | None = None,
                 cache: DecoderCache | None = None, check_masks: bool = True) -> mx.array:
        """Logits [B, T, tgt_vocab] for ``tgt_input_ids`` [B, T] given the encoder's output.

        Pass ``encoder_hidden_states`` [B, S, C] (and ``src_padding_mask`` [B, S]) for a full
        forward pass, or a ``cache`` from ``make_cache`` to continue decoding where it stopped.
        """
        B, T = tgt_input_ids.shape
        if cache is None:
            if encoder_hidden_states is None:
                raise MlxGptError("the decoder needs encoder_hidden_states (or a cache from make_cache)")
            cross_kv, cross_mask = self.cross_inputs(encoder_hidden_states, src_padding_mask, check_masks)
            self_caches, offset = None, 0
        else:
            if encoder_hidden_states is not None or src_padding_mask is not None:
                raise MlxGptError("pass either a decoder cache or encoder_hidden_states/src_padding_mask, not both")
            if tgt_padding_mask is not None:
                raise MlxGptError("tgt_padding_mask is for full forward passes; cached decoding takes unpadded steps")
            cross_kv, cross_mask, self_caches, offset = cache.cross_kv, cache.cross_mask, cache.self_attn, cache.offset
        _check_length(offset + T, self.block_size, "the target")
        if tgt_padding_mask is None:
            # No padding: the fused kernel's causal path (bottom-right aligned, so it also fits cached steps).
            positions, mask = mx.arange(offset, offset + T), "causal"
        else:
            if check_masks:
                tgt_padding_mask = check_padding_mask(tgt_padding_mask, "tgt_padding_mask", (B, T))
            positions, mask = padded_positions(tgt_padding_mask), causal_padding_mask(tgt_padding_mask)
        x = self.hidden_states(tgt_input_ids, positions, mask, self_caches, cross_kv, cross_mask)
        return self.wte.as_linear(x)


class Seq2Seq(nn.Module):
    """Encoder + decoder: ``model(src_ids, tgt_input_ids, src_padding_mask, tgt_padding_mask)`` -> logits."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Residual branches: self-attention + MLP per encoder block, plus cross-attention per decoder block.
        init_weights(self, residual_branches=2 * config.n_encoder_layer + 3 * config.n_decoder_layer)

    def encode(self, src_ids: mx.array, src_padding_mask: mx.array | None = None,
               check_masks: bool = True) -> mx.array:
        return self.encoder(src_ids, src_padding_mask, check_masks=check_masks)

    def __call__(self, src_ids: mx.array, tgt_input_ids: mx.array, src_padding_mask: mx.array | None = None,
                 tgt_padding_mask: mx.array | None = None, check_masks: bool = True) -> mx.array:
        if check_masks and src_padding_mask is not None:  # once here, not again in the decoder
            src_padding_mask = check_padding_mask(src_padding_mask, "src_padding_mask", src_ids.shape)
        encoded = self.encoder(src_ids, src_padding_mask, check_masks=False)
        return self.decoder(tgt_input_ids, encoded, tgt_padding_mask, src_padding_mask, check_masks=check_masks)

    def num_params(self) -> int:
        return sum(p.size for _, p in tree_flatten(self.parameters()))


__all__ = ["Seq2SeqConfig", "Encoder", "Decoder", "Seq2Seq", "check_padding_mask", "causal_padding_mask",
           "key_padding_mask", "padded_positions"]
