"""Muon (Keller Jordan's MomentUm Orthogonalized by Newton-Schulz) for the blocks' 2-D weight matrices, with AdamW
for everything else: ``--optimizer muon``.

The update is MLX's ``mlx.optimizers.Muon`` (Nesterov momentum, 5 Newton-Schulz steps, the update scaled by
``max(1, rows / cols) ** 0.5`` as in Keller's Muon), with two changes: the weight decay is decoupled
(``p <- p * (1 - lr * wd)`` before the update, as AdamW and Keller's Muon do; MLX adds ``wd * p`` to the gradient),
and the momentum is an array that may follow a schedule (the warm-up), computed in the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_merge, tree_unflatten

from ..config import TrainConfig
from .optim import AdamW, PerParameterStreams

MOMENTUM_WARMUP_START = 0.85  # modded-nanogpt's momentum at step 0 of the warm-up


def is_muon_parameter(name: str, parameter: mx.array) -> bool:
    """Whether Muon updates this parameter: a 2-D matrix inside the blocks (``h.``); embeddings, the head, gains,
    biases and scalars go to AdamW."""
    return name.startswith("h.") and parameter.ndim == 2


def momentum_schedule(cfg: TrainConfig) -> float | Callable[[mx.array], mx.array]:
    """Muon's momentum at an optimizer step: ``muon_momentum``, or over the first ``momentum_warmup_iters`` steps a
    linear rise from 0.85 to it (modded-nanogpt's warm-up)."""
    if cfg.momentum_warmup_iters == 0:
        return cfg.muon_momentum

    def momentum(step: mx.array) -> mx.array:
        frac = mx.minimum(step.astype(mx.float32) / cfg.momentum_warmup_iters, 1.0)
        return (1 - frac) * MOMENTUM_WARMUP_START + frac * cfg.muon_momentum

    return momentum


class Muon(PerParameterStreams, optim.Muon):
    """MLX's Muon with decoupled weight decay and a momentum that may be scheduled (``state["momentum"]``), each
    parameter's update on its stream (``PerParameterStreams``). For 2-D parameters only."""

    def __init__(self, learning_rate: Any, momentum: float | Callable[[mx.array], mx.array],
                 weight_decay: float) -> None:
        super().__init__(learning_rate, weight_decay=0.0, nesterov=True, ns_steps=5)
        self._maybe_schedule("momentum", momentum)
        self.decoupled_weight_decay = weight_decay

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        with self.on_its_stream(parameter):
            lr = self.learning_rate.astype(gradient.dtype)
            momentum = self.state["momentum"].astype(gradient.dtype)
            if self.decoupled_weight_decay != 0:
                parameter = parameter * (1 - lr * self.decoupled_weight_decay)
            v = momentum * state["v"] + (1 - momentum) * gradient
            state["v"] = v
            update = self._zeropower_via_newtonschulz5(gradient * (1 - momentum) + v * momentum, self.ns_steps)
            lr = lr * max(1, update.shape[-2] / update.shape[-1]) ** 0.5
            return parameter - lr * update


class MuonWithAdamW(optim.Optimizer):
    """Muon for the parameters ``is_muon_parameter`` picks, AdamW for the rest, as one optimizer whose state is
    ``{"muon": ..., "adamw": ...}`` (each part's own step counter, learning rate and buffers), so that the compiled
    step and the checkpoint see all of it. ``step`` and ``learning_rate`` are AdamW's."""

    def __init__(self, muon: Muon, adamw: AdamW) -> None:
        super().__init__()
        self.parts: dict[str, PerParameterStreams] = {"muon": muon, "adamw": adamw}
        self._state = {name: part.state for name, part in self.parts.items()}
        self.parameter_streams: dict | None = None

    def split(self, tree: dict) -> dict[str, dict]:
        """``tree`` (parameters or gradients) as {"muon": its Muon part, "adamw": the rest}."""
        parts: dict[str, list] = {"muon": [], "adamw": []}
        for name, value in tree_flatten(tree):
            parts["muon" if is_muon_parameter(name, value) else "adamw"].append((name, value))
        return {name: tree_unflatten(items) if items else {} for name, items in parts.items()}

    def _part(self, name: str) -> Any:
        """The part ``name``, reading and writing its state in this optimizer's tree (which a restore or a skipped
        non-finite step may have replaced)."""
        part = self.parts[name]
        if part.state is not self._state[name]:
            part.state = self._state[name]
        return part

    def init(self, parameters: dict) -> None:
        for name, tree in self.split(parameters).items():
            self._part(name).init(tree)
        self._initialized = True

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        updated: dict = {}
        for name, grads in self.split(gradients).items():
            part = self._part(name)
            part.parameter_streams = self.parameter_streams
            updated = tree_merge(updated, part.apply_gradients(grads, parameters))
        return updated

    @property
    def step(self) -> mx.array:
        return self._state["adamw"]["step"]

    @property
    def learning_rate(self) -> mx.array:
        return self._state["adamw"]["learning_rate"]
