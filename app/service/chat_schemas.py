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

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a last chunk with the token usage")


class ChatCompletionRequest(BaseModel):
    """One user turn with one image of a diagram, and optionally the instruction as text."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the id from GET /v1/models")
    messages: list[ChatMessage] = Field(min_length=1, description="exactly one user message: one image_url part "
                                        "and optional text parts (the instruction; empty = the default)")
    max_completion_tokens: int | None = Field(None, ge=1, description="cap on generated tokens, up to "
                                              "MAX_NEW_TOKENS (default: MAX_NEW_TOKENS)")
    max_tokens: int | None = Field(None, ge=1, description="older name of max_completion_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="decoding is greedy: only 0 or absent")
    top_p: float | None = Field(None, gt=0, le=1, description="decoding is greedy: only 1 or absent")
    n: int | None = Field(None, ge=1, description="only 1")
    stream: bool = Field(False, description="answer as server-sent events, token by token")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="not supported: the answer ends with its table")
    logprobs: bool | None = Field(None, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported")
    response_format: dict[str, Any] | None = Field(None, description="only {\"type\": \"text\"}")
    seed: int | None = Field(None, description="accepted and ignored: greedy decoding is deterministic")
    user: str | None = Field(None, description="accepted and ignored")


def request_problems(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(param, message) for each sampling or output option this service does not honour."""
    problems = []
    if request.temperature not in (None, 0):
        problems.append(("temperature", "decoding is greedy; temperature must be 0 or absent"))
    if request.top_p not in (None, 1):
        problems.append(("top_p", "decoding is greedy; top_p must be 1 or absent"))
    if request.n not in (None, 1):
        problems.append(("n", "one choice per request; n must be 1 or absent"))
    if request.stop:
        problems.append(("stop", "stop sequences are not supported; the answer ends with its table"))
    if request.logprobs:
        problems.append(("logprobs", "log probabilities are not supported"))
    if request.tools:
        problems.append(("tools", "tools are not supported"))
    if request.response_format and request.response_format.get("type") != "text":
        problems.append(("response_format", "only the text response format is supported"))
    if request.stream_options is not None and not request.stream:
        problems.append(("stream_options", "stream_options is only allowed with stream: true"))
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
