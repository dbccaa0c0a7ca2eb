"""Synchronous model work: image + prompt -> model inputs -> greedy generation -> text. No web imports."""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .guards import RepetitionGuard
from .imaging import VisionGeometry
from .loader import LoadedModel
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingDefaults:
    """Per-request defaults: the environment wins, then the adapter's params.json, then built-ins."""

    prompt: str
    max_new_tokens: int
    max_image_tokens: int

    @classmethod
    def from_sources(cls, settings: Settings, params: dict[str, Any]) -> "ServingDefaults":
        def pick(name: str) -> Any:
            if settings.explicitly_set(name) or name not in params:
                return getattr(settings, name)
            return params[name]

        return cls(pick("prompt"), pick("max_new_tokens"), pick("max_image_tokens"))


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    finish_reason: str  # stop | length | repetition | cancelled
    preprocess_time_s: float
    generation_time_s: float
    first_token_time_s: float | None = None  # prefill, vision encoder included


class _StepWatch(StoppingCriteria):
    """Called after every decoding step: stops generation once the request's cancel flag is set
    (deadline, disconnect) or the output degenerates into repetition, and notes when the first token
    came out (the end of prefill)."""

    def __init__(self, cancel: threading.Event, prompt_length: int, guard: RepetitionGuard | None):
        self.cancel = cancel
        self.prompt_length = prompt_length
        self.guard = guard
        self.first_token_at: float | None = None
        self.repetition = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        stop = self.cancel.is_set()
        if not stop and self.guard is not None:
            generated = input_ids[0, self.prompt_length:]
            if generated.shape[0] >= self.guard.min_span:
                self.repetition = stop = self.guard.tripped(generated[-self.guard.max_period * 8:].tolist())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns the loaded model and processor; every method is blocking and meant for the model thread."""

    def __init__(self, loaded: LoadedModel, defaults: ServingDefaults,
                 repetition_guard: RepetitionGuard | None = RepetitionGuard()):
        self.loaded = loaded
        self.repetition_guard = repetition_guard
        self.model = loaded.model
        self.processor = loaded.processor
        self.defaults = defaults
        image_processor = self.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        self.geometry = VisionGeometry(
            factor=factor,
            min_pixels=int(image_processor.size["shortest_edge"]),
            max_pixels=min(int(image_processor.size["longest_edge"]), defaults.max_image_tokens * factor * factor),
        )
        config = copy.deepcopy(self.model.generation_config)
        # Greedy, whatever the checkpoint's sampling defaults: the table must be reproducible.
        config.do_sample, config.num_beams = False, 1
        config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = self.processor.tokenizer.pad_token_id
        self.generation_config = config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def build_inputs(self, image: Image.Image, prompt: str) -> Any:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        return inputs.to(self.model.device)

    def generate(self, image: Image.Image, prompt: str, max_new_tokens: int,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Greedy generation for one image. ``cancel`` stops it at the next token."""
        cancel = cancel or threading.Event()
        started = time.perf_counter()
        inputs = self.build_inputs(image, prompt)
        merge = self.processor.image_processor.merge_size ** 2
        image_tokens = int(inputs["image_grid_thw"].prod(dim=-1).sum()) // merge
        prompt_tokens = int(inputs["input_ids"].shape[1])
        preprocessed = time.perf_counter()
        config = copy.copy(self.generation_config)
        config.max_new_tokens = max_new_tokens
        watch = _StepWatch(cancel, prompt_tokens, self.repetition_guard)
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config,
                                         stopping_criteria=StoppingCriteriaList([watch]))
        generated = output[0, prompt_tokens:].tolist()
        finished = time.perf_counter()
        if cancel.is_set():
            reason = "cancelled"
        elif watch.repetition:
            reason = "repetition"
        elif generated and generated[-1] in self.eos_ids:
            reason = "stop"
        elif len(generated) >= max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        text = self.processor.tokenizer.decode(generated, skip_special_tokens=True).strip()
        first_token_s = watch.first_token_at - preprocessed if watch.first_token_at else None
        return GenerationResult(text, prompt_tokens, len(generated), image_tokens, reason,
                                preprocessed - started, finished - preprocessed, first_token_s)

    def warmup(self) -> GenerationResult:
        """One short generation on a synthetic diagram-like image, so the first request pays no setup."""
        image = Image.new("RGB", (256, 192), "white")
        return self.generate(image, self.defaults.prompt, max_new_tokens=2)
