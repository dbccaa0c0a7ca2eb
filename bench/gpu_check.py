"""GPU figures for the engine on the full Qwen3-VL-2B architecture (random weights), bf16 on CUDA.

Single-stream time to first token and decode tokens/s, throughput at batch 1/8/32, peak GPU memory, and
a 1024x768 diagram with 384 new tokens single-stream; eager, eager with QUANTIZATION=int8 (bitsandbytes,
when installed) and with TORCH_COMPILE (static cache + torch.compile). Run by bench/gpu_check.sh on a lent GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import FULL_SIZE_CONFIG, build_config, build_model, tokenizer_and_processor  # noqa: E402

from app.device import Placement  # noqa: E402
from app.engine import Engine, GenerationRequest, ServingDefaults  # noqa: E402
from app.loader import LoadedModel  # noqa: E402
from app.quantize import quantize_bitsandbytes  # noqa: E402


def timed(engine: Engine, batch: int, new_tokens: int, image: Image.Image, mode: str) -> dict[str, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = engine.generate_batch([GenerationRequest(image, "Extract the table.", new_tokens) for _ in range(batch)])
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    first = results[0].first_token_time_s or 0.0
    generated = sum(r.completion_tokens for r in results)
    return {"mode": mode, "batch": batch, "new_tokens": new_tokens, "wall_s": wall, "ttft_s": first,
            "decode_tok_s_per_stream": (new_tokens - 1) / max(results[0].generation_time_s - first, 1e-9),
            "generated_tok_s": generated / wall, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--diagram-tokens", type=int, default=384, help="the single-stream diagram's length")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    tokenizer, processor = tokenizer_and_processor()
    model = build_model(build_config(FULL_SIZE_CONFIG, tokenizer), dtype=torch.bfloat16).to("cuda")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    loaded = LoadedModel(model, processor, Placement("cuda", torch.bfloat16), "qwen3-vl-2b-random", None)
    image = Image.new("RGB", (1024, 768), "white")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    # Compiling is the slowest to warm up, so it runs last: if the device's time runs out, the rows already
    # printed and written are kept.
    for mode in ("eager", "int8_bitsandbytes", "torch_compile"):
        target = loaded
        if mode == "int8_bitsandbytes":
            try:  # on a copy: the layers are replaced in place
                target = dataclasses.replace(loaded, model=quantize_bitsandbytes(copy.deepcopy(model), "cuda"))
            except ImportError:
                print("bitsandbytes is not installed: no int8 rows", flush=True)
                continue
        defaults = ServingDefaults("Extract the table.", args.diagram_tokens, 1024)
        engine = Engine(target, defaults, force_max_new_tokens=True, torch_compile=mode == "torch_compile")
        for batch in [1] + [int(b) for b in args.batches.split(",")]:
            engine.generate_batch([GenerationRequest(image, "warm up", 8) for _ in range(batch)])  # (re)compile
        measured = [timed(engine, 1, args.diagram_tokens, image, mode)]  # the 1024x768 single-stream diagram
        measured += [timed(engine, int(b), args.new_tokens, image, mode) for b in args.batches.split(",")]
        for row in measured:
            if not rows:
                print("| " + " | ".join(row) + " |\n|" + "---:|" * len(row), flush=True)
            print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |",
                  flush=True)
            rows.append(row)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        del engine, target
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
