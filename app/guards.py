"""Degenerate-repetition detection on generated token ids (a known failure of OCR-style VLMs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RepetitionGuard:
    """Trips when the output ends in one pattern of up to ``max_period`` tokens repeated at least
    ``min_repeats`` times over at least ``min_span`` tokens: "<<<<<<<<…", or the same table row again and
    again. A table's own regularity (a separator row, rows that differ in a number) stays below that."""

    max_period: int = 64
    min_repeats: int = 4
    min_span: int = 48

    def tripped(self, tokens: Sequence[int]) -> bool:
        tail = list(tokens[-self.max_period * max(self.min_repeats, 1) * 4:])
        last = len(tail) - 1
        for period in range(1, self.max_period + 1):
            repeats = max(self.min_repeats, -(-self.min_span // period))  # ceil(min_span / period)
            span = period * repeats
            if span > len(tail):
                break  # longer periods need even longer spans
            # Cheap test first: a repeating tail repeats its last token one period back.
            if tail[last] != tail[last - period]:
                continue
            if tail[-span:] == tail[-period:] * repeats:
                return True
        return False
