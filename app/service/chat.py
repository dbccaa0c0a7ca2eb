"""OpenAI Chat Completions over the service: the request's one user turn becomes an image and a prompt, which
take the same admission, decoding, batching and deadlines as POST /infer; the answer goes back as a
``chat.completion`` or as its server-sent chunks, token by token."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from pydantic import ValidationError

from app.errors import InvalidRequestError, ModelNotFoundError
from app.model.engine import Engine
from app.model.grammar import JsonFormat
from app.model.sampling import SamplingParams
from app.pipeline.bpmn import looks_like_bpmn
from app.pipeline.image_source import load_image_url, parse_hosts
from app.service.chat_schemas import (
    PROMPT_MAX_CHARS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ImagePart,
    ModelCard,
    ModelList,
    TextPart,
    Usage,
    request_problems,
)
from app.service.inference import InferenceService, InferParams, PreparedRequest
from app.service.runner import Ticket
from app.service.schemas import InferResponse

logger = logging.getLogger(__name__)

TABLE_FIELDS = {"rows", "table", "table_error"}


@dataclass(frozen=True)
class Conversation:
    image_url: str
    prompt: str  # "" = the service's default instruction
    system: str | None  # the system (and developer) messages' text, joined


def served_model_id(service: InferenceService) -> str:
    """SERVED_MODEL_NAME, else the base model and a digest of the adapter: replicas serving the same adapter
    share one id, and a new adapter is a new id."""
    return service.settings.served_model_name or digest_model_id(service)


def digest_model_id(service: InferenceService) -> str:
    engine = service.runner.engine
    adapter = engine.loaded.adapter if engine is not None else None
    base = service.settings.base_model_id
    return f"{base}+lora-{adapter.digest}" if adapter else base


def model_ids(service: InferenceService) -> set[str]:
    """The ids a request may name: the served one, and the digest id as an alias (clients configured before
    SERVED_MODEL_NAME was set keep working through a rollout)."""
    return {served_model_id(service), digest_model_id(service)}


def list_models(service: InferenceService) -> ModelList:
    service.runner.check_ready()
    return ModelList(data=[ModelCard(id=served_model_id(service), created=service.loaded_at or 0)])


def retrieve_model(service: InferenceService, model_id: str) -> ModelCard:
    models = list_models(service)
    if model_id not in model_ids(service):
        raise ModelNotFoundError(f"no model {model_id!r} here; this service serves {models.data[0].id!r}",
                                 param="model")
    return ModelCard(id=model_id, created=models.data[0].created)


async def parse_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate off the event loop: a body with a 20 MB image is ~50 ms of JSON."""
    try:
        return await asyncio.to_thread(ChatCompletionRequest.model_validate_json, body)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "json_invalid":
            raise InvalidRequestError(f"the body is not valid JSON: {problem['msg']}") from None
        if problem["type"] == "missing":
            raise InvalidRequestError(f"missing required parameter: {where!r}", param=where) from None
        raise InvalidRequestError(f"{where}: {problem['msg']}", param=where or None) from None


def _text_of(message: ChatMessage) -> tuple[str, list[str]]:
    """A message's text (its text parts joined) and its image URLs."""
    content = message.content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content or []
    text = "\n".join(part.text for part in parts if isinstance(part, TextPart)).strip()
    return text, [part.image_url.url for part in parts if isinstance(part, ImagePart)]


def read_conversation(request: ChatCompletionRequest) -> Conversation:
    """System (or developer) messages, then the one user message with its image and text. One diagram per
    request, answered in one turn: assistant and tool turns, or a second user message, are refused with why."""
    roles = [message.role for message in request.messages]
    turns = sorted({role for role in roles if role not in ("system", "developer", "user")})
    if turns:
        raise InvalidRequestError(f"{' and '.join(turns)} messages are not supported: each request is one diagram "
                                  "answered in one turn (system messages, then one user message)", param="messages")
    users = [index for index, role in enumerate(roles) if role == "user"]
    if len(users) != 1:
        raise InvalidRequestError(f"one user message per request ({len(users)} given): send each diagram on its "
                                  "own", param="messages")
    if users[0] != len(roles) - 1:
        raise InvalidRequestError("system messages go before the user message", param="messages")
    system_texts = []
    for message in request.messages[:-1]:
        text, images = _text_of(message)
        if images:
            raise InvalidRequestError(f"a {message.role} message holds text only; put the image in the user "
                                      "message", param="messages")
        system_texts.append(text)
    system = "\n\n".join(text for text in system_texts if text) or None
    prompt, images = _text_of(request.messages[-1])
    if not images:
        raise InvalidRequestError('the user message holds no image: add a content part {"type": "image_url", '
                                  '"image_url": {"url": "data:image/png;base64,..."}}', param="messages")
    if len(images) > 1:
        raise InvalidRequestError(f"one image per request ({len(images)} given): send each diagram on its own",
                                  param="messages")
    for name, text in (("user message", prompt), ("system messages", system or "")):
        if len(text) > PROMPT_MAX_CHARS:
            raise InvalidRequestError(f"the text of the {name} is {len(text)} characters; at most "
                                      f"{PROMPT_MAX_CHARS}", param="messages")
    return Conversation(images[0], prompt, system)


def max_new_tokens(request: ChatCompletionRequest, engine: Engine) -> int | None:
    """The token cap asked for, capped at MAX_NEW_TOKENS (an answer it cuts ends with finish_reason length)."""
    wanted = request.max_completion_tokens or request.max_tokens
    return min(wanted, engine.defaults.max_new_tokens) if wanted is not None else None


def sampling_of(request: ChatCompletionRequest) -> SamplingParams:
    return SamplingParams(
        temperature=request.temperature or 0.0, top_p=request.top_p or 1.0, top_k=max(request.top_k or 0, 0),
        seed=request.seed, frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0, repetition_penalty=request.repetition_penalty or 1.0)


def json_format_of(request: ChatCompletionRequest) -> JsonFormat | None:
    wanted = request.response_format
    if wanted is None or wanted.type == "text":
        return None
    if wanted.type == "json_object":
        return JsonFormat({"type": "object"}, strict=False, param="response_format")
    return JsonFormat(wanted.json_schema.json_schema, strict=bool(wanted.json_schema.strict), param="response_format")


async def start_chat_completion(service: InferenceService, body: bytes, ticket: Ticket
                                ) -> tuple[ChatCompletionRequest, PreparedRequest | InferResponse]:
    """Everything that can refuse the request (400, 404, 413, 415), before a stream's first byte. A BPMN file
    is answered here, from its XML (no model runs), as /infer answers it."""
    request = await parse_request(body)
    problems = request_problems(request)
    if problems:
        param, message = problems[0]
        raise InvalidRequestError(message, param=param)
    model_id = served_model_id(service)
    if request.model not in model_ids(service):
        raise ModelNotFoundError(f"no model {request.model!r} here; this service serves {model_id!r} "
                                 "(GET /v1/models)", param="model")
    turn = read_conversation(request)
    settings = service.settings
    params = InferParams(prompt=turn.prompt, max_new_tokens=max_new_tokens(request, service.runner.engine),
                         system=turn.system, sampling=sampling_of(request), json_format=json_format_of(request))
    data = await load_image_url(turn.image_url, allowed_hosts=parse_hosts(settings.allowed_image_hosts),
                                max_bytes=settings.max_upload_bytes, timeout_s=settings.image_fetch_timeout_s)
    if looks_like_bpmn(data):
        return request, await service.read_bpmn(data, params, ticket)
    return request, await service.prepare(data, params, ticket)


def openai_finish_reason(reason: str) -> str:
    """OpenAI knows stop and length; a generation cut for degenerate repetition did not end its answer."""
    return "stop" if reason == "stop" else "length"


def usage_of(response: InferResponse) -> Usage:
    meta = response.metadata
    return Usage(prompt_tokens=meta.prompt_tokens, completion_tokens=meta.completion_tokens,
                 total_tokens=meta.prompt_tokens + meta.completion_tokens)


def completion(response: InferResponse, model_id: str) -> ChatCompletion:
    meta = response.metadata
    return ChatCompletion(
        id=f"chatcmpl-{meta.request_id}", created=int(time.time()), model=model_id,
        choices=[Choice(message=AssistantMessage(content=response.description),
                        finish_reason=openai_finish_reason(meta.finish_reason))],
        usage=usage_of(response), rows=response.rows, table=response.table, table_error=response.table_error,
        details=meta)
