"""Structured output: a JSON schema (or any JSON) compiled by xgrammar into a token grammar, and one matcher per
constrained row that masks the step's logits to the tokens the grammar allows and advances with the chosen one.

xgrammar is the library vLLM and SGLang use; it runs on the CPU and CUDA. Compiled grammars are cached by the
compiler (a schema sent again costs nothing); compiling happens while a request is prepared, off the event loop
and off the model thread, so the model thread only fills a bitmask per constrained row per step.
JSON is compiled without free whitespace between tokens: a grammar that allows any whitespace lets a model
loop on blanks until its token cap, a known failure of constrained decoding.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

# A schema larger than this is refused before compiling: compile time and memory grow with it.
MAX_SCHEMA_CHARS = 100_000
MAX_MIN_LENGTH = 2_000  # characters a string must at least have (compiles in ~1 s); more would not fit an answer


@dataclass(frozen=True)
class JsonFormat:
    """What a request asks its answer to be: JSON for ``schema`` (``strict``: no properties beyond those named,
    as OpenAI's strict mode). OpenAI's ``json_object`` is ``JsonFormat({"type": "object"}, strict=False)``."""

    schema: dict[str, Any]
    strict: bool = True
    param: str = "json_schema"  # the request field it came from, named by a 400


def bounded_strings_as_patterns(schema: Any) -> Any:
    """The schema with each string's ``minLength``/``maxLength`` said as a ``pattern`` of as many characters.

    xgrammar (0.2.9) compiles a length-bounded string to a bare character class that lets raw control
    characters through and no escapes (mlc-ai/xgrammar#800, fix pending in #880): the answer is then not JSON.
    Its pattern path is JSON-string aware, and a pattern counts decoded characters, as maxLength does."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rewritten = {key: bounded_strings_as_patterns(value) for key, value in schema.items()}
    if rewritten.get("type") == "string" and ("minLength" in rewritten or "maxLength" in rewritten) \
            and not {"pattern", "format", "enum", "const"} & rewritten.keys():
        low = _length(rewritten.pop("minLength", 0), "minLength")
        high = _length(rewritten.pop("maxLength"), "maxLength") if "maxLength" in rewritten else None
        # A pattern's lower bound unrolls into the automaton: its compile time grows with its square.
        if low > MAX_MIN_LENGTH:
            raise GrammarError(f"minLength {low} is over {MAX_MIN_LENGTH}, more than one answer can hold")
        rewritten["pattern"] = f"^[\\s\\S]{{{low},{'' if high is None else high}}}$"
    return rewritten


def _length(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GrammarError(f"{name} must be a non-negative integer, not {json.dumps(value)[:40]}")
    return value


class GrammarError(ValueError):
    """The schema cannot be compiled (the message says why, for a 400)."""


class Grammars:
    """The compiler for one tokenizer and vocabulary (the model's, which may be padded past the tokenizer's)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer, self._vocab_size, self._stop = tokenizer, vocab_size, stop_token_ids
        self._compiler = None
        self._lock = threading.Lock()  # built once, on first use: importing xgrammar and reading the vocab

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                                stop_token_ids=self._stop)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=256 * 2 ** 20)
            return self._compiler

    def compile(self, wanted: JsonFormat) -> Any:
        """A compiled grammar for JSON matching the schema."""
        compiler = self._get_compiler()
        try:
            text = json.dumps(bounded_strings_as_patterns(wanted.schema))
        except RecursionError:
            raise GrammarError("the JSON schema is nested too deeply") from None
        if len(text) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the JSON schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS}")
        try:
            return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=wanted.strict)
        except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with the reason
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GrammarError(f"the JSON schema cannot be used: {reason}") from None

    def matcher(self, compiled: Any) -> "GrammarMatcher":
        return GrammarMatcher(compiled, self._vocab_size)


class GrammarMatcher:
    """One row's place in its grammar."""

    def __init__(self, compiled: Any, vocab_size: int):
        import xgrammar

        self._xgrammar = xgrammar
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()

    def mask(self, scores: torch.Tensor) -> None:
        """Tokens the grammar does not allow next get -inf in ``scores`` ``[vocab]`` (float32, any device)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask.to(scores.device, non_blocking=True)
        # Off the CPU, plain torch ops: xgrammar's CUDA and Triton kernels compile at first use, which needs a
        # compiler on the serving machine; a mask over one row is no work worth that risk.
        backend = "cpu" if scores.device.type == "cpu" else "torch_native"
        self._xgrammar.apply_token_bitmask_inplace(scores[None], bitmask, vocab_size=self._vocab_size,
                                                   backend=backend)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
