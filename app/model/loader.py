"""Load the base model and processor, apply and merge the LoRA adapter, and verify the merge."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ModelLoadError
from app.model.device import Placement, resolve_dtype
from app.settings import Quantization, Settings, TorchDType

logger = logging.getLogger(__name__)

# Files that make an adapter folder a complete processor source (the production adapter ships them,
# so serving preprocesses exactly as training did).
PROCESSOR_FILES = ("tokenizer_config.json",)
IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# params.json keys we apply, mapped to the setting they override when the environment leaves it unset.
RECOGNIZED_PARAMS = {"prompt": str, "max_new_tokens": int, "max_image_tokens": int}


@dataclass(frozen=True)
class AdapterReport:
    path: str
    lora_modules: int
    merged_modules: int
    digest: str = ""  # of its config and weights: names the served model (the same adapter, the same name)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_digest(adapter_dir: Path) -> str:
    """The first 8 hex digits of a SHA-256 over the adapter's config and weight files."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = adapter_dir / name
        if path.is_file():
            with path.open("rb") as file:
                digest.update(name.encode())
                digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()[:8]


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    placement: Placement
    model_id: str
    adapter: AdapterReport | None
    params: dict[str, Any] = field(default_factory=dict)


def resolve_sources(settings: Settings) -> tuple[str, Path]:
    """Base model id/path and adapter folder; BASE_MODEL_ID=demo builds the offline tiny model once."""
    if not settings.is_demo:
        return settings.base_model_id, settings.adapter_path
    from app.demo import ensure_built

    built = ensure_built(settings.demo_dir)
    adapter = settings.adapter_path if settings.explicitly_set("adapter_path") else built / "weights"
    return str(built / "base-model"), adapter


def adapter_has_processor(adapter_dir: Path) -> bool:
    return all((adapter_dir / name).is_file() for name in PROCESSOR_FILES) and any(
        (adapter_dir / name).is_file() for name in IMAGE_PROCESSOR_FILES
    )


def read_params(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's params.json, restricted to keys we understand; other keys are logged and ignored."""
    path = adapter_dir / "params.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    logger.info("adapter params.json keys: %s", ", ".join(sorted(raw)) or "(none)")
    params = {}
    for key, value in raw.items():
        expected = RECOGNIZED_PARAMS.get(key)
        if expected is None:
            continue
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ModelLoadError(f"{path}: {key} must be {expected.__name__}, got {value!r}")
        params[key] = value
    ignored = sorted(set(raw) - set(params))
    if ignored:
        logger.info("params.json keys not used by the service: %s", ", ".join(ignored))
    return params


def check_adapter(adapter_dir: Path, required: bool) -> bool:
    """Whether there is an adapter to apply. Raises ModelLoadError when one is required and missing: checked
    before the base model is fetched, so a missing mount is reported at once, not after minutes of downloads."""
    if (adapter_dir / "adapter_config.json").is_file():
        return True
    if required:
        raise ModelLoadError(f"no adapter at {adapter_dir} (no adapter_config.json): mount the fine-tuned "
                             "adapter there, or set REQUIRE_ADAPTER=false to serve the base model on purpose")
    return False


def apply_adapter(model: Any, adapter_dir: Path, required: bool = True) -> tuple[Any, AdapterReport | None]:
    """Apply the LoRA adapter with peft, verify every weight landed, merge it and unload the wrapper."""
    if not check_adapter(adapter_dir, required):
        logger.warning("adapter not found at %s (no adapter_config.json), serving the base model "
                       "(REQUIRE_ADAPTER=false)", adapter_dir)
        return model, None
    unreadable = [path.name for path in sorted(adapter_dir.iterdir())
                  if path.is_file() and not os.access(path, os.R_OK)]
    if unreadable:
        raise ModelLoadError(f"adapter file(s) at {adapter_dir} not readable by the service user (uid {os.getuid()}): "
                             f"{', '.join(unreadable)}; make them readable (chmod a+r), since peft may save them "
                             "readable by their owner only")
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    try:
        # Same steps as PeftModel.from_pretrained, but keeping the load result it throws away: an adapter
        # saved with another key layout otherwise loads silently as a no-op.
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a
            # FutureWarning at every start that nobody running the service can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel(model, config)
    except ValueError as error:
        reason = str(error).splitlines()[0]
        raise ModelLoadError(f"adapter at {adapter_dir} matches no module of the base model: {reason}") from None
    lora_modules = sum(isinstance(module, LoraLayer) for module in peft_model.modules())
    result = peft_model.load_adapter(str(adapter_dir), adapter_name="default")
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        example = (unexpected or missing)[0]
        raise ModelLoadError(
            f"adapter at {adapter_dir} does not fit the base model: {len(missing)} LoRA weights missing, "
            f"{len(unexpected)} in the file match no module (e.g. {example}); it was saved for another "
            "model or with an older key layout - re-save it against this base model"
        )
    merged = peft_model.merge_and_unload()
    leftover = sum(isinstance(module, LoraLayer) for module in merged.modules())
    if leftover:
        raise ModelLoadError(f"merging the adapter left {leftover} LoRA layers unmerged")
    logger.info("adapter %s: %d LoRA modules matched and merged", adapter_dir, lora_modules)
    return merged, AdapterReport(str(adapter_dir), lora_modules, lora_modules, adapter_digest(adapter_dir))


def quantize(model: Any, placement: Placement, mode: Quantization = Quantization.int8) -> tuple[Any, Placement]:
    """QUANTIZATION=int8 or int4, after the merge: the kernel that pays on each device (README, "Quantization")."""
    from app.model.quantize import quantize_bitsandbytes, quantize_int4_decode, quantize_int8_decode

    if mode == Quantization.int4:
        if placement.device != "cpu":
            raise ModelLoadError(f"QUANTIZATION=int4 runs on the CPU only, not on {placement.device}; "
                                 "use int8 or unset QUANTIZATION")
        return quantize_int4_decode(model), dataclasses.replace(placement, quantization="int4-decode")
    if placement.device == "cpu":
        # Its kernel takes bfloat16 activations; measured faster than llama.cpp's Q8_0 even where bfloat16 is
        # emulated (Ice Lake, bench/RESULTS.md), so no warning there any more.
        return quantize_int8_decode(model), dataclasses.replace(placement, quantization="int8-decode")
    if placement.device == "cuda":
        return quantize_bitsandbytes(model, "cuda"), dataclasses.replace(placement, quantization="int8-bitsandbytes")
    raise ModelLoadError(f"QUANTIZATION=int8 runs on cpu or cuda, not on {placement.device}; unset QUANTIZATION")


def count_parameters(base: str, revision: str | None) -> int | None:
    """The model's size from its config alone (built on the meta device: no weights, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(base, revision=revision)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except (OSError, ValueError):
        return None  # the load below reports the problem properly
    return sum(parameter.numel() for parameter in model.parameters())


def load_model(settings: Settings, placement: Placement) -> LoadedModel:
    """The whole load: base weights, processor, adapter merge. Raises ModelLoadError."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    started = time.perf_counter()
    base, adapter_dir = resolve_sources(settings)
    check_adapter(adapter_dir, settings.require_adapter)
    if placement.device == "cpu" and settings.torch_dtype == TorchDType.auto:
        parameters = count_parameters(base, settings.model_revision)
        dtype, _ = resolve_dtype("cpu", TorchDType.auto, parameters)
        if dtype != placement.dtype:
            logger.info("%s has %.0fM parameters: %s is faster than %s for a model this small on this CPU",
                        base, (parameters or 0) / 1e6, dtype, placement.dtype)
            placement = dataclasses.replace(placement, dtype=dtype)
    logger.info("loading %s (revision %s) on %s as %s", base, settings.model_revision or "default",
                placement.device, placement.dtype_name)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            base, dtype=placement.dtype, revision=settings.model_revision, device_map=placement.device
        )
        processor_source = str(adapter_dir) if adapter_has_processor(adapter_dir) else base
        processor = AutoProcessor.from_pretrained(processor_source, revision=None if processor_source != base
                                                  else settings.model_revision)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load {base}: {str(error).splitlines()[0]}") from None
    logger.info("processor loaded from %s", processor_source)
    params = read_params(adapter_dir)
    model, adapter = apply_adapter(model, adapter_dir, required=settings.require_adapter)
    if settings.quantization != Quantization.none:
        model, placement = quantize(model, placement, settings.quantization)
    model.eval()
    logger.info("model ready to warm up after %.1f s", time.perf_counter() - started)
    return LoadedModel(model, processor, placement, settings.base_model_id, adapter, params)
