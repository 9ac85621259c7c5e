"""Dynamic loss scaling for float16 training, as ``torch.amp.GradScaler`` does it.

float16 has a narrow range: small gradients underflow to zero. The loss is multiplied by a scale before the backward
and the gradients divided by it after. A step whose gradients are not finite (the scaled backward overflowed) is
skipped, weights and optimizer state untouched, and the scale halves; after ``growth_interval`` good steps in a row
it doubles. The scale never goes below ``MIN_SCALE``: an overflow there is not the scale's doing, and the training
loop treats it as any other non-finite step.

The state lives in MLX arrays that the compiled step reads and writes; a checkpoint holds it (``to_dict``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 2000
MIN_SCALE = 1.0


class LossScaler:
    """The scale and the count of good steps since it last changed, as arrays in ``state``."""

    def __init__(self, init_scale: float = INIT_SCALE, growth_interval: int = GROWTH_INTERVAL) -> None:
        self.growth_interval = growth_interval
        self.state = {"scale": mx.array(init_scale, dtype=mx.float32), "good_steps": mx.array(0, dtype=mx.int32)}

    @property
    def scale(self) -> float:
        return self.state["scale"].item()

    def update(self, finite: mx.array) -> None:
        """After a step (MLX ops: runs inside the compiled step): ``finite`` says whether its gradients were."""
        scale = self.state["scale"]
        good = mx.where(finite, self.state["good_steps"] + 1, 0)
        grow = good >= self.growth_interval
        self.state["scale"] = mx.where(finite, mx.where(grow, scale * 2, scale), mx.maximum(scale * 0.5, MIN_SCALE))
        self.state["good_steps"] = mx.where(grow, 0, good).astype(mx.int32)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.state["good_steps"].item()}

    def load(self, values: dict[str, Any]) -> None:
        """Restore ``to_dict``'s values (a checkpoint's, checked when it was read)."""
        self.state["scale"] = mx.array(values["scale"], dtype=mx.float32)
        self.state["good_steps"] = mx.array(values["good_steps"], dtype=mx.int32)

