"""The training graph's memory (mlx_gpt/lean_backward.py): in training mode the model's backward keeps less alive at
once, with the same gradients, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import lean_backward
from mlx_gpt.config import GPTConfig
from mlx_gpt.model import GPT


def _grads(model: GPT, x: mx.array, y: mx.array, training: bool) -> tuple[float, list]:
    """(MLX's peak memory in MiB over one compiled forward + backward, the loss and gradients) in the given mode."""
    model.train(training)

    def loss(model: GPT, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    grad_fn = nn.value_and_grad(model, loss)
    step = mx.compile(lambda x, y: grad_fn(model, x, y), inputs=[model.state], outputs=[model.state])
    # One operation in flight at a time: else MLX allocates the outputs of up to ~10 operations ahead, as fast
    # as its thread happens to run, and the peak would depend on timing.
    limit = mx.set_memory_limit(1)
    try:
        mx.eval(step(x, y))  # traced and compiled
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        out = step(x, y)
        mx.eval(out)
        return (mx.get_peak_memory() - before) / 2**20, [out[0], *(g for _, g in tree_flatten(out[1]))]
    finally:
        mx.set_memory_limit(limit)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "relu2"])
def test_training_mode_keeps_less_with_the_same_gradients(activation: str) -> None:
    """Without dropout, training and eval mode compute the same function; training mode takes the lean backward
    (before it, both kept GELU's intermediates, [B, T, 4C] per layer)."""
    cfg = GPTConfig(n_layer=6, n_head=2, n_embd=64, block_size=64, vocab_size=65, dropout=0.0, activation=activation)
    mx.random.seed(0)
    model = GPT(cfg)
    x = mx.random.randint(0, cfg.vocab_size, (16, cfg.block_size))
    y = mx.random.randint(0, cfg.vocab_size, (16, cfg.block_size))
    mx.eval(model.parameters(), x, y)
    plain_peak, plain = _grads(model, x, y, training=False)
    lean_peak, lean = _grads(model, x, y, training=True)
    assert all(mx.array_equal(a, b).item() for a, b in zip(plain, lean, strict=True))
    # GELU keeps the most intermediates (measured lean : plain peaks: GELU 0.70-0.74, relu2 0.85, ReLU 0.95-1.0)
    if activation.startswith("gelu"):
        assert lean_peak < 0.85 * plain_peak, (lean_peak, plain_peak)


def test_linear_computes_weight_gradients_early() -> None:
    """A chain of linear layers: MLX computed each weight gradient only at the end (nothing but the output needs
    it), keeping every layer's input and output gradient until then; the lean linear frees them layer by layer."""
    mx.random.seed(2)
    weights = [mx.random.normal((256, 64)) * 0.1 if i % 2 == 0 else mx.random.normal((64, 256)) * 0.1
               for i in range(16)]
    x, r = mx.random.normal((512, 64)), mx.random.normal((512, 64))
    mx.eval(weights, x, r)
    peaks, grads = [], []
    for linear in (lambda h, w: h @ w.T, lambda h, w: lean_backward.linear(h, w, None)):
        def loss(weights: list, x: mx.array, linear=linear) -> mx.array:
            for w in weights:
                x = linear(x, w)
            return (x * r).sum()

        limit = mx.set_memory_limit(1)  # one operation in flight at a time (see _grads)
        try:
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            grads.append(mx.grad(loss)(weights, x))
            mx.eval(grads[-1])
            peaks.append(mx.get_peak_memory() - before)
        finally:
            mx.set_memory_limit(limit)
    assert all(mx.array_equal(a, b).item() for a, b in zip(*grads, strict=True))
    assert peaks[1] < 0.75 * peaks[0], peaks  # measured: 0.5


def test_lean_functions_give_autograds_values_and_gradients() -> None:
    mx.random.seed(1)
    x, w, b = mx.random.normal((4, 8, 16)), mx.random.normal((24, 16)), mx.random.normal((24,))
    cotangent = mx.random.normal((4, 8, 24))
    for bias in ([b], []):
        plain = mx.vjp(lambda *a: mx.addmm(a[2], a[0], a[1].T) if len(a) > 2 else a[0] @ a[1].T,
                       [x, w, *bias], [cotangent])
        lean = mx.vjp(lambda *a: lean_backward.linear(a[0], a[1], a[2] if len(a) > 2 else None),
                      [x, w, *bias], [cotangent])
        assert all(mx.array_equal(p, q).item() for p, q in zip([*plain[0], *plain[1]], [*lean[0], *lean[1]],
                                                                strict=True))
    for fn in (nn.gelu, nn.gelu_approx):
        h = mx.random.normal((4, 8, 64))
        (out,), (grad,) = mx.vjp(lean_backward.recomputed(fn), [h], [h * 0.5])
        (plain_out,), (plain_grad,) = mx.vjp(fn, [h], [h * 0.5])
        assert mx.array_equal(out, plain_out).item() and mx.array_equal(grad, plain_grad).item()
