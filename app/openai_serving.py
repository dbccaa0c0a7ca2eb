"""OpenAI Chat Completions over the service: the request's one user turn becomes an image and a prompt, which
take the same admission, decoding, batching and deadlines as POST /infer; the answer goes back as a
``chat.completion`` or as its server-sent chunks, token by token."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from pydantic import BaseModel, ValidationError

from .access import note
from .engine import Engine
from .envelope import openai_error
from .errors import InvalidRequestError, ModelNotFoundError, ServiceError
from .image_source import load_image_url, parse_hosts
from .openai_protocol import (PROMPT_MAX_CHARS, AssistantMessage, ChatCompletion, ChatCompletionChunk,
                              ChatCompletionRequest, Choice, ChunkChoice, Delta, ImagePart, ModelCard, ModelList,
                              TextPart, Usage, request_problems)
from .protocol import InferResponse
from .requestid import current_request_id
from .runner import Ticket
from .sequence import GenerationResult
from .serving import InferenceService, InferParams, PreparedRequest
from .textstream import IncrementalText

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


class ChunkStream:
    """The server-sent events of one streamed completion."""

    def __init__(self, service: InferenceService, request: ChatCompletionRequest, prepared: PreparedRequest):
        self.service = service
        self.prepared = prepared
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.model_id = served_model_id(service)
        self.id = f"chatcmpl-{current_request_id()}"
        self.created = int(time.time())

    async def events(self) -> AsyncIterator[str]:
        """Role first, then content as it is generated, then finish_reason with the parsed table, the usage if
        asked, and [DONE]. An error after the first byte can only be an event: OpenAI's SDKs raise it."""
        text = IncrementalText(self.prepared.engine.decode_tokens)
        try:
            yield self._chunk(Delta(role="assistant", content=""))
            async for item in self.service.stream(self.prepared):
                if isinstance(item, GenerationResult):
                    response = self.service.respond(self.prepared, item)
                    tail = text.finish(response.description)
                    if tail:
                        yield self._chunk(Delta(content=tail))
                    yield self._last_chunks(response)
                else:
                    delta = text.push(item)
                    if delta:
                        yield self._chunk(Delta(content=delta))
        except ServiceError as error:
            yield self._error(error)
        except Exception:  # noqa: BLE001 - a bug mid-stream: the client still learns it failed, and why not
            logger.exception("streamed completion failed")
            yield self._error(ServiceError())
        yield "data: [DONE]\n\n"

    def _chunk(self, delta: Delta, finish_reason: str | None = None, **extra: object) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model_id,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)], **extra)
        return self._event(chunk, exclude=(set() if extra else set(TABLE_FIELDS))
                           | (set() if self.include_usage else {"usage"}))

    def _last_chunks(self, response: InferResponse) -> str:
        finished = self._chunk(Delta(), openai_finish_reason(response.metadata.finish_reason), rows=response.rows,
                               table=response.table, table_error=response.table_error)
        if not self.include_usage:
            return finished
        usage = ChatCompletionChunk(id=self.id, created=self.created, model=self.model_id, choices=[],
                                    usage=usage_of(response))
        return finished + self._event(usage, exclude=TABLE_FIELDS)

    @staticmethod
    def _event(model: BaseModel, exclude: set[str]) -> str:
        return f"data: {model.model_dump_json(exclude=exclude)}\n\n"

    @staticmethod
    def _error(error: ServiceError) -> str:
        note(error_type=error.error_type)  # the access log and the rejected counter see it, under status 200
        return f"data: {json.dumps(openai_error(error), ensure_ascii=False)}\n\n"
