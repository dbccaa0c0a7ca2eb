"""What sampling and structured output cost, measured side by side in one run on this machine.

1. Per row and step, on logits of Qwen3-VL's vocabulary size (151,936): the greedy argmax the step already does,
   RowSampler with temperature, top-p and penalties, and the grammar's mask fill + apply. The grammar runs over
   a real 128k byte-level BPE vocabulary (the DeepSeek tokenizer litellm ships, a stand-in for Qwen's, which
   is not on this machine), following a rows schema through a whole answer.
2. The engine (random weights, the config given) decoding 16 rows together: all greedy, then a quarter
   sampled and a quarter under a grammar, interleaved for ``--rounds``; tokens/s and the ratio.

    python bench/sampling_bench.py                               # mid-size model, float32, CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from random_model import build_config, build_model, tokenizer_and_processor

from app.model.device import Placement  # random_model put the repository root on sys.path
from app.model.engine import Engine, EngineLimits, ServingDefaults
from app.model.grammar import Grammars, JsonFormat
from app.model.loader import LoadedModel
from app.model.sampling import RowSampler, SamplingParams
from app.model.scheduler import generate
from app.model.sequence import Sequence

VOCAB = 151_936
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["rows"],
          "properties": {"rows": {"type": "array", "maxItems": 20, "items": {
              "type": "object", "additionalProperties": False, "required": ["number", "action", "role"],
              "properties": {"number": {"type": "integer"}, "action": {"type": "string", "maxLength": 60},
                             "role": {"type": "string", "maxLength": 40}}}}}}


def per_step_costs(steps: int) -> list[tuple[str, float]]:
    from transformers import PreTrainedTokenizerFast

    import litellm

    path = Path(litellm.__file__).parent / "litellm_core_utils" / "tokenizers" / "deepseek_tokenizer.json"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    grammars = Grammars(tokenizer, VOCAB, [tokenizer.convert_tokens_to_ids(tokenizer.eos_token or "") or 1])
    started = time.perf_counter()
    compiled = grammars.compile(JsonFormat(SCHEMA))
    compile_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(VOCAB, generator=generator) for _ in range(steps)]
    rows: list[tuple[str, float]] = [("grammar compile (once per schema; cached after)", compile_s * 1e6)]

    def timed(name: str, choose) -> None:
        times, generated = [], []
        for step in logits:
            began = time.perf_counter()
            generated.append(choose(step, generated))
            times.append(time.perf_counter() - began)
        rows.append((name, statistics.median(times) * 1e6))

    timed("greedy argmax", lambda step, generated: int(step.argmax()))
    sampler = RowSampler(SamplingParams(temperature=0.7, top_p=0.9, seed=1, frequency_penalty=0.5,
                                        presence_penalty=0.5))
    timed("sampled: temperature, top-p, penalties", sampler.choose)
    matcher_steps = []
    matcher = grammars.matcher(compiled)
    for step in logits:  # greedy under the grammar, restarted whenever an answer completes
        if matcher.finished:
            matcher = grammars.matcher(compiled)
        began = time.perf_counter()
        scores = step.clone()
        matcher.mask(scores)
        matcher.accept(int(scores.argmax()))
        matcher_steps.append(time.perf_counter() - began)
    rows.append(("grammar: mask fill + apply + advance (greedy)", statistics.median(matcher_steps) * 1e6))
    return rows


def engine_throughput(config: Path, dtype: torch.dtype, rows: int, tokens: int, rounds: int) -> dict[str, list]:
    tokenizer, processor = tokenizer_and_processor()
    model = build_model(build_config(config, tokenizer), dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    loaded = LoadedModel(model, processor, Placement("cpu", dtype), "qwen3-vl-random", None)
    engine = Engine(loaded, ServingDefaults("Extract the table.", tokens, 256), repetition_guard=None,
                    force_max_new_tokens=True, limits=EngineLimits(max_rows=rows, max_prompt_tokens=128))
    from PIL import Image

    image = Image.new("RGB", (320, 240), "white")
    inputs = [engine.prepare(image, f"Extract the table. {index}") for index in range(rows)]
    small = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 400}}, "required": ["a"]}
    results: dict[str, list] = {"all greedy": [], "1/4 sampled, 1/4 constrained": []}
    for _ in range(rounds):
        for mode in results:
            sequences = []
            for index, prepared in enumerate(inputs):
                sampler = None
                if mode != "all greedy" and index % 4 == 1:
                    sampler = RowSampler(SamplingParams(temperature=0.8, top_p=0.95, seed=index))
                elif mode != "all greedy" and index % 4 == 2:
                    sampler = engine.sampler(prepared, SamplingParams(), JsonFormat(small))
                sequences.append(Sequence(prepared, tokens, sampler=sampler))
            began = time.perf_counter()
            done = generate(engine, sequences)
            elapsed = time.perf_counter() - began
            results[mode].append(sum(result.completion_tokens for result in done) / elapsed)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("qwen3_vl_mid_config.json")))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="steps timed per row kind in part 1")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| per row and step (151,936 logits, CPU) | median µs |\n|---|---:|")
    for name, micros in per_step_costs(args.steps):
        print(f"| {name} | {micros:,.0f} |")
    results = engine_throughput(Path(args.config), getattr(torch, args.dtype), args.rows, args.tokens, args.rounds)
    print(f"\n| {Path(args.config).name}, {args.dtype}, {args.rows} rows x {args.tokens} tokens | tokens/s "
          f"(median of {args.rounds}) |\n|---|---:|")
    medians = {mode: statistics.median(values) for mode, values in results.items()}
    for mode, value in medians.items():
        print(f"| {mode} | {value:.1f} |")
    greedy, mixed = medians.values()
    print(f"\nmixed / all greedy: {mixed / greedy:.2f}x")


if __name__ == "__main__":
    main()
