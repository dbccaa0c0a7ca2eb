"""Dynamic batching: batched greedy output equals one-at-a-time output; rows stop on their own terms."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
import time

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.device import resolve_placement
from app.engine import Engine, GenerationRequest, ServingDefaults
from app.loader import load_model
from app.main import create_app
from app.serving import InferenceService
from app.settings import Settings

from .helpers import FakeEngine, diagram_png, fake_factory, wait_for_status

SIZES = [(320, 240), (640, 320), (200, 400), (480, 480)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    settings = Settings(base_model_id=str(tiny_model_dir / "base-model"), adapter_path=tiny_model_dir / "weights",
                        device="cpu", torch_dtype="float32")
    loaded = load_model(settings, resolve_placement(settings.device, settings.torch_dtype))
    return Engine(loaded, ServingDefaults("Describe.", 24, 256))


def image(size) -> Image.Image:
    return Image.open(io.BytesIO(diagram_png(*size))).convert("RGB")


def test_batched_greedy_output_is_token_identical_to_single(engine):
    prompts = ["Describe.", "Извлеки таблицу", "List the roles.", "Describe."]
    singles = [engine.generate(image(size), prompt, 24) for size, prompt in zip(SIZES, prompts)]
    assert len({r.image_tokens for r in singles}) > 1  # different image sizes -> different prompt lengths
    batched = engine.generate_batch([GenerationRequest(image(size), prompt, 24)
                                     for size, prompt in zip(SIZES, prompts)])
    for single, row in zip(singles, batched):
        assert row.text == single.text
        assert (row.completion_tokens, row.prompt_tokens, row.image_tokens, row.finish_reason) == \
               (single.completion_tokens, single.prompt_tokens, single.image_tokens, single.finish_reason)


def test_rows_prepared_apart_collate_to_what_the_processor_builds_for_the_batch(engine):
    """The service prepares each request off the model thread; the batch must be what the processor itself
    makes of all rows at once (left padding, image patches in row order)."""
    prompts = ["Describe.", "Извлеки таблицу из диаграммы, пожалуйста", "List the roles.", "Describe."]
    images = [image(size) for size in SIZES]
    collated = engine.collate([engine.prepare(img, prompt) for img, prompt in zip(images, prompts)])
    texts = [engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=False) for prompt in prompts]
    expected = engine.processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert set(collated) == set(expected)
    for key in expected:
        assert torch.equal(collated[key], expected[key].to(collated[key].dtype)), key


def test_prepare_gives_the_same_inputs_from_many_threads_at_once(engine):
    """The service calls prepare from worker threads concurrently; the shared processor must not mix them."""
    jobs = [(image(SIZES[i % len(SIZES)]), f"prompt {i}") for i in range(24)]
    expected = [engine.prepare(img, prompt) for img, prompt in jobs]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(lambda job: engine.prepare(*job), jobs), expected):
                assert all(torch.equal(got[key], want[key]) for key in want)


def test_rows_keep_their_own_token_cap_and_finish_early(engine):
    finished_at: dict[int, float] = {}
    requests = []
    for index, tokens in enumerate([3, 40]):
        request = GenerationRequest(image(SIZES[index]), "Describe.", tokens)
        request.on_done = lambda result, i=index: finished_at.setdefault(i, time.perf_counter())
        requests.append(request)
    short, long = engine.generate_batch(requests)
    assert short.completion_tokens == 3 and short.finish_reason == "length"
    assert long.completion_tokens == 40
    assert finished_at[0] < finished_at[1]  # the short row was answered before the batch ended
    assert short.text == engine.generate(image(SIZES[0]), "Describe.", 3).text


def test_cancelled_row_stops_without_stopping_the_others(engine):
    cancelled = GenerationRequest(image(SIZES[0]), "Describe.", 40)
    other = GenerationRequest(image(SIZES[1]), "Describe.", 40)
    cancelled.cancel.set()  # e.g. its deadline passed: it stops at the first step
    first, second = engine.generate_batch([cancelled, other])
    assert first.finish_reason == "cancelled" and first.completion_tokens == 1
    assert second.completion_tokens == 40


def concurrent_posts(client, count: int) -> list:
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("max_batch_size, expect_batching", [(8, True), (1, False)])
def test_concurrent_requests_are_batched_up_to_the_limit(max_batch_size, expect_batching):
    engine = FakeEngine(generate_s=0.5)
    service = InferenceService(Settings(max_batch_size=max_batch_size, batch_wait_ms=200, max_queue=16),
                               engine_factory=fake_factory(engine))
    with TestClient(create_app(service=service)) as client:
        wait_for_status(client, "healthy")
        responses = concurrent_posts(client, 6)
    assert all(r.status_code == 200 for r in responses)
    assert max(engine.batch_sizes) <= max_batch_size
    assert (max(engine.batch_sizes) > 1) is expect_batching
    assert sum(engine.batch_sizes) == 6


def test_forced_token_count_for_benchmarks(engine):
    forced = Engine(engine.loaded, engine.defaults, force_max_new_tokens=True)
    results = forced.generate_batch([GenerationRequest(image(size), "Describe.", 30) for size in SIZES[:2]])
    assert [r.completion_tokens for r in results] == [30, 30]
    assert {r.finish_reason for r in results} == {"length"}


def test_static_cache_path_gives_the_same_answers(engine, caplog):
    compiled = Engine(engine.loaded, engine.defaults, torch_compile=True)
    assert compiled.generation_config.cache_implementation == "static"
    assert any("only the static cache" in r.getMessage() for r in caplog.records)  # no CUDA here
    requests = lambda: [GenerationRequest(image(size), "Describe.", 16) for size in SIZES[:2]]  # noqa: E731
    expected = engine.generate_batch(requests())
    assert [r.text for r in compiled.generate_batch(requests())] == [r.text for r in expected]
