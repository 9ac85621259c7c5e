"""Encoder-decoder translation built from the GPT's blocks: the decoder gains cross-attention.

``model`` (Encoder, Decoder, Seq2Seq, padding masks), ``cache`` (decoding caches), ``decoding``
(greedy and sampled translation), ``tokenizer`` (characters + PAD/BOS/EOS), ``dates`` (the
generated example task), ``checkpoint`` (save/load), ``train`` (``python -m mlx_gpt.seq2seq.train``).
"""

from .cache import DecoderCache, KVCache
from .decoding import translate, translate_ids
from .model import Decoder, Encoder, Seq2Seq, Seq2SeqConfig
from .tokenizer import BOS, EOS, PAD, SpecialCharTokenizer, pad_batch

__all__ = ["BOS", "EOS", "PAD", "Decoder", "DecoderCache", "Encoder", "KVCache", "Seq2Seq", "Seq2SeqConfig",
           "SpecialCharTokenizer", "pad_batch", "translate", "translate_ids"]
