"""The optimizer as nanoGPT sets it up: AdamW with PyTorch's semantics, its learning-rate schedule (or WSD), gradient
clipping, and the EMA's decay; ``make_optimizer`` builds AdamW or Muon with AdamW (``muon``) from the settings."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..config import TrainConfig


def on_stream(stream: mx.Stream | None) -> contextlib.AbstractContextManager:
    """``with`` this: ops on ``stream``, or where they would go anyway (MLX's default stream) for None."""
    return mx.stream(stream) if stream is not None else contextlib.nullcontext()


class PerParameterStreams:
    """Mixin for an optimizer: ``parameter_streams`` (a tree like the parameters, see ``step.spread_over_streams``)
    runs each parameter's update on the stream given for it, so that a step's update is shared between the CPU
    streams too. ``apply_single`` runs its ops ``with self.on_its_stream(parameter)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parameter_streams: dict | None = None
        self._stream_of: dict[int, mx.Stream | None] = {}

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # Looked up by the parameter array itself: independent of the order in which MLX visits the tree.
        flat_streams = dict(tree_flatten(self.parameter_streams)) if self.parameter_streams is not None else {}
        self._stream_of = {id(p): flat_streams.get(name) for name, p in tree_flatten(parameters)}
        try:
            return super().apply_gradients(gradients, parameters)
        finally:
            self._stream_of = {}

    def on_its_stream(self, parameter: mx.array) -> contextlib.AbstractContextManager:
        return on_stream(self._stream_of.get(id(parameter)))


class AdamW(PerParameterStreams, optim.AdamW):
    """AdamW as PyTorch (and nanoGPT) use it: bias correction on, weight decay only on tensors with ndim >= 2;
    each parameter's update on its stream (``PerParameterStreams``)."""

    def __init__(self, learning_rate: Any, betas: tuple[float, float], weight_decay: float) -> None:
        super().__init__(learning_rate, betas=list(betas), weight_decay=weight_decay, bias_correction=True)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        with self.on_its_stream(parameter):
            if parameter.ndim < 2:  # biases and LayerNorm gains are not decayed
                return optim.Adam.apply_single(self, gradient, parameter, state)
            return super().apply_single(gradient, parameter, state)


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """The run's optimizer: AdamW (nanoGPT's), or with ``optimizer="muon"`` Muon for the blocks' 2-D weights and
    AdamW for the rest, Muon's rate following the same schedule scaled to ``muon_learning_rate``."""
    schedule = lr_schedule(cfg)
    adamw = AdamW(schedule, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return adamw
    from .muon import Muon, MuonWithAdamW, momentum_schedule  # here: muon imports this module

    scale = cfg.muon_learning_rate / cfg.learning_rate
    muon = Muon(lambda step: schedule(step) * scale, momentum_schedule(cfg), cfg.weight_decay)
    return MuonWithAdamW(muon, adamw)


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """The learning rate at an optimizer step, as MLX ops (so it lives inside the compiled step): nanoGPT's get_lr
    (linear warmup, cosine to min_lr), or with ``lr_schedule="wsd"`` the same warmup, then ``learning_rate`` until
    the last ``wsd_decay_fraction`` of ``lr_decay_iters``, then linear to min_lr."""
    if not cfg.decay_lr:
        return lambda step: mx.array(cfg.learning_rate, dtype=mx.float32)
    warmup, decay_end = cfg.warmup_iters, max(cfg.lr_decay_iters, cfg.warmup_iters + 1)
    decay_start = max(warmup, decay_end * (1.0 - cfg.wsd_decay_fraction))  # < decay_end: the fraction is > 0

    def cosine(it: mx.array) -> mx.array:
        progress = mx.clip((it - warmup) / (decay_end - warmup), 0.0, 1.0)
        return cfg.min_lr + 0.5 * (1.0 + mx.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)

    def wsd(it: mx.array) -> mx.array:
        progress = mx.clip((it - decay_start) / (decay_end - decay_start), 0.0, 1.0)
        return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)

    after_warmup = wsd if cfg.lr_schedule == "wsd" else cosine

    def lr(step: mx.array) -> mx.array:
        it = step.astype(mx.float32)
        warm = cfg.learning_rate * (it + 1) / (warmup + 1)
        return mx.where(it < warmup, warm, after_warmup(it))

    return lr


def clip_grad_norm(grads: dict, max_norm: float, grad_streams: Any) -> tuple[dict, mx.array]:
    """(``grads`` scaled to a global norm of at most ``max_norm`` (unchanged if ``max_norm`` <= 0), the norm
    before); ``grad_streams`` (a tree like ``grads``) says on which stream each gradient's share runs."""

    def square_sum(stream: mx.Stream | None, g: mx.array) -> mx.array:
        with on_stream(stream):
            return mx.sum(mx.square(g))

    def scaled(stream: mx.Stream | None, g: mx.array) -> mx.array:
        with on_stream(stream):
            return g * scale

    squares = tree_map(square_sum, grad_streams, grads)
    norm = mx.sqrt(sum(square for _, square in tree_flatten(squares)))
    if max_norm <= 0:
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)  # as optim.clip_grad_norm
    return tree_map(scaled, grad_streams, grads), norm


def ema_decay_at(decay: float, step: mx.array) -> mx.array:
    """The EMA decay at an optimizer step, ramped up early ((1 + t) / (10 + t)) so the average is not
    dominated by the random init in short runs."""
    t = step.astype(mx.float32)
    return mx.minimum(decay, (1.0 + t) / (10.0 + t))
