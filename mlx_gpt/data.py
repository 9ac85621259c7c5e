"""The training text: find or download it, split it, and draw random (x, y) batches."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MlxGptError
from .files import write_atomic
from .tokenizer import CharTokenizer

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV = "MLX_GPT_DATA"
TRAIN_FRACTION = 0.9


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-gpt"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_tiny_shakespeare(dest: Path) -> Path:
    """Download Tiny Shakespeare to ``dest`` (atomically), verified by SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise MlxGptError(
            f"could not download Tiny Shakespeare ({exc}); pass a local copy with --data PATH "
            f"or set {DATA_ENV}=PATH"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise MlxGptError(
            f"downloaded Tiny Shakespeare has SHA-256 {digest}, expected {TINY_SHAKESPEARE_SHA256}; "
            "retry, or pass a local copy with --data PATH"
        )
    write_atomic(dest, payload)
    return dest


def resolve_data_path(data: str | None) -> Path:
    """The text file to train on: ``--data``, else $MLX_GPT_DATA, else cached/downloaded Tiny Shakespeare."""
    if data:
        return Path(data)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file() and _sha256(cached) == TINY_SHAKESPEARE_SHA256:
        return cached
    print(f"downloading Tiny Shakespeare to {cached}")
    return download_tiny_shakespeare(cached)


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents, or a clear error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MlxGptError(f"data file {path} does not exist; pass an existing text file with --data") from None
    except OSError as exc:
        raise MlxGptError(f"cannot read data file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MlxGptError(
            f"data file {path} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8"
        ) from None
    if not text:
        raise MlxGptError(f"data file {path} is empty; pass a text file with some content")
    return text


class BatchSampler:
    """Random contiguous windows of ``block_size + 1`` tokens from one split, from a seeded numpy Generator.

    In data-parallel training every rank holds the same generator and draws the same global batch of
    ``batch_size * world_size`` window starts, then keeps only its own ``batch_size`` rows: the ranks'
    shares are disjoint, and together they are exactly the batch a single process with
    ``batch_size * world_size`` would draw. The generator state is therefore the same on every rank and
    does not depend on the world size: ``state()``/``set_state()`` (JSON-able) resume on any number of ranks.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int | list[int],
                 rank: int = 0, world_size: int = 1) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed)
        self._window = np.arange(block_size + 1)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = self.tokens[mine[:, None] + self._window]
        return windows[:, :-1], windows[:, 1:]

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise MlxGptError(f"the saved data-sampler state is not valid ({exc})") from None


class Dataset:
    """A text encoded with a tokenizer and split: the first 90% train, the rest validation (as nanoGPT)."""

    def __init__(self, text: str, tokenizer: CharTokenizer, block_size: int, source: str = "text") -> None:
        tokens = tokenizer.encode(text)
        # saved in checkpoints, so that a resume on another text can say so
        self.fingerprint = {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text),
                            "source": source}
        n_train = int(TRAIN_FRACTION * len(tokens))
        self.train, self.val = tokens[:n_train], tokens[n_train:]
        self.source = source
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split) < block_size + 1:
                raise MlxGptError(
                    f"{source}: the {name} split has {len(split)} characters, fewer than block_size + 1 = "
                    f"{block_size + 1} ({len(tokens)} in all, {TRAIN_FRACTION:.0%} train); "
                    "use a longer text or a smaller --block_size"
                )

    @classmethod
    def load(
        cls, data: str | None, block_size: int, tokenizer: CharTokenizer | None = None
    ) -> tuple[Dataset, CharTokenizer]:
        """Read the data file; build the tokenizer from it unless one is given (on resume)."""
        path = resolve_data_path(data)
        text = read_text(path)
        if tokenizer is None:
            tokenizer = CharTokenizer.from_text(text)
        elif tokenizer.unknown_chars(text):
            raise MlxGptError(
                f"data file {path} has characters the checkpoint's vocabulary lacks "
                f"({''.join(tokenizer.unknown_chars(text))[:40]!r}); resume with the data it was trained on"
            )
        return cls(text, tokenizer, block_size, source=str(path)), tokenizer
