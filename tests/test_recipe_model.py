"""The recipe's architecture settings (docs/recipe.md): each one's forward pass, against a reference where one exists,
the KV cache equal to no cache with every setting, rotary sliding past block_size, and checkpoints that carry them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gpt.cache import make_cache
from mlx_gpt.checkpoint import Checkpoint, load_model
from mlx_gpt.config import GPTConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT, rotate
from mlx_gpt.sampling import generate_step
from mlx_gpt.tokenizer import CharTokenizer

BASE = GPTConfig(vocab_size=19, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.0)
SETTINGS = {
    "rope": {"position_encoding": "rope"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"activation": "relu2"},
    "zero_init_proj": {"zero_init_proj": True},
    "untied": {"tie_weights": False},
    "softcap": {"logit_softcap": 2.0},
    "value_residual": {"value_residual": True},
    "embed_shortcut": {"embed_shortcut": True},
}
ALL = {k: v for setting in SETTINGS.values() for k, v in setting.items()}
CASES = {**SETTINGS, "all": ALL}


def model_with(settings: dict, seed: int = 0, perturb: bool = True) -> GPT:
    """A model with ``settings``; ``perturb`` moves every weight off its init (zero projections, mixing weights at
    their start values) so that every setting's code path changes the output."""
    mx.random.seed(seed)
    model = GPT(dataclasses.replace(BASE, **settings))
    if perturb:
        model.update(nn.utils.tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.parameters()))
    return model


def tokens(shape: tuple[int, int], seed: int = 1) -> mx.array:
    return mx.random.randint(0, BASE.vocab_size, shape, key=mx.random.key(seed))


@pytest.mark.parametrize("name", CASES)
def test_each_setting_changes_the_forward_pass_and_stays_causal(name: str) -> None:
    idx = tokens((2, 16))
    plain, changed = model_with({}), model_with(CASES[name])
    logits = changed(idx)
    assert logits.shape == (2, 16, BASE.vocab_size) and bool(mx.all(mx.isfinite(logits)))
    if name != "untied":  # the same draws, except an untied head adds a matrix
        assert not np.allclose(np.array(logits), np.array(plain(idx)), atol=1e-4)
    later = np.array(idx)
    later[:, 8:] = (later[:, 8:] + 3) % BASE.vocab_size
    np.testing.assert_allclose(np.array(changed(mx.array(later)))[:, :8], np.array(logits)[:, :8], atol=1e-5)


def test_rotary_positions_equal_nn_rope() -> None:
    x = mx.random.normal((2, 7, 4, 8), key=mx.random.key(3))  # [B, T, H, D]
    reference = nn.RoPE(8, base=500.0)(x.swapaxes(1, 2), offset=5).swapaxes(1, 2)
    np.testing.assert_allclose(np.array(rotate(x, 5, 500.0)), np.array(reference), atol=1e-6)


def test_rotary_attention_depends_only_on_relative_positions() -> None:
    q, k = (mx.random.normal((1, 1, 2, 8), key=mx.random.key(s)) for s in (4, 5))
    scores = [float((rotate(q, offset + 3, 1e4) * rotate(k, offset, 1e4)).sum()) for offset in (0, 11, 200)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-4) and scores[0] == pytest.approx(scores[2], abs=1e-4)


def test_rope_model_has_no_position_embedding() -> None:
    assert "wpe" in model_with({}) and "wpe" not in model_with(SETTINGS["rope"])


def test_qk_norm_gives_unit_rms_queries_and_keys() -> None:
    model = model_with(SETTINGS["qk_norm"])
    seen = {}
    original = mx.fast.rms_norm

    def spy(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
        seen.setdefault("out", []).append(original(x, weight, eps))
        return seen["out"][-1]

    mx.fast.rms_norm = spy
    try:
        model(tokens((1, 16)))
    finally:
        mx.fast.rms_norm = original
    assert len(seen["out"]) == BASE.n_layer  # queries and keys together, once per layer
    for out in seen["out"]:
        np.testing.assert_allclose(np.array(mx.sqrt(mx.mean(out * out, axis=-1))), 1.0, atol=1e-3)


def test_relu2_is_relu_squared() -> None:
    x = mx.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    model = model_with(SETTINGS["relu2"])
    np.testing.assert_allclose(np.array(model.h[0].mlp.activation(x)), [0, 0, 0, 0.25, 9])


def test_zero_init_proj_starts_every_block_as_the_identity() -> None:
    model = model_with(SETTINGS["zero_init_proj"], perturb=False)
    for block in model.h:
        assert not np.any(np.array(block.attn.c_proj.weight)) and not np.any(np.array(block.mlp.c_proj.weight))
    idx = tokens((1, 16))
    x = model.wte(idx) + model.wpe(mx.arange(16))
    np.testing.assert_allclose(np.array(model(idx)), np.array(model.wte.as_linear(model.ln_f(x))), atol=1e-5)


def test_logit_softcap_bounds_the_logits_and_is_tanh() -> None:
    capped, plain = model_with(SETTINGS["softcap"]), model_with({})
    idx = tokens((2, 16))
    logits = np.array(capped(idx))
    assert np.abs(logits).max() < 2.0
    np.testing.assert_allclose(logits, 2.0 * np.tanh(np.array(plain(idx)) / 2.0), atol=1e-5)


def test_shortcut_weights_start_as_the_plain_model_and_are_learned_parameters() -> None:
    # At their start values the mixing weights change nothing: same seed, same logits as the plain model.
    idx = tokens((2, 16))
    plain = np.array(model_with({}, perturb=False)(idx))
    for name in ("value_residual", "embed_shortcut"):
        model = model_with(SETTINGS[name], perturb=False)
        names = {k for k, _ in nn.utils.tree_flatten(model.trainable_parameters())}
        expected = "h.1.attn.value_lambda" if name == "value_residual" else "h.0.x0_lambdas"
        assert expected in names and "h.0.attn.value_lambda" not in names
        if name == "embed_shortcut":
            np.testing.assert_allclose(np.array(model(idx)), plain, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_kv_cache_equals_no_cache(name: str) -> None:
    model = model_with(CASES[name])
    idx = tokens((2, 16))
    full = np.array(model(idx))
    cache = make_cache(model)
    steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t:t + 1], mask=None, cache=cache) for t in range(5, 16)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), full, atol=1e-4)


def test_rotary_cache_slides_one_token_at_a_time_past_block_size() -> None:
    # One layer: a token's key and value depend on that token alone, so sliding equals recomputing the last
    # block_size tokens from scratch (relative positions are all that count).
    mx.random.seed(6)
    model = GPT(dataclasses.replace(BASE, n_layer=1, position_encoding="rope"))
    sequence = tokens((1, 40))
    cache = make_cache(model)
    model(sequence[:, :16], cache=cache)
    for t in range(16, 40):
        slid = model(sequence[:, t:t + 1], mask=None, cache=cache)[:, -1]
        recomputed = model(sequence[:, t - 15:t + 1])[:, -1]
        np.testing.assert_allclose(np.array(slid), np.array(recomputed), atol=1e-4)
    assert cache[0].offset == 40 and cache[0].keys.shape[2] == BASE.block_size


def test_rotary_sampling_never_reprefills(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_with(SETTINGS["rope"])
    calls = []
    original = GPT.__call__
    monkeypatch.setattr(GPT, "__call__", lambda self, idx, *a, **k: calls.append(idx.shape[1]) or original(
        self, idx, *a, **k))
    out = [t.item() for t, _ in generate_step(model, [1, 2, 3], max_new_tokens=60)]
    assert len(out) == 60 and calls[0] == 3 and set(calls[1:]) == {1}


def test_learned_positions_still_refuse_a_cache_past_block_size() -> None:
    model = model_with({})
    cache = make_cache(model)
    model(tokens((1, 16)), cache=cache)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(tokens((1, 1)), mask=None, cache=cache)


def test_checkpoint_carries_the_settings_and_sampling_honours_them(tmp_path: Path) -> None:
    model = model_with(ALL)
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(BASE.vocab_size)])
    ckpt = Checkpoint(config=model.config, tokenizer=tokenizer,
                      model={k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())},
                      optimizer={}, ema={}, train={}, iter=0, best_val_loss=None)
    path = tmp_path / "ckpt.npz"
    ckpt.save(path)
    loaded, _, _ = load_model(path)
    assert loaded.config == model.config
    idx = tokens((1, 16))
    np.testing.assert_allclose(np.array(loaded(idx)), np.array(model(idx)), atol=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"position_encoding": "alibi"}, "position_encoding must be one of learned, rope"),
    ({"position_encoding": "rope", "n_embd": 12, "n_head": 4}, "even head size"),
    ({"logit_softcap": -1.0}, "logit_softcap must be a finite number >= 0"),
    ({"logit_softcap": math.inf}, "logit_softcap must be a finite number >= 0"),
    ({"rope_base": 1.0}, "rope_base must be a finite number > 1"),
    ({"activation": "swish"}, "relu2"),
])
def test_bad_settings_are_one_line_errors(settings: dict, message: str) -> None:
    with pytest.raises(MlxGptError, match=message):
        dataclasses.replace(BASE, **settings)
