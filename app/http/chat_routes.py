"""HTTP routes of the OpenAI-compatible API (/v1): parse, call the chat-completions serving code, shape the answer.
Errors here take OpenAI's shape (see envelope.py), so its SDKs, LiteLLM and gateways read them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.http.access_log import note_answer
from app.http.chat_stream import ChunkStream
from app.http.dependencies import ServiceDep
from app.http.disconnect import EventStreamResponse, until_disconnect
from app.http.docs import json_request_body
from app.errors import InvalidRequestError, ModelNotFoundError
from app.http.envelope import EnvelopedRoute, error_responses
from app.service.chat import completion, list_models, retrieve_model, served_model_id, start_chat_completion
from app.service.chat_schemas import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList, OpenAIErrorResponse
from app.service.schemas import InferResponse

router = APIRouter(prefix="/v1", route_class=EnvelopedRoute, tags=["openai"])

_DESCRIPTIONS = {
    400: "Invalid request: not system messages then one user message with one image, a parameter this service "
         "does not implement (n > 1, stop, logprobs, tools, ...) or does not know, a JSON schema that cannot be "
         "compiled, a remote image URL on a host not in ALLOWED_IMAGE_HOSTS or that could not be fetched, an "
         "undecodable image",
    404: "The model named is not the one this service serves (GET /v1/models)",
}


_EXAMPLES = {
    400: InvalidRequestError("log probabilities are not supported", param="logprobs"),
    404: ModelNotFoundError("no model 'gpt-4o' here; this service serves 'qwen3-vl-2b-diagrams'", param="model"),
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(*codes, model=OpenAIErrorResponse, descriptions=_DESCRIPTIONS, examples=_EXAMPLES)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="OpenAI-compatible: the table of a diagram sent as an image_url, whole or streamed",
    description="Optional system (or developer) messages, then one user message with one `image_url` part (a "
    "base64 `data:` URL, or an http(s) URL on a host in `ALLOWED_IMAGE_HOSTS`; an image, a PDF, an SVG or a BPMN "
    "file, which is answered from its XML) and optional text parts (the instruction; empty = the default). "
    "Decoding is greedy unless `temperature` > 0 (then `top_p`, `top_k`, `seed` apply); `frequency_penalty`, "
    "`presence_penalty` and `repetition_penalty` apply either way. `response_format` `json_object` or "
    "`json_schema` decodes under a grammar, so the answer is valid JSON (for the schema). `max_tokens` above "
    "MAX_NEW_TOKENS is MAX_NEW_TOKENS. `stream: true` answers with server-sent events, token by token. Besides "
    "OpenAI's fields, the answer carries `rows`, `table` and `table_error` (the parsed table) and `details` "
    "(timings and sizes, as POST /infer's `metadata`).",
    operation_id="create_chat_completion",
    openapi_extra=json_request_body(ChatCompletionRequest),
    responses={**_errors(400, 401, 404, 408, 413, 415, 500, 503, 504),
               200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "a chat.completion (JSON), or with stream: true chat.completion.chunk events"}},
)
async def create_chat_completion(request: Request, service: ServiceDep) -> Any:
    body = await request.body()
    chat, prepared = await until_disconnect(
        request, start_chat_completion(service, body, request.state.ticket))
    if chat.stream:
        return EventStreamResponse(ChunkStream(service, chat, prepared).events())
    if isinstance(prepared, InferResponse):  # a BPMN file, answered from its XML
        response = prepared
    else:
        response = await until_disconnect(request, service.complete(prepared))
    note_answer(response.metadata)
    return completion(response, served_model_id(service))


@router.get("/models", response_model=ModelList, summary="OpenAI-compatible: the model this service serves",
            operation_id="list_models", responses=_errors(401, 500, 503))
async def read_models(service: ServiceDep) -> ModelList:
    return list_models(service)


@router.get("/models/{model_id:path}", response_model=ModelCard, summary="OpenAI-compatible: one model",
            operation_id="retrieve_model", responses=_errors(401, 404, 500, 503))
async def read_model(model_id: str, service: ServiceDep) -> ModelCard:
    return retrieve_model(service, model_id)
