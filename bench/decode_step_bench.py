"""The decoding step before and after the fused layers, side by side in one run, on this machine.

modules-eager is the step as it was (the model's modules one by one); fused-eager is the fused step
(fusion.py, decode_step.py). Both run on one engine over the same cache, interleaved round by round, at the
batch sizes given, with ``--kv`` tokens in each row's slot (the keys are whatever the cache holds: a step's
time does not depend on their values). Then each path's startup check (decode_paths.py) on this model and
dtype: the largest logit difference from the model's own forward, as a share of the logit scale, against
the tolerance the service applies. And the process's RSS before and after the fusion (it must not grow: the
modules' weights become views of the fused ones). With ``--quantization int4`` (or int8) the language model decodes
with QUANTIZATION's low-bit copies. "fused-eager, token-major cache" is the fused step over the cache laid out as
on CUDA rather than the CPU's head-major layout (kvcache.py).

    python bench/decode_step_bench.py                          # Qwen3-VL-2B dimensions, random weights, bf16
    python bench/decode_step_bench.py --config bench/qwen3_vl_mid_config.json --dtype float32
    python bench/decode_step_bench.py --quantization int4 --rows 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from random_model import FULL_SIZE_CONFIG, build_config, build_model, tokenizer_and_processor

from app.model import decode_context, decode_paths, int4, quantize  # random_model put the repository root on sys.path
from app.model.decode_paths import ALL_PATHS, check_decoding, check_tolerance
from app.model.device import Placement
from app.model.engine import Engine, EngineLimits, ServingDefaults
from app.model.kvcache import SlotKVCache
from app.model.loader import LoadedModel
from app.model.quantize import quantize_int4_decode, quantize_int8_decode

MODES = ("modules-eager", "fused-eager")
# With --quantization: the fused step reading the original weights instead of the low-bit copies, as the prefill
# does (what a decoding step of many rows would gain or lose by it).
ORIGINAL_WEIGHTS = "fused-eager, original weights"
# The fused step over the cache as CUDA lays it out (each position's heads side by side) instead of the CPU's
# head-major one (kvcache.py): what the layout is worth to the CPU's attention.
TOKEN_MAJOR = "fused-eager, token-major cache"
QUANTIZE = {"int4": (quantize_int4_decode, "int4-decode"), "int8": (quantize_int8_decode, "int8-decode")}


def use_mode(engine: Engine, mode: str, caches: dict[bool, SlotKVCache]) -> None:
    engine.cache = caches[mode != TOKEN_MAJOR]  # keyed by head_major
    engine.use_decode_path(next(path for path in ALL_PATHS if path.mode == mode.split(",")[0]))
    reads_low_bits = (lambda: False) if mode == ORIGINAL_WEIGHTS else decode_context.in_decoding_step
    int4.in_decoding_step = quantize.in_decoding_step = reads_low_bits


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def time_steps(engine: Engine, rows: int, kv: int, steps: int) -> float:
    """Median seconds per step of ``rows`` rows whose slots hold ``kv`` tokens."""
    step = engine._step
    step.positions[:rows] = kv
    engine._run_step(rows, kv + 1)  # warm
    times = []
    for _ in range(steps):
        step.positions[:rows] = kv  # stay at the same length every step
        started = time.perf_counter()
        engine._run_step(rows, kv + 1)
        times.append(time.perf_counter() - started)
    step.reset()
    return statistics.median(times)


def check_margin(engine: Engine) -> tuple[str, float]:
    """The startup check's verdict on the current path and its largest difference / logit scale."""
    worst = []
    compare = decode_paths.compare

    def spy(candidate, reference, tolerance):
        worst.append(((candidate - reference).abs().max() / reference.abs().max()).item())
        return compare(candidate, reference, tolerance)

    decode_paths.compare = spy
    try:
        problem = check_decoding(engine)
    finally:
        decode_paths.compare = compare
    return ("passes" if problem is None else f"FAILS: {problem}"), max(worst, default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(FULL_SIZE_CONFIG))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--kv", type=int, default=800, help="tokens already in each slot")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path, batch size and round")
    parser.add_argument("--quantization", choices=["none", *QUANTIZE], default="none")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    levels = [int(r) for r in args.rows.split(",")]
    tokenizer, processor = tokenizer_and_processor()
    model = build_model(build_config(Path(args.config), tokenizer), dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    quantization = None
    if args.quantization != "none":
        quantize, quantization = QUANTIZE[args.quantization]
        model = quantize(model)
    loaded = LoadedModel(model, processor, Placement("cpu", dtype, quantization), "qwen3-vl-random", None)
    before = rss_mb()
    engine = Engine(loaded, ServingDefaults("Extract the table.", 64, 1024), repetition_guard=None,
                    limits=EngineLimits(max_rows=max(levels), max_prompt_tokens=256))
    after = rss_mb() - engine.cache.nbytes / 2 ** 20 - engine._step.logits.nbytes / 2 ** 20
    print(f"{Path(args.config).name}, {args.dtype}{'+' + quantization if quantization else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.kv} tokens in each slot; RSS {before:.0f} MB before the fusion, {after:.0f} MB after "
          "(less the KV cache and the logits buffer)", flush=True)
    modes = MODES + ((ORIGINAL_WEIGHTS,) if quantization else ()) + (TOKEN_MAJOR,)
    caches = {True: engine.cache, False: SlotKVCache(engine.cache.shape, dtype, "cpu", head_major=False)}
    timings: dict[tuple[str, int], list[float]] = {}
    for round_index in range(args.rounds):
        for mode in modes:
            use_mode(engine, mode, caches)
            for rows in levels:
                timings.setdefault((mode, rows), []).append(time_steps(engine, rows, args.kv, args.steps))
        print(f"  round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{mode} x{rows} {values[-1] * 1000:.1f} ms" for (mode, rows), values in timings.items()), flush=True)
    print("\n| path | rows | ms per step (median of rounds) | tokens/s | vs modules-eager |")
    print("|---|---:|---:|---:|---:|")
    for rows in levels:
        base = statistics.median(timings[("modules-eager", rows)])
        for mode in modes:
            median = statistics.median(timings[(mode, rows)])
            print(f"| {mode} | {rows} | {median * 1000:.1f} | {rows / median:.2f} | {base / median:.2f}x |")
    print(f"\nstartup check on this model (tolerance {check_tolerance(engine):g} of the logit scale):")
    print("| path | verdict | largest difference / logit scale |")
    print("|---|---|---:|")
    for mode in MODES:
        use_mode(engine, mode, caches)
        verdict, margin = check_margin(engine)
        print(f"| {mode} | {verdict} | {margin:.4f} |", flush=True)


if __name__ == "__main__":
    main()
