"""The OpenAI-compatible API, driven by the official ``openai`` client against a real server on loopback.

The engine is a fake that spells a known table one character per token, so the answer, its rows and the pace
of a stream are known; the last test runs the tiny real model for the byte-level tokenizer's streaming."""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import threading
import time

import httpx
import openai
import pydantic
import pytest
import uvicorn

from app.http.app import create_app
from app.model.engine import ServingDefaults
from app.service.inference import InferenceService
from app.settings import Settings

from .helpers import TABLE, FakeEngine, diagram_png, fake_factory
from .test_examples import EXAMPLES
from .test_server import free_port, running_server

KEY = "test-key"
ANSWER = "\n" + TABLE + "\n| 2 | Проверить документы | Юрист |\n"  # stripped in the final answer


class SpellingEngine(FakeEngine):
    """Generates ``text`` one character per token, then ends its turn."""

    OFFSET = 10  # token = OFFSET + code point; EOS and FILLER stay below

    def __init__(self, text: str = ANSWER, step_s: float = 0.002, max_new_tokens: int = 4096):
        super().__init__(text=text, step_s=step_s)
        self.defaults = ServingDefaults(prompt="prompt", max_new_tokens=max_new_tokens, max_image_tokens=64)
        self.finished: list = []

    def _next(self, sequence) -> int:
        done = len(sequence.tokens)
        return self.OFFSET + ord(self.text[done]) if done < len(self.text) else self.EOS

    def prefill(self, sequences) -> list[int]:
        self.prefills += 1
        self.occupants.extend(sequences)
        return [self._next(sequence) for sequence in sequences]

    def decode(self, sequences) -> list[tuple]:
        time.sleep(self.step_s)
        self.rows_per_step.append(len(sequences))
        return [(sequence, self._next(sequence)) for sequence in sequences]

    def free(self, sequence) -> None:
        self.finished.append(sequence)
        super().free(sequence)

    def decode_tokens(self, tokens: list[int]) -> str:
        return "".join(chr(token - self.OFFSET) for token in tokens if token >= self.OFFSET)


@contextlib.contextmanager
def serving(engine: FakeEngine, **settings):
    """The real app with ``engine``, served by uvicorn on loopback from a thread."""
    port = free_port()
    service = InferenceService(Settings(api_key=KEY, **settings), engine_factory=fake_factory(engine))
    server = uvicorn.Server(uvicorn.Config(create_app(service=service), host="127.0.0.1", port=port,
                                           log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.05)
        yield base, service
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client_for(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def data_url(data: bytes | None = None, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data or diagram_png()).decode()


def image_message(*urls: str, text: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module", autouse=True)
def no_proxy_for_loopback():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("no_proxy", "127.0.0.1,localhost")
        yield


@pytest.fixture(scope="module")
def image_host():
    """A plain HTTP server on loopback: /diagram.png, /big.png (over 1 MiB), /away (redirects off the list)."""
    port = free_port()
    png = diagram_png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/diagram.png")
                self.end_headers()
                return
            body = png if self.path == "/diagram.png" else b"\0" * (2 * 1024 * 1024) if self.path == "/big.png" \
                else None
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}", f"http://localhost:{port}"
    server.shutdown()


@pytest.fixture(scope="module")
def live(image_host):
    engine = SpellingEngine()
    allowed = image_host[0].removeprefix("http://")
    with serving(engine, allowed_image_hosts=allowed, max_upload_mb=1) as (base, service):
        yield base, service, engine


@pytest.fixture()
def client(live):
    return client_for(live[0])


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [model.id for model in models] == ["Qwen/Qwen3-VL-2B-Instruct"]  # no adapter: the base model alone
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_completion_with_a_base64_png_returns_the_table_and_usage(client):
    completion = client.chat.completions.create(model=model_id(client), messages=image_message(data_url()))
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ANSWER.strip()
    assert choice.finish_reason == "stop"
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    usage = completion.usage
    assert usage.completion_tokens == len(ANSWER) + 1  # each character, then the end of turn
    assert usage.prompt_tokens == 10 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = completion.model_extra
    assert extra["rows"][1] == {"number": "2", "action": "Проверить документы", "role": "Юрист"}
    assert extra["details"]["finish_reason"] == "stop" and extra["table_error"] is None


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client):
    completion = client.chat.completions.create(model=model_id(client), messages=image_message(data_url()),
                                                max_completion_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].message.content == ANSWER[:5].strip()


def test_stream_deltas_concatenate_to_the_whole_answer(client):
    messages = image_message(data_url(), text="Extract the steps")
    whole = client.chat.completions.create(model=model_id(client), messages=messages)
    stream = client.chat.completions.create(model=model_id(client), messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    assert len([d for d in deltas if d]) > 10  # token by token, not one piece at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].model_extra["rows"] == whole.model_extra["rows"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(chunk.id == chunks[0].id for chunk in chunks)


def test_client_disconnect_mid_stream_stops_the_generation(image_host):
    engine = SpellingEngine(text=ANSWER * 200, step_s=0.01)  # ~20 s of tokens
    with serving(engine) as (base, service):
        client = client_for(base)
        stream = client.chat.completions.create(model=model_id(client), messages=image_message(data_url()),
                                                stream=True)
        received = [next(stream) for _ in range(5)]
        assert received[-1].choices[0].delta.content
        stream.close()
        deadline = time.monotonic() + 3
        while not engine.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(engine.finished) == 1
        assert len(engine.finished[0].tokens) < 500  # stopped within a few steps, far from its 6,000 tokens
        assert engine.finished[0].result.finish_reason == "cancelled"
        assert httpx.get(f"{base}/health").json()["in_flight"] == 0
        exposition = httpx.get(f"{base}/metrics", headers={"Accept": "text/plain"}).text
        assert 'vlm_finish_reason_total{reason="cancelled"} 1.0' in exposition


def expect_error(status: int, code: str, param: str | None, call) -> dict:
    """The call fails with ``status`` and OpenAI's error shape naming ``code`` and ``param``."""
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    error = raised.value
    assert error.status_code == status, error.body
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["code"] == code and error.body["param"] == param and error.body["message"]
    return error.body


@pytest.mark.parametrize(("messages", "param"), [
    (image_message(text="no image here"), "messages"),
    ([{"role": "user", "content": "just text"}], "messages"),
    (image_message(data_url(), data_url()), "messages"),
    (image_message(data_url()) + [{"role": "assistant", "content": "| 1 | a | b |"}], "messages"),
    (image_message(data_url()) + image_message(data_url()), "messages"),
    (image_message(data_url()) + [{"role": "system", "content": "late"}], "messages"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url()}}]}]
     + image_message(text="and text"), "messages"),
], ids=["no-image", "plain-text", "two-images", "assistant-turn", "two-user-turns", "system-after-user",
        "image-in-system"])
def test_a_request_that_is_not_one_diagram_in_one_turn_is_a_400_saying_why(client, messages, param):
    body = expect_error(400, "invalid_request", param,
                        lambda: client.chat.completions.create(model=model_id(client), messages=messages))
    assert body["type"] == "invalid_request_error"


def test_a_wrong_key_is_a_401_in_openai_shape(live):
    client = client_for(live[0], key="wrong")
    body = expect_error(401, "unauthorized", None, lambda: client.models.list())
    assert body["type"] == "authentication_error"
    expect_error(401, "unauthorized", None, lambda: client.chat.completions.create(
        model="any", messages=image_message(data_url())))


def test_an_unknown_model_is_a_404(client):
    expect_error(404, "model_not_found", "model", lambda: client.chat.completions.create(
        model="gpt-4o", messages=image_message(data_url())))


REFUSED = [("n", 2), ("stop", ["|"]), ("logprobs", True), ("top_logprobs", 2), ("logit_bias", {"12": 5}),
           ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
           ("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "alloy", "format": "mp3"}),
           ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
           ("reasoning_effort", "low"), ("verbosity", "low"), ("web_search_options", {}), ("store", True),
           ("top_logprobs", 0)]
HARMLESS = [("user", "u-1"), ("metadata", {"team": "a"}), ("store", False), ("service_tier", "auto"),
            ("parallel_tool_calls", False), ("tool_choice", "none"), ("modalities", ["text"]), ("n", 1),
            ("safety_identifier", "s"), ("prompt_cache_key", "k"), ("logprobs", False), ("stop", [])]


@pytest.mark.parametrize(("option", "value"), REFUSED, ids=[name for name, _ in REFUSED])
def test_a_parameter_that_would_change_the_answer_and_is_not_implemented_is_a_400_naming_it(client, option, value):
    extra = {"web_search_options": value} if option == "web_search_options" else {}
    kwargs = {} if extra else {option: value}
    body = expect_error(400, "invalid_request", option, lambda: client.chat.completions.create(
        model=model_id(client), messages=image_message(data_url()), extra_body=extra or None, **kwargs))
    assert body["message"]


def test_parameters_without_effect_on_the_answer_are_accepted(client):
    for option, value in HARMLESS:
        completion = client.chat.completions.create(model=model_id(client), messages=image_message(data_url()),
                                                    **{option: value})
        assert completion.choices[0].message.content == ANSWER.strip(), option


def test_an_unknown_parameter_is_a_400_naming_it_not_ignored(client):
    body = expect_error(400, "invalid_request", "min_p", lambda: client.chat.completions.create(
        model=model_id(client), messages=image_message(data_url()), extra_body={"min_p": 0.1}))
    assert "unknown parameter" in body["message"]


def test_max_tokens_over_the_limit_is_capped_to_it_not_refused(live):
    client = client_for(live[0])
    completion = client.chat.completions.create(model=model_id(client), messages=image_message(data_url()),
                                                max_tokens=100_000)
    assert completion.choices[0].message.content == ANSWER.strip()
    assert completion.model_extra["details"]["max_new_tokens"] == live[2].defaults.max_new_tokens


def test_a_remote_url_is_refused_unless_its_host_is_allowed(client, image_host):
    allowed, other = image_host
    completion = client.chat.completions.create(model=model_id(client),
                                                messages=image_message(f"{allowed}/diagram.png"))
    assert completion.choices[0].message.content == ANSWER.strip()
    for url in (f"{other}/diagram.png", f"{allowed}/away", "http://169.254.169.254/latest/meta-data/"):
        expect_error(400, "image_url_not_allowed", "messages", lambda: client.chat.completions.create(
            model=model_id(client), messages=image_message(url)))
    expect_error(413, "payload_too_large", "messages", lambda: client.chat.completions.create(
        model=model_id(client), messages=image_message(f"{allowed}/big.png")))
    expect_error(400, "image_fetch_failed", "messages", lambda: client.chat.completions.create(
        model=model_id(client), messages=image_message(f"{allowed}/missing.png")))


def test_remote_urls_are_refused_by_default(image_host):
    with serving(SpellingEngine()) as (base, _):
        client = client_for(base)
        body = expect_error(400, "image_url_not_allowed", "messages", lambda: client.chat.completions.create(
            model=model_id(client), messages=image_message(f"{image_host[0]}/diagram.png")))
        assert "data: URL" in body["message"]


def test_bad_image_data_is_a_4xx_in_openai_shape(client):
    expect_error(400, "invalid_request", "messages", lambda: client.chat.completions.create(
        model=model_id(client), messages=image_message("data:image/png;base64,not base64!")))
    expect_error(415, "unsupported_media_type", None, lambda: client.chat.completions.create(
        model=model_id(client), messages=image_message(data_url(b"plain text, not a picture"))))


def test_a_body_over_the_limit_is_a_413(live):
    base = live[0]
    response = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "m", "messages": image_message(data_url(b"\0" * (2 * 1024 * 1024)))})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_not_valid_json_is_a_400_not_a_422(live):
    response = httpx.post(f"{live[0]}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_metrics_carry_the_route(client, live):
    client.chat.completions.create(model=model_id(client), messages=image_message(data_url()))
    exposition = httpx.get(f"{live[0]}/metrics", headers={"Accept": "text/plain"}).text
    assert 'vlm_request_duration_seconds_count{route="/v1/chat/completions"}' in exposition
    assert 'vlm_requests_total{endpoint="/v1/chat/completions",status="200"}' in exposition
    assert 'vlm_client_error_requests_total{reason="image_url_not_allowed",route="/v1/chat/completions"}' in exposition


def test_streaming_with_the_real_tokenizer_matches_the_whole_answer(tiny_model_dir):
    """Byte-level BPE splits Cyrillic characters across tokens: the deltas never show half a character, and
    still add up to the non-streamed answer."""
    with running_server(tiny_model_dir, MAX_NEW_TOKENS="48", FORCE_MAX_NEW_TOKENS="true") as (base, _):
        client = client_for(base, key="none")
        name = model_id(client)
        assert name.startswith(str(tiny_model_dir / "base-model") + "+lora-")
        messages = image_message(data_url(), text="Составь таблицу")
        whole = client.chat.completions.create(model=name, messages=messages).choices[0].message.content
        deltas = [chunk.choices[0].delta.content or "" for chunk in
                  client.chat.completions.create(model=name, messages=messages, stream=True) if chunk.choices]
        assert "".join(deltas) == whole and len(whole) > 20
        if "\ufffd" not in whole:
            assert not any("\ufffd" in delta for delta in deltas)


def test_a_stream_past_its_deadline_ends_with_an_error_event(image_host):
    engine = SpellingEngine(text=ANSWER * 200, step_s=0.01)
    with serving(engine, request_timeout_s=1.0) as (base, _):
        client = client_for(base)
        stream = client.chat.completions.create(model=model_id(client), messages=image_message(data_url()),
                                                stream=True)
        received = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in stream:
                received.append(chunk)
        assert len(received) > 5  # it had streamed a part of the answer
        assert raised.value.body["code"] == "timeout" and "REQUEST_TIMEOUT_S" in raised.value.message
        exposition = httpx.get(f"{base}/metrics", headers={"Accept": "text/plain"}).text
        assert 'vlm_finish_reason_total{reason="timeout"} 1.0' in exposition


def test_while_loading_v1_answers_503_not_ready_in_openai_shape():
    from fastapi.testclient import TestClient

    service = InferenceService(Settings(), engine_factory=fake_factory(SpellingEngine(), load_s=2.0))
    with TestClient(create_app(service=service)) as client:
        request = {"model": "m", "messages": image_message(data_url())}
        for response in (client.get("/v1/models"), client.post("/v1/chat/completions", json=request)):
            assert response.status_code == 503 and response.headers["Retry-After"]
            assert response.json()["error"]["code"] == "not_ready"
            assert response.json()["error"]["type"] == "server_error"


# --- the tiny real model: sampling, system messages, structured output, BPMN, gateways ----------------------

class Step(pydantic.BaseModel):
    number: int = pydantic.Field(ge=1, le=99)
    action: str = pydantic.Field(max_length=24)
    role: str = pydantic.Field(max_length=24)


class Steps(pydantic.BaseModel):
    rows: list[Step] = pydantic.Field(max_length=3)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    with running_server(tiny_model_dir, MAX_NEW_TOKENS="300", SERVED_MODEL_NAME="diagrams") as (base, _):
        yield client_for(base, key="none"), base


def ask(client, **options):
    options.setdefault("messages", image_message(data_url(), text="Extract the steps."))
    options.setdefault("max_tokens", 24)
    options.setdefault("model", "diagrams")
    return client.chat.completions.create(**options)


def test_a_system_message_is_the_chat_templates_system_turn(tiny):
    client, _ = tiny
    plain = ask(client)
    told = ask(client, messages=[{"role": "system", "content": "Answer with a markdown table only."},
                                 {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}]
               + image_message(data_url(), text="Extract the steps."))
    assert told.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # both turns reached the model
    assert told.choices[0].message.content


def test_a_seeded_sampled_answer_repeats_and_another_seed_gives_another_valid_one(tiny):
    client, _ = tiny
    first, again = (ask(client, temperature=0.7, seed=1).choices[0].message.content for _ in range(2))
    other = ask(client, temperature=0.7, seed=2)
    greedy = ask(client).choices[0].message.content
    assert first == again and first != greedy
    assert other.choices[0].message.content != first and other.choices[0].finish_reason in ("stop", "length")


def test_parse_with_a_pydantic_model_gives_an_object_that_validates_streamed_and_not(tiny):
    client, _ = tiny
    parsed = client.chat.completions.parse(model="diagrams", messages=image_message(data_url()), max_tokens=300,
                                           response_format=Steps)
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Steps)
    with client.chat.completions.stream(model="diagrams", messages=image_message(data_url()), max_tokens=300,
                                        response_format=Steps, temperature=1.0, seed=3) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Steps)
    assert Steps.model_validate_json(final.choices[0].message.content) == final.choices[0].message.parsed


def test_json_object_decodes_under_a_json_grammar(tiny):
    """The random model never closes a free string, so the answer is cut; what it wrote is an object's start."""
    client, _ = tiny
    answer = ask(client, response_format={"type": "json_object"})
    assert answer.choices[0].message.content.startswith('{"')


def test_a_schema_that_cannot_be_compiled_is_a_400_naming_response_format(tiny):
    client, _ = tiny
    body = expect_error(400, "invalid_request", "response_format", lambda: ask(client, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}))
    assert "schema" in body["message"]
    body = expect_error(400, "invalid_request", "response_format", lambda: ask(client, response_format={
        "type": "json_object", "json_schema": {"name": "x", "schema": {"type": "object"}}}))
    for option, value in (("top_p", 0.5), ("top_k", 5)):  # greedy by default: nothing to cut
        body = expect_error(400, "invalid_request", option, lambda: ask(client, extra_body={option: value}))
        assert "temperature" in body["message"]
    expect_error(400, "invalid_request", "seed", lambda: ask(client, temperature=1.0, seed=2 ** 70))


def test_a_schema_no_answer_satisfies_is_a_400_and_a_vanishing_temperature_decodes_greedily(tiny):
    """A schema that compiles but admits nothing past its first token: a 400 naming response_format, streamed
    or not, not a 500. A temperature of 1e-38 would overflow the logits into NaN (token 0 every time)."""
    client, base = tiny
    dead_end = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                               "pattern": "[^\\s\\S]"}}}
    body = expect_error(400, "invalid_request", "response_format", lambda: ask(client, response_format=dead_end))
    assert "nothing can satisfy it" in body["message"]
    with pytest.raises(openai.APIError, match="nothing can satisfy it"):
        list(ask(client, response_format=dead_end, stream=True))
    assert ask(client, temperature=1e-38, seed=1).choices[0].message.content == ask(client).choices[0].message.content
    expect_error(400, "invalid_request", "repetition_penalty",
                 lambda: ask(client, temperature=1.0, extra_body={"repetition_penalty": 1e-39}))
    for wrong in ("NaN", "true", '"0.5"'):  # a JSON number only, and finite
        body = f'{{"model": "diagrams", "temperature": {wrong}, "messages": [{{"role": "user", "content": "x"}}]}}'
        response = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature", response.text


def test_bpmn_as_a_data_url_is_answered_from_its_xml_in_any_encoding(tiny):
    client, _ = tiny
    bpmn = (EXAMPLES / "order-process.bpmn").read_bytes()
    for data in (bpmn, bpmn.decode().replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")):
        answer = client.chat.completions.create(model="diagrams", messages=image_message(
            data_url(data, "application/xml")))
        assert answer.model_extra["rows"][0]["action"] and answer.model_extra["details"]["source_format"] == "BPMN"
        chunks = list(client.chat.completions.create(model="diagrams", stream=True, messages=image_message(
            data_url(data, "application/xml"))))
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) \
            == answer.choices[0].message.content


def test_the_adapter_digest_id_stays_an_alias_of_the_served_name(tiny, tiny_model_dir):
    client, _ = tiny
    assert [model.id for model in client.models.list().data] == ["diagrams"]
    from app.model.loader import adapter_digest

    digest_id = f"{tiny_model_dir / 'base-model'}+lora-{adapter_digest(tiny_model_dir / 'weights')}"
    assert client.models.retrieve(digest_id).id == digest_id
    assert ask(client, model=digest_id).choices[0].message.content is not None


def test_litellm_openai_provider_with_temperature_and_a_system_message(tiny):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its bundled price list: no fetch at import
    import litellm

    _, base = tiny
    answer = litellm.completion(model="openai/diagrams", api_base=f"{base}/v1", api_key="none", temperature=0.2,
                                max_tokens=16, messages=[{"role": "system", "content": "You read diagrams."}]
                                + image_message(data_url(), text="Extract the steps."))
    assert answer.choices[0].message.content and answer.usage.completion_tokens <= 16
