"""The training step: forward, backward, gradient averaging, clipping, the optimizer and the EMA, compiled; and the
eval loss.

A batch may be split into equal slices: micro-batches (gradient accumulation) and, where ``ops.step_streams`` gives
several streams (the CPU plug-in: one per core), a share of each micro-batch per stream. Each slice's gradients are
computed on its stream; their mean is the batch's gradient.

With a compute dtype other than float32 (``TrainConfig.dtype``) the forward and backward run on copies of the weights
cast inside the differentiated function, so the gradients come back float32 and the optimizer updates the float32
weights; the loss (log-softmax, cross-entropy) is computed in float32. float16 adds dynamic loss scaling
(``loss_scale.py``) inside the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import TrainConfig
from ..model import GPT
from ..precision import cast_floats, mlx_dtype, weights_cast
from .loss_scale import LossScaler
from .optim import clip_grad_norm, ema_decay_at, on_stream


def float32_logits(model: GPT, x: mx.array) -> mx.array:
    """The model's logits, in float32 whatever it computes in: the log-softmax and the loss are float32."""
    logits = model(x)
    return logits if logits.dtype == mx.float32 else logits.astype(mx.float32)


def loss_fn(model: GPT, x: mx.array, y: mx.array, label_smoothing: float = 0.0) -> mx.array:
    return nn.losses.cross_entropy(float32_logits(model, x), y, label_smoothing=label_smoothing, reduction="mean")


def weighted_loss_sum(model: GPT, x: mx.array, y: mx.array, weights: mx.array) -> mx.array:
    """The sum of the per-token losses times ``weights`` (the whole-split evaluation's windows)."""
    return (nn.losses.cross_entropy(float32_logits(model, x), y, reduction="none") * weights).sum()


def spread_over_streams(tree: Any, streams: list[mx.Stream] | None) -> Any:
    """A tree like ``tree`` (of arrays) holding a stream for each array (None for all when there are no
    ``streams``): the largest array goes to the stream with the fewest elements so far, so that per-parameter work
    (gradient averaging, norm, update) is balanced."""
    flat = tree_flatten(tree)  # and back below: no empty containers (nn.average_gradients drops them too)
    chosen = dict.fromkeys((name for name, _ in flat), None)
    if streams:
        load = [0] * len(streams)
        for name, array in sorted(flat, key=lambda item: -item[1].size):
            least = load.index(min(load))
            load[least] += array.size
            chosen[name] = streams[least]
    return tree_unflatten(list(chosen.items()))


def dropout_seed(seed: int, iteration: int, slice_index: int) -> int:
    """The seed of one slice of one step's dropout: a function of (seed, iteration, slice), so that a resumed run
    draws what a straight one does, and each stream its own (a key passed from one stream on would chain them)."""
    return ((seed * 1_000_003 + iteration) * 1_000_003 + slice_index) % 2**64


class TrainStep:
    """``step(x, y, iteration)`` -> (loss, gradient norm before clipping), updating the model, the optimizer, the
    EMA and the loss scaler in place; ``eval_loss(x, y)`` -> the mean loss and ``eval_loss_sum(x, y, weights)`` -> the
    weighted sum of the per-token losses (this rank's; dropout as the model's mode says).

    ``cfg.dtype`` must be a concrete dtype (not auto); ``scaler`` (float16) scales the loss of each step.
    """

    def __init__(self, model: GPT, optimizer: optim.Optimizer, ema: dict | None, cfg: TrainConfig, world_size: int,
                 streams: list[mx.Stream] | None, scaler: LossScaler | None = None) -> None:
        self.model, self.optimizer, self.ema, self.cfg = model, optimizer, ema, cfg
        self.world_size, self.streams, self.scaler = world_size, streams, scaler
        self.dtype = mlx_dtype(cfg.dtype)
        scaler_state = [scaler.state] if scaler is not None else []
        # Each parameter's share of the update on one stream, so that this part of a step is shared too.
        self.grad_streams = spread_over_streams(model.trainable_parameters(), streams)
        optimizer.parameter_streams = self.grad_streams
        self._gradients = [self._gradients_on(stream) for stream in streams or [None]]
        self._update, self._eval_loss, self._eval_loss_sum = self._apply_update, self._mean_loss, self._loss_sum
        if cfg.compile:
            # One compiled function per stream: traced as one graph, mx.compile merged the streams' identical
            # constants, and one stream's kernels then waited on the other's. Each reads the model and the RNG
            # (dropout); value_and_grad writes the model back.
            stream_state = [model.state, mx.random.state]
            self._gradients = [mx.compile(f, inputs=stream_state + scaler_state, outputs=stream_state)
                               for f in self._gradients]
            state = [model.state, optimizer.state] + ([ema] if ema is not None else []) + scaler_state
            self._update = mx.compile(self._update, inputs=state, outputs=state)
            self._eval_loss = mx.compile(self._eval_loss, inputs=[model.state])
            self._eval_loss_sum = mx.compile(self._eval_loss_sum, inputs=[model.state])

    def _gradients_on(self, stream: mx.Stream | None) -> Callable[[mx.array, mx.array], Any]:
        loss = partial(loss_fn, label_smoothing=self.cfg.label_smoothing)
        if self.dtype == mx.float32 and self.scaler is None:
            grad_fn = nn.value_and_grad(self.model, loss)

            def gradients(x: mx.array, y: mx.array) -> tuple[mx.array, dict]:
                with on_stream(stream):
                    return grad_fn(self.model, x, y)

            return gradients
        return self._mixed_gradients_on(stream, loss)

    def _mixed_gradients_on(self, stream: mx.Stream | None, loss: Callable[..., mx.array]
                            ) -> Callable[[mx.array, mx.array], Any]:
        """(loss, gradients of the loss times the scale) with the forward and backward in the compute dtype: the
        float32 weights are cast inside the differentiated function, so their gradients are float32."""
        model, dtype, scaler = self.model, self.dtype, self.scaler

        def scaled_loss(params: dict, x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
            model.update(cast_floats(params, dtype))
            value = loss(model, x, y)
            return (value * scaler.state["scale"] if scaler is not None else value), value

        grad_fn = mx.value_and_grad(scaled_loss)

        def gradients(x: mx.array, y: mx.array) -> tuple[mx.array, dict]:
            with on_stream(stream):
                params = model.trainable_parameters()
                (_, value), grads = grad_fn(params, x, y)
                model.update(params)  # the float32 weights back in the model
                return value, grads

        return gradients

    def _apply_update(self, parts: list[tuple[mx.array, dict]]) -> tuple[mx.array, mx.array]:
        """The optimizer step from the (loss, gradients) of equal slices of the batch: their mean is the batch's."""
        loss = sum(part_loss for part_loss, _ in parts) / len(parts)
        # float16: the gradients are of the scaled loss; divided by the scale in the mean
        unscale = 1.0 / (len(parts) * self.scaler.state["scale"]) if self.scaler is not None else None

        def mean(stream: mx.Stream | None, *values: mx.array) -> mx.array:
            with on_stream(stream):
                return sum(values) / len(values) if unscale is None else sum(values) * unscale

        grads = tree_map(mean, self.grad_streams, *(g for _, g in parts))
        if self.world_size > 1:  # every rank gets the mean over the global batch
            grads = nn.average_gradients(grads)
            loss = mx.distributed.all_sum(loss) / self.world_size
        grads, norm = clip_grad_norm(grads, self.cfg.grad_clip, self.grad_streams)
        model, optimizer = self.model, self.optimizer
        guarded = self.cfg.skip_nonfinite > 0 or self.scaler is not None  # float16: an overflow skips the step
        if guarded:
            old_params = model.parameters()
            old_state = tree_map(lambda a: a, optimizer.state)  # new containers: update() mutates in place
        optimizer.update(model, grads)
        if guarded:  # a non-finite loss or gradient leaves weights and optimizer untouched
            keep = partial(mx.where, mx.isfinite(loss) & mx.isfinite(norm))
            model.update(tree_map(keep, model.parameters(), old_params))
            optimizer.state.update(tree_map(keep, optimizer.state, old_state))
        if self.scaler is not None:
            self.scaler.update(mx.isfinite(norm))
        if self.ema is not None:
            decay = ema_decay_at(self.cfg.ema_decay, optimizer.step)
            self.ema.update(tree_map(lambda e, p: decay * e + (1 - decay) * p, self.ema, model.parameters()))
        return loss, norm

    def _per_stream(self, loss: Callable[..., mx.array], *batch: mx.array) -> list[mx.array]:
        """``loss(model, *slice)`` on equal slices of the batch, one per stream, in parallel (the whole batch when
        there are no streams), in the compute dtype."""
        with weights_cast(self.model, self.dtype):
            if self.streams is None:
                return [loss(self.model, *batch)]
            parts = []
            for stream, *part in zip(self.streams, *(mx.split(a, len(self.streams)) for a in batch), strict=True):
                with mx.stream(stream):
                    parts.append(loss(self.model, *part))
            return parts

    def _mean_loss(self, x: mx.array, y: mx.array) -> mx.array:
        """The loss as the mean over the streams' slices, averaged over the ranks."""
        parts = self._per_stream(loss_fn, x, y)
        loss = sum(parts) / len(parts)
        return mx.distributed.all_sum(loss) / self.world_size if self.world_size > 1 else loss

    def _loss_sum(self, x: mx.array, y: mx.array, weights: mx.array) -> mx.array:
        """The weighted loss sum over the streams' slices (this rank's)."""
        return sum(self._per_stream(weighted_loss_sum, x, y, weights))

    def __call__(self, x: np.ndarray, y: np.ndarray, iteration: int) -> tuple[mx.array, mx.array]:
        slices = self.cfg.gradient_accumulation_steps * len(self._gradients)
        parts = []
        for i, (x_part, y_part) in enumerate(zip(np.split(x, slices), np.split(y, slices), strict=True)):
            # nn.Dropout draws from MLX's global generator, which the compiled function reads as an input
            mx.random.seed(dropout_seed(self.cfg.seed, iteration, i))
            parts.append(self._gradients[i % len(self._gradients)](mx.array(x_part), mx.array(y_part)))
            if self.cfg.gradient_accumulation_steps > 1 and (i + 1) % len(self._gradients) == 0:
                mx.eval(parts)  # one micro-batch's activations in memory at a time
        loss, norm = self._update(parts)
        mx.eval(loss, norm, self.model.parameters(), self.optimizer.state, self.ema or {},
                self.scaler.state if self.scaler is not None else {})
        return loss, norm

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return self._eval_loss(mx.array(x), mx.array(y)).item()

    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
        return self._eval_loss_sum(mx.array(x), mx.array(y), mx.array(weights)).item()
