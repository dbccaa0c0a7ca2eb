"""Continuous batching over KV slots on the tiny model (float32): every sequence's greedy tokens equal the
model's own generate() for it alone, whenever it arrives, whoever it shares steps with, however they end."""

from __future__ import annotations

import copy
import io
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.http.app import create_app
from app.model.device import resolve_placement
from app.model.engine import Engine, EngineLimits, PromptTooLongError, ServingDefaults
from app.model.loader import load_model
from app.model.scheduler import Scheduler, generate
from app.model.sequence import Sequence
from app.pipeline.repetition import RepetitionGuard
from app.service.inference import InferenceService
from app.settings import Settings

from .helpers import FakeEngine, diagram_png, fake_factory, wait_for_status

SIZES = [(320, 240), (640, 320), (200, 400), (480, 480), (256, 256)]
PROMPTS = ["Describe.", "Извлеки таблицу", "List the roles.", "Describe.", "Steps?"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    settings = Settings(base_model_id=str(tiny_model_dir / "base-model"), adapter_path=tiny_model_dir / "weights",
                        device="cpu", torch_dtype="float32")
    return load_model(settings, resolve_placement(settings.device, settings.torch_dtype))


def make_engine(loaded, rows: int = 3, **options) -> Engine:
    options.setdefault("repetition_guard", None)  # the random model repeats itself; compare raw greedy output
    return Engine(loaded, ServingDefaults("Describe.", 64, 256), limits=EngineLimits(max_rows=rows), **options)


@pytest.fixture(scope="module")
def engine(loaded):
    return make_engine(loaded)


def image(size) -> Image.Image:
    return Image.open(io.BytesIO(diagram_png(*size))).convert("RGB")


def reference_tokens(engine: Engine, index: int, new_tokens: int) -> list[int]:
    """What the model's own generate() makes of request ``index`` alone."""
    inputs = engine.collate([engine.prepare(image(SIZES[index]), PROMPTS[index]).tensors])
    config = copy.deepcopy(engine.model.generation_config)
    config.do_sample, config.max_new_tokens = False, new_tokens
    with torch.inference_mode():
        output = engine.model.generate(**inputs, generation_config=config)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def sequence(engine: Engine, index: int, new_tokens: int) -> Sequence:
    return Sequence(engine.prepare(image(SIZES[index]), PROMPTS[index]), new_tokens)


@pytest.fixture(scope="module")
def references(engine):
    return {index: reference_tokens(engine, index, 40) for index in range(len(SIZES))}


def assert_prefix_of_reference(seq: Sequence, expected: list[int]) -> None:
    assert seq.tokens == expected[:len(seq.tokens)]


def test_one_request_is_token_identical_to_generate(engine, references):
    result = generate(engine, [sequence(engine, 0, 40)])[0]
    assert result.completion_tokens == 40 and result.finish_reason == "length"
    assert result.text == engine.detokenize(references[0])
    assert engine.slots_in_use == 0


def test_staggered_arrivals_of_different_lengths_match_generate(engine, references):
    """More requests than slots, arriving while others decode, each with its own length: rows join the running
    batch, finish mid-batch (the last occupant moves into the freed slot) and others take their slots."""
    scheduler = Scheduler(engine)
    lengths = [40, 7, 25, 3, 33]
    sequences = [sequence(engine, index, lengths[index]) for index in range(5)]
    arrivals = {0: [0], 2: [1, 2], 5: [3], 6: [4]}  # step -> requests arriving before it
    steps = 0
    max_running = 0
    while steps < 200 and (scheduler.has_work or steps <= max(arrivals)):
        for index in arrivals.get(steps, []):
            scheduler.add(sequences[index])
        scheduler.step()
        max_running = max(max_running, len(scheduler.running))
        assert engine.slots_in_use == len(scheduler.running)
        steps += 1
    assert max_running == engine.max_rows  # the slots were all in use at some point
    for index, seq in enumerate(sequences):
        assert seq.result.finish_reason == "length" and seq.result.completion_tokens == lengths[index]
        assert seq.tokens == references[index][:lengths[index]], f"request {index}"
    assert engine.slots_in_use == 0


def test_a_row_cancelled_mid_way_leaves_and_the_others_are_unchanged(engine, references):
    scheduler = Scheduler(engine)
    sequences = [sequence(engine, index, 30) for index in range(3)]
    for seq in sequences:
        scheduler.add(seq)
    for _ in range(5):
        scheduler.step()
    sequences[0].cancel.set()
    scheduler.step()
    assert sequences[0].result.finish_reason == "cancelled" and sequences[0].slot is None
    assert len(scheduler.running) == 2
    while scheduler.has_work:
        scheduler.step()
    assert_prefix_of_reference(sequences[0], references[0])
    for index in (1, 2):
        assert sequences[index].tokens == references[index][:30]


def test_a_request_cancelled_while_waiting_never_reaches_the_model(engine):
    scheduler = Scheduler(engine)
    waiting = sequence(engine, 0, 10)
    waiting.cancel.set()
    started = []
    waiting.on_start = lambda: started.append(True)
    scheduler.add(waiting)
    scheduler.step()
    assert waiting.result.finish_reason == "cancelled" and waiting.result.completion_tokens == 0
    assert not started and engine.slots_in_use == 0


def test_prefill_groups_respect_the_token_budget(engine, references):
    sequences = [sequence(engine, index, 4) for index in range(3)]
    budget = max(s.inputs.prompt_tokens for s in sequences)  # one prompt per prefill
    scheduler = Scheduler(engine, prefill_token_budget=budget)
    for seq in sequences:
        scheduler.add(seq)
    scheduler.step()
    assert len(scheduler.running) == 1 and len(scheduler.waiting) == 2
    while scheduler.has_work:
        scheduler.step()
    for index, seq in enumerate(sequences):
        assert seq.tokens == references[index][:4]


def test_forced_token_count_for_benchmarks(loaded):
    forced = make_engine(loaded, force_max_new_tokens=True)
    results = generate(forced, [sequence(forced, index, 30) for index in range(2)])
    assert [r.completion_tokens for r in results] == [30, 30]
    assert {r.finish_reason for r in results} == {"length"}


def test_repetition_guard_ends_a_row_where_the_whole_check_trips(loaded, references):
    guard = RepetitionGuard(max_period=8, min_repeats=2, min_span=4)  # hair-trigger: the random model echoes
    guarded = make_engine(loaded, repetition_guard=guard)
    expected = references[0]
    trip_at = next(i for i in range(1, len(expected) + 1) if guard.tripped(expected[:i]))
    result = generate(guarded, [sequence(guarded, 0, 40)])[0]
    assert result.finish_reason == "repetition" and result.completion_tokens == trip_at


def test_the_incremental_repetition_tracker_agrees_with_the_whole_check():
    generator = random.Random(7)
    guard = RepetitionGuard(max_period=12, min_repeats=3, min_span=10)
    for _ in range(300):
        pattern = [generator.randrange(5) for _ in range(generator.randrange(1, 14))]
        tokens = [generator.randrange(5) for _ in range(generator.randrange(0, 30))]
        tokens += (pattern * 20)[:generator.randrange(0, 60)]
        tracker = guard.tracker()
        for end, token in enumerate(tokens, start=1):
            tracker.push(token)
            assert tracker.tripped == any(guard.tripped(tokens[:i]) for i in range(1, end + 1))


def test_rows_prepared_apart_collate_to_what_the_processor_builds_for_the_batch(engine):
    """Prefill batches are right-padded: each row's keys and values start at position 0, as in its slot."""
    images = [image(size) for size in SIZES[:4]]
    collated = engine.collate([engine.prepare(img, prompt).tensors for img, prompt in zip(images, PROMPTS)])
    texts = [engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=False) for prompt in PROMPTS[:4]]
    processor = copy.deepcopy(engine.processor)
    processor.tokenizer.padding_side = "right"
    expected = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert set(collated) == set(expected)
    for key in expected:
        assert torch.equal(collated[key], expected[key].to(collated[key].dtype)), key


def test_prepare_gives_the_same_inputs_from_many_threads_at_once(engine):
    """The service calls prepare from worker threads concurrently; the shared processor must not mix them."""
    jobs = [(image(SIZES[i % len(SIZES)]), f"prompt {i}") for i in range(24)]
    expected = [engine.prepare(img, prompt).tensors for img, prompt in jobs]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(lambda job: engine.prepare(*job).tensors, jobs), expected):
                assert all(torch.equal(got[key], want[key]) for key in want)


def test_a_prompt_over_the_slot_budget_is_refused_before_the_queue(loaded):
    small = Engine(loaded, ServingDefaults("Describe.", 8, 256), limits=EngineLimits(max_rows=1, max_prompt_tokens=64))
    with pytest.raises(PromptTooLongError, match="MAX_PROMPT_TOKENS"):
        small.prepare(image(SIZES[0]), "word " * 200)
    assert small.cache.shape.slot_tokens == small.max_image_tokens + 64 + 8


# --- through the service: threads, HTTP, counters -------------------------------------------------------

def concurrent_posts(client, count: int, **data) -> list:
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}, data=data)))
        for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("max_rows, expect_batching", [(8, True), (1, False)])
def test_concurrent_requests_share_steps_up_to_the_slot_count(max_rows, expect_batching):
    engine = FakeEngine(generate_s=0.5, max_rows=max_rows)
    service = InferenceService(Settings(max_queue=16), engine_factory=fake_factory(engine))
    with TestClient(create_app(service=service)) as client:
        wait_for_status(client, "healthy")
        responses = concurrent_posts(client, 6)
    assert all(r.status_code == 200 for r in responses)
    assert max(engine.rows_per_step) <= max_rows
    assert (max(engine.rows_per_step) > 1) is expect_batching


def test_a_short_request_sent_during_a_long_one_finishes_first(tiny_model_dir):
    settings = Settings(base_model_id=str(tiny_model_dir / "base-model"), adapter_path=tiny_model_dir / "weights",
                        device="cpu", torch_dtype="float32", max_new_tokens=1500, force_max_new_tokens=True)
    finished: dict[str, dict] = {}
    with TestClient(create_app(settings)) as client:
        wait_for_status(client, "healthy")

        def post(name: str, tokens: int) -> None:
            response = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                                   data={"max_new_tokens": str(tokens)})
            assert response.status_code == 200
            finished[name] = {"at": time.perf_counter(), **response.json()["metadata"]}

        long = threading.Thread(target=post, args=("long", 1500))
        long.start()
        deadline = time.monotonic() + 30
        while client.get("/health").json()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        post("short", 2)
        assert "long" not in finished  # it joined the running batch instead of waiting for it
        long.join()
    assert finished["short"]["at"] < finished["long"]["at"]
    assert finished["long"]["completion_tokens"] == 1500 and finished["short"]["completion_tokens"] == 2


def test_counters_follow_each_row_under_mixed_lengths(tiny_model_dir):
    """queue_depth and in_flight never go negative while rows of different lengths come and go, and both are
    back to 0 when idle (before, rows finishing at different times drove queue_depth to -7)."""
    settings = Settings(base_model_id=str(tiny_model_dir / "base-model"), adapter_path=tiny_model_dir / "weights",
                        device="cpu", torch_dtype="float32", max_batch_size=3, max_queue=16,
                        force_max_new_tokens=True)
    seen: list[tuple[int, int]] = []
    with TestClient(create_app(settings)) as client:
        wait_for_status(client, "healthy")
        service = client.app.state.service
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.append((service.runner.queue_depth, service.runner.in_flight))
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=lambda n=n: client.post(
            "/infer", files={"file": ("d.png", diagram_png(), "image/png")}, data={"max_new_tokens": str(n)}))
            for n in (1, 48, 5, 30, 2, 17, 9, 40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        watcher.join()
        health = client.get("/health").json()
        metrics = client.get("/metrics").json()
    assert min(q for q, _ in seen) >= 0 and min(f for _, f in seen) >= 0
    assert max(f for _, f in seen) <= 3 and max(q for q, _ in seen) >= 1
    assert (health["queue_depth"], health["in_flight"]) == (0, 0)
    assert (metrics["queue_depth"], metrics["in_flight"]) == (0, 0)
    assert health["kv_cache"]["slots"] == 3 and health["kv_cache"]["slots_in_use"] == 0
    assert health["decode_mode"] == "eager"
    assert metrics["completion_tokens_total"] == 1 + 48 + 5 + 30 + 2 + 17 + 9 + 40
