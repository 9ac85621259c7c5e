"""Text generation: samplers as small pure functions, logits processors, and ``generate``.

A *sampler* maps logits ``[B, V]`` to token ids ``[B]``; ``make_sampler`` composes the pieces in
this order (Hugging Face's and nanoGPT's): temperature, then top-k, then top-p (nucleus, on the
distribution left by top-k), then min-p, then one categorical draw per row. Temperature 0 is
greedy (argmax), which every filter keeps, so the filters are skipped.

A *logits processor* maps ``(tokens [B, n], logits [B, V])`` to new logits before the sampler;
``tokens`` is the whole sequence so far (prompt + generated). ``make_logits_processors`` builds the
repetition penalty (mlx-lm's / the CTRL paper's: a seen token's logit is divided by the penalty
when positive, multiplied when negative) over the last ``repetition_context_size`` tokens.

``generate_step`` runs the model: the prompt is prefilled in one pass, then one token per step
through a KV cache (``cache.py``, whose docstring states the sliding-window rule used past
block_size). ``num_samples`` continuations run as one batch. Memory does not grow with the number of
new tokens: only the window and the processors' context are kept.

Randomness comes from MLX's global generator: ``mx.random.seed(s)`` first makes a run repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .cache import initial_window_start, make_cache, reset_cache, window_start
from .errors import MlxGptError
from .model import GPT
from .tokenizer import CharTokenizer

Sampler = Callable[[mx.array], mx.array]  # logits [B, V] -> token ids [B]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (tokens [B, n], logits [B, V]) -> logits

# ----------------------------------------------------------------------------- samplers


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row."""
    return mx.argmax(logits, axis=-1)


def categorical(logits: mx.array) -> mx.array:
    """One draw per row from softmax(logits)."""
    return mx.random.categorical(logits, axis=-1)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    """Divide the logits by ``temperature`` (> 0): below 1 sharpens, above 1 flattens."""
    return logits if temperature == 1 else logits * (1.0 / temperature)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits of each row (ties at the k-th value are kept); the rest -> -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)
    return mx.where(logits < kth, -mx.inf, logits)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``.

    A token is kept when the probability of the tokens ranked above it is below ``p``; tokens tied
    with the last kept one are kept as well. ``p = 1`` keeps everything.
    """
    if p >= 1:
        return logits
    sorted_logits = -mx.sort(-logits, axis=-1)  # descending
    sorted_probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    n_keep = mx.maximum((mass_before < p).sum(axis=-1, keepdims=True), 1)
    cutoff = mx.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return mx.where(logits < cutoff, -mx.inf, logits)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep the tokens whose probability is at least ``min_p`` times the top token's; ``0`` keeps all."""
    if min_p <= 0:
        return logits
    threshold = logits.max(axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logits < threshold, -mx.inf, logits)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_args(temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None) -> None:
    """Raise an MlxGptError naming the first bad value."""
    if not _is_number(temperature) or temperature < 0:
        raise MlxGptError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise MlxGptError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise MlxGptError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and (not _is_number(min_p) or not 0 <= min_p <= 1):
        raise MlxGptError(f"min_p must be in [0, 1], got {min_p!r}")


def make_sampler(temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None) -> Sampler:
    """One sampler from temperature (0 = greedy), top-k, top-p and min-p (None = off)."""
    check_sampling_args(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return greedy
    filters: list[Callable[[mx.array], mx.array]] = []
    if top_k is not None:
        filters.append(lambda x: apply_top_k(x, int(top_k)))
    if top_p is not None and top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p is not None and min_p > 0:
        filters.append(lambda x: apply_min_p(x, min_p))

    def sample(logits: mx.array) -> mx.array:
        logits = apply_temperature(logits.astype(mx.float32), temperature)
        for f in filters:
            logits = f(logits)
        return categorical(logits)

    return sample


# ----------------------------------------------------------------------------- logits processors


def apply_repetition_penalty(logits: mx.array, tokens: mx.array, penalty: float) -> mx.array:
    """Penalize the tokens in ``tokens`` [B, n]: positive logits / penalty, negative ones * penalty."""
    if tokens.shape[-1] == 0 or penalty == 1:
        return logits
    selected = mx.take_along_axis(logits, tokens, axis=-1)
    selected = mx.where(selected < 0, selected * penalty, selected / penalty)
    return mx.put_along_axis(logits, tokens, selected, axis=-1)


def make_logits_processors(repetition_penalty: float | None = None,
                           repetition_context_size: int = 20) -> list[LogitsProcessor]:
    """The processors for ``generate``: a repetition penalty over the last ``repetition_context_size`` tokens.

    ``repetition_penalty`` None or 1 = off; values above 1 discourage repeats, below 1 encourage them.
    """
    if repetition_penalty is not None and (not _is_number(repetition_penalty) or repetition_penalty <= 0):
        raise MlxGptError(f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}")
    if (not isinstance(repetition_context_size, (int, np.integer)) or isinstance(repetition_context_size, bool)
            or repetition_context_size < 1):
        raise MlxGptError(f"repetition_context_size must be an integer >= 1, got {repetition_context_size!r}")
    if repetition_penalty is None or repetition_penalty == 1:
        return []
    context = int(repetition_context_size)

    def repetition_penalty_processor(tokens: mx.array, logits: mx.array) -> mx.array:
        return apply_repetition_penalty(logits, tokens[:, -context:], repetition_penalty)

    return [repetition_penalty_processor]


# ----------------------------------------------------------------------------- generation


def _prompt_ids(prompt_ids: Sequence[int] | np.ndarray | mx.array) -> mx.array:
    ids = mx.array(np.asarray(prompt_ids, dtype=np.int32)) if not isinstance(prompt_ids, mx.array) else prompt_ids
    if ids.ndim != 1:
        raise MlxGptError(f"the prompt must be one sequence of token ids, got shape {tuple(ids.shape)}")
    if ids.size == 0:
        raise MlxGptError("the prompt is empty; the model needs at least one character to continue "
                          "(nanoGPT's default start is a newline: leave out --prompt)")
    return ids.astype(mx.int32)


class History:
    """The last tokens of each sequence: at least ``keep`` of them, in a buffer of twice that written by slice
    (when it fills, its last ``keep`` tokens move to the front), so memory does not grow with the sequence."""

    def __init__(self, prompt: mx.array, batch: int, keep: int) -> None:
        n = prompt.size
        self.first = max(0, n - keep)  # the position in the sequence of the buffer's first token
        self.length = n  # tokens in the sequence so far
        self.buffer = mx.zeros((batch, 2 * keep), dtype=mx.int32)
        self.buffer[:, : n - self.first] = mx.broadcast_to(prompt[None, self.first:], (batch, n - self.first))
        self.keep = keep

    def tokens(self, start: int, end: int | None = None) -> mx.array:
        """Tokens [B, end - start] at sequence positions start .. end (default: the last one); start must be
        among the last ``keep``."""
        end = self.length if end is None else end
        return self.buffer[:, start - self.first: end - self.first]

    def recent(self) -> mx.array:
        """The last ``keep`` tokens of each sequence (all of them while there are fewer)."""
        return self.tokens(max(self.first, self.length - self.keep))

    def append(self, token: mx.array) -> None:
        if self.length - self.first == self.buffer.shape[1]:
            self.buffer[:, : self.keep] = self.buffer[:, -self.keep:]
            self.first = self.length - self.keep
        self.buffer[:, self.length - self.first] = token
        self.length += 1
        mx.async_eval(token, self.buffer)  # start computing while Python builds the next step


def generate_step(model: GPT, prompt_ids: Sequence[int] | np.ndarray | mx.array, max_new_tokens: int,
                  sampler: Sampler | None = None, num_samples: int = 1,
                  logits_processors: Sequence[LogitsProcessor] | None = None,
                  history_size: int = 0) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield ``(tokens [B], logits [B, V])`` per new token, B = ``num_samples``.

    ``logits`` are the model's (before processors and sampler) for the position the token was
    drawn at. The processors see the last ``max(block_size, history_size)`` tokens of each sequence.
    """
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise MlxGptError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise MlxGptError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    sampler = sampler or greedy
    processors = list(logits_processors or [])
    ids = _prompt_ids(prompt_ids)
    block = model.config.block_size
    low, high = mx.min(ids).item(), mx.max(ids).item()
    if low < 0 or high >= model.config.vocab_size:
        raise MlxGptError(f"prompt token ids must be in [0, {model.config.vocab_size}), got {low}..{high}")
    history = History(ids, int(num_samples), max(block, int(history_size)))
    cache = make_cache(model)
    sliding = cache[0].sliding  # rotary positions: the window slides one token at a time (see cache.py)
    start = initial_window_start(ids.size, block)

    def prefill(start: int) -> mx.array:
        """Logits [B, V] at the last position, from a (re)prefill of the window tokens[start:]."""
        reset_cache(cache)
        window = history.tokens(start)
        return model(window, mask="causal" if window.shape[1] > 1 else None, cache=cache)[:, -1, :]

    def draw(logits: mx.array) -> mx.array:
        recent = history.recent() if processors else None
        for processor in processors:
            logits = processor(recent, logits)
        token = sampler(logits).astype(mx.int32)
        history.append(token)
        return token

    if max_new_tokens == 0:
        return
    logits = prefill(start)
    token = draw(logits)
    for i in range(max_new_tokens):
        if i + 1 < max_new_tokens:  # queue the next step before handing this token over
            new_start = start if sliding else window_start(start, history.length, block)
            if new_start == start:
                next_logits = model(token[:, None], mask=None, cache=cache)[:, -1, :]
            else:
                next_logits = prefill(new_start)
            start = new_start
            next_token = draw(next_logits)
        yield token, logits
        if i + 1 < max_new_tokens:
            token, logits = next_token, next_logits


def generate(model: GPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int,
             sampler: Sampler | None = None, num_samples: int = 1,
             logits_processors: Sequence[LogitsProcessor] | None = None,
             history_size: int = 0) -> Iterator[list[str]]:
    """Yield, per step, the next character of each of ``num_samples`` continuations of ``prompt``.

    ``prompt`` must be non-empty and use only the tokenizer's characters (MlxGptError otherwise).
    A prompt longer than block_size is fine: the model sees its last block_size characters, and
    generation of any length slides the window (see ``cache.py``). ``sampler`` defaults to greedy.
    """
    if not isinstance(prompt, str):
        raise MlxGptError(f"the prompt must be a string, got {type(prompt).__name__}")
    if not prompt:
        _prompt_ids([])  # the empty-prompt error
    ids = tokenizer.encode(prompt)
    chars = tokenizer.chars
    for token, _ in generate_step(model, ids, max_new_tokens, sampler, num_samples, logits_processors,
                                  history_size):
        yield [chars[i] for i in token.tolist()]
