"""Decoding caches for the encoder-decoder: self-attention keys/values and the encoder's cross-attention ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..errors import MlxGptError


class KVCache:
    """Self-attention keys/values [B, H, max_len, D], preallocated on the first write and written by slices.

    ``update_and_fetch`` is what ``CausalSelfAttention`` calls: append this step's keys/values,
    return all of them so far. Preallocating keeps each step from copying the whole history.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.offset = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, T, D = keys.shape
        if self.offset + T > self.max_len:
            raise MlxGptError(f"the KV cache holds {self.max_len} positions; {self.offset + T} were asked for "
                              "(decode fewer tokens or make a larger cache)")
        if self.keys is None:
            self.keys = mx.zeros((B, H, self.max_len, D), dtype=keys.dtype)
            self.values = mx.zeros((B, H, self.max_len, values.shape[-1]), dtype=values.dtype)
        self.keys[:, :, self.offset : self.offset + T, :] = keys
        self.values[:, :, self.offset : self.offset + T, :] = values
        self.offset += T
        return self.keys[:, :, : self.offset, :], self.values[:, :, : self.offset, :]


@dataclass
class DecoderCache:
    """Everything a decoder step needs besides the new tokens: per layer, the self-attention cache and the
    cross-attention keys/values of the (fixed) source, plus the source mask. Made by ``Decoder.make_cache``."""

    self_attn: list[KVCache]
    cross_kv: list[tuple[mx.array, mx.array]]
    cross_mask: Any  # None or bool [B, 1, 1, S]

    @property
    def offset(self) -> int:
        return self.self_attn[0].offset
