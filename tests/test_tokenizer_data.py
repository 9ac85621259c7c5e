"""Tokenizer round trip and errors; the data file, split, batches and the download."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from mlx_gpt import data
from mlx_gpt.data import BatchSampler, Dataset, read_text, resolve_data_path
from mlx_gpt.errors import MlxGptError
from mlx_gpt.tokenizer import MAX_VOCAB_SIZE, CharTokenizer


def test_tiny_shakespeare_vocabulary_and_round_trip(shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    assert len(text) == 1_115_394
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65 and tok.chars == sorted(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() == 0 and ids.max() == 64
    assert tok.decode(ids[:5000]) == text[:5000]
    assert CharTokenizer.from_dict(tok.to_dict()).chars == tok.chars


def test_unknown_characters_are_listed_never_dropped() -> None:
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(MlxGptError, match=r"2 character\(s\) not in the vocabulary: '!', 'é'"):
        tok.encode("hello world!é")


@pytest.mark.parametrize("vocab", [True, 7, None, {"a": 1}, ["ab"], ["a", "a"], []])
def test_a_bad_vocabulary_is_our_error(vocab: object) -> None:
    with pytest.raises(MlxGptError, match="vocabulary"):
        CharTokenizer(vocab)


@pytest.mark.parametrize("vocab", [["a", "\ud800"], "\udfffb", ["\udc80"]])
def test_a_vocabulary_with_a_lone_surrogate_is_refused(vocab: object) -> None:
    """Not a character: printing or saving it as UTF-8 would fail halfway through the output."""
    with pytest.raises(MlxGptError, match=r"lone surrogate\(s\) such as '\\ud[89a-f][0-9a-f]{2}'"):
        CharTokenizer(vocab)


def test_a_vocabulary_over_the_cap_is_refused_before_it_is_built() -> None:
    CharTokenizer([chr(0x10000 + i) for i in range(MAX_VOCAB_SIZE)])  # the cap itself is allowed
    with pytest.raises(MlxGptError, match=f"has 1000000 characters, more than the limit of {MAX_VOCAB_SIZE}"):
        CharTokenizer(" " * 1_000_000)  # refused by its length: no repeated-character check over a million


def test_non_ascii_vocabulary_round_trips() -> None:
    text = "naïve café — ünïcödé 🙂"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


def test_split_is_first_90_percent(small_text: Path) -> None:
    text = small_text.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    ds = Dataset(text, tok, block_size=32)
    assert len(ds.train) == 45_000 and len(ds.val) == 5_000
    assert tok.decode(ds.val[:100]) == text[45_000:45_100]


def test_batches_are_shifted_windows_and_state_restores(small_text: Path) -> None:
    tokens = np.arange(1000, dtype=np.int32)
    sampler = BatchSampler(tokens, block_size=8, batch_size=4, seed=0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 8)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(x[:, 1:] - x[:, :-1], 1)
    state = sampler.state()
    expected = sampler.next_batch()
    other = BatchSampler(tokens, block_size=8, batch_size=4, seed=123)
    other.set_state(state)
    np.testing.assert_array_equal(other.next_batch()[0], expected[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"short text", "fewer than block_size")],
)
def test_bad_data_files_give_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(MlxGptError, match=message):
        Dataset.load(str(path), block_size=64)


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(MlxGptError, match="does not exist"):
        read_text(tmp_path / "nope.txt")


def test_data_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_GPT_DATA", str(tmp_path / "env.txt"))
    assert resolve_data_path("flag.txt") == Path("flag.txt")
    assert resolve_data_path(None) == tmp_path / "env.txt"


def test_download_is_verified_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"To be, or not to be"

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        assert url == data.TINY_SHAKESPEARE_URL
        return io.BytesIO(payload)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "cache" / "tinyshakespeare.txt"
    with pytest.raises(MlxGptError, match="SHA-256"):
        data.download_tiny_shakespeare(dest)
    assert not dest.exists() and not list(dest.parent.iterdir())

    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    assert data.download_tiny_shakespeare(dest).read_bytes() == payload


def test_no_network_says_how_to_pass_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> None:
        raise data.urllib.error.URLError("no route to host")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    monkeypatch.delenv("MLX_GPT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(MlxGptError, match="--data PATH"):
        resolve_data_path(None)


@pytest.mark.parametrize("value", [-1, 2**200, 1.5, None, "x"])
def test_a_damaged_sampler_state_is_our_error(value: object) -> None:
    sampler = BatchSampler(np.arange(100, dtype=np.int32), block_size=4, batch_size=2, seed=0)
    state = {**sampler.state(), "state": {"state": value, "inc": 1}}
    try:
        sampler.set_state(state)
    except MlxGptError as exc:
        assert "not valid" in str(exc)
    else:  # numpy accepts some odd values (e.g. 1.5 truncated): then the sampler must still draw
        assert sampler.next_batch()[0].shape == (2, 4)
