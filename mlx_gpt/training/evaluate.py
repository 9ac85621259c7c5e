"""The loss on a whole split: every target counted once, in fixed windows, instead of random batches.

A split of N tokens has N - 1 targets (tokens[1:]). They are covered by non-overlapping windows of
T = min(block_size, N - 1) targets from the split's start; when those leave r < T targets over, one last window
ending at the split's end covers them, and only its last r targets count (the others were counted already).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..errors import MlxGptError

# Tokens per batch of the whole-split evaluation: windows go in batches of a multiple of the training batch (the
# plug-in splits those evenly over its streams), about this many tokens each; 12 windows of 64 would be 146 small
# batches for Tiny Shakespeare's val split.
WHOLE_SPLIT_BATCH_TOKENS = 16384


def whole_split_batch_size(batch_size: int, block_size: int) -> int:
    """The windows per batch of a whole-split evaluation: a multiple of ``batch_size``, ~WHOLE_SPLIT_BATCH_TOKENS."""
    return batch_size * max(1, WHOLE_SPLIT_BATCH_TOKENS // (batch_size * block_size))


# (x, y, weights) -> the sum of the per-token losses times the weights (0 or 1), as a Python float
LossSum = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def whole_split_windows(n_tokens: int, block_size: int) -> tuple[np.ndarray, int, int]:
    """(window starts, window length T, r): the windows that cover the split's targets once; the last one counts
    only its last r targets when r > 0."""
    if n_tokens < 2:
        raise MlxGptError(f"a split of {n_tokens} token(s) has no targets to evaluate; use a longer text")
    length = min(block_size, n_tokens - 1)
    full, rest = divmod(n_tokens - 1, length)
    starts = np.arange(full, dtype=np.int64) * length
    if rest:
        starts = np.append(starts, n_tokens - 1 - length)
    return starts, length, rest


def whole_split_batches(tokens: np.ndarray, block_size: int, batch_size: int, rank: int = 0,
                        world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x, y, weights) batches of ``batch_size`` windows covering the split (rank ``rank``'s share of each global
    batch of ``batch_size * world_size``). The last batches are padded with weight-0 windows, so every rank runs
    the same number of batches of the same shape."""
    starts, length, rest = whole_split_windows(len(tokens), block_size)
    global_batch = batch_size * world_size
    window = np.arange(length + 1)
    for first in range(0, len(starts), global_batch):
        index = first + rank * batch_size + np.arange(batch_size)
        real = index < len(starts)
        rows = tokens[np.where(real, starts[np.minimum(index, len(starts) - 1)], 0)[:, None] + window]
        weights = np.repeat(real[:, None], length, axis=1).astype(np.float32)
        if rest:
            weights[index == len(starts) - 1, : length - rest] = 0  # targets the windows before it counted
        yield rows[:, :-1], rows[:, 1:], weights


def whole_split_loss(tokens: np.ndarray, block_size: int, batch_size: int, loss_sum: LossSum, rank: int = 0,
                     world_size: int = 1) -> float:
    """The mean loss per target over the whole split; with ``world_size`` > 1 each rank computes its share and
    the sums are added over the ranks (every rank must call this)."""
    total = sum(loss_sum(x, y, w) for x, y, w in whole_split_batches(tokens, block_size, batch_size, rank,
                                                                     world_size))
    if world_size > 1:
        total = mx.distributed.all_sum(mx.array(total, dtype=mx.float32)).item()
    return total / (len(tokens) - 1)
