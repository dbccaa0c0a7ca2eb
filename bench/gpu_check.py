"""The engine on the full Qwen3-VL-2B architecture (random weights): decoding speed and graph correctness.

Side by side in one run, one 1024x768 diagram per row, every row forced to the same token count:
  hf-generate    the model's own generate() (DynamicCache, eager), as the service ran before the slot engine
  modules-eager  our slot engine, decoding step run module by module (the step before the fused layers)
  fused-eager    our slot engine, fused layers, one kernel launch at a time
  <served>       the path the service's startup ladder picks (flash-graphs or sdpa-graphs on a GPU)
Also: each path's startup check (its logits against the model's own forward, on this device), and a check
that the served step's logits equal the eager step's at the same positions, up to many steps after capture
(the graph must attend to keys written after it was captured).

    python bench/gpu_check.py                                   # CUDA, full size (bench/gpu_check.sh)
    python bench/gpu_check.py --device cpu --model tiny         # the logic, on the CPU (figures meaningless)
    python bench/gpu_check.py --device cpu --config bench/qwen3_vl_small_config.json    # the 2B's heads, 2 layers

A run that raises is recorded with its error (and its traceback printed) and the next one still runs.
--save-model DIR saves the full-size model it built, for bench/serve_bench.py --model-dir DIR (built once).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import (FULL_SIZE_CONFIG, build_config, build_model, save_for_service,  # noqa: E402
                          set_generation_ids, tokenizer_and_processor)

from app.model.decode_paths import ALL_PATHS, candidate_paths, check_decoding  # noqa: E402
from app.model.device import Placement  # noqa: E402
from app.model.engine import Engine, EngineLimits, ServingDefaults  # noqa: E402
from app.model.loader import LoadedModel  # noqa: E402
from app.model.scheduler import generate  # noqa: E402
from app.model.sequence import Sequence  # noqa: E402

PROMPT = "Extract the table."


def diagram(width: int = 1024, height: int = 768) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for box in range(6):
        left = 40 + box * (width - 80) // 6
        draw.rectangle((left, height // 3, left + 120, height // 3 + 80), outline="black", width=2)
    return image


def load(model_kind: str, device: str, dtype: torch.dtype, config: Path = FULL_SIZE_CONFIG,
         save_to: Path | None = None) -> LoadedModel:
    started = time.perf_counter()
    tokenizer, processor = tokenizer_and_processor()
    if model_kind == "full":
        model = build_model(build_config(config, tokenizer), dtype=dtype, device=device)
    else:
        from app.demo import build_model as build_tiny

        model = build_tiny(tokenizer).to(dtype)
    set_generation_ids(model, tokenizer)
    model = model.to(device).eval()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"model built in {time.perf_counter() - started:.1f} s on {device}", flush=True)
    if save_to is not None:
        started = time.perf_counter()
        save_for_service(model, processor, save_to)
        print(f"saved for serve_bench in {time.perf_counter() - started:.1f} s: {save_to}", flush=True)
    return LoadedModel(model, processor, Placement(device, dtype), f"qwen3-vl-{model_kind}-random", None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_engine(engine: Engine, rows: int, new_tokens: int, image: Image.Image, mode: str) -> dict:
    """``rows`` diagrams submitted at once, through the scheduler, each forced to ``new_tokens``."""
    device = engine.model.device.type
    sequences = [Sequence(engine.prepare(image, PROMPT), new_tokens) for _ in range(rows)]
    # When each token reached the host: the worst gap between two tokens of one row is what a running stream
    # feels of the prefills admitted beside it (DECODING_PREFILL_TOKEN_BUDGET bounds it).
    arrivals: list[list[float]] = [[] for _ in sequences]
    for sequence, times in zip(sequences, arrivals):
        sequence.on_token = lambda token, times=times: times.append(time.perf_counter())
    sync(device)
    started = time.perf_counter()
    results = generate(engine, sequences)
    sync(device)
    wall = time.perf_counter() - started
    decode = [(r.completion_tokens - 1) / max(r.generation_time_s - r.first_token_time_s, 1e-9) for r in results]
    gaps = [later - earlier for times in arrivals for earlier, later in zip(times, times[1:])]
    return {"mode": mode, "rows": rows, "new_tokens": new_tokens, "wall_s": wall,
            "ttft_p50_s": statistics.median(r.first_token_time_s for r in results),
            "decode_tok_s_per_stream": statistics.median(decode),
            "total_tok_s": sum(r.completion_tokens for r in results) / wall,
            "worst_gap_ms": 1000 * max(gaps, default=0.0)}


def run_hf_generate(loaded: LoadedModel, engine: Engine, new_tokens: int, image: Image.Image) -> dict:
    """The old path: the model's own generate() for one diagram, forced to ``new_tokens``; a 1-token run
    gives its time to first token, which the decode rate leaves out."""
    device = loaded.placement.device
    inputs = engine.collate([engine.prepare(image, PROMPT).tensors])

    def timed(tokens: int) -> tuple[float, int]:
        config = copy.deepcopy(loaded.model.generation_config)
        config.do_sample, config.max_new_tokens, config.min_new_tokens = False, tokens, tokens
        with torch.inference_mode():
            sync(device)
            started = time.perf_counter()
            output = loaded.model.generate(**inputs, generation_config=config)
            sync(device)
        return time.perf_counter() - started, output.shape[1] - inputs["input_ids"].shape[1]

    timed(2)  # warm
    first_s, _ = timed(1)
    wall, produced = timed(new_tokens)
    return {"mode": "hf-generate", "rows": 1, "new_tokens": produced, "wall_s": wall, "ttft_p50_s": first_s,
            "decode_tok_s_per_stream": (produced - 1) / max(wall - first_s, 1e-9), "total_tok_s": produced / wall}


def graph_matches_eager(engine: Engine, image: Image.Image, steps: int, checkpoints: set[int]) -> list[dict]:
    """Prefill 3 rows (fewer if the engine has fewer slots), advance them with the captured step, and at each
    checkpoint run that step twice from the same state, replayed and eager: their logits must agree (bf16
    tolerance)."""
    step, replay = engine._step, engine._run_step
    eager = step.run
    sequences = [Sequence(engine.prepare(image, f"{PROMPT} {i}"), steps + 8) for i in range(min(3, engine.max_rows))]
    engine.prefill(sequences)
    rows, report = len(sequences), []
    for index in range(1, steps + 1):
        if index not in checkpoints:
            replay(rows)
            continue
        tokens, positions = step.tokens.clone(), step.positions.clone()
        replay(rows)
        replayed, after = step.logits[:rows].float().clone(), (step.tokens.clone(), step.positions.clone())
        step.tokens.copy_(tokens)
        step.positions.copy_(positions)
        eager(rows, int(positions[:rows].max()) + 1)  # eager, attention sliced to the rows' length
        eager_logits = step.logits[:rows].float()
        step.tokens.copy_(after[0])
        step.positions.copy_(after[1])
        scale = eager_logits.abs().max().item()
        difference = (replayed - eager_logits).abs().max().item()
        agree = (replayed.argmax(-1) == eager_logits.argmax(-1)).float().mean().item()
        report.append({"step": index, "max_abs_diff": difference, "logit_scale": scale, "top1_agreement": agree,
                       "ok": difference <= 0.02 * scale + 1e-3})
    for sequence in sequences:
        engine.free(sequence)
    return report


def print_rows(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |\n|" + "---:|" * len(columns), flush=True)
    for row in rows:
        cells = (row.get(column, "") for column in columns)
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells) + " |", flush=True)


def failure(error: BaseException) -> str:
    """An error in one line, its traceback printed: a failed run shows why, and the next still runs."""
    traceback.print_exc()
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="full", choices=["full", "tiny"])
    parser.add_argument("--rows", default="1,8,32", help="concurrent diagrams for the graph runs")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--diagram-tokens", type=int, default=384, help="the single-stream diagram's length")
    parser.add_argument("--eager-tokens", type=int, default=32, help="eager and hf-generate runs (slow)")
    parser.add_argument("--check-steps", type=int, default=300, help="0 skips the graph-vs-eager check")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", type=Path, default=FULL_SIZE_CONFIG,
                        help="--model full: the architecture built with random weights (default: Qwen3-VL-2B's)")
    parser.add_argument("--save-model", type=Path, default=None,
                        help="--model full: also save the built model here for serve_bench.py --model-dir")
    args = parser.parse_args()
    device = args.device
    assert device == "cpu" or torch.cuda.is_available(), "needs CUDA (or --device cpu)"
    dtype = torch.bfloat16 if device == "cuda" or args.model == "full" else torch.float32
    import transformers

    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}, transformers {transformers.__version__}", flush=True)
    loaded = load(args.model, device, dtype, args.config, args.save_model if args.model == "full" else None)
    image = diagram()
    levels = [int(r) for r in args.rows.split(",")]
    engine = Engine(loaded, ServingDefaults(PROMPT, max(args.diagram_tokens, args.new_tokens, args.check_steps + 8),
                                            1024),
                    repetition_guard=None, force_max_new_tokens=True, limits=EngineLimits(max_rows=max(levels)))
    info = engine.cache_info()
    print(f"KV cache: {info['slots']} slots x {info['slot_tokens']} tokens = {info['bytes'] / 2 ** 30:.2f} GiB",
          flush=True)
    results: dict = {"rows": []}
    rows = results["rows"]

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    def record(mode: str, rows_run: int, new_tokens: int, measure) -> None:
        try:
            row = measure()
        except Exception as error:  # noqa: BLE001 - recorded with its error; the next measurement still runs
            row = {"mode": mode, "rows": rows_run, "new_tokens": new_tokens, "error": failure(error)}
            engine.release_all()
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        save()

    def warm_and_run(rows_run: int, new_tokens: int, mode: str) -> dict:
        run_engine(engine, 1, 2, image, "warm-up")
        return run_engine(engine, rows_run, new_tokens, image, mode)

    record("hf-generate", 1, args.eager_tokens, lambda: run_hf_generate(loaded, engine, args.eager_tokens, image))
    paths = {path.mode: path for path in ALL_PATHS}

    def eager_path(mode: str) -> dict:
        engine.use_decode_path(paths[mode])
        return warm_and_run(1, args.eager_tokens, mode)

    for mode in ("modules-eager", "fused-eager"):
        record(mode, 1, args.eager_tokens, lambda mode=mode: eager_path(mode))
    # Every path that can run here, checked as the service checks it at startup (capture included).
    candidates, skipped = candidate_paths(engine.model.device, engine.model.dtype, graphs_allowed=True,
                                          fusable=engine.fused_layers is not None, quantization=None)
    results["paths"] = [{"mode": why.split(":")[0], "verdict": why, "seconds": 0.0} for why in skipped]
    for path in candidates:
        began = time.perf_counter()
        try:
            engine.use_decode_path(path)
            verdict = check_decoding(engine) or "passes"
        except Exception as error:  # noqa: BLE001 - reported, and the ladder below steps past it
            verdict = f"raised {failure(error)}"
            engine.release_all()
        results["paths"].append({"mode": path.mode, "verdict": verdict, "seconds": time.perf_counter() - began})
        save()
    print("startup check of each path (logits vs the model's own forward, on this device):", flush=True)
    print_rows(results["paths"])
    ladder = time.perf_counter()
    try:
        engine.choose_decode_path()
    except Exception as error:  # noqa: BLE001 - no path passed: nothing more to measure
        results["decode_mode"] = None
        results["decode_fallback"] = failure(error)
        save()
        print(f"no decoding path passed its startup check: {results['decode_fallback']}", flush=True)
        print_rows(rows)
        return 1
    results["ladder_s"] = time.perf_counter() - ladder
    results["decode_mode"], results["decode_fallback"] = engine.decode_mode, engine.decode_fallback
    print(f"served: {engine.decode_mode} (fallback: {engine.decode_fallback}); ladder with capture and checks "
          f"took {results['ladder_s']:.1f} s", flush=True)
    served = engine.decode_mode
    # Without graphs this compares the whole-slot eager step with the length-sliced one: still a check.
    if args.check_steps:
        try:
            checks = graph_matches_eager(engine, image, args.check_steps,
                                         {step for step in (1, 2, 10, 100, args.check_steps)
                                          if step <= args.check_steps})
        except Exception as error:  # noqa: BLE001 - a check that cannot run has failed
            checks = [{"step": 0, "error": failure(error), "ok": False}]
            engine.release_all()
        results["graph_vs_eager"] = checks
        save()
        print(f"{engine.decode_mode} step vs eager step, same state:", flush=True)
        print_rows(checks)
    # The served path at every level (an eager one where graphs cannot run: measured above at one stream).
    if served.endswith("-graphs"):
        record(served, 1, args.eager_tokens, lambda: warm_and_run(1, args.eager_tokens, served))
    record(served, 1, args.diagram_tokens, lambda: run_engine(engine, 1, args.diagram_tokens, image, served))
    for level in levels:
        record(served, level, args.new_tokens,
               lambda level=level: run_engine(engine, level, args.new_tokens, image, served))
    print()
    print_rows(rows)
    by_mode = {(row["mode"], row["rows"], row["new_tokens"]): row for row in rows}
    base = by_mode.get(("hf-generate", 1, args.eager_tokens))
    for mode in dict.fromkeys(("modules-eager", "fused-eager", served)):
        ours = by_mode.get((mode, 1, args.eager_tokens))
        if base and ours and "error" not in base and "error" not in ours:
            print(f"one stream, {args.eager_tokens} tokens: {mode} decodes "
                  f"{ours['decode_tok_s_per_stream'] / base['decode_tok_s_per_stream']:.2f}x hf-generate "
                  f"(wall {base['wall_s'] / ours['wall_s']:.2f}x)", flush=True)
    if results.get("graph_vs_eager"):
        verdict = all(check["ok"] for check in results["graph_vs_eager"])
        print(f"{engine.decode_mode} vs eager logits within tolerance at every checkpoint: {verdict}", flush=True)
    failed = [row["mode"] for row in rows if "error" in row]
    if results.get("graph_vs_eager") and not all(check["ok"] for check in results["graph_vs_eager"]):
        failed.append("graph_vs_eager")
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
