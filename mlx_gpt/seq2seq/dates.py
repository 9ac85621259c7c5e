"""A translation task that needs no download: English dates in words -> ISO 8601.

"the twenty-third of March, 1994" -> "1994-03-23". The dates are drawn with a seed from 1900-2099
(``datetime`` makes them valid, leap days included, and writes the ISO answer, so every pair is
checkable), in one of three English styles. The held-out dates never appear in training.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
_UNITS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
_TEENS = ("tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
          "eighteenth", "nineteenth")
STYLES = (
    "the {day_words} of {month}, {year}",  # the twenty-third of March, 1994
    "{month} {day_words}, {year}",  # March twenty-third, 1994
    "the {day_digits} of {month}, {year}",  # the 23rd of March, 1994
)
FIRST_DATE, LAST_DATE = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)
TARGET_CHARS = "0123456789-"


def ordinal_words(day: int) -> str:
    """1 -> "first", 23 -> "twenty-third", 30 -> "thirtieth" (days of a month: 1-31)."""
    if not 1 <= day <= 31:
        raise ValueError(f"day must be in 1..31, got {day}")
    if day < 10:
        return _UNITS[day - 1]
    if day < 20:
        return _TEENS[day - 10]
    tens = "twenty" if day < 30 else "thirty"
    return tens[:-1] + "ieth" if day % 10 == 0 else f"{tens}-{_UNITS[day % 10 - 1]}"


def ordinal_digits(day: int) -> str:
    """1 -> "1st", 12 -> "12th", 23 -> "23rd"."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def date_in_words(date: datetime.date, style: int = 0) -> str:
    return STYLES[style].format(day_words=ordinal_words(date.day), day_digits=ordinal_digits(date.day),
                                month=MONTHS[date.month - 1], year=date.year)


def source_chars() -> str:
    """Every character a source can contain, in a fixed order."""
    texts = [date_in_words(datetime.date(2000, month, 1), style).replace("2000", "0123456789")
             for month in range(1, 13) for style in range(len(STYLES))]
    texts += [ordinal_words(day) + ordinal_digits(day) for day in range(1, 32)]
    return "".join(sorted(set("".join(texts))))


@dataclass
class DatePairs:
    sources: list[str]
    targets: list[str]


class DateTask:
    """A seeded held-out set of ``n_test`` distinct dates, and an endless stream of training pairs
    whose dates are never held-out ones."""

    def __init__(self, seed: int = 0, n_test: int = 1000) -> None:
        self._first, last = FIRST_DATE.toordinal(), LAST_DATE.toordinal()
        self._span = last - self._first + 1
        rng = np.random.default_rng([seed, 0])
        held_out = rng.choice(self._span, size=n_test, replace=False)
        self._held_out = np.zeros(self._span, dtype=bool)
        self._held_out[held_out] = True
        self.test = self._pairs(held_out, rng.integers(len(STYLES), size=n_test))
        self._rng = np.random.default_rng([seed, 1])

    def _pairs(self, offsets: np.ndarray, styles: np.ndarray) -> DatePairs:
        dates = [datetime.date.fromordinal(self._first + int(o)) for o in offsets]
        return DatePairs([date_in_words(d, int(s)) for d, s in zip(dates, styles, strict=True)],
                         [d.isoformat() for d in dates])

    def train_batch(self, batch_size: int) -> DatePairs:
        offsets = self._rng.integers(self._span, size=batch_size)
        while self._held_out[offsets].any():  # redraw the (rare) held-out dates
            redraw = self._held_out[offsets]
            offsets[redraw] = self._rng.integers(self._span, size=int(redraw.sum()))
        return self._pairs(offsets, self._rng.integers(len(STYLES), size=batch_size))
