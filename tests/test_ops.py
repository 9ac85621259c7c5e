"""The CPU attention (mlx_gpt/ops.py) agrees with MLX's fused kernel to <= 1e-5 relative, values and gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import ops
from mlx_gpt.config import GPTConfig
from mlx_gpt.model import GPT

RTOL = 1e-5
# Where a value or gradient crosses zero, relative error is meaningless: float32 rounding of O(1) terms
# leaves ~1e-7 absolute.
ATOL = 1e-6


@pytest.fixture(autouse=True)
def cpu_fast_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    mx.set_default_device(mx.cpu)
    monkeypatch.setattr(ops, "FAST_CPU_OPS", True)


def test_the_cpu_attention_is_taken_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ops.on_cpu()
    monkeypatch.setattr(ops, "FAST_CPU_OPS", False)
    assert not ops.on_cpu()


def test_query_blocks_cover_the_queries_in_blocks_of_about_query_block() -> None:
    assert ops.query_blocks(24, causal=True) == [(0, 24)]
    assert ops.query_blocks(256, causal=True) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert ops.query_blocks(150, causal=True) == [(0, 75), (75, 150)]
    assert ops.query_blocks(256, causal=False) == [(0, 256)]


# (queries, keys): one block of queries, several (of uneven length), and queries that are the last of the keys
# (a prefill after a cache)
SHAPES = {"causal": (24, 24), "causal_blocks": (150, 150), "causal_shorter_queries": (5, 24),
          "causal_shorter_queries_blocks": (130, 200), "bool": (24, 24), "additive": (24, 24), "none": (24, 24)}


@pytest.mark.parametrize("case", list(SHAPES))
def test_attention_matches_the_fused_kernel_values_and_gradients(case: str) -> None:
    t_q, t_k = SHAPES[case]
    keys = [mx.random.key(i) for i in range(4)]
    q = mx.random.normal((2, 3, t_q, 16), key=keys[0])
    k, v = (mx.random.normal((2, 3, t_k, 16), key=key) for key in keys[1:3])
    mask = {"bool": mx.random.uniform(shape=(t_q, t_k), key=keys[3]) > 0.3,
            "additive": mx.random.normal((t_q, t_k), key=keys[3]), "none": None}.get(case, "causal")
    if case == "bool":
        mask[:, 0] = True  # every query sees at least one key
    cotangent = mx.random.normal(q.shape, key=mx.random.key(9))

    def run(attention):
        return mx.vjp(lambda q, k, v: attention(q, k, v, scale=0.25, mask=mask), [q, k, v], [cotangent])

    (got,), got_grads = run(ops.scaled_dot_product_attention)
    (want,), want_grads = run(mx.fast.scaled_dot_product_attention)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=RTOL, atol=ATOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=RTOL, atol=ATOL)


def test_model_loss_and_gradients_with_fast_ops_match_plain_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    mx.random.seed(0)
    model = GPT(GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    x = mx.random.randint(0, 17, (3, 16), key=mx.random.key(1))
    y = mx.random.randint(0, 17, (3, 16), key=mx.random.key(2))

    def loss(model: GPT) -> mx.array:
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    fast_loss, fast_grads = nn.value_and_grad(model, loss)(model)
    monkeypatch.setattr(ops, "FAST_CPU_OPS", False)
    plain_loss, plain_grads = nn.value_and_grad(model, loss)(model)
    np.testing.assert_allclose(fast_loss.item(), plain_loss.item(), rtol=RTOL)
    flat_fast, flat_plain = dict(tree_flatten(fast_grads)), dict(tree_flatten(plain_grads))
    for name, g in flat_fast.items():
        scale = float(mx.abs(flat_plain[name]).max())
        np.testing.assert_allclose(np.array(g), np.array(flat_plain[name]), rtol=RTOL, atol=1e-5 * scale,
                                   err_msg=name)


def test_half_precision_attention_keeps_its_dtype() -> None:
    q = mx.random.normal((1, 2, 130, 16), key=mx.random.key(3)).astype(mx.float16)
    got = ops.scaled_dot_product_attention(q, q, q, scale=0.25)
    want = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.25, mask="causal")
    assert got.dtype == mx.float16
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=1e-2)
