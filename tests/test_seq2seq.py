"""The encoder-decoder: padding masks, cross-attention, cached decoding, the dates task, training, the script."""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT
from mlx.utils import tree_map

from mlx_gpt.checkpoint import arrays_checksum
from mlx_gpt.config import GPTConfig, TrainConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT
from mlx_gpt.seq2seq import (
    BOS,
    EOS,
    PAD,
    Seq2Seq,
    Seq2SeqConfig,
    SpecialCharTokenizer,
    pad_batch,
    translate,
    translate_ids,
)
from mlx_gpt.seq2seq.checkpoint import load_translator, save_translator
from mlx_gpt.seq2seq.dates import DatePairs, DateTask, date_in_words, ordinal_digits, ordinal_words, source_chars
from mlx_gpt.seq2seq.model import causal_padding_mask, key_padding_mask
from mlx_gpt.seq2seq.train import train_translator

CFG = Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=11, src_block_size=16, tgt_block_size=12,
                    n_encoder_layer=2, n_decoder_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def make_model(seed: int, scale: float | None = None) -> Seq2Seq:
    """A random model; ``scale`` redraws the matrices larger, so that greedy decoding is not one repeated token."""
    mx.random.seed(seed)
    model = Seq2Seq(CFG)
    if scale is not None:
        model.update(tree_map(lambda p: mx.random.normal(p.shape, scale=scale) if p.ndim == 2 else p,
                              model.parameters()))
    model.eval()
    return model


def random_sequences(rng: np.random.Generator, lengths: list[int], vocab: int) -> list[list[int]]:
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]  # ids >= 3: never a special token


def pad_left(sequences: list[list[int]], length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Left padding, with junk (not PAD) ids under the mask: only the mask may decide what is padding."""
    ids = rng.integers(0, 11, size=(len(sequences), length)).astype(np.int32)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = seq
        mask[row, length - len(seq) :] = True
    return ids, mask


# ----------------------------------------------------------------------------- padding and masks


def test_padding_never_changes_outputs_at_real_positions() -> None:
    model = make_model(0)
    rng = np.random.default_rng(0)
    src = random_sequences(rng, [5, 9, 2], CFG.src_vocab_size)
    tgt = random_sequences(rng, [7, 3, 1], CFG.tgt_vocab_size)
    # Way 1: right-padded to the longest; way 2: left-padded further, junk ids under the mask.
    src_a, src_mask_a = pad_batch(src)
    tgt_a, tgt_mask_a = pad_batch(tgt)
    src_b, src_mask_b = pad_left(src, 14, rng)
    tgt_b, tgt_mask_b = pad_left(tgt, 11, rng)
    logits_a = np.array(model(mx.array(src_a), mx.array(tgt_a), mx.array(src_mask_a), mx.array(tgt_mask_a)))
    logits_b = np.array(model(mx.array(src_b), mx.array(tgt_b), mx.array(src_mask_b), mx.array(tgt_mask_b)))
    assert np.all(np.isfinite(logits_b))  # PAD positions too: a NaN there would leak through later layers
    for row, seq in enumerate(tgt):
        np.testing.assert_allclose(logits_b[row, 11 - len(seq) :], logits_a[row, : len(seq)], atol=1e-5)
    # Each row alone, unpadded (masks None: the fused causal path), gives the same logits again.
    for row in range(3):
        alone = model(mx.array([src[row]]), mx.array([tgt[row]]))[0]
        np.testing.assert_allclose(np.array(alone), logits_a[row, : len(tgt[row])], atol=1e-5)


def test_padding_mask_changes_outputs_when_it_hides_real_tokens() -> None:
    # The other direction, so the test above cannot pass with masks that do nothing.
    model = make_model(1)
    src = mx.array(np.random.default_rng(1).integers(3, 13, size=(1, 8)).astype(np.int32))
    tgt = mx.array([[BOS, 4, 5, 6]])
    full = model(src, tgt, mx.ones((1, 8), dtype=mx.bool_))
    hidden = model(src, tgt, mx.array([[True] * 4 + [False] * 4]))
    assert not np.allclose(np.array(full), np.array(hidden), atol=1e-4)


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax attention with explicit loops over (batch, head, query) and the allowed keys only."""
    out = np.zeros_like(q)
    for b, h, i in np.ndindex(*q.shape[:3]):
        keys = np.flatnonzero(allowed[b, i])
        scores = k[b, h, keys] @ q[b, h, i] / math.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max())
        out[b, h, i] = (weights / weights.sum()) @ v[b, h, keys]
    return out


def test_causal_plus_padding_mask_equals_naive_masked_attention() -> None:
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 7, 8)).astype(np.float32) for _ in range(3))
    tgt_mask = np.array([[True] * 5 + [False] * 2, [False] * 3 + [True] * 4])  # right- and left-padded
    mask = causal_padding_mask(mx.array(tgt_mask))
    fused = np.array(mx.fast.scaled_dot_product_attention(
        mx.array(q), mx.array(k), mx.array(v), scale=1 / math.sqrt(8), mask=mask))
    # Real queries: the real keys at or before them. PAD queries: the same plus themselves (so never empty).
    i, j = np.arange(7)[:, None], np.arange(7)[None, :]
    allowed = (j <= i) & (tgt_mask[:, None, :] | (i == j))
    np.testing.assert_allclose(fused, naive_attention(q, k, v, allowed), atol=1e-5)


def test_cross_attention_padding_mask_equals_naive_attention() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 6, 8)).astype(np.float32) for _ in range(2))
    src_mask = np.array([[True] * 6, [False, True, True, False, True, False]])
    fused = np.array(mx.fast.scaled_dot_product_attention(
        mx.array(q), mx.array(k), mx.array(v), scale=1 / math.sqrt(8), mask=key_padding_mask(mx.array(src_mask))))
    allowed = np.broadcast_to(src_mask[:, None, :], (2, 4, 6))
    np.testing.assert_allclose(fused, naive_attention(q, k, v, allowed), atol=1e-5)


def test_all_masked_source_row_is_a_clear_error() -> None:
    model = make_model(4)
    src = mx.array(np.full((2, 5), 4, dtype=np.int32))
    src_mask = mx.array([[True] * 5, [False] * 5])
    tgt = mx.array([[BOS, 4], [BOS, 5]])
    calls = [
        lambda: model(src, tgt, src_mask),
        lambda: model.decoder(tgt, mx.zeros((2, 5, 32)), src_padding_mask=src_mask),
        lambda: model.decoder.make_cache(mx.zeros((2, 5, 32)), src_mask),
        lambda: translate_ids(model, src, src_mask),
    ]
    for call in calls:
        with pytest.raises(MlxGptError, match=r"src_padding_mask: row\(s\) \[1\] are all PAD"):
            call()
    with pytest.raises(MlxGptError, match=r"tgt_padding_mask: row\(s\) \[0\] are all PAD"):
        model(src, tgt, tgt_padding_mask=mx.array([[False, False], [True, True]]))
    with pytest.raises(MlxGptError, match="shape"):
        model(src, tgt, mx.ones((2, 4), dtype=mx.bool_))


def test_gpt_blocks_have_no_cross_attention() -> None:
    gpt = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=8))
    assert not hasattr(gpt.h[0], "cross_attn")
    model = make_model(5)
    assert all(hasattr(block, "cross_attn") for block in model.decoder.h)
    assert not any(hasattr(block, "cross_attn") for block in model.encoder.h)


# ----------------------------------------------------------------------------- cached decoding


def test_decoding_past_the_target_block_size_is_refused() -> None:
    model = make_model(6, scale=0.3)
    src = mx.array([[5, 6, 7]])
    cache = model.decoder.make_cache(model.encoder(src))
    model.decoder(mx.zeros((1, model.decoder.block_size), dtype=mx.int32), cache=cache)
    with pytest.raises(MlxGptError, match="longer than its block size"):
        model.decoder(mx.zeros((1, 1), dtype=mx.int32), cache=cache)


def test_cached_decode_equals_full_recompute() -> None:
    model = make_model(6, scale=0.3)
    rng = np.random.default_rng(6)
    src_ids, src_mask = pad_batch(random_sequences(rng, [6, 3, 10], CFG.src_vocab_size))
    src_ids, src_mask = mx.array(src_ids), mx.array(src_mask)
    tgt = mx.array(np.concatenate([np.full((3, 1), BOS), rng.integers(3, 11, size=(3, 8))], axis=1).astype(np.int32))
    encoded = model.encode(src_ids, src_mask)
    full = np.array(model.decoder(tgt, encoded, src_padding_mask=src_mask))
    # Token by token, then a 3-token chunk: the cross K/V are computed once, in make_cache.
    cache = model.decoder.make_cache(encoded, src_mask)
    steps = [model.decoder(tgt[:, t : t + 1], cache=cache) for t in range(6)]
    steps.append(model.decoder(tgt[:, 6:9], cache=cache))
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), full, atol=1e-4)
    assert cache.offset == 9
    # Greedy and sampled decoding: the same tokens with and without the caches.
    greedy = translate_ids(model, src_ids, src_mask, max_new_tokens=10)
    assert greedy == translate_ids(model, src_ids, src_mask, max_new_tokens=10, use_cache=False)
    assert sum(map(len, greedy)) > 5 and any(len(set(row)) > 1 for row in greedy)  # not trivially equal
    sampled = []
    for use_cache in (True, False):
        mx.random.seed(7)
        sampled.append(translate_ids(model, src_ids, src_mask, max_new_tokens=10, temperature=1.5,
                                     use_cache=use_cache))
    assert sampled[0] == sampled[1] and sampled[0] != greedy


def test_decode_length_is_checked() -> None:
    model = make_model(9)
    with pytest.raises(MlxGptError, match="max_new_tokens"):
        translate_ids(model, mx.array([[4, 5]]), max_new_tokens=CFG.tgt_block_size + 1)
    with pytest.raises(MlxGptError, match="block size"):
        model(mx.zeros((1, CFG.src_block_size + 1), dtype=mx.int32), mx.array([[BOS]]))


# ----------------------------------------------------------------------------- tokenizer, data, files


def test_special_tokenizer_reserves_pad_bos_eos() -> None:
    tok = SpecialCharTokenizer.from_text("ba-")
    assert (PAD, BOS, EOS) == (0, 1, 2) and tok.vocab_size == 6
    ids = tok.encode("ab-", bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and min(ids[1:-1]) >= 3
    assert tok.decode(ids + [5, 4]) == "ab-"  # stops at EOS
    assert SpecialCharTokenizer.from_dict(tok.to_dict()).encode("ab") == tok.encode("ab")
    with pytest.raises(MlxGptError, match="not in the vocabulary"):
        tok.encode("abc")
    with pytest.raises(MlxGptError, match="empty"):
        pad_batch([[3], []])


def test_dates_are_correct_and_held_out_dates_never_train() -> None:
    assert [ordinal_words(d) for d in (1, 12, 20, 23, 30, 31)] == [
        "first", "twelfth", "twentieth", "twenty-third", "thirtieth", "thirty-first"]
    assert [ordinal_digits(d) for d in (1, 2, 3, 11, 12, 13, 22, 31)] == [
        "1st", "2nd", "3rd", "11th", "12th", "13th", "22nd", "31st"]
    assert date_in_words(datetime.date(1994, 3, 23)) == "the twenty-third of March, 1994"
    task = DateTask(seed=3, n_test=300)
    assert len(set(task.test.targets)) == 300
    seen = set()
    for _ in range(20):
        batch = task.train_batch(256)
        seen.update(batch.targets)
        for source, target in zip(batch.sources, batch.targets, strict=True):
            date = datetime.date.fromisoformat(target)
            assert str(date.year) in source and date.strftime("%B") in source
            assert ordinal_words(date.day) in source or ordinal_digits(date.day) in source
    assert not seen & set(task.test.targets)
    assert DateTask(seed=3, n_test=300).test == task.test  # seeded
    SpecialCharTokenizer.from_text(source_chars()).encode("".join(task.test.sources))  # vocabulary covers them


def test_save_and_load_translator_round_trip(tmp_path: Path) -> None:
    model = make_model(10)
    tok = SpecialCharTokenizer.from_text("abcdefghij")  # 13 ids, as CFG.src_vocab_size
    tgt_tok = SpecialCharTokenizer.from_text("01234567")  # 11 ids
    path = save_translator(tmp_path / "t.npz", model, tok, tgt_tok, info={"exact_match": 0.5})
    loaded, src_loaded, tgt_loaded = load_translator(path)
    src, tgt = mx.array([tok.encode("abcj")]), mx.array([tgt_tok.encode("0123", bos=True)])
    np.testing.assert_array_equal(np.array(loaded(src, tgt)), np.array(model(src, tgt)))
    assert src_loaded.to_dict() == tok.to_dict() and tgt_loaded.to_dict() == tgt_tok.to_dict()
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(MlxGptError):
        load_translator(tmp_path / "bad.npz")


def _saved_translator(path: Path) -> Path:
    return save_translator(path, make_model(10), SpecialCharTokenizer.from_text("abcdefghij"),
                           SpecialCharTokenizer.from_text("01234567"))


def _edited(path: Path, change_meta=None, arrays: dict | None = None) -> None:
    """Re-save a translator with its header or arrays changed and a matching checksum (as a buggy writer would)."""
    with np.load(path, allow_pickle=False) as npz:
        current = {k: npz[k] for k in npz.files}
    meta = json.loads(current.pop("meta").tobytes())
    current.update(arrays or {})
    if change_meta:
        change_meta(meta)
    meta["checksum"] = arrays_checksum(current)
    np.savez(path, **current, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _edited(p, lambda m: m["config"].update(n_encoder_layer=10**9)),
     r"n_layer is 1000000000 but the weights hold 2 encoder\.h\.N layers"),
    (lambda p: _edited(p, arrays={"model/encoder.wte.weight": np.ones((13, 32), dtype=np.int64)}),
     r"model/encoder\.wte\.weight has dtype int64 but must hold floats"),
    (lambda p: _edited(p, arrays={"model/decoder.ln_f.weight": np.full(32, np.nan, dtype=np.float32)}),
     r"non-finite weights in model/decoder\.ln_f\.weight: the translator is damaged"),
    (lambda p: np.savez(p, meta=np.frombuffer(b"[" * 50_000, dtype=np.uint8)),
     "its header nests 50000 levels deep, more than the limit of 32"),
    (lambda p: p.write_text("not a zip\n"), r"not an \.npz file"),
    (lambda p: (p.unlink(), p.mkdir()), "is a folder, not a file"),
])
def test_translator_loader_has_every_checkpoint_check(tmp_path: Path, damage, message: str) -> None:
    path = _saved_translator(tmp_path / "t.npz")
    damage(path)
    with pytest.raises(MlxGptError, match=message) as info:
        load_translator(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_translator_says_how_to_train_one(tmp_path: Path) -> None:
    with pytest.raises(MlxGptError, match="does not exist; train one with python -m mlx_gpt.seq2seq"):
        load_translator(tmp_path / "missing.npz")


@pytest.mark.parametrize("args, code, message", [
    (["--seed", "-1"], 2, "error: argument --seed: must be in [0, 2**64), got -1"),
    (["--seed", str(2**64)], 2, "error: argument --seed: must be in [0, 2**64)"),
    (["--out", "{tmp}"], 1, "error: --out {tmp} is a folder; give a file name such as"),
])
def test_train_script_refuses_bad_seed_and_folder_output_before_training(tmp_path: Path, args: list[str], code: int,
                                                                          message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt.seq2seq", *[a.format(tmp=tmp_path) for a in args],
                           "--max_iters", "3", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == code and message.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "iter 1" not in proc.stdout


# ----------------------------------------------------------------------------- learning


class FixedPairs:
    """A task whose training stream is always the same few pairs (a memorisation check)."""

    def __init__(self, pairs: DatePairs) -> None:
        self.test = pairs

    def train_batch(self, batch_size: int) -> DatePairs:
        return self.test


def test_training_learns_a_few_dates() -> None:
    pairs = DateTask(seed=0, n_test=8).test
    src_tok = SpecialCharTokenizer.from_text(source_chars())
    tgt_tok = SpecialCharTokenizer.from_text("0123456789-")
    cfg = Seq2SeqConfig(src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size, src_block_size=48,
                        tgt_block_size=16, n_encoder_layer=1, n_decoder_layer=1, n_head=2, n_embd=32)
    train = TrainConfig(batch_size=8, max_iters=150, learning_rate=1e-2, min_lr=1e-3, warmup_iters=10,
                        lr_decay_iters=150, weight_decay=0.0, eval_interval=150, log_interval=1000)
    model, history = train_translator(cfg, train, FixedPairs(pairs), src_tok, tgt_tok, log=lambda _: None)
    assert history[-1][0] == 150 and history[-1][1] >= 0.75
    right = [p == t for p, t in zip(translate(model, src_tok, tgt_tok, pairs.sources), pairs.targets, strict=True)]
    assert np.mean(right) == history[-1][1]


def test_train_script_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "dates.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_gpt.seq2seq", "--max_iters", "3", "--n_embd", "16", "--n_head", "2",
         "--batch_size", "4", "--n_test", "4", "--eval_interval", "3", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "held-out exact match" in proc.stdout and "'the twenty-third of March, 1994'" in proc.stdout
    model, _, _ = load_translator(out)
    assert model.config.n_embd == 16
