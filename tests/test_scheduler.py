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
from app.model.decode_step import DecodeStep
from app.model.engine import Engine, EngineLimits, PromptTooLongError, ServingDefaults
from app.model.kvcache import SlotKVCache
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


def test_while_rows_decode_a_prefill_takes_the_smaller_budget():
    """Each prefill pauses every decoding row: arrivals join them in smaller groups than an idle engine takes."""
    engine = FakeEngine(generate_s=60, max_rows=8, step_s=0)  # FakeEngine prompts are 10 tokens each
    scheduler = Scheduler(engine, prefill_token_budget=40, decoding_prefill_token_budget=20)
    first = [Sequence(engine.prepare(None, "p"), 100) for _ in range(5)]
    for seq in first:
        scheduler.add(seq)
    scheduler.step()
    assert len(scheduler.running) == 4  # idle: 4 x 10 tokens
    scheduler.step()
    assert len(scheduler.running) == 5 and engine.prefills == 2  # decoding: 2 x 10 at most, 1 was waiting
    for seq in [Sequence(engine.prepare(None, "p"), 100) for _ in range(3)]:
        scheduler.add(seq)
    scheduler.step()
    assert len(scheduler.running) == 7 and len(scheduler.waiting) == 1


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
    assert health["decode_mode"] == "fused-eager" and health["decode_fallback"] is None
    assert metrics["completion_tokens_total"] == 1 + 48 + 5 + 30 + 2 + 17 + 9 + 40


# --- the decoding paths (decode_paths.py) ---------------------------------------------------------------------

def path_named(mode: str):
    from app.model.decode_paths import ALL_PATHS

    return next(path for path in ALL_PATHS if path.mode == mode)


@pytest.mark.parametrize("mode,overlap,head_major", [
    ("fused-eager", False, True), ("modules-eager", False, True), ("sdpa-graphs", False, True),
    ("sdpa-graphs", True, False), ("fused-eager", True, False), ("fused-eager", False, False)])
def test_every_decode_path_gives_generates_tokens_staggered_with_a_cancelled_row(loaded, references, mode, overlap,
                                                                                  head_major):
    """sdpa-graphs runs as its graphs would (full padded bucket, whole slot, warm-up garbage left in the idle
    slots), eagerly: with 4 slots, 3 rows pad to a bucket of 4. With overlap (the CUDA default) each step is
    launched before the previous one's tokens are read: rows stop, are cancelled, compact and join a step
    late on the device, and not one token differs. In both cache layouts: head-major (the CPU's) and
    token-major (CUDA's), the prefill's writes, the steps' writes and the compaction's moves all included."""
    engine = make_engine(loaded, rows=4)
    assert engine.cache.head_major  # on the CPU
    if not head_major:
        engine.cache = SlotKVCache(engine.cache.shape, engine.model.dtype, "cpu", head_major=False)
    engine.use_decode_path(path_named(mode), emulate_graphs=True)
    engine.overlap = overlap
    scheduler = Scheduler(engine)
    lengths = [40, 7, 25, 3, 33]
    sequences = [sequence(engine, index, lengths[index]) for index in range(5)]
    arrivals = {0: [0], 2: [1, 2], 5: [3], 6: [4]}
    for steps in range(200):
        for index in arrivals.get(steps, []):
            scheduler.add(sequences[index])
        if steps == 9:
            sequences[2].cancel.set()
        scheduler.step()
        if not scheduler.has_work and steps > max(arrivals):
            break
    assert sequences[2].result.finish_reason == "cancelled"
    assert_prefix_of_reference(sequences[2], references[2])
    for index in (0, 1, 3, 4):
        assert sequences[index].tokens == references[index][:lengths[index]], f"request {index}"
    assert engine.slots_in_use == 0


def test_on_the_cpu_each_heads_history_is_one_dense_run_and_flash_refuses_that_layout(loaded):
    engine = make_engine(loaded)
    keys = engine.cache.keys  # [layer, slot, position, kv_head, dim], whatever the layout
    history = keys[0, 1, :10].transpose(0, 1)  # slot 1's first 10 keys per head, as the attention reads them
    assert history.stride()[1:] == (keys.shape[-1], 1) and history[0].is_contiguous()
    head = keys.shape[3] - 1
    keys[0, 1, 3, head] = 7.0  # a write through the view lands where the reads find it
    assert bool((history[head, 3] == 7.0).all()) and int((keys == 7.0).sum()) == keys.shape[-1]
    keys[0, 1, 3, head] = 0.0
    with pytest.raises(ValueError, match="token-major"):
        DecodeStep(engine.model, engine.cache, None, "flash")


def test_the_fused_layer_launches_a_third_of_the_modules_kernels(loaded):
    """One decoder layer of the step, counted at the dispatcher (views are free and not counted); on CUDA each
    op counted here is one kernel. A regression in the fused layer shows here first."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "t", "expand", "unsqueeze",
            "squeeze", "as_strided", "split", "split_with_sizes", "alias", "detach", "permute", "unbind"}

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in free:
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    engine = make_engine(loaded, rows=2)
    for mode in ("fused-eager", "modules-eager"):
        step = engine.use_decode_path(path_named(mode))
        hidden = step.text.embed_tokens(step.tokens[:2])
        at = step.positions[:2]
        rope = step.rope.at(at) if step.fused else step.text.rotary_emb(hidden, at[:, None])
        visible = (step._cache_index[:8][None, :] <= at[:, None],)
        layer = step._fused_layer if step.fused else step._modules_layer
        with torch.inference_mode(), Counting() as counting:
            layer(0, step.text.layers[0], hidden, rope, at, 8, visible)
        counts[mode] = sum(counting.ops.values())
    assert counts["fused-eager"] <= 18, counts
    assert counts["modules-eager"] >= 3 * counts["fused-eager"], counts


def test_fused_projections_are_the_modules_weights_not_a_copy(loaded):
    engine = make_engine(loaded, rows=1)
    layer, fused = engine.model.model.language_model.layers[0], engine.fused_layers[0]
    qkv = fused.qkv.weight
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        assert module.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == fused.gate_up.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(fused.qkv(torch.ones(1, qkv.shape[1])).split(
        [layer.self_attn.q_proj.weight.shape[0], layer.self_attn.k_proj.weight.shape[0],
         layer.self_attn.v_proj.weight.shape[0]], dim=-1)[2], layer.self_attn.v_proj(torch.ones(1, qkv.shape[1])))


def wrong_rms_norm(x, weight, eps):
    """A kernel that is subtly wrong: what the startup check exists to catch."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps) * 1.05


def test_a_path_that_fails_its_check_is_not_served_and_the_next_one_is(loaded, monkeypatch):
    from app.model import decode_step

    engine = make_engine(loaded, rows=3)
    monkeypatch.setattr(decode_step, "rms_norm", wrong_rms_norm)
    engine.choose_decode_path()
    assert engine.decode_mode == "modules-eager"
    assert engine.decode_fallback.startswith("fused-eager: row 0") and "logits differ" in engine.decode_fallback
    assert engine.slots_in_use == 0
    monkeypatch.setattr(decode_step, "sdpa_decode", lambda query, *rest: torch.zeros(
        query.shape[0], query.shape[1] * query.shape[2], dtype=query.dtype))
    from app.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no decoding path passed its startup check: fused-eager: .*modules-eager"):
        engine.choose_decode_path()
    engine.occupants.append(sequence(engine, 0, 4))
    with pytest.raises(RuntimeError, match="no slot"):
        engine.use_decode_path(path_named("fused-eager"))
    engine.release_all()


def test_health_and_metrics_say_which_path_serves_and_why(tiny_model_dir, monkeypatch):
    from app.model import decode_step

    monkeypatch.setattr(decode_step, "rms_norm", wrong_rms_norm)
    settings = Settings(base_model_id=str(tiny_model_dir / "base-model"), adapter_path=tiny_model_dir / "weights",
                        device="cpu", torch_dtype="float32", warmup=False)
    with TestClient(create_app(settings)) as client:
        health = wait_for_status(client, "healthy")
        assert health["decode_mode"] == "modules-eager" and "fused-eager" in health["decode_fallback"]
        metrics = client.get("/metrics", params={"format": "text"}).text
        assert 'vlm_decode_mode{mode="modules-eager"} 1.0' in metrics
        assert 'vlm_decode_mode{mode="fused-eager"} 0.0' in metrics
        answer = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                             data={"max_new_tokens": "5"})
        assert answer.status_code == 200


def test_on_cuda_the_ladder_starts_with_graphs_and_says_why_a_rung_cannot_run():
    from app.model.decode_paths import candidate_paths

    cuda = torch.device("cuda")
    paths, skipped = candidate_paths(cuda, torch.float32, graphs_allowed=True, fusable=True, quantization=None)
    assert [path.mode for path in paths] == ["sdpa-graphs", "fused-eager", "modules-eager"]
    assert skipped == ["flash-graphs: FlashAttention takes float16 or bfloat16, not float32"]
    paths, skipped = candidate_paths(cuda, torch.bfloat16, graphs_allowed=True, fusable=True, quantization="int8")
    assert [path.mode for path in paths] == ["fused-eager", "modules-eager"]
    assert all("int8 kernels are not captured" in why for why in skipped)
    paths, skipped = candidate_paths(torch.device("cpu"), torch.bfloat16, graphs_allowed=True, fusable=False,
                                     quantization=None)
    assert [path.mode for path in paths] == ["modules-eager"] and skipped[0].startswith("fused-eager")
