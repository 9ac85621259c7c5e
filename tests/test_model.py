"""The model: shapes, causality, attention against a naive reference, init, config validation."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt.config import GPTConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT

CFG = GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def test_logits_shape_and_param_count() -> None:
    mx.random.seed(0)
    model = GPT(CFG)
    logits = model(mx.zeros((3, 16), dtype=mx.int32))
    assert logits.shape == (3, 16, 17)
    # nanoGPT's count for this shape (tied head, position embeddings excluded).
    per_block = 2 * 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    assert model.num_params() == 17 * 32 + 2 * per_block + 2 * 32


def test_baby_config_has_nanogpt_parameter_count() -> None:
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
    assert round(model.num_params() / 1e6, 2) == 0.80


def test_changing_a_later_token_never_changes_earlier_logits() -> None:
    mx.random.seed(1)
    model = GPT(CFG)
    idx = mx.random.randint(0, 17, (2, 16))
    base = np.array(model(idx))
    for t in range(15):
        changed = np.array(idx)
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 5) % 17
        out = np.array(model(mx.array(changed)))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
        assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


def naive_attention(q: mx.array, k: mx.array, v: mx.array, mask: np.ndarray) -> mx.array:
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(q.shape[-1])
    scores = mx.where(mx.array(mask), scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


def test_fused_causal_attention_equals_naive_masked_softmax() -> None:
    mx.random.seed(2)
    q, k, v = (mx.random.normal((2, 4, 16, 8)) for _ in range(3))
    causal = np.tril(np.ones((16, 16), dtype=bool))
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(8), mask="causal")
    np.testing.assert_allclose(np.array(fused), np.array(naive_attention(q, k, v, causal)), atol=1e-5)


def test_explicit_mask_matches_causal_path() -> None:
    mx.random.seed(3)
    model = GPT(CFG)
    idx = mx.random.randint(0, 17, (2, 16))
    causal = mx.array(np.tril(np.ones((16, 16), dtype=bool)))
    np.testing.assert_allclose(np.array(model(idx, mask=causal)), np.array(model(idx)), atol=1e-5)
    additive = mx.where(causal, 0.0, -mx.inf)
    np.testing.assert_allclose(np.array(model(idx, mask=additive)), np.array(model(idx)), atol=1e-5)


def test_nanogpt_init_statistics() -> None:
    mx.random.seed(4)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True))
    block = model.h[0]
    assert abs(np.std(np.array(block.mlp.c_fc.weight)) - 0.02) < 0.001
    assert abs(np.std(np.array(block.mlp.c_proj.weight)) - 0.02 / math.sqrt(8)) < 0.0005
    assert np.all(np.array(block.ln_1.weight) == 1) and np.all(np.array(block.attn.c_attn.bias) == 0)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_activations_and_head_options_run(activation: str) -> None:
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, activation=activation,
                    tie_weights=False, lm_head_bias=True)
    logits = GPT(cfg)(mx.zeros((1, 8), dtype=mx.int32))
    assert logits.shape == (1, 8, 11) and np.all(np.isfinite(np.array(logits)))


def test_sequence_longer_than_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        GPT(CFG)(mx.zeros((1, 17), dtype=mx.int32))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be positive"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "swish"}, "activation"),
        ({"n_head": "4"}, "must be int"),
    ],
)
def test_config_validation(change: dict, message: str) -> None:
    with pytest.raises(MlxGptError, match=message):
        GPTConfig(**{**CFG.to_dict(), **change})
