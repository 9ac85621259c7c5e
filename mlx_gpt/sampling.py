"""Text generation: samplers as small pure functions, and ``generate``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx

from .errors import MlxGptError
from .model import GPT
from .tokenizer import CharTokenizer

Sampler = Callable[[mx.array], mx.array]  # logits [B, V] -> token ids [B]


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits (ties at the k-th value are kept), mask the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)
    return mx.where(logits < kth, -mx.inf, logits)


def make_sampler(temperature: float = 0.8, top_k: int | None = None) -> Sampler:
    """Compose temperature and top-k into one sampler; temperature 0 is greedy."""
    if temperature < 0:
        raise MlxGptError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MlxGptError(f"top_k must be >= 1, got {top_k}")
    if temperature == 0:
        return greedy

    def sample(logits: mx.array) -> mx.array:
        logits = logits / temperature
        if top_k is not None:
            logits = apply_top_k(logits, top_k)
        return mx.random.categorical(logits, axis=-1)

    return sample


def generate(model: GPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int,
             sampler: Sampler, num_samples: int = 1) -> Iterator[list[str]]:
    """Yield, per step, the next character of each of ``num_samples`` continuations of ``prompt``.

    The context is cropped to the last ``block_size`` tokens (recomputed every step).
    """
    if not prompt:
        raise MlxGptError("the prompt is empty; pass at least one character (e.g. --prompt $'\\n')")
    ids = mx.array(tokenizer.encode(prompt))[None].astype(mx.int32)
    ids = mx.repeat(ids, num_samples, axis=0)
    block = model.config.block_size
    for _ in range(max_new_tokens):
        logits = model(ids[:, -block:])[:, -1, :]
        token = sampler(logits).astype(mx.int32)
        ids = mx.concatenate([ids, token[:, None]], axis=1)
        yield [tokenizer.chars[i] for i in token.tolist()]
