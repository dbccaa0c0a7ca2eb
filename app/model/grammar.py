"""Structured output: a JSON schema (or any JSON) compiled by xgrammar into a token grammar, and one matcher per
constrained row that masks the step's logits to the tokens the grammar allows and advances with the chosen one.

xgrammar is the library vLLM and SGLang use; it runs on the CPU and CUDA. A schema is first checked, rewritten and
priced (schema_rules.py); compiling happens while a request is prepared, on one thread of its own, off the event
loop and off the model thread, so the model thread only fills a bitmask per constrained row per step. Grammars
compiled lately are kept: a schema sent again costs nothing.
JSON is compiled without free whitespace between tokens: a grammar that allows any whitespace lets a model
loop on blanks until its token cap, a known failure of constrained decoding.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch

from app.errors import OverloadedError
from app.model.schema_rules import GrammarError, prepared_schema

__all__ = ["GrammarError", "Grammars", "GrammarMatcher", "JsonFormat"]

# A schema larger than this is refused before compiling: compile time and memory grow with it.
MAX_SCHEMA_CHARS = 100_000
# One compile at a time, on its own thread (a compile uses a core: it must not crowd the model's threads), at most
# this many waiting for it, and none waited on longer than this: past either a request is refused, not queued
# for minutes. A schema compiled lately, or being compiled, takes no place: its requests share the one grammar.
MAX_WAITING_COMPILES = 4
COMPILE_TIMEOUT_S = 30.0
READY_GRAMMARS = 32
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


@dataclass(frozen=True)
class JsonFormat:
    """What a request asks its answer to be: JSON for ``schema`` (``strict``: no properties beyond those named,
    as OpenAI's strict mode). OpenAI's ``json_object`` is ``JsonFormat({"type": "object"}, strict=False)``."""

    schema: dict[str, Any]
    strict: bool = True
    param: str = "json_schema"  # the request field it came from, named by a 400


class Grammars:
    """The compiler for one tokenizer and vocabulary (the model's, which may be padded past the tokenizer's)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer, self._vocab_size, self._stop = tokenizer, vocab_size, stop_token_ids
        self._compiler = None
        self._lock = threading.Lock()  # built once, on first use: importing xgrammar and reading the vocab
        self._compiles = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._waiting = threading.BoundedSemaphore(MAX_WAITING_COMPILES + 1)  # + the one compiling
        self._cache_lock = threading.RLock()  # RLock: a future already done runs its callback in the caller
        self._ready: OrderedDict[tuple[str, bool], Any] = OrderedDict()
        self._in_flight: dict[tuple[str, bool], Future] = {}

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                                stop_token_ids=self._stop)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=256 * 2 ** 20)
            return self._compiler

    def compile(self, wanted: JsonFormat, timeout_s: float = COMPILE_TIMEOUT_S) -> Any:
        """A compiled grammar for JSON matching the schema (blocks the calling thread, not the event loop).
        GrammarError (naming the request's field): unusable schema; OverloadedError: compiles are backed up, or
        this one is not done in time."""
        try:
            return self._compile(wanted, timeout_s)
        except GrammarError as error:  # a fresh one: waiters of one compile share its exception, not their field
            raise GrammarError(str(error), error.param or wanted.param) from None

    def _compile(self, wanted: JsonFormat, timeout_s: float) -> Any:
        try:
            sent = len(json.dumps(wanted.schema, separators=(",", ":")))  # as the client wrote it, less blanks
            if sent > MAX_SCHEMA_CHARS:
                raise GrammarError(f"the JSON schema is {sent} characters; at most {MAX_SCHEMA_CHARS}")
            rewritten, _ = prepared_schema(wanted.schema)
            text = json.dumps(rewritten, separators=(",", ":"))
        except RecursionError:
            raise GrammarError("the JSON schema is nested too deeply") from None
        key = (text, wanted.strict)
        with self._cache_lock:
            if key in self._ready:
                self._ready.move_to_end(key)
                return self._ready[key]
            future = self._in_flight.get(key)
            if future is None:
                if not self._waiting.acquire(blocking=False):
                    raise OverloadedError(f"{MAX_WAITING_COMPILES} JSON schemas are already waiting to be "
                                          "compiled; retry shortly", headers={"Retry-After": "2"})
                try:
                    future = self._compiles.submit(self._compile_now, text, wanted.strict)
                except BaseException:
                    self._waiting.release()
                    raise
                self._in_flight[key] = future
                future.add_done_callback(lambda done: self._landed(key, done))
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:  # it goes on and lands in the cache: the same schema sent again is then instant
            raise OverloadedError(f"the JSON schema's grammar was not ready within {timeout_s:.0f} s; retry later",
                                  headers={"Retry-After": "10"}) from None

    def _landed(self, key: tuple[str, bool], future: Future) -> None:
        with self._cache_lock:
            self._in_flight.pop(key, None)
            if not future.cancelled() and future.exception() is None:
                self._ready[key] = future.result()
                while len(self._ready) > READY_GRAMMARS:
                    self._ready.popitem(last=False)
        self._waiting.release()

    def _compile_now(self, text: str, strict: bool) -> Any:
        compiler = self._get_compiler()
        try:
            return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=strict)
        except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with the reason
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = _XGRAMMAR_PREFIX.sub("", reason)  # its log prefix: a time and a C++ file and line
            raise GrammarError(f"the JSON schema cannot be used: {reason}") from None

    def matcher(self, compiled: Any, param: str | None = None) -> "GrammarMatcher":
        return GrammarMatcher(compiled, self._vocab_size, param)


class GrammarMatcher:
    """One row's place in its grammar."""

    def __init__(self, compiled: Any, vocab_size: int, param: str | None = None):
        import xgrammar

        self._xgrammar = xgrammar
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._param = param
        self._accepted = 0

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()

    def mask(self, scores: torch.Tensor) -> None:
        """Tokens the grammar does not allow next get -inf in ``scores`` ``[vocab]`` (float32, any device)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if not self._bitmask.any():  # a schema that compiles yet admits no answer, e.g. a pattern nothing matches
            raise GrammarError(f"the JSON schema allows no token after the first {self._accepted} of the answer: "
                               "nothing can satisfy it", self._param)
        bitmask = self._bitmask.to(scores.device, non_blocking=True)
        # Off the CPU, plain torch ops: xgrammar's CUDA and Triton kernels compile at first use, which needs a
        # compiler on the serving machine; a mask over one row is no work worth that risk.
        backend = "cpu" if scores.device.type == "cpu" else "torch_native"
        self._xgrammar.apply_token_bitmask_inplace(scores[None], bitmask, vocab_size=self._vocab_size,
                                                   backend=backend)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
        self._accepted += 1
