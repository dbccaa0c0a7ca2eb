"""Pydantic models of the OpenAI-compatible routes: the subset of the Chat Completions API this service honours.

Fields the API defines and this service cannot honour are declared, so a request that relies on them is refused
with a message instead of being answered as if they had been applied (``request_problems``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from app.service.schemas import InferMetadata, StepRow, TableData

PROMPT_MAX_CHARS = 4000


class ImageURL(BaseModel):
    url: str = Field(description="a data: URL (base64 PNG, JPEG, WebP, GIF, BMP, TIFF or PDF), or an http(s) URL "
                     "on a host listed in ALLOWED_IMAGE_HOSTS", examples=["data:image/png;base64,iVBORw0KGgo..."])
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="accepted and ignored: the image is always fitted to MAX_IMAGE_TOKENS")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


ContentPart = Annotated[ImagePart | TextPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a last chunk with the token usage")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64, description="the schema's name (OpenAI requires one; not used otherwise)")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer must match")
    strict: bool | None = Field(None, description="true: no properties beyond the schema's (OpenAI's strict mode)")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")


def number(low: float, high: float, description: str, above: bool = False) -> Any:
    """An optional sampling number from ``low`` (or above it) to ``high``: a JSON number only, finite (a string,
    true or NaN is a 400 saying so, not a number guessed at)."""
    bounds = {"gt": low} if above else {"ge": low}
    return Field(None, strict=True, allow_inf_nan=False, le=high, description=description, **bounds)


class ChatCompletionRequest(BaseModel):
    """System messages, then one user turn with one image of a diagram and optionally the instruction as text.

    Every parameter of OpenAI's Chat Completions either takes effect or is refused with 400 naming it; an
    unknown one is refused too (``request_problems``)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="the id from GET /v1/models")
    messages: list[ChatMessage] = Field(min_length=1, description="optional system (or developer) messages, then "
                                        "one user message: one image_url part and optional text parts (the "
                                        "instruction; empty = the default)")
    max_completion_tokens: int | None = Field(None, ge=1, description="cap on generated tokens; above "
                                              "MAX_NEW_TOKENS it is MAX_NEW_TOKENS (default)")
    max_tokens: int | None = Field(None, ge=1, description="older name of max_completion_tokens")
    temperature: float | None = number(0, 2, "0 or absent: greedy (the default); above 0 the answer is sampled "
                                       "(below 1e-5: greedy, as vLLM)")
    top_p: float | None = number(0, 1, "nucleus sampling, when sampling", above=True)
    top_k: int | None = Field(None, ge=-1, description="extension (vLLM's): sample among the k most likely "
                              "tokens; 0 or -1: all")
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 64 - 1,
                             description="makes a sampled answer reproducible on the same device")
    frequency_penalty: float | None = number(-2, 2, "as OpenAI defines it")
    presence_penalty: float | None = number(-2, 2, "as OpenAI defines it")
    repetition_penalty: float | None = number(0.01, 10, "extension (vLLM's): above 1 discourages tokens of the "
                                              "prompt and of the answer so far (below 0.01 a logit divided by it "
                                              "overflows)")
    response_format: ResponseFormat | None = Field(None, description="text (default), json_object, or "
                                                   "json_schema: the answer is decoded under a grammar built from "
                                                   "the schema, so it is valid JSON for it")
    n: int | None = Field(None, ge=1, description="only 1")
    stream: bool = Field(False, description="answer as server-sent events, token by token")
    stream_options: StreamOptions | None = None
    # Refused when set (see request_problems): they would change the answer and are not implemented.
    stop: str | list[str] | None = Field(None, description="not supported")
    logprobs: bool | None = Field(None, description="not supported")
    top_logprobs: int | None = Field(None, description="not supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported")
    tool_choice: str | dict[str, Any] | None = Field(None, description="only \"none\"")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported")
    function_call: str | dict[str, Any] | None = Field(None, description="only \"none\"")
    audio: dict[str, Any] | None = Field(None, description="not supported")
    modalities: list[str] | None = Field(None, description="only [\"text\"]")
    prediction: dict[str, Any] | None = Field(None, description="not supported")
    reasoning_effort: str | None = Field(None, description="not supported (not a reasoning model)")
    verbosity: str | None = Field(None, description="not supported")
    web_search_options: dict[str, Any] | None = Field(None, description="not supported")
    store: bool | None = Field(None, description="only false: nothing is stored")
    # Accepted without effect on the answer: they identify or tag the request, or hint at the serving tier.
    user: str | None = Field(None, description="accepted; no effect on the answer")
    safety_identifier: str | None = Field(None, description="accepted; no effect on the answer")
    prompt_cache_key: str | None = Field(None, description="accepted; no effect on the answer")
    prompt_cache_retention: str | None = Field(None, description="accepted; no effect on the answer")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="accepted; no effect on the answer")
    metadata: dict[str, str] | None = Field(None, description="accepted; no effect on the answer")
    service_tier: Literal["auto", "default"] | None = Field(None, description="accepted; one tier here")
    parallel_tool_calls: bool | None = Field(None, description="accepted; no tools here")


def request_problems(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(param, message) for each parameter given that this service does not honour, and each unknown one."""
    problems = [(name, f"unknown parameter: {name!r}") for name in sorted(request.model_extra or {})]
    if request.n not in (None, 1):
        problems.append(("n", "one choice per request; n must be 1 or absent"))
    refused = {
        "stop": "stop sequences are not supported; the answer ends with its table",
        "logprobs": "log probabilities are not supported",
        "top_logprobs": "log probabilities are not supported",
        "logit_bias": "logit_bias is not supported",
        "tools": "tools are not supported",
        "functions": "functions are not supported",
        "audio": "audio output is not supported",
        "prediction": "predicted outputs are not supported",
        "reasoning_effort": "this model does not reason in a separate phase; reasoning_effort is not supported",
        "verbosity": "verbosity is not supported",
        "web_search_options": "web search is not supported",
    }
    present = {"top_logprobs", "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"}
    for param, message in refused.items():
        value = getattr(request, param)
        # For lists, maps and flags, empty or false changes nothing; web_search_options: {} turns search on.
        if (value is not None) if param in present else bool(value):
            problems.append((param, message))
    for param in ("tool_choice", "function_call"):
        if getattr(request, param) not in (None, "none"):
            problems.append((param, f"{param} can only be \"none\": no tools here"))
    if request.modalities not in (None, ["text"]):
        problems.append(("modalities", 'the answer is text: modalities can only be ["text"]'))
    if request.store:
        problems.append(("store", "completions are not stored here; store can only be false"))
    if request.stream_options is not None and not request.stream:
        problems.append(("stream_options", "stream_options is only allowed with stream: true"))
    formats = request.response_format
    if formats is not None and formats.type == "json_schema" and formats.json_schema is None:
        problems.append(("response_format", "response_format json_schema needs its json_schema: "
                         '{"name": ..., "schema": {...}}'))
    if formats is not None and formats.type != "json_schema" and formats.json_schema is not None:
        problems.append(("response_format", f"a json_schema is read with type json_schema, not {formats.type}"))
    if not request.temperature:  # greedy: nothing to cut or to seed; a no-op value is fine
        for param, idle in (("top_p", request.top_p in (None, 1)), ("top_k", request.top_k in (None, 0, -1))):
            if not idle:
                problems.append((param, f"{param} applies when sampling: set temperature above 0 (decoding is "
                                 "greedy by default)"))
    return problems


# --- responses --------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="the model's answer: a markdown table of steps and roles")


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended its answer; length: cut at the token cap, or stopped early because "
        "the output degenerated into repetition (details.finish_reason says which)")
    logprobs: None = None


class TableExtras(BaseModel):
    """The service's own parse of the answer, beside the OpenAI fields (SDKs ignore what they do not know)."""

    rows: list[StepRow] | None = Field(None, description="the table's rows as number/action/role, when its "
                                       "columns are recognized")
    table: TableData | None = Field(None, description="the table parsed from the answer; null when none")
    table_error: str | None = Field(None, description="why table or rows is null")


class ChatCompletion(TableExtras):
    id: str = Field(description="chatcmpl- and the request id")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time, seconds")
    model: str
    choices: list[Choice]
    usage: Usage
    details: InferMetadata = Field(description="timings and sizes, as POST /infer's metadata gives them")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict[str, Any]:
        """What did not change is left out, as OpenAI does: the last delta is {}."""
        return {key: value for key, value in handler(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(TableExtras):
    """One server-sent event of a streamed answer. The chunk carrying finish_reason also carries the parsed
    table; with stream_options.include_usage a last chunk with no choices carries the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str = Field(description="what to send as model", examples=["Qwen/Qwen3-VL-2B-Instruct+lora-3f2a9c1d"])
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the model finished loading")
    owned_by: str = "vlm-inference"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error or server_error")
    param: str | None = Field(None, description="the request field at fault, when there is one")
    code: str | None = Field(None, description="the service's error type (as POST /infer's envelope gives it)",
                             examples=["invalid_image"])


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody
