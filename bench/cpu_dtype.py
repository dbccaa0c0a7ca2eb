"""Which dtype is fastest on this CPU? Prefill (vision + prompt) and per-token decode, side by side in one run.

A mid-size random-weight Qwen3-VL (real architecture, scaled down so the run takes a minute or two) with the
tiny demo model's tokenizer and processor. Prints a table and the ratios against float32.

    python bench/cpu_dtype.py [--image 1024x768] [--new-tokens 48] [--answer-tokens 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import build_processor, build_tokenizer  # noqa: E402

TEXT = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True}}
VISION = {"depth": 8, "hidden_size": 512, "intermediate_size": 2048, "num_heads": 8, "patch_size": 16,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 1024,
          "num_position_embeddings": 2304, "deepstack_visual_indexes": [1, 3, 5]}


def build_model(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(text_config={**TEXT, "vocab_size": len(tokenizer)}, vision_config=VISION,
                           image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                           tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).eval()


def timed_generate(model, inputs, new_tokens: int, repeats: int) -> float:
    """Fastest of ``repeats`` runs forced to exactly ``new_tokens`` tokens (the machine is noisy)."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            best = min(best, time.perf_counter() - started)
    return best


def measure(model, inputs, new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds per further token)."""
    first = timed_generate(model, inputs, 1, repeats=3)
    total = timed_generate(model, inputs, new_tokens, repeats=2)
    return first, (total - first) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="1024x768")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--answer-tokens", type=int, default=200,
                        help="answer length for the per-diagram estimate (a typical table: 100-300 tokens)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.image.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    processor = build_processor(tokenizer)
    processor.image_processor.size = {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 4096}
    model = build_model(tokenizer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Extract the table."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (width, height), "white")], return_tensors="pt")
    image_tokens = int(inputs["image_grid_thw"].prod()) // 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; image {width}x{height} = "
          f"{image_tokens} image tokens; {args.new_tokens} new tokens")
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model.to(dtype)
        batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        measure(model, batch, 2)  # warm-up
        rows.append((str(dtype).removeprefix("torch."), *measure(model, batch, args.new_tokens)))
    base_first, base_token = rows[0][1], rows[0][2]
    n = args.answer_tokens
    base_total = base_first + n * base_token
    print(f"| dtype | first token s | s/token | prefill vs fp32 | decode vs fp32 | diagram ({n} tokens) s | vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, first, per_token in rows:
        total = first + n * per_token
        print(f"| {name} | {first:.3f} | {per_token:.4f} | {first / base_first:.2f}x | {per_token / base_token:.2f}x "
              f"| {total:.2f} | {total / base_total:.2f}x |")


if __name__ == "__main__":
    main()
