"""Sampling: the KV cache against full recomputation, the samplers, batching, and sample.py end to end."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_script

from mlx_gpt.cache import KVCache, initial_window_start, keep_size, make_cache, reset_cache, window_start
from mlx_gpt.checkpoint import load_model
from mlx_gpt.config import GPTConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT
from mlx_gpt.sampling import (
    History,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    generate,
    generate_step,
    greedy,
    make_logits_processors,
    make_sampler,
)

PROMPT = "ROMEO:\nWhat say you, my lord?\n"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path):
    """A trained tiny model (2 layers, 32 wide, block 32) and its tokenizer."""
    model, tokenizer, _ = load_model(tiny_checkpoint)
    assert model.config.block_size == 32
    return model, tokenizer


def tokens_of(model, prompt_ids, n, **kwargs) -> np.ndarray:
    """[B, n] token ids from generate_step."""
    return np.stack([np.array(t) for t, _ in generate_step(model, prompt_ids, n, **kwargs)], axis=1)


def greedy_recomputed(model, prompt_ids, n: int) -> list[int]:
    """Greedy tokens without a cache: a full forward pass over the window cache.py's rule gives, every step."""
    block = model.config.block_size
    seq = [int(i) for i in prompt_ids]
    start = initial_window_start(len(seq), block)
    for _ in range(n):
        logits = model(mx.array(seq[start:])[None])[0, -1]
        seq.append(int(mx.argmax(logits).item()))
        start = window_start(start, len(seq), block)
    return seq[len(prompt_ids):]


# ----------------------------------------------------------------------------- the attention mask and the cache


def test_sdpa_causal_mask_aligns_bottom_right_when_queries_are_fewer_than_keys():
    """A chunk of queries continuing a cached sequence attends to everything before it (bottom-right alignment)."""
    mx.random.seed(0)
    q = mx.random.normal((1, 2, 3, 8))
    k = mx.random.normal((1, 2, 7, 8))
    v = mx.random.normal((1, 2, 7, 8))
    scale = 1 / math.sqrt(8)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    allowed = mx.arange(7)[None] <= mx.arange(3)[:, None] + (7 - 3)
    naive = mx.softmax(mx.where(allowed, scores, -mx.inf), axis=-1) @ v
    assert mx.abs(fused - naive).max().item() < 1e-5


def test_kv_cache_preallocates_in_chunks_and_writes_by_slice():
    cache = KVCache(step=4)
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((2, 3, t, 5)).astype(np.float32) for t in (3, 1, 1, 6, 1)]
    seen = []
    capacities = []
    for c in chunks:
        k, v = cache.update_and_fetch(mx.array(c), mx.array(-c))
        seen.append(c)
        capacities.append(cache.keys.shape[2])
        expected = np.concatenate(seen, axis=2)
        np.testing.assert_array_equal(np.array(k), expected)
        np.testing.assert_array_equal(np.array(v), -expected)
        assert cache.offset == expected.shape[2]
    assert capacities == [4, 4, 8, 12, 12]  # grows a chunk at a time, not a token at a time
    cache.reset()
    assert cache.offset == 0
    k, _ = cache.update_and_fetch(mx.array(chunks[0]), mx.array(chunks[0]))
    np.testing.assert_array_equal(np.array(k), chunks[0])


def test_cache_never_grows_past_block_size():
    cfg = GPTConfig(vocab_size=11, block_size=20, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = GPT(cfg)
    cache = make_cache(model)
    assert len(cache) == 2
    model(mx.zeros((1, 19), dtype=mx.int32), cache=cache)
    model(mx.zeros((1, 1), dtype=mx.int32), mask=None, cache=cache)
    assert all(c.offset == 20 and c.keys.shape[2] == 20 for c in cache)
    with pytest.raises(ValueError, match="block_size"):
        model(mx.zeros((1, 1), dtype=mx.int32), mask=None, cache=cache)
    reset_cache(cache)
    assert all(c.offset == 0 for c in cache)


def test_window_rule():
    assert keep_size(32) == 16 and keep_size(1) == 1
    assert initial_window_start(10, 32) == 0
    assert initial_window_start(100, 32) == 68  # a long prompt: its last block_size tokens
    start, starts = 0, []
    for length in range(1, 100):
        start = window_start(start, length, 32)
        assert 0 < length - start <= 32
        starts.append(start)
    assert starts[31] == 0 and starts[32] == 33 - 16  # slides when the 33rd token arrives
    assert sorted(set(starts)) == [0, 17, 34, 51, 68]  # then a re-prefill every 32 - 16 + 1 tokens


# ----------------------------------------------------------------------------- cache == recompute


def test_cached_logits_equal_full_forward_before_the_window_slides(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("ROMEO:\n")
    n_new = model.config.block_size - len(prompt) + 1  # the last one is drawn from a full block
    steps = list(generate_step(model, prompt, n_new))
    sequence = np.concatenate([prompt, [int(t.item()) for t, _ in steps]])
    assert len(sequence) == model.config.block_size + 1
    full = model(mx.array(sequence[None, :-1]))[0]
    for i, (_, logits) in enumerate(steps):
        np.testing.assert_allclose(np.array(logits[0]), np.array(full[len(prompt) - 1 + i]), atol=1e-4, rtol=0)


def test_chunked_prefill_through_the_cache_equals_full_forward(tiny):
    """Prefill in pieces (causal mask with fewer queries than keys) gives the full-forward logits."""
    model, tokenizer = tiny
    ids = mx.array(tokenizer.encode(PROMPT[:30]))[None]
    full = model(ids)
    cache = make_cache(model)
    parts = [model(ids[:, a:b], mask="causal" if b - a > 1 else None, cache=cache)
             for a, b in ((0, 7), (7, 8), (8, 20), (20, 30))]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-4, rtol=0)


def test_greedy_with_cache_equals_greedy_recompute_well_past_block_size(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    cached = tokens_of(model, prompt, 200)
    assert cached.shape == (1, 200)
    np.testing.assert_array_equal(cached[0], greedy_recomputed(model, prompt, 200))
    # The text generator yields the same characters.
    text = "".join(chars[0] for chars in generate(model, tokenizer, PROMPT, 200))
    assert text == tokenizer.decode(cached[0])


def test_prompt_longer_than_block_size_and_long_generation(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT * 5)  # 150 characters, block 32
    assert len(prompt) > 4 * model.config.block_size
    cached = tokens_of(model, prompt, 300)
    np.testing.assert_array_equal(cached[0], greedy_recomputed(model, prompt, 300))
    # The model only sees the prompt's last block_size characters.
    np.testing.assert_array_equal(cached[:, :10], tokens_of(model, prompt[-32:], 10))


def test_history_is_bounded_however_many_tokens_are_asked_for(tiny):
    model, _ = tiny
    history = History(mx.array([1, 2, 3], dtype=mx.int32), batch=2, keep=40)
    for i in range(500):
        history.append(mx.array([i % 7, i % 5], dtype=mx.int32))
    assert history.buffer.shape == (2, 80) and history.length == 503
    np.testing.assert_array_equal(np.array(history.tokens(503 - 40))[0], [i % 7 for i in range(460, 500)])
    steps = generate_step(model, [1, 2], 10**9)  # would ask for 4 GB up front if the history held it all
    assert len([t for t, _ in zip(steps, range(5), strict=False)]) == 5


# ----------------------------------------------------------------------------- batches and seeds


def test_batched_samples_differ_and_are_reproducible(tiny):
    model, tokenizer = tiny
    sampler = make_sampler(1.0, top_k=200)

    def run(seed: int) -> list[str]:
        mx.random.seed(seed)
        texts = [""] * 4
        for chars in generate(model, tokenizer, PROMPT, 100, sampler, num_samples=4):
            texts = [t + c for t, c in zip(texts, chars, strict=True)]
        return texts

    first = run(1234)
    assert len(first) == 4 and all(len(t) == 100 for t in first)
    assert len(set(first)) == 4, "the 4 samples of a batch must differ"
    assert run(1234) == first
    assert run(4321) != first


def test_batched_greedy_rows_equal_the_single_sample(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    single = tokens_of(model, prompt, 80)
    batch = tokens_of(model, prompt, 80, num_samples=3)
    for row in batch:
        np.testing.assert_array_equal(row, single[0])


# ----------------------------------------------------------------------------- samplers

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def logits_of(probs: np.ndarray) -> mx.array:
    return mx.array(np.log(probs).astype(np.float32))[None]


def kept(logits: mx.array) -> list[int]:
    return [i for i, x in enumerate(np.array(logits[0])) if np.isfinite(x)]


def test_greedy_is_argmax_and_ignores_filters():
    logits = mx.array(np.random.default_rng(0).standard_normal((50, 20)).astype(np.float32))
    expected = np.argmax(np.array(logits), axis=-1)
    np.testing.assert_array_equal(np.array(greedy(logits)), expected)
    np.testing.assert_array_equal(np.array(make_sampler(0, top_k=3, top_p=0.5, min_p=0.3)(logits)), expected)


def test_top_k_never_emits_a_token_outside_the_k_best():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2000, 30)).astype(np.float32)
    mx.random.seed(0)
    draws = np.array(make_sampler(2.0, top_k=5)(mx.array(logits)))
    best5 = np.argsort(-logits, axis=-1)[:, :5]
    assert all(d in row for d, row in zip(draws, best5, strict=True))
    assert len(set(draws.tolist())) > 5  # different rows, different sets: the draws are not all the same
    assert kept(apply_top_k(logits_of(PROBS), 2)) == [0, 1]
    assert kept(apply_top_k(logits_of(PROBS), 100)) == list(range(6))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_of(PROBS)  # cumulative: 0.4, 0.65, 0.8, 0.9, 0.96, 1.0
    assert kept(apply_top_p(logits, 0.3)) == [0]
    assert kept(apply_top_p(logits, 0.5)) == [0, 1]
    assert kept(apply_top_p(logits, 0.7)) == [0, 1, 2]
    assert kept(apply_top_p(logits, 0.85)) == [0, 1, 2, 3]
    assert kept(apply_top_p(logits, 1.0)) == list(range(6))
    # Order of the vocabulary does not matter; rows are independent.
    shuffled = np.array([PROBS[[3, 0, 5, 1, 2, 4]], PROBS[::-1]])
    out = np.array(apply_top_p(mx.array(np.log(shuffled).astype(np.float32)), 0.7))
    assert [i for i, x in enumerate(out[0]) if np.isfinite(x)] == [1, 3, 4]
    assert [i for i, x in enumerate(out[1]) if np.isfinite(x)] == [3, 4, 5]


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    logits = logits_of(PROBS)
    assert kept(apply_min_p(logits, 0.2)) == [0, 1, 2, 3]  # >= 0.08
    assert kept(apply_min_p(logits, 0.5)) == [0, 1]  # >= 0.2
    assert kept(apply_min_p(logits, 1.0)) == [0]
    assert kept(apply_min_p(logits, 0.0)) == list(range(6))


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("settings, expected", [
    (dict(temperature=1.0), PROBS),
    (dict(temperature=0.5), PROBS ** 2),
    (dict(temperature=2.0), PROBS ** 0.5),
    (dict(temperature=1.0, top_k=3), np.r_[PROBS[:3], 0, 0, 0]),
    (dict(temperature=1.0, top_p=0.85), np.r_[PROBS[:4], 0, 0]),
    (dict(temperature=1.0, min_p=0.3), np.r_[PROBS[:3], 0, 0, 0]),
    (dict(temperature=0.5, top_k=4, top_p=0.9), np.r_[(PROBS ** 2)[:3], 0, 0, 0]),  # cum. 0.63, 0.87, 0.96
], ids=["t1", "t0.5", "t2", "top_k3", "top_p0.85", "min_p0.3", "t0.5_k4_p0.9"])
def test_distribution_of_10000_draws(settings, expected):
    """With a fixed seed, 10,000 draws match the expected probabilities (chi-square, 0.1% level)."""
    expected = expected / expected.sum()
    n = 10_000
    mx.random.seed(7)
    draws = np.array(make_sampler(**settings)(mx.broadcast_to(logits_of(PROBS), (n, len(PROBS)))))
    counts = np.bincount(draws, minlength=len(PROBS))
    assert counts[expected == 0].sum() == 0, f"filtered-out tokens were drawn: {counts}"
    live = expected > 0
    chi2 = float((((counts - n * expected) ** 2)[live] / (n * expected[live])).sum())
    df = int(live.sum()) - 1
    if df > 0:
        assert chi2 < _chi2_critical(df), f"counts {counts} vs expected {n * expected}: chi2 {chi2:.1f}"


def test_temperature_scales_logits():
    logits = mx.array([[1.0, -2.0, 4.0]])
    np.testing.assert_allclose(np.array(apply_temperature(logits, 0.5)), [[2.0, -4.0, 8.0]])
    assert apply_temperature(logits, 1) is logits


# ----------------------------------------------------------------------------- repetition penalty


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = mx.array([[2.0, -1.0, 3.0, 0.5], [2.0, -1.0, 3.0, 0.5]])
    tokens = mx.array([[0, 1, 1], [3, 3, 3]])
    out = np.array(apply_repetition_penalty(logits, tokens, 2.0))
    np.testing.assert_allclose(out, [[1.0, -2.0, 3.0, 0.5], [2.0, -1.0, 3.0, 0.25]])


def test_repetition_penalty_looks_at_the_recent_window_only():
    [processor] = make_logits_processors(2.0, repetition_context_size=2)
    logits = mx.array([[2.0, 2.0, 2.0, 2.0]])
    out = np.array(processor(mx.array([[0, 1, 2]]), logits))
    np.testing.assert_allclose(out, [[2.0, 1.0, 1.0, 2.0]])  # token 0 is outside the last 2
    assert make_logits_processors(None) == [] and make_logits_processors(1.0) == []


def test_processors_see_the_recent_sequence(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("ROMEO:")
    seen = []

    def record(tokens, logits):
        seen.append(np.array(tokens))
        return logits

    out = tokens_of(model, prompt, 5, num_samples=2, logits_processors=[record])
    assert [s.shape for s in seen] == [(2, 6 + i) for i in range(5)]
    np.testing.assert_array_equal(seen[-1][:, 6:], out[:, :4])
    np.testing.assert_array_equal(seen[0][0], prompt)
    seen.clear()  # past block_size: the last max(block_size, history_size) tokens
    tokens_of(model, prompt, 60, logits_processors=[record], history_size=50)
    assert seen[-1].shape == (1, 50)
    np.testing.assert_array_equal(seen[-1][0, -5:], tokens_of(model, prompt, 60)[0, -6:-1])


def test_a_strong_repetition_penalty_changes_greedy_output(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    plain = tokens_of(model, prompt, 60)
    penalized = tokens_of(model, prompt, 60, logits_processors=make_logits_processors(5.0, 8))
    assert not np.array_equal(plain, penalized)
    # With a huge penalty greedy avoids the last few characters whenever another is possible.
    window = 4
    out = tokens_of(model, prompt, 60, logits_processors=make_logits_processors(1e6, window))[0]
    seq = np.concatenate([prompt, out])
    repeats = sum(seq[i] in seq[i - window:i] for i in range(len(prompt), len(seq)))
    assert repeats <= 3


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
])
def test_bad_sampler_values_are_clear_errors(kwargs, message):
    with pytest.raises(MlxGptError, match=message) as info:
        make_sampler(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_processor_values_are_clear_errors():
    with pytest.raises(MlxGptError, match="repetition_penalty"):
        make_logits_processors(0.0)
    with pytest.raises(MlxGptError, match="repetition_context_size"):
        make_logits_processors(1.2, 0)


def test_empty_prompt_and_unknown_characters_are_clear_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(MlxGptError, match="prompt is empty"):
        next(generate(model, tokenizer, "", 5))
    with pytest.raises(MlxGptError, match="not in the vocabulary"):
        next(generate(model, tokenizer, "caf\u00e9", 5))
    assert list(generate_step(model, [1], 0)) == []


# ----------------------------------------------------------------------------- sample.py


def test_sample_py_streams_and_is_reproducible(tiny_checkpoint: Path):
    args = ["--ckpt", str(tiny_checkpoint), "--prompt", "ROMEO:", "--max_new_tokens", "80", "--seed", "42",
            "--device", "cpu", "--top_p", "0.95", "--min_p", "0.01", "--repetition_penalty", "1.1"]
    first = run_script("sample.py", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("ROMEO:")
    assert len(first.stdout) == len("ROMEO:") + 80 + 1
    second = run_script("sample.py", *args)
    assert second.stdout == first.stdout
    other = run_script("sample.py", *args[:-10], "--seed", "43", "--device", "cpu")
    assert other.returncode == 0 and other.stdout != first.stdout


def test_sample_py_batched_samples_are_separated_by_dashes(tiny_checkpoint: Path, tmp_path: Path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT * 3, encoding="utf-8")  # longer than block_size
    args = ["--ckpt", str(tiny_checkpoint), "--prompt", f"FILE:{prompt_file}", "--max_new_tokens", "60",
            "--num_samples", "3", "--seed", "5", "--device", "cpu", "--temperature", "1.0"]
    proc = run_script("sample.py", *args)
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3
    assert all(s.startswith(PROMPT * 3) for s in samples)
    assert len({s[len(PROMPT) * 3:] for s in samples}) == 3
    assert run_script("sample.py", *args).stdout == proc.stdout


def test_sample_py_greedy_matches_the_library(tiny, tiny_checkpoint: Path):
    model, tokenizer = tiny
    proc = run_script("sample.py", "--ckpt", str(tiny_checkpoint), "--prompt", PROMPT, "--max_new_tokens", "70",
                      "--temperature", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    expected = tokenizer.decode(tokens_of(model, tokenizer.encode(PROMPT), 70)[0])
    assert proc.stdout == PROMPT + expected + "\n"


@pytest.mark.parametrize("flag, value", [
    ("--top_p", "1.5"), ("--top_p", "0"), ("--temperature", "-1"), ("--top_k", "0"),
    ("--min_p", "2"), ("--repetition_penalty", "0"), ("--repetition_context_size", "0"), ("--num_samples", "0"),
])
def test_sample_py_bad_sampler_args_give_a_one_line_error(tiny_checkpoint: Path, flag: str, value: str):
    proc = run_script("sample.py", "--ckpt", str(tiny_checkpoint), flag, value, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sample.py: error: argument {flag}:"), proc.stderr


@pytest.mark.parametrize("prompt, message", [
    ("caf\u00e9", "not in the vocabulary: '\u00e9'"),
    ("", "the prompt is empty"),
    ("FILE:/nonexistent/prompt.txt", "cannot read prompt file"),
])
def test_sample_py_bad_prompts_give_a_one_line_error(tiny_checkpoint: Path, prompt: str, message: str):
    proc = run_script("sample.py", "--ckpt", str(tiny_checkpoint), "--prompt", prompt, "--device", "cpu",
                      timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
