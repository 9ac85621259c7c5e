"""Decoding caches for the encoder-decoder: self-attention keys/values (the GPT's ``KVCache``) and the
encoder's cross-attention ones, computed once per source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..cache import KVCache


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
