"""Random-weight Qwen3-VL models for benchmarks: real architecture at any size, built fast.

The tokenizer and processor are the tiny demo model's (offline); the config's special-token ids are
pointed at that tokenizer's ids, while vocab and layer sizes stay as the config says.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import build_processor, build_tokenizer  # noqa: E402

FULL_SIZE_CONFIG = Path(__file__).with_name("qwen3_vl_2b_config.json")
# Where the full-size model is saved for the service: bench/gpu_check.py --save-model writes it once,
# bench/serve_bench.py --model full loads it (and builds it only when it is missing).
SAVED_FULL_MODEL = Path(tempfile.gettempdir()) / "vlm-bench" / "qwen3-vl-2b-random"


def tokenizer_and_processor():
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    # The production processor's pixel bounds (Qwen3-VL: 64x64 up to 16M pixels); the service's own
    # MAX_IMAGE_TOKENS budget is what limits the image in practice.
    processor.image_processor.size = {"shortest_edge": 64 * 64, "longest_edge": 16 * 1024 * 1024}
    return tokenizer, processor


def build_config(config_path: Path, tokenizer):
    from transformers import Qwen3VLConfig

    raw = json.loads(Path(config_path).read_text())
    ids = tokenizer.convert_tokens_to_ids
    raw.update(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
               vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    raw["text_config"].update(eos_token_id=ids("<|im_end|>"), bos_token_id=None,
                              pad_token_id=ids("<|endoftext|>"))
    return Qwen3VLConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})


def build_model(config, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"):
    """Construct on the meta device (no init cost), then materialize on ``device`` with small random values.
    On CUDA that takes a second where the CPU's serial generator needs ~40 s for the 2B (weights differ by device,
    all random)."""
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                tensor.fill_(1.0)
            elif name.endswith("bias"):
                tensor.zero_()
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32, device=device)
                             * 0.02)
    # Rotary tables are buffers, left empty by to_empty(): take them from a fresh module on the CPU.
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
    leftover = [name for name, b in model.named_buffers() if not torch.isfinite(b.float()).all()]
    assert not leftover, f"uninitialised buffers: {leftover}"
    model.tie_weights()
    return model.eval()


def set_generation_ids(model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def save_for_service(model, processor, folder: Path) -> Path:
    """Save a built model and its processor where the service loads them (BASE_MODEL_ID=folder); written
    beside and renamed, so a run killed mid-save leaves no half model for the next one to load."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(str(partial))
        processor.save_pretrained(str(partial))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def save_full_size(folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Qwen3-VL-2B dimensions with random weights, written once in Hugging Face form (bf16: ~4.3 GB) with the
    demo tokenizer and processor, so the service and other tools (llama.cpp's converter) can load it."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    tokenizer, processor = tokenizer_and_processor()
    model = build_model(build_config(FULL_SIZE_CONFIG, tokenizer), dtype=dtype)
    set_generation_ids(model, tokenizer)
    return save_for_service(model, processor, folder)
