"""Which dtype is fastest on this CPU? Prefill (vision + prompt) and per-token decode, side by side in one run.

A random-weight Qwen3-VL (real architecture; mid-size by default so the run takes a few minutes, or the true
Qwen3-VL-2B dimensions with --config bench/qwen3_vl_2b_config.json) with the tiny demo model's tokenizer and
processor. Prints a table and the ratios against the first dtype listed.

    python bench/cpu_dtype.py [--image 1024x768] [--new-tokens 48] [--answer-tokens 200]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from random_model import FULL_SIZE_CONFIG, build_config, build_model, tokenizer_and_processor
from transformers import StoppingCriteria, StoppingCriteriaList

from app.model.decode_context import decoding_step  # random_model put the repository root on sys.path
from app.model.quantize import Int8DecodeLinear, quantize_int8_decode

MID_SIZE_CONFIG = Path(__file__).with_name("qwen3_vl_mid_config.json")


class TokenClock(StoppingCriteria):
    """Notes the time each token comes out, so decoding is timed step by step rather than as the difference
    of two whole runs (a second of prefill noise would otherwise shift every per-token figure)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def measure(model, inputs, new_tokens: int, repeats: int = 2) -> tuple[float, float]:
    """(seconds to first token, median seconds per further token), the best of ``repeats`` runs."""
    first, per_token = float("inf"), float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            clock = TokenClock()
            started = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           stopping_criteria=StoppingCriteriaList([clock]))
            steps = [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]
            first = min(first, clock.times[0] - started)
            per_token = min(per_token, statistics.median(steps))
    return first, per_token


def decode_calls_as_decoding_steps(model):
    """``generate``'s calls after the prefill (one new token a row) run as the engine's decoding steps do, so the
    int8 layers read their int8 copy there and the original weights in the prefill (decode_context.py)."""
    forward = model.forward

    def forward_marked(*args, **kwargs):
        ids = kwargs.get("input_ids")
        with decoding_step() if ids is not None and ids.shape[-1] == 1 else contextlib.nullcontext():
            return forward(*args, **kwargs)

    model.forward = forward_marked
    return model


def read_bandwidth_gb_s() -> float:
    """How fast this machine's threads stream memory: the floor under a memory-bound decoding step."""
    data = torch.ones(256 * 2 ** 20, dtype=torch.float32)  # 1 GiB, far beyond any cache
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * data.element_size() / best / 1e9


def decode_step_bytes(model) -> int:
    """Weight bytes one decoding step must read: the language model's Linear layers and the output head."""
    layers = [*model.get_decoder().modules(), model.get_output_embeddings()]
    tensors = [tensor for layer in layers for tensor in (
        (layer.weight_int8, layer.scales) if isinstance(layer, Int8DecodeLinear)
        else (layer.weight,) if isinstance(layer, torch.nn.Linear) else ())]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(MID_SIZE_CONFIG),
                        help=f"model config (mid-size by default; full size: {FULL_SIZE_CONFIG.name})")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="comma-separated: float32, bfloat16, float16, bfloat16+int8-decode (QUANTIZATION=int8)")
    parser.add_argument("--image", default="1024x768")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--answer-tokens", type=int, default=200,
                        help="answer length for the per-diagram estimate (a typical table: 100-300 tokens)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.image.split("x"))
    tokenizer, processor = tokenizer_and_processor()
    model = build_model(build_config(Path(args.config), tokenizer))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Extract the table."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (width, height), "white")], return_tensors="pt")
    image_tokens = int(inputs["image_grid_thw"].prod()) // 4
    print(f"{Path(args.config).name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; image {width}x{height} = "
          f"{image_tokens} image tokens; {args.new_tokens} new tokens")
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.split("+")[0])
        model.to(dtype)
        # QUANTIZATION=int8 on the CPU: int8 copies of the language model's weights for the decoding steps.
        candidate = (decode_calls_as_decoding_steps(quantize_int8_decode(copy.deepcopy(model)))
                     if name.endswith("+int8-decode") else model)
        batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        measure(candidate, batch, 3, repeats=1)  # warm-up
        rows.append((name, *measure(candidate, batch, args.new_tokens), decode_step_bytes(candidate)))
        del candidate
    base_first, base_token = rows[0][1], rows[0][2]
    n = args.answer_tokens
    base_total = base_first + n * base_token
    first = rows[0][0]
    print(f"| dtype | first token s | s/token | prefill vs {first} | decode vs {first} | diagram ({n} tokens) s "
          f"| vs {first} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, first, per_token, _ in rows:
        total = first + n * per_token
        print(f"| {name} | {first:.3f} | {per_token:.4f} | {first / base_first:.2f}x | {per_token / base_token:.2f}x "
              f"| {total:.2f} | {total / base_total:.2f}x |")
    # Roofline: a decoding step reads every language-model weight once; it cannot beat memory bandwidth.
    bandwidth = read_bandwidth_gb_s()
    print(f"\nmemory read bandwidth: {bandwidth:.1f} GB/s ({torch.get_num_threads()} threads)")
    print("| dtype | weights read per step GB | bandwidth floor s/token | measured / floor |")
    print("|---|---:|---:|---:|")
    for name, _, per_token, step_bytes in rows:
        floor = step_bytes / 1e9 / bandwidth
        print(f"| {name} | {step_bytes / 1e9:.2f} | {floor:.4f} | {per_token / floor:.2f}x |")


if __name__ == "__main__":
    main()
