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
from app.pipeline.image_source import load_image_url, parse_hosts
from app.service.chat_schemas import (
    PROMPT_MAX_CHARS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
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
class UserTurn:
    image_url: str
    prompt: str  # "" = the service's default instruction


def served_model_id(service: InferenceService) -> str:
    """SERVED_MODEL_NAME, else the base model and a digest of the adapter: replicas serving the same adapter
    share one id, and a new adapter is a new id."""
    settings = service.settings
    if settings.served_model_name:
        return settings.served_model_name
    engine = service.runner.engine
    adapter = engine.loaded.adapter if engine is not None else None
    return f"{settings.base_model_id}+lora-{adapter.digest}" if adapter else settings.base_model_id


def list_models(service: InferenceService) -> ModelList:
    service.runner.check_ready()
    return ModelList(data=[ModelCard(id=served_model_id(service), created=service.loaded_at or 0)])


def retrieve_model(service: InferenceService, model_id: str) -> ModelCard:
    models = list_models(service)
    if model_id != models.data[0].id:
        raise ModelNotFoundError(f"no model {model_id!r} here; this service serves {models.data[0].id!r}",
                                 param="model")
    return models.data[0]


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


def read_user_turn(request: ChatCompletionRequest) -> UserTurn:
    """The one user message's image and text. Other roles are refused, not ignored: the service holds its own
    instruction, and a system prompt it silently dropped would be an answer to another question."""
    others = sorted({message.role for message in request.messages if message.role != "user"})
    if others:
        raise InvalidRequestError(f"only one user message is supported, not {', '.join(others)} messages: put "
                                  "your instruction as text in the user message", param="messages")
    if len(request.messages) != 1:
        raise InvalidRequestError(f"one user message per request ({len(request.messages)} given)", param="messages")
    content = request.messages[0].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content or []
    images = [part.image_url.url for part in parts if isinstance(part, ImagePart)]
    if not images:
        raise InvalidRequestError('the user message holds no image: add a content part {"type": "image_url", '
                                  '"image_url": {"url": "data:image/png;base64,..."}}', param="messages")
    if len(images) > 1:
        raise InvalidRequestError(f"one image per request ({len(images)} given): send each diagram on its own",
                                  param="messages")
    prompt = "\n".join(part.text for part in parts if isinstance(part, TextPart)).strip()
    if len(prompt) > PROMPT_MAX_CHARS:
        raise InvalidRequestError(f"the text of the user message is {len(prompt)} characters; at most "
                                  f"{PROMPT_MAX_CHARS}", param="messages")
    return UserTurn(images[0], prompt)


def max_new_tokens(request: ChatCompletionRequest, engine: Engine) -> int | None:
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    wanted = request.max_completion_tokens or request.max_tokens
    limit = engine.defaults.max_new_tokens
    if wanted is not None and wanted > limit:
        raise InvalidRequestError(f"{param}={wanted} is over this service's limit of {limit} (MAX_NEW_TOKENS)",
                                  param=param)
    return wanted


async def start_chat_completion(service: InferenceService, body: bytes, ticket: Ticket
                                ) -> tuple[ChatCompletionRequest, PreparedRequest]:
    """Everything that can refuse the request (400, 404, 413, 415), before a stream's first byte."""
    request = await parse_request(body)
    problems = request_problems(request)
    if problems:
        param, message = problems[0]
        raise InvalidRequestError(message, param=param)
    model_id = served_model_id(service)
    if request.model != model_id:
        raise ModelNotFoundError(f"no model {request.model!r} here; this service serves {model_id!r} "
                                 "(GET /v1/models)", param="model")
    turn = read_user_turn(request)
    settings = service.settings
    wanted = max_new_tokens(request, service.runner.engine)
    data = await load_image_url(turn.image_url, allowed_hosts=parse_hosts(settings.allowed_image_hosts),
                                max_bytes=settings.max_upload_bytes, timeout_s=settings.image_fetch_timeout_s)
    prepared = await service.prepare(data, InferParams(prompt=turn.prompt, max_new_tokens=wanted), ticket)
    return request, prepared


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
