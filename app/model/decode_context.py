"""Whether the model is running a decoding step: what a quantized layer (QUANTIZATION=int8/int4 on the CPU) asks
to pick its weights.

A decoding step reads each weight once per token and is bound by how many bytes it reads: there the low-bit copy
is used, whatever the number of rows. The prefill (and anything else: the vision tower, the model's own
``generate``) uses the original weights. The choice is by the kind of call, not by its row count, so a greedy
answer does not change with how many other requests happen to be decoding beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_decoding = contextvars.ContextVar("decoding_step", default=False)


@contextlib.contextmanager
def decoding_step() -> Iterator[None]:
    token = _decoding.set(True)
    try:
        yield
    finally:
        _decoding.reset(token)


def in_decoding_step() -> bool:
    return _decoding.get()
