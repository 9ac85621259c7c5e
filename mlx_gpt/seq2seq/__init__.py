"""Encoder-decoder translation built from the GPT's blocks: the decoder gains cross-attention.

``model`` (Encoder, Decoder, Seq2Seq, padding masks), ``cache`` (decoding caches), ``decoding``
(greedy and sampled translation), ``tokenizer`` (characters + PAD/BOS/EOS), ``dates`` (the
generated example task), ``checkpoint`` (save/load), ``train`` (``python -m mlx_gpt.seq2seq``).

The names below are imported on first use, so that ``python -m mlx_gpt.seq2seq`` can enable the CPU plug-in
before MLX is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DecoderCache": "cache", "KVCache": "cache", "translate": "decoding", "translate_ids": "decoding",
    "Decoder": "model", "Encoder": "model", "Seq2Seq": "model", "Seq2SeqConfig": "model",
    "BOS": "tokenizer", "EOS": "tokenizer", "PAD": "tokenizer", "SpecialCharTokenizer": "tokenizer",
    "pad_batch": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
