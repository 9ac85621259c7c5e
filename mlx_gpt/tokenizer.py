"""Character-level tokenizer: one token per distinct character of the training text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import MlxGptError

# The most characters a vocabulary may hold. Real text stays far below it (Tiny Shakespeare: 65; a text mixing many
# scripts: a few thousand), and the cap bounds what a damaged checkpoint header can make a loader build.
MAX_VOCAB_SIZE = 2**16


class CharTokenizer:
    """Maps characters to ids by their position in a sorted vocabulary."""

    def __init__(self, chars: Iterable[str]) -> None:
        if not isinstance(chars, (list, tuple, str)):  # e.g. a damaged checkpoint header
            raise MlxGptError(f"the vocabulary must be a list of characters, got {type(chars).__name__}")
        if len(chars) > MAX_VOCAB_SIZE:
            raise MlxGptError(f"the vocabulary has {len(chars)} characters, more than the limit of {MAX_VOCAB_SIZE}; "
                              "a character-level model of real text needs far fewer")
        self.chars: list[str] = list(chars)
        if not self.chars:
            raise MlxGptError("the vocabulary is empty: build the tokenizer from non-empty text")
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise MlxGptError("the vocabulary must be a list of single characters")
        # A lone surrogate is no character: printing or saving it as UTF-8 fails halfway through the output.
        surrogates = [c for c in self.chars if "\ud800" <= c <= "\udfff"]
        if surrogates:
            raise MlxGptError(f"the vocabulary holds {len(surrogates)} lone surrogate(s) such as {surrogates[0]!r}, "
                              "which are not characters (UTF-8 cannot encode them); rebuild it from UTF-8 text")
        if len(set(self.chars)) != len(self.chars):
            raise MlxGptError("the vocabulary has repeated characters")
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - self._ids.keys())

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32). Characters outside the vocabulary are an error, never dropped."""
        unknown = self.unknown_chars(text)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise MlxGptError(
                f"{len(unknown)} character(s) not in the vocabulary: {shown}; "
                "remove them (the model only knows the characters of its training text)"
            )
        # Fast path for long texts: map through a code-point lookup table.
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int32)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
        return table[codes]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, values: Any) -> CharTokenizer:
        if not isinstance(values, dict) or values.get("type") != "char" or not isinstance(values.get("chars"), list):
            raise MlxGptError("the tokenizer entry must be {'type': 'char', 'chars': [...]} ")
        return cls(values["chars"])
