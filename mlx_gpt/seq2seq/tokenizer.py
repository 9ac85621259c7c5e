"""Characters plus the three special tokens a translation model needs: PAD, BOS and EOS.

The specials take the first ids (0, 1, 2) and the characters follow, so a character can never be
mistaken for a special token and the ids of the specials do not depend on the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import MlxGptError
from ..tokenizer import CharTokenizer

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


class SpecialCharTokenizer:
    """A ``CharTokenizer`` whose ids are shifted past PAD, BOS and EOS."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = CharTokenizer(chars)

    @classmethod
    def from_text(cls, text: str) -> SpecialCharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + self.chars.vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = (self.chars.encode(text) + len(SPECIAL_TOKENS)).tolist()
        return [BOS] * bos + ids + [EOS] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` up to the first EOS; PAD and BOS are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIAL_TOKENS):
                out.append(self.chars.chars[i - len(SPECIAL_TOKENS)])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char+specials", "specials": list(SPECIAL_TOKENS), "chars": self.chars.chars}

    @classmethod
    def from_dict(cls, values: Any) -> SpecialCharTokenizer:
        if (not isinstance(values, dict) or values.get("type") != "char+specials"
                or values.get("specials") != list(SPECIAL_TOKENS) or not isinstance(values.get("chars"), list)):
            raise MlxGptError(f"the tokenizer entry must be {{'type': 'char+specials', 'specials': "
                              f"{list(SPECIAL_TOKENS)}, 'chars': [...]}}")
        return cls(values["chars"])


def pad_batch(sequences: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id sequences with PAD: (ids int32 [B, L], padding mask bool [B, L], True at real tokens).

    ``length`` (default: the longest sequence) fixes L, e.g. to keep a compiled step's shapes few.
    """
    if not sequences:
        raise MlxGptError("cannot pad an empty batch: pass at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise MlxGptError("a sequence in the batch is empty: attention over nothing is undefined; drop it")
    length = max(lengths) if length is None else length
    if max(lengths) > length:
        raise MlxGptError(f"a sequence of {max(lengths)} tokens does not fit the padded length {length}")
    ids = np.full((len(sequences), length), PAD, dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    return ids, np.arange(length)[None, :] < np.array(lengths)[:, None]
