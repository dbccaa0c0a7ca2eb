"""Degenerate-repetition detection on generated token ids (a known failure of OCR-style VLMs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RepetitionGuard:
    """Trips when the output ends in one pattern of up to ``max_period`` tokens repeated at least
    ``min_repeats`` times over at least ``min_span`` tokens: "<<<<<<<<…", or the same table row again and
    again. A table's own regularity (a separator row, rows that differ in a number) stays below that."""

    max_period: int = 64
    min_repeats: int = 4
    min_span: int = 48

    def span(self, period: int) -> int:
        """Tokens a pattern of this period must cover to count as degenerate."""
        return period * max(self.min_repeats, -(-self.min_span // period))  # ceil(min_span / period)

    def tripped(self, tokens: Sequence[int]) -> bool:
        """The whole check on a finished list (the reference the incremental tracker is tested against)."""
        tail = list(tokens)
        for period in range(1, self.max_period + 1):
            span = self.span(period)
            if span <= len(tail) and tail[-span:] == tail[-period:] * (span // period):
                return True
        return False

    def tracker(self) -> "RepetitionTracker":
        return RepetitionTracker(self)


class RepetitionTracker:
    """The guard's test kept up to date one token at a time, in constant work per token: for every period p
    it counts how many of the latest tokens equal the token p places before them. The tail is periodic with
    period p over ``span(p)`` tokens exactly when that count reaches ``span(p) - p``."""

    def __init__(self, guard: RepetitionGuard):
        periods = np.arange(1, guard.max_period + 1)
        self._needed = np.array([guard.span(int(p)) - int(p) for p in periods])
        self._recent = np.full(guard.max_period, -1, dtype=np.int64)  # _recent[p - 1] = the token p places back
        self._matches = np.zeros(guard.max_period, dtype=np.int64)
        self.tripped = False

    def push(self, token: int) -> None:
        same = self._recent == token
        self._matches = np.where(same, self._matches + 1, 0)
        self._recent[1:] = self._recent[:-1].copy()
        self._recent[0] = token
        self.tripped = self.tripped or bool((self._matches >= self._needed).any())
