"""Sampling and structured output in the engine (the tiny model, float32): the logits processors as OpenAI and
vLLM define them, the grammar mask per row per step, and greedy rows untouched by the rows that sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.model.grammar import GrammarError, JsonFormat
from app.model.sampling import RowSampler, SamplingParams
from app.model.scheduler import Scheduler, generate
from app.model.sequence import Sequence

from .test_scheduler import engine, loaded, make_engine, references, sequence  # noqa: F401 - fixtures

ROWS_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["rows"],
    "properties": {"rows": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "additionalProperties": False, "required": ["number", "action", "role"],
        "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 99},
                       "action": {"type": "string", "maxLength": 24}, "role": {"type": "string", "maxLength": 24}}}}},
}


def test_frequency_and_presence_penalties_are_openais():
    """logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, over generated tokens."""
    logits = torch.tensor([0.0, 1.0, 0.9, 0.5, -0.2])
    sampler = RowSampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.3))
    scores = sampler.scores(logits, [1, 1, 2])
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0 - 2 * 0.5 - 0.3, 0.9 - 0.5 - 0.3, 0.5, -0.2]))
    assert sampler.choose(logits, [1, 1, 2]) == 3 and int(logits.argmax()) == 1  # and logits are untouched
    negative = RowSampler(SamplingParams(frequency_penalty=-1.0))  # a negative penalty encourages repeats
    assert negative.choose(torch.tensor([1.0, 0.5]), [1]) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_answer():
    logits = torch.tensor([2.0, -1.0, 3.0, 1.0])
    sampler = RowSampler(SamplingParams(repetition_penalty=2.0), prompt_ids=torch.tensor([[0, 0]]))
    torch.testing.assert_close(sampler.scores(logits, [1]), torch.tensor([1.0, -2.0, 3.0, 1.0]))


def test_temperature_top_k_and_top_p_restrict_and_seed_reproduces_the_draws():
    logits = torch.tensor([4.0, 3.9, 3.8, -5.0, -6.0])

    def draws(**options) -> list[int]:
        sampler = RowSampler(SamplingParams(**options))
        return [sampler.choose(logits, []) for _ in range(200)]

    assert set(draws(temperature=1.0, top_k=2, seed=1)) <= {0, 1}
    assert set(draws(temperature=1.0, top_p=0.01, seed=1)) == {0}  # the first token always stays
    assert set(draws(temperature=1.0, top_p=0.5, seed=1)) <= {0, 1}
    assert len(set(draws(temperature=1.0, seed=1))) >= 3
    assert draws(temperature=0.7, seed=5) == draws(temperature=0.7, seed=5)
    assert draws(temperature=0.7, seed=5) != draws(temperature=0.7, seed=6)


def test_greedy_options_are_the_fast_path():
    assert SamplingParams().is_greedy and SamplingParams(top_p=0.5, top_k=3, seed=1).is_greedy
    assert not SamplingParams(temperature=0.2).is_greedy and not SamplingParams(presence_penalty=0.1).is_greedy


def constrained(engine, index: int, new_tokens: int, schema=ROWS_SCHEMA, sampling=SamplingParams()) -> Sequence:
    row = sequence(engine, index, new_tokens)
    row.sampler = engine.sampler(row.inputs, sampling, JsonFormat(schema))
    return row


def test_a_row_under_a_grammar_answers_json_for_the_schema_and_stops_when_the_grammar_completes(engine):
    rows = [constrained(engine, 0, 400), constrained(engine, 1, 400, sampling=SamplingParams(temperature=1.0, seed=2))]
    results = generate(engine, rows)
    for row, result in zip(rows, results):
        assert result.finish_reason == "stop", result
        assert row.tokens[-1] in engine.stop_rules.eos_ids  # the grammar's stop token ended it
        answer = json.loads(result.text)  # strict JSON: no raw control characters in its strings
        assert len(answer["rows"]) <= 3
        for item in answer["rows"]:
            assert set(item) == {"number", "action", "role"} and 1 <= item["number"] <= 99
            # A random model can emit stray UTF-8 bytes that xgrammar counts as characters; each decodes to U+FFFD
            # (and may take up to three places): what the grammar bounded is the rest.
            assert len(item["action"].replace("\ufffd", "")) <= 24 and len(item["role"].replace("\ufffd", "")) <= 24


def test_any_json_object_starts_as_one_and_stays_within_the_grammar(engine):
    """json_object: the random model never closes a free string, so this checks the start and that every
    token it took was one the grammar allowed (accept() raises otherwise)."""
    row = constrained(engine, 2, 40, schema={"type": "object"})
    result = generate(engine, [row])[0]
    assert result.text.startswith("{") and result.finish_reason == "length"


def test_the_grammar_mask_is_applied_to_the_steps_logits_and_advances_per_row(engine):
    """Step by step: every chosen token is one the row's mask allowed for that step's logits, and two rows
    under the same schema at different places in it get different masks."""
    rows = [constrained(engine, 0, 30), constrained(engine, 3, 30, sampling=SamplingParams(temperature=1.0, seed=9))]
    seen: dict[int, list[bool]] = {0: [], 1: []}
    originals = [row.sampler.choose for row in rows]

    def watching(index, choose):
        def wrapper(logits, generated):
            allowed = rows[index].sampler.scores(logits, generated) > float("-inf")  # the mask, before advancing
            token = choose(logits, generated)
            seen[index].append(bool(allowed[token]) and bool(allowed.sum() < allowed.numel()))
            return token
        return wrapper

    for index, row in enumerate(rows):
        row.sampler.choose = watching(index, originals[index])
    generate(engine, rows)
    assert all(seen[0]) and all(seen[1]) and len(seen[0]) == len(rows[0].tokens)


def test_greedy_rows_batched_with_sampled_and_constrained_rows_are_unchanged(engine, references):
    """Rows that sample or follow a grammar pick their own tokens after the step; the greedy rows beside them
    get exactly the tokens they get alone."""
    scheduler = Scheduler(engine)
    greedy = [sequence(engine, 0, 30), sequence(engine, 2, 30)]
    sampled = sequence(engine, 1, 30)
    sampled.sampler = RowSampler(SamplingParams(temperature=1.0, seed=4, presence_penalty=1.0))
    for row in (greedy[0], sampled, constrained(engine, 4, 60), greedy[1]):
        scheduler.add(row)
    while scheduler.has_work:
        scheduler.step()
    assert greedy[0].tokens == references[0][:30] and greedy[1].tokens == references[2][:30]
    assert sampled.tokens != references[1][:30]  # it did sample


def test_a_seeded_sampled_answer_is_reproducible_and_another_seed_differs(engine):
    def answer(seed: int) -> list[int]:
        row = sequence(engine, 1, 24)
        row.sampler = RowSampler(SamplingParams(temperature=0.8, top_p=0.95, seed=seed))
        return generate(engine, [row])[0] and row.tokens

    assert answer(7) == answer(7)
    assert answer(7) != answer(8)


def test_with_overlap_on_a_sampled_row_waits_for_its_choice(loaded, references):
    """On CUDA steps run ahead of the host; a row that samples must feed its own choice to the next step."""
    engine = make_engine(loaded, rows=3)
    engine.overlap = True
    alone = sequence(engine, 1, 20)
    alone.sampler = RowSampler(SamplingParams(temperature=1.0, seed=3))
    expected = generate(make_engine(loaded, rows=3), [alone])[0].text
    scheduler = Scheduler(engine)
    greedy = sequence(engine, 0, 30)
    scheduler.add(greedy)
    for _ in range(4):
        scheduler.step()
    sampled = sequence(engine, 1, 20)
    sampled.sampler = RowSampler(SamplingParams(temperature=1.0, seed=3))
    scheduler.add(sampled)
    while scheduler.has_work:
        scheduler.step()
    assert greedy.tokens == references[0][:30]
    assert sampled.result.text == expected


def test_a_schema_that_cannot_be_compiled_is_a_grammar_error(engine):
    row = sequence(engine, 0, 4)
    with pytest.raises(GrammarError, match="cannot be used"):
        engine.sampler(row.inputs, SamplingParams(), JsonFormat({"type": "no-such-type"}))


def test_infer_takes_a_json_schema_and_answers_json_for_it(tiny_client):
    from .helpers import diagram_png

    small = {"type": "object", "required": ["step", "role"], "additionalProperties": False,
             "properties": {"step": {"type": "string", "maxLength": 8}, "role": {"type": "string", "maxLength": 8}}}
    answer = tiny_client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                              data={"json_schema": json.dumps(small)})  # the tiny adapter's MAX_NEW_TOKENS is 48
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["metadata"]["finish_reason"] == "stop" and set(json.loads(body["description"])) == {"step", "role"}
    assert body["table"] is None and body["table_error"]
    for bad, why in (("{not json", "not valid JSON"), ("[1]", "JSON object"),
                     (json.dumps({"type": "no-such-type"}), "cannot be used")):
        refused = tiny_client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                                   data={"json_schema": bad})
        assert refused.status_code == 400 and why in refused.json()["error"]["message"], refused.text
        assert refused.json()["error"].get("param", "json_schema") == "json_schema"
    refused = tiny_client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                               data={"json_schema": json.dumps(small), "format": "markdown"})
    assert refused.status_code == 400 and "format=markdown" in refused.json()["error"]["message"]
    bpmn = (Path(__file__).resolve().parent.parent / "examples" / "order-process.bpmn").read_bytes()
    refused = tiny_client.post("/infer", files={"file": ("p.bpmn", bpmn)}, data={"json_schema": '{"type": "object"}'})
    assert refused.status_code == 400 and "BPMN" in refused.json()["error"]["message"]
    pdf = (Path(__file__).resolve().parent.parent / "examples" / "order-process.pdf").read_bytes()
    refused = tiny_client.post("/infer", files={"file": ("p.pdf", pdf)},
                               data={"json_schema": json.dumps(small), "pages": "all"})
    assert refused.status_code == 400 and "one page" in refused.json()["error"]["message"], refused.text
    refused = tiny_client.post("/jobs", files={"file": ("p.pdf", pdf)},
                               data={"json_schema": json.dumps(small), "pages": "1-2"})
    assert refused.status_code == 400 and "one page" in refused.json()["error"]["message"], refused.text


def test_a_job_with_a_schema_that_cannot_be_used_is_refused_at_submission(tiny_client):
    """Told at once (400), not as a failed job later: a schema that does not compile, and one on a BPMN file."""
    from .helpers import diagram_png

    bpmn = (Path(__file__).resolve().parent.parent / "examples" / "order-process.bpmn").read_bytes()
    for upload, schema, why in ((("d.png", diagram_png(), "image/png"), {"type": "no-such-type"}, "cannot be used"),
                                (("p.bpmn", bpmn, "application/xml"), {"type": "object"}, "BPMN")):
        refused = tiny_client.post("/jobs", files={"file": upload}, data={"json_schema": json.dumps(schema)})
        assert refused.status_code == 400 and why in refused.json()["error"]["message"], refused.text


@pytest.mark.parametrize("schema,why", [
    ({"type": "string", "minLength": 50_000}, "minLength 50000 is over 2000"),
    ({"type": "string", "maxLength": 8_000}, "maxLength 8000 is over 2000"),
    ({"type": "string", "pattern": "^[\\s\\S]{4000,}$"}, "unroll to more than one string of 2000"),
    ({"type": "string", "pattern": "(a{100}b){30}"}, "unroll to more than one string of 2000"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1500} for i in range(3)}},
     "unroll to more than one string of 2000"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "uses not, which the grammar cannot"),
    ({"type": "array", "contains": {"const": 5}}, "uses contains"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 2}, "both a pattern and minLength/maxLength"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uses uniqueItems"),
    ({"type": "object", "required": ["answer"]}, "required names answer"),
    ({"allOf": [{"type": "object"}, {"type": "object"}]}, "uses allOf"),
    ({"allOf": [{"allOf": [{"type": "integer", "not": {"const": 1}}]}]}, "uses not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "uses if/then/else"),
    ({"type": "string", "pattern": "^a(?=b)c$"}, "lookaround or a backreference"),
    ({"$ref": "http://example.com/x.json"}, "only local references"),
    ({"type": "string", "format": "email", "maxLength": 9}, "both a format and minLength/maxLength"),
    ({"maxLength": 9}, "without \"type\": \"string\""),
    ({"type": "string", "maxLength": None}, "maxLength must be a non-negative integer"),
    ({"type": "string", "minLength": "x"}, "minLength must be"),
    ({"type": "string", "maxLength": True}, "maxLength must be"),
    ({"type": "string", "maxLength": 1e400}, "maxLength must be"),
])
def test_string_bounds_that_cannot_be_honoured_quickly_are_grammar_errors_at_once(engine, schema, why):
    import time

    began = time.perf_counter()
    with pytest.raises(GrammarError, match=why):
        engine.grammars.compile(JsonFormat(schema))
    assert time.perf_counter() - began < 1.0


def test_a_schema_nested_too_deeply_is_a_grammar_error(engine):
    schema: dict = {"type": "string"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(GrammarError, match="nested too deeply"):
        engine.grammars.compile(JsonFormat(schema))


def test_a_row_whose_token_choice_fails_ends_alone_with_its_error(engine, references):
    scheduler = Scheduler(engine)
    greedy = sequence(engine, 0, 20)
    broken = sequence(engine, 1, 20)
    broken.sampler = RowSampler(SamplingParams(temperature=1.0, seed=2 ** 70))  # manual_seed refuses it
    errors = []
    broken.on_error = errors.append
    for row in (greedy, broken):
        scheduler.add(row)
    while scheduler.has_work:
        scheduler.step()
    assert len(errors) == 1 and broken.slot is None and broken.result is None
    assert greedy.tokens == references[0][:20] and engine.slots_in_use == 0


def test_a_forced_length_row_under_a_grammar_still_stops_when_the_grammar_completes(loaded):
    forced = make_engine(loaded, force_max_new_tokens=True)
    row = constrained(forced, 0, 400)
    result = generate(forced, [row])[0]
    assert result.finish_reason == "stop" and json.loads(result.text)


def test_schema_keywords_are_read_as_keywords_only_where_a_schema_has_them():
    """A property named like a keyword, and data under const/enum/discriminator, are neither refused, rewritten
    nor priced as keywords; what is under a property named "default" is priced like any other schema."""
    from app.model.schema_rules import prepared_schema

    schema = {"type": "object", "properties": {"not": {"type": "string", "maxLength": 3},
                                               "pattern": {"type": "string", "pattern": "^a{3}$"}},
              "enum": [{"contains": 1, "pattern": "a{5000}", "type": "string", "maxLength": 9}],
              "discriminator": {"propertyName": "kind", "mapping": {"not": "#/$defs/A", "contains": "#/$defs/B"}}}
    rewritten, cost = prepared_schema(schema)
    assert rewritten["properties"]["not"] == {"type": "string", "pattern": "^[\\s\\S]{0,3}$"}
    assert rewritten["enum"] == schema["enum"] and rewritten["discriminator"] == schema["discriminator"]
    assert cost == 3 ** 2 + 3 ** 2  # ^[\s\S]{0,3}$ and ^a{3}$
    hidden = {"type": "object", "properties": {"default": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "maxLength": 2000} for i in range(3)}}}}
    for priced_over in (hidden, {"type": "string", "pattern": "^(?<x>[\\s\\S]){0,2000}(?<y>a){0,2000}$"},
                        {"type": "string", "pattern": "a{4294967295}"},
                        {"type": "object", "patternProperties": {"^[\\s\\S]{0,3000}$": {"type": "integer"}}}):
        with pytest.raises(GrammarError, match="unroll to more than one string"):
            prepared_schema(priced_over)


def test_forms_xgrammar_would_misread_are_said_plainly():
    """A type list with string bounds (OpenAI's optional field) becomes anyOf with the bounds as a pattern; oneOf is
    anyOf; an allOf of one schema is that schema; 5.0 is an integer."""
    from app.model.schema_rules import prepared_schema

    optional, _ = prepared_schema({"type": ["string", "null"], "maxLength": 40, "description": "d"})
    assert optional == {"anyOf": [{"description": "d", "type": "string", "pattern": "^[\\s\\S]{0,40}$"},
                                  {"description": "d", "type": "null"}]}
    assert prepared_schema({"type": ["string"], "maxLength": 5.0})[0] == {"type": "string",
                                                                          "pattern": "^[\\s\\S]{0,5}$"}
    assert prepared_schema({"oneOf": [{"type": "integer"}, {"type": "null"}]})[0] == {
        "anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert prepared_schema({"allOf": [{"$ref": "#/$defs/X"}], "$defs": {"X": {"type": "integer"}}})[0] == {
        "$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X"}


def test_a_pattern_that_keeps_to_its_length_bounds_is_taken_as_it_is():
    """pydantic's Field(pattern="^[A-Z]{3}$", max_length=3): the pattern already holds the length."""
    from app.model.schema_rules import prepared_schema

    rewritten, _ = prepared_schema({"type": "string", "pattern": "^[A-Z]{3}$", "maxLength": 3, "minLength": 1})
    assert rewritten == {"type": "string", "pattern": "^[A-Z]{3}$"}
    with pytest.raises(GrammarError, match="does not keep to"):
        prepared_schema({"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3})


def test_grammars_compile_one_at_a_time_refuse_a_backlog_and_bound_the_wait(monkeypatch):
    """A compile holds a core: one runs at a time, MAX_WAITING_COMPILES more may wait, the next is a 503, and a
    compile past its time answers 503 while it goes on into the cache."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from app.errors import OverloadedError
    from app.model import grammar

    release, running, at_once = threading.Event(), [], []

    def slow(self, text, strict):
        at_once.append(len(running))
        running.append(text)
        release.wait(20)
        running.remove(text)
        return text

    monkeypatch.setattr(grammar.Grammars, "_compile_now", slow)
    grammars = grammar.Grammars(None, 16, [0])
    backlog = grammar.MAX_WAITING_COMPILES + 1
    with ThreadPoolExecutor(backlog) as pool:
        futures = [pool.submit(grammars.compile, JsonFormat({"type": "integer", "minimum": i})) for i in range(backlog)]
        deadline = time.monotonic() + 10
        while grammars._waiting._value and time.monotonic() < deadline:  # every slot taken
            time.sleep(0.01)
        with pytest.raises(OverloadedError, match="already waiting"):
            grammars.compile(JsonFormat({"type": "string"}))
        # A schema already being compiled takes no place: it waits on that compile.
        same = pool.submit(grammars.compile, JsonFormat({"type": "integer", "minimum": 0}))
        release.set()
        assert sorted(json.loads(future.result(10))["minimum"] for future in futures) == list(range(backlog))
        assert json.loads(same.result(10))["minimum"] == 0
    assert at_once == [0] * backlog  # never two at once, and the shared one compiled once
    release.clear()
    with pytest.raises(OverloadedError, match="not ready within"):
        grammars.compile(JsonFormat({"type": "boolean"}), timeout_s=0.2)
    # While that one still compiles, a schema compiled before is answered at once, without a place in the queue.
    began = time.perf_counter()
    assert json.loads(grammars.compile(JsonFormat({"type": "integer", "minimum": 1})))["minimum"] == 1
    assert time.perf_counter() - began < 1 and len(running) == 1
    release.set()
