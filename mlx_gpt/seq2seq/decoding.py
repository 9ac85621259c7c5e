"""Translating: encode the sources once, then decode greedily or by sampling, one token per step.

With ``use_cache=True`` each step feeds only the newest token: the self-attention keys/values of
earlier ones come from a ``KVCache`` and the cross-attention keys/values are computed once per
source. ``use_cache=False`` recomputes the whole target prefix every step (the reference the tests
compare against).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..errors import MlxGptError
from .model import Seq2Seq, check_padding_mask
from .tokenizer import BOS, EOS, PAD, SpecialCharTokenizer, pad_batch


def next_token(logits: mx.array, temperature: float) -> mx.array:
    """Token ids [B] from logits [B, V]: argmax at temperature 0, else a sample of softmax(logits / temperature)."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(logits / temperature, axis=-1)


def translate_ids(model: Seq2Seq, src_ids: mx.array, src_padding_mask: mx.array | None = None,
                  max_new_tokens: int | None = None, temperature: float = 0.0,
                  use_cache: bool = True) -> list[list[int]]:
    """Target ids for each source row: decoded from BOS until EOS (not included) or ``max_new_tokens``.

    Call ``model.eval()`` first (dropout would otherwise make greedy decoding random).
    """
    if temperature < 0:
        raise MlxGptError(f"temperature must be >= 0, got {temperature}")
    block = model.config.tgt_block_size
    max_new_tokens = block if max_new_tokens is None else max_new_tokens
    if not 1 <= max_new_tokens <= block:
        raise MlxGptError(f"max_new_tokens must be in [1, {block}] (the target block size), got {max_new_tokens}")
    B = src_ids.shape[0]
    if src_padding_mask is not None:
        src_padding_mask = check_padding_mask(src_padding_mask, "src_padding_mask", src_ids.shape)
    encoded = model.encode(src_ids, src_padding_mask, check_masks=False)
    cache = model.decoder.make_cache(encoded, src_padding_mask, check_masks=False) if use_cache else None

    prefix = mx.full((B, 1), BOS, dtype=mx.int32)  # everything fed so far (for use_cache=False)
    step_input = prefix
    generated: list[np.ndarray] = []
    finished = np.zeros(B, dtype=bool)
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model.decoder(step_input, cache=cache)
        else:
            logits = model.decoder(prefix, encoded, src_padding_mask=src_padding_mask, check_masks=False)
        token = next_token(logits[:, -1, :], temperature).astype(mx.int32)
        token_np = np.where(finished, PAD, np.array(token))
        generated.append(token_np)
        finished |= token_np == EOS
        if finished.all():
            break
        step_input = mx.array(token_np)[:, None]
        prefix = mx.concatenate([prefix, step_input], axis=1)
    rows = np.stack(generated, axis=1).tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in rows]


def translate(model: Seq2Seq, src_tokenizer: SpecialCharTokenizer, tgt_tokenizer: SpecialCharTokenizer,
              texts: Sequence[str], max_new_tokens: int | None = None, temperature: float = 0.0,
              batch_size: int = 512) -> list[str]:
    """Translate ``texts`` (in batches of ``batch_size``, padded per batch)."""
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        ids, mask = pad_batch([src_tokenizer.encode(t) for t in texts[start : start + batch_size]])
        rows = translate_ids(model, mx.array(ids), mx.array(mask), max_new_tokens, temperature)
        out.extend(tgt_tokenizer.decode(row) for row in rows)
    return out
