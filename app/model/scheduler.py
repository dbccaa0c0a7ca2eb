"""Iteration-level scheduling: which sequences prefill and decode at each step of the model thread.

Waiting sequences take free KV slots before every decoding step (prefilled together, within a token budget
so running rows are not stalled for long); a finished sequence hands its result over and frees its slot the
moment its last token is out. It knows the engine only by four calls: prefill, decode, free, detokenize.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Iterable

from app.model.sequence import GenerationResult, Sequence

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKEN_BUDGET = 8192
# While rows are decoding, a prefill pauses all of them: a smaller group bounds the gap between their tokens
# (about 5 diagrams of 800 tokens), at the cost of more prefills when many arrive at once.
DEFAULT_DECODING_PREFILL_TOKEN_BUDGET = 4096


class Scheduler:
    def __init__(self, engine: Any, prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
                 decoding_prefill_token_budget: int = DEFAULT_DECODING_PREFILL_TOKEN_BUDGET):
        self.engine = engine
        self.rules = engine.stop_rules
        self.prefill_token_budget = prefill_token_budget
        self.decoding_prefill_token_budget = min(decoding_prefill_token_budget, prefill_token_budget)
        self.waiting: deque[Sequence] = deque()  # synchronous requests: first to free slots
        self.background: deque[Sequence] = deque()  # job pages: the slots synchronous requests leave free
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.background or self.running)

    def add(self, sequence: Sequence) -> None:
        guard = self.rules.repetition_guard
        sequence.repetition = guard.tracker() if guard is not None else None
        (self.background if sequence.background else self.waiting).append(sequence)

    def step(self) -> None:
        """Admit what fits, then advance every running sequence by one token."""
        self._drop_abandoned()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.running:
            self._decode()

    def fail_all(self, error: BaseException) -> None:
        """Hand every waiting and running sequence the error and free all slots."""
        waiting = [*self.waiting, *self.background]
        self.waiting.clear()
        self.background.clear()
        self._fail_running(error)
        for sequence in waiting:
            sequence.on_error(error)

    def _fail_running(self, error: BaseException) -> None:
        running = list(self.running)
        self.running.clear()
        self.engine.release_all()
        for sequence in running:
            sequence.on_error(error)

    def _drop_abandoned(self) -> None:
        """Timed out or disconnected while waiting: never touches the device."""
        for queue in (self.waiting, self.background):
            for sequence in [s for s in queue if s.cancel.is_set()]:
                queue.remove(sequence)
                sequence.on_done(sequence.finish("", "cancelled"))

    def _admit(self) -> list[Sequence]:
        """Waiting sequences, synchronous ones first, each kind in arrival order, as many as free slots and the
        padded prefill budget allow (the smaller one while rows decode; always at least one, however long)."""
        group: list[Sequence] = []
        longest = 0
        free = self.engine.max_rows - len(self.running)
        budget = self.decoding_prefill_token_budget if self.running else self.prefill_token_budget
        for queue in (self.waiting, self.background):
            while queue and len(group) < free:
                tokens = queue[0].inputs.prompt_tokens
                if group and max(longest, tokens) * (len(group) + 1) > budget:
                    return group
                group.append(queue.popleft())
                longest = max(longest, tokens)
        return group

    def _prefill(self, group: list[Sequence]) -> None:
        started = time.perf_counter()
        for sequence in group:
            sequence.started_at = started
            sequence.on_start()
        try:
            first_tokens = self.engine.prefill(group)
        except Exception as error:  # a bug or device error: fail these requests, keep serving the others
            logger.exception("prefill failed for %d request(s)", len(group))
            for sequence in group:
                self.engine.free(sequence)
                sequence.on_error(error)
            return
        self.running.extend(group)
        for sequence, token in zip(group, first_tokens):
            self._advance(sequence, token)

    def _decode(self) -> None:
        rows = list(self.running)
        try:
            advanced = self.engine.decode(rows)
        except Exception as error:
            logger.exception("decoding step failed for %d request(s)", len(rows))
            self._fail_running(error)
            return
        for sequence, token in advanced:
            self._advance(sequence, token)

    def _advance(self, sequence: Sequence, token: int) -> None:
        if sequence.error is not None:  # its own token choice failed (engine): it ends, the others go on
            self.running.remove(sequence)
            self.engine.free(sequence)
            sequence.on_error(sequence.error)
            return
        sequence.append(token)
        if sequence.on_token is not None:
            sequence.on_token(token)
        reason = self.rules.reason(sequence)
        if reason is not None:
            self.running.remove(sequence)
            self.engine.free(sequence)
            sequence.on_done(sequence.finish(self.engine.detokenize(sequence.tokens), reason))


def generate(engine: Any, sequences: Iterable[Sequence],
             prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET) -> list[GenerationResult]:
    """Run sequences to completion on the calling thread (warm-up, benchmarks, tests); the first error a
    sequence met is raised, not left as a missing result."""
    sequences = list(sequences)
    errors: list[BaseException] = []
    scheduler = Scheduler(engine, prefill_token_budget)
    for sequence in sequences:
        on_error = sequence.on_error
        sequence.on_error = lambda error, on_error=on_error: (errors.append(error), on_error(error))
        scheduler.add(sequence)
    while scheduler.has_work:
        scheduler.step()
    if errors:
        raise errors[0]
    return [sequence.result for sequence in sequences]
