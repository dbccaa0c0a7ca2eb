"""Text deltas from tokens as they are generated, for streaming answers. No torch, no web: a decode function in,
strings out."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalText:
    """Turns a growing list of token ids into text deltas whose concatenation is exactly the final answer,
    ``decode(all tokens).strip()``, the text a non-streamed response holds.

    Each push decodes only a short window (from the previous cut), not everything so far. A token that ends in
    the middle of a character (byte-level BPE splits UTF-8) waits for the next one; whitespace at the end
    waits for what follows, since the final answer is stripped.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._tokens: list[int] = []
        self._window = 0  # where the next decode starts: the cut before the last one, so joins decode right
        self._cut = 0  # tokens already turned into text
        self._text = ""  # the text of tokens[:cut]
        self._sent = ""  # what push has returned so far, in order

    def push(self, tokens: Iterable[int]) -> str:
        """The new text the given tokens complete (often "", never a partial character)."""
        self._tokens.extend(tokens)
        before = self._decode(self._tokens[self._window:self._cut])
        after = self._decode(self._tokens[self._window:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHARACTER):
            self._text += after[len(before):]
            self._window, self._cut = self._cut, len(self._tokens)
        return self._release(self._text.strip())

    def finish(self, final: str) -> str:
        """The rest of ``final``, the answer as the non-streamed response gives it."""
        if not final.startswith(self._sent):  # cannot happen with a byte-level tokenizer; said, not hidden
            logger.warning("streamed text diverged from the final answer; the stream ends with the final tail")
            return final[len(self._sent):]
        return self._release(final)

    def _release(self, stable: str) -> str:
        delta = stable[len(self._sent):]
        self._sent += delta
        return delta
