"""One request's life on the model thread: its prepared inputs, its tokens so far, why it stops, its result.

Plain data and rules, no torch: the scheduler moves sequences around, the engine computes their tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from app.pipeline.repetition import RepetitionGuard, RepetitionTracker


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    finish_reason: str  # stop | length | repetition | cancelled
    queue_time_s: float  # queued until its prefill began
    generation_time_s: float  # prefill start to last token
    first_token_time_s: float | None = None  # prefill, vision encoder included


@dataclass(frozen=True)
class PreparedInputs:
    """A request's unpadded model inputs (token ids, image patches, ...) and what they hold."""

    tensors: dict[str, Any]
    prompt_tokens: int
    image_tokens: int
    # M-RoPE positions of the prompt's tokens ``[3, prompt_tokens]`` and where generated text continues from
    # them (its position minus its index), worked out on the CPU before the model thread sees the request.
    rope_positions: Any = None
    rope_offset: int = 0


@dataclass(frozen=True)
class StopRules:
    """When a sequence is finished, decided after each new token in this order: cancelled (deadline or
    disconnect), forced length (benchmarks), end of turn, its own max_new_tokens, degenerate repetition."""

    eos_ids: frozenset[int]
    force_max_new_tokens: bool = False
    repetition_guard: RepetitionGuard | None = RepetitionGuard()

    def reason(self, sequence: "Sequence") -> str | None:
        if sequence.cancel.is_set():
            return "cancelled"
        count = len(sequence.tokens)
        if sequence.sampler is not None and sequence.sampler.finished:  # its grammar is complete: nothing may follow
            return "stop"
        if self.force_max_new_tokens:
            return "length" if count >= sequence.max_new_tokens else None
        if count and sequence.tokens[-1] in self.eos_ids:
            return "stop"
        if count >= sequence.max_new_tokens:
            return "length"
        if sequence.repetition is not None and sequence.repetition.tripped:
            return "repetition"
        return None


@dataclass(eq=False)
class Sequence:
    """Per-request state. ``on_done`` / ``on_error`` are called on the model thread, once, the moment this
    sequence finishes, whatever the other rows are doing."""

    inputs: PreparedInputs
    max_new_tokens: int
    cancel: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[GenerationResult], None] = lambda result: None
    on_error: Callable[[BaseException], None] = lambda error: None
    on_start: Callable[[], None] = lambda: None  # it got a KV slot: no longer waiting
    on_token: Callable[[int], None] | None = None  # each new token, as it comes (streaming requests only)
    background: bool = False  # a job's: synchronous requests take free slots first
    sampler: Any = None  # sampling.RowSampler when it does not decode plain greedy (sampling, a grammar)
    error: BaseException | None = None  # its own token choice failed: it alone ends with this error
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None  # the engine's KV slot while it decodes
    position: int = 0  # index in its slot where the next input token's keys and values go
    repetition: RepetitionTracker | None = None
    result: GenerationResult | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None

    def append(self, token: int) -> None:
        if not self.tokens:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        if self.repetition is not None:
            self.repetition.push(token)

    def finish(self, text: str, reason: str) -> GenerationResult:
        now = time.perf_counter()
        started = self.started_at if self.started_at is not None else now
        self.result = GenerationResult(
            text=text, prompt_tokens=self.inputs.prompt_tokens, completion_tokens=len(self.tokens),
            image_tokens=self.inputs.image_tokens, finish_reason=reason, queue_time_s=started - self.queued_at,
            generation_time_s=now - started,
            first_token_time_s=self.first_token_at - started if self.first_token_at is not None else None,
        )
        return self.result
