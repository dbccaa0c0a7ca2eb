"""The server-sent events of a streamed chat completion: the OpenAI chunk format over the service's token
stream, with the text decoded piece by piece."""

from __future__ import annotations

import json
import logging
import time
from typing import AsyncIterator

from pydantic import BaseModel

from app.errors import ServiceError
from app.http.access_log import note, note_answer
from app.http.envelope import openai_error
from app.model.sequence import GenerationResult
from app.pipeline.textstream import IncrementalText
from app.request_context import current_request_id
from app.service.chat import TABLE_FIELDS, openai_finish_reason, served_model_id, usage_of
from app.service.chat_schemas import ChatCompletionChunk, ChatCompletionRequest, ChunkChoice, Delta
from app.service.inference import InferenceService, PreparedRequest
from app.service.schemas import InferResponse

logger = logging.getLogger(__name__)


class ChunkStream:
    """The server-sent events of one streamed completion."""

    def __init__(self, service: InferenceService, request: ChatCompletionRequest,
                 prepared: PreparedRequest | InferResponse):
        self.service = service
        self.prepared = prepared  # an InferResponse already: a BPMN file, answered from its XML
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.model_id = served_model_id(service)
        self.id = f"chatcmpl-{current_request_id()}"
        self.created = int(time.time())

    async def events(self) -> AsyncIterator[str]:
        """Role first, then content as it is generated, then finish_reason with the parsed table, the usage if
        asked, and [DONE]. An error after the first byte can only be an event: OpenAI's SDKs raise it."""
        if isinstance(self.prepared, InferResponse):
            yield self._chunk(Delta(role="assistant", content=""))
            note_answer(self.prepared.metadata)
            yield self._chunk(Delta(content=self.prepared.description))
            yield self._last_chunks(self.prepared)
            yield "data: [DONE]\n\n"
            return
        text = IncrementalText(self.prepared.engine.decode_tokens)
        try:
            yield self._chunk(Delta(role="assistant", content=""))
            async for item in self.service.stream(self.prepared):
                if isinstance(item, GenerationResult):
                    response = self.service.respond(self.prepared, item)
                    note_answer(response.metadata)
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
        note(error_type=error.error_type)  # the access log and the failed counter see it, under status 200
        return f"data: {json.dumps(openai_error(error), ensure_ascii=False)}\n\n"
