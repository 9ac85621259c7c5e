"""A key/value cache for fast decoding, in the style of mlx-lm's ``KVCache``.

Each attention layer gets one ``KVCache``. Keys and values live in buffers of shape
``[batch, heads, capacity, head_dim]`` that grow along the time axis in chunks of ``step``
positions (never beyond ``max_size``, the model's block_size); new entries are written into the
buffer by slice, not by concatenating a new array every token. ``offset`` is the number of
positions filled, which is also the position (for the learned position embedding) of the next
token fed to the model.

The sliding-window rule (the model's positions are absolute and learned, so a cache cannot simply
drop its oldest entry and go on: every cached key was computed at a position that would shift):

    The model sees a window ``tokens[start:]`` of the sequence. At the start, ``start =
    max(0, len(prompt) - block_size)``: as much of the prompt as fits. Whenever appending the
    next token would make the window longer than ``block_size``, the window restarts from the
    last ``block_size // 2`` tokens (at least 1; the new token included): the cache is reset,
    those tokens are prefilled in one pass at positions ``0 .. block_size // 2 - 1``, and
    decoding continues one token per step.

With rotary positions (``position_encoding="rope"``) attention depends only on how far apart two tokens are, so
the window slides by one token instead: ``make_cache`` gives such a model sliding caches, which once full write
each new token over the oldest (a ring of ``block_size`` entries; the rotation is already applied to the cached
keys) and decoding never re-prefills. Keys cached long ago were computed while older tokens were still in the
window, so past ``block_size`` this is not the same as recomputing the window from scratch (as in mlx-lm's
``RotatingKVCache``); within it, it is.

With learned positions, a sequence of any length can be generated, each new token is predicted from at least
``block_size // 2`` tokens of context (once there are that many), and a re-prefill of
``block_size // 2`` tokens happens every ``block_size - block_size // 2 + 1`` new tokens (every
129 at block 256). ``window_start`` states the rule on its own, so that a sampler without a cache can follow the same
windows (the tests check that the cached one draws the same tokens).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, preallocated in chunks along time."""

    step = 256

    def __init__(self, max_size: int | None = None, step: int | None = None, sliding: bool = False) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen; a sliding cache keeps the last max_size of them
        self.max_size = max_size
        self.sliding = sliding
        if sliding and max_size is None:
            raise ValueError("a sliding cache needs a max_size")
        if step is not None:
            self.step = step

    def _grow(self, k: mx.array, v: mx.array, needed: int) -> None:
        """Make room for ``needed`` positions: a new chunk (or a larger first buffer)."""
        B, H, _, Dk = k.shape
        Dv = v.shape[-1]
        capacity = ((needed + self.step - 1) // self.step) * self.step
        if self.max_size is not None:
            capacity = min(capacity, max(self.max_size, needed))
        old = 0 if self.keys is None else self.offset
        extra = capacity - old
        new_k = mx.zeros((B, H, extra, Dk), dtype=k.dtype)
        new_v = mx.zeros((B, H, extra, Dv), dtype=v.dtype)
        if self.keys is None or old == 0:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :old, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :old, :], new_v], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store ``keys``/``values`` [B, H, T, D] at ``offset``; return all keys/values so far."""
        prev = self.offset
        T = keys.shape[2]
        if self.sliding and prev + T > self.max_size:
            return self._slide(keys, values)
        if (self.keys is None or prev + T > self.keys.shape[2]
                or self.keys.shape[0] != keys.shape[0] or self.keys.dtype != keys.dtype):
            if self.keys is not None and (self.keys.shape[0] != keys.shape[0] or self.keys.dtype != keys.dtype):
                if prev:
                    raise ValueError("the batch size or dtype changed in the middle of a cached sequence")
                self.keys = self.values = None
            self._grow(keys, values, prev + T)
        self.offset = prev + T
        self.keys[..., prev:self.offset, :] = keys
        self.values[..., prev:self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _slide(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write one token over the oldest of a full ring; return the whole ring (its order does not matter to a
        single query that sees every key)."""
        if keys.shape[2] != 1 or self.offset < self.max_size:
            raise ValueError("a sliding cache takes one token at a time once it holds max_size of them")
        slot = self.offset % self.max_size
        self.keys[..., slot:slot + 1, :] = keys
        self.values[..., slot:slot + 1, :] = values
        self.offset += 1
        return self.keys, self.values

    def reset(self) -> None:
        """Forget the sequence (the buffers are kept and overwritten)."""
        self.offset = 0


def make_cache(model: Any, step: int | None = None) -> list[KVCache]:
    """One KVCache per layer of ``model`` (a ``GPT``), capped at its block_size; sliding with rotary positions."""
    block, sliding = model.config.block_size, model.config.position_encoding == "rope"
    return [KVCache(max_size=block, step=step, sliding=sliding) for _ in range(len(model.h))]


def reset_cache(cache: list[KVCache]) -> None:
    for layer in cache:
        layer.reset()


def keep_size(block_size: int) -> int:
    """How many tokens the window keeps when it slides: ``block_size // 2`` (at least 1)."""
    return max(1, block_size // 2)


def initial_window_start(prompt_length: int, block_size: int) -> int:
    """The window's start for a prompt: as much of the prompt as fits in block_size."""
    return max(0, prompt_length - block_size)


def window_start(start: int, length: int, block_size: int) -> int:
    """The window's start once the sequence is ``length`` tokens long, given its ``start`` before.

    When the window ``[start, length)`` would exceed block_size, it restarts from the last
    ``keep_size(block_size)`` tokens; otherwise it is unchanged.
    """
    if length - start > block_size:
        return length - keep_size(block_size)
    return start
