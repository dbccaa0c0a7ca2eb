"""Build the offline tiny Qwen3-VL (random weights, real architecture) and a real LoRA adapter for it.

Nothing here downloads anything: the tokenizer is trained on an in-memory corpus, the model is the real
``Qwen3VLForConditionalGeneration`` at toy dimensions, and the adapter is a real peft LoRA saved in the
production adapter layout. Tests, CI and newcomers without the real weights serve it end to end.

    python -m app.demo OUT_DIR     # writes OUT_DIR/base-model and OUT_DIR/weights
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

BUILD_VERSION = "1"  # bump when the layout below changes, so cached demo builds are rebuilt
SEED = 1234

# Qwen's special tokens, in Qwen's order, so chat templates and processors find what they expect.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The same shape of template as Qwen3-VL's: an image item becomes vision_start + image_pad + vision_end.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the tokenizer learns its merges from: the words of our prompt and table, in Russian and English.
CORPUS = [
    "| № | Наименование действия | Роль |", "|---|---|---|",
    "Извлеки из диаграммы процесса все шаги и роли и верни таблицу в формате markdown.",
    "Получить заявку Проверить документы Согласовать договор Отправить уведомление Менеджер Клиент",
    "Бухгалтер Юрист Оператор Руководитель отдела Создать счёт Оплатить счёт Закрыть задачу",
    "Extract every step and role from the process diagram and return a markdown table.",
    "Receive request Check documents Approve contract Send notification Manager Customer Accountant",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 | - : . , ( ) ",
]

TEXT_CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    # mrope_section must sum to head_dim / 2.
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2],
                        "mrope_interleaved": True},
}
VISION_CONFIG = {
    # head dim = 32 / 2 = 16, divisible by 4 as the 2-D rotary embedding needs.
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
    "num_position_embeddings": 64,  # a perfect square: positions are interpolated on a 2-D grid
    "deepstack_visual_indexes": [0, 1], "hidden_act": "gelu_pytorch_tanh",
}
IMAGE_PROCESSOR = {
    "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    # Pixel bounds in the production processor's units; kept small so the tiny model stays fast.
    "size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 256},
}
# What a real adapter targets: the language model's attention and MLP, and the vision blocks.
LORA_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|.*visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.linear_fc1|mlp\.linear_fc2)"
)
DEMO_PARAMS = {
    "max_new_tokens": 48,
    "note": "tiny random-weight demo adapter built by app.demo; its answers are nonsense by design",
}


def build_tokenizer():
    """Train a byte-level BPE on the corpus and wrap it as Qwen's tokenizer class."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer):
    """The Qwen3-VL processor with its image settings set explicitly (the defaults are Qwen2-VL's)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(**IMAGE_PROCESSOR)
    video_processor = Qwen3VLVideoProcessor(**IMAGE_PROCESSOR)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer):
    """A random-weight Qwen3VLForConditionalGeneration whose greedy output is not degenerate."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={**TEXT_CONFIG, "vocab_size": len(tokenizer), "pad_token_id": ids("<|endoftext|>")},
        vision_config=VISION_CONFIG,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    config.eos_token_id = ids("<|im_end|>")
    config.pad_token_id = ids("<|endoftext|>")
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # The default init (std 0.02) gives near-uniform logits; a wider one makes greedy decoding
        # wander across the vocabulary instead of repeating one token.
        embed = model.get_input_embeddings().weight
        embed.normal_(0.0, 1.0)
        for module in model.model.language_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.4)
        # Keep the end-of-turn token rare, so a demo answer has some length before it stops.
        embed[ids("<|im_end|>")] *= 0.3
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.do_sample = False
    return model


def build_adapter(model, adapter_dir: Path) -> None:
    """Save a real peft LoRA adapter for ``model`` with non-zero B matrices (so merging changes weights)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED + 1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0,
                        init_lora_weights=False)
    with warnings.catch_warnings():  # peft calls a transformers API that transformers deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's model-card stub; not part of our layout
    peft_model.unload()  # leave the caller's model as it was


def build(out_dir: str | os.PathLike) -> Path:
    """Write ``OUT_DIR/base-model`` and ``OUT_DIR/weights``; return ``OUT_DIR``."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a few-kB model needs no progress bar
    out = Path(out_dir)
    base_dir, adapter_dir = out / "base-model", out / "weights"
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer)
    model.save_pretrained(str(base_dir))
    processor.save_pretrained(str(base_dir))
    build_adapter(model, adapter_dir)
    # The production adapter folder carries the training-time processor files and its own params.
    processor.save_pretrained(str(adapter_dir))
    (adapter_dir / "params.json").write_text(json.dumps(DEMO_PARAMS, indent=2, ensure_ascii=False))
    (out / "BUILD_VERSION").write_text(BUILD_VERSION)
    return out


def ensure_built(cache_dir: str | os.PathLike) -> Path:
    """Build the demo model into ``cache_dir`` once; later calls reuse it. Safe against partial builds."""
    target = Path(cache_dir)
    marker = target / "BUILD_VERSION"
    if marker.is_file() and marker.read_text().strip() == BUILD_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place: a crash mid-build never leaves a half model.
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        build(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built the tiny demo model in %s", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write base-model/ and weights/ into")
    args = parser.parse_args(argv)
    out = build(args.out_dir)
    print(f"BASE_MODEL_ID={out / 'base-model'} ADAPTER_PATH={out / 'weights'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
