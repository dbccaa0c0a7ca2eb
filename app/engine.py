"""Synchronous model work: image + prompt -> model inputs -> greedy generation -> text. No web imports."""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature, CompileConfig, StoppingCriteria, StoppingCriteriaList

from .guards import RepetitionGuard
from .imaging import VisionGeometry
from .loader import LoadedModel
from .settings import Settings

logger = logging.getLogger(__name__)

ModelInputs = dict[str, torch.Tensor]
# The processor's per-token outputs (padded when rows are batched); the others are per image.
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids"})


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


@dataclass
class GenerationRequest:
    """One row of a batch. ``on_done`` is called on the model thread as soon as this row finishes,
    even while other rows of its batch still generate."""

    image: Image.Image
    prompt: str
    max_new_tokens: int
    cancel: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[GenerationResult], None] = lambda result: None
    result: GenerationResult | None = None
    inputs: ModelInputs | None = None  # from Engine.prepare; when absent, prepared on the model thread


class _BatchWatch(StoppingCriteria):
    """Called after every decoding step. Decides per row whether it is finished (end of turn, its own
    max_new_tokens, cancelled by deadline or disconnect, degenerate repetition), hands each finished row
    its result right away, and notes when the first token came out (the end of prefill)."""

    def __init__(self, engine: "Engine", requests: list[GenerationRequest], inputs: Any, started: float,
                 preprocessed: float):
        self.engine = engine
        self.requests = requests
        self.prompt_length = int(inputs["input_ids"].shape[1])
        self.prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        merge = engine.processor.image_processor.merge_size ** 2
        self.image_tokens = (inputs["image_grid_thw"].prod(dim=-1) // merge).tolist()
        self.started, self.preprocessed = started, preprocessed
        self.first_token_at: float | None = None
        self.done = [False] * len(requests)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        generated = input_ids[:, self.prompt_length:]
        last_tokens = generated[:, -1].tolist()  # one device->host copy per step, not one per row
        for row, request in enumerate(self.requests):
            if not self.done[row]:
                reason = self.engine.finish_reason(generated[row], request, last_tokens[row])
                if reason is not None:
                    self.finish(row, generated[row].tolist(), reason)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def finish(self, row: int, tokens: list[int], reason: str) -> None:
        self.done[row] = True
        request = self.requests[row]
        now = time.perf_counter()
        request.result = GenerationResult(
            text=self.engine.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            prompt_tokens=int(self.prompt_tokens[row]), completion_tokens=len(tokens),
            image_tokens=int(self.image_tokens[row]), finish_reason=reason,
            preprocess_time_s=self.preprocessed - self.started, generation_time_s=now - self.preprocessed,
            first_token_time_s=(self.first_token_at or now) - self.preprocessed,
        )
        request.on_done(request.result)


class Engine:
    """Owns the loaded model and processor; every method is blocking and meant for the model thread."""

    def __init__(self, loaded: LoadedModel, defaults: ServingDefaults,
                 repetition_guard: RepetitionGuard | None = RepetitionGuard(), force_max_new_tokens: bool = False,
                 torch_compile: bool = False):
        self.loaded = loaded
        self.force_max_new_tokens = force_max_new_tokens
        self.repetition_guard = repetition_guard
        self.model = loaded.model
        self.processor = loaded.processor
        self.processor.tokenizer.padding_side = "left"  # rows of a batch must end where generation starts
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
        if torch_compile:
            # A fixed-size KV cache lets transformers compile the per-token step once per shape; it does so
            # on CUDA only (on the CPU inductor would need a C++ compiler in the image).
            config.cache_implementation = "static"
            config.compile_config = CompileConfig(mode="reduce-overhead")
            if loaded.placement.device != "cuda":
                logger.warning("TORCH_COMPILE: compiling needs CUDA; on %s only the static cache is used",
                               loaded.placement.device)
        self.generation_config = config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # In a prompt these would be read as structure, not text: an image placeholder breaks the processor's
        # count of image tokens, a turn marker rewrites the conversation.
        self.control_tokens = tuple(self.processor.tokenizer.all_special_tokens)

    def control_tokens_in(self, prompt: str) -> list[str]:
        return [token for token in self.control_tokens if token in prompt]

    def prepare(self, image: Image.Image, prompt: str) -> ModelInputs:
        """One request's unpadded model inputs (chat template, token ids, image patches), on the CPU.

        Safe to call from any thread. The service calls it before queueing, so one request's preprocessing
        neither holds up the model thread (it was 40 % of that thread's time at batch 16 on the CPU) nor,
        if it fails, the other rows of a batch."""
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True, tokenize=False,
        )
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        # The vision encoder casts the patches to its dtype first thing; casting here instead halves what a
        # queued bfloat16 request holds (a 1024-token image is 25 MB of float32 patches).
        return {key: value.to(self.model.dtype) if value.is_floating_point() else value
                for key, value in inputs.items()}

    def collate(self, rows: list[ModelInputs]) -> Any:
        """Rows from ``prepare`` as one batch: per-token tensors left-padded to the longest row (rows of a
        batch must end where generation starts), per-image tensors concatenated - what the processor returns
        for the whole batch with padding (a test holds the two equal)."""
        length = max(int(row["input_ids"].shape[1]) for row in rows)
        batch = {}
        for key in rows[0]:
            if key in TOKEN_KEYS:
                fill = self.processor.tokenizer.pad_token_id if key == "input_ids" else 0
                batch[key] = torch.cat([F.pad(row[key], (length - row[key].shape[1], 0), value=fill) for row in rows])
            else:
                batch[key] = torch.cat([row[key] for row in rows])
        return BatchFeature(batch).to(self.model.device)

    def finish_reason(self, generated: torch.Tensor, request: GenerationRequest,
                      last_token: int | None = None) -> str | None:
        """Why this row is finished after the latest step, or None while it goes on."""
        if request.cancel.is_set():
            return "cancelled"
        count = int(generated.shape[0])
        if self.force_max_new_tokens:
            return "length" if count >= request.max_new_tokens else None
        if count and (last_token if last_token is not None else int(generated[-1])) in self.eos_ids:
            return "stop"
        if count >= request.max_new_tokens:
            return "length"
        guard = self.repetition_guard
        if guard is not None and count >= guard.min_span and guard.tripped(
                generated[-guard.max_period * 8:].tolist()):
            return "repetition"
        return None

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Greedy generation for several images at once (left padding, one forward pass per step for
        all rows). Each row stops on its own terms and gets its result as soon as it stops."""
        started = time.perf_counter()
        inputs = self.collate([r.inputs if r.inputs is not None else self.prepare(r.image, r.prompt)
                               for r in requests])
        watch = _BatchWatch(self, requests, inputs, started, time.perf_counter())
        config = copy.copy(self.generation_config)
        config.max_new_tokens = max(r.max_new_tokens for r in requests)
        if self.force_max_new_tokens:  # benchmarks: comparable runs need a fixed token count
            config.min_new_tokens = config.max_new_tokens
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config,
                                         stopping_criteria=StoppingCriteriaList([watch]))
        generated = output[:, watch.prompt_length:]
        for row, request in enumerate(requests):
            if request.result is None:  # generate() ended by itself (e.g. every row at end of turn)
                tokens = generated[row].tolist()
                while tokens and tokens[-1] == config.pad_token_id and config.pad_token_id not in self.eos_ids:
                    tokens.pop()
                watch.finish(row, tokens, self.finish_reason(generated[row], request) or "stop")
        return [request.result for request in requests]

    def generate(self, image: Image.Image, prompt: str, max_new_tokens: int,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Greedy generation for one image. ``cancel`` stops it at the next token."""
        request = GenerationRequest(image, prompt, max_new_tokens, cancel or threading.Event())
        return self.generate_batch([request])[0]

    def warmup(self) -> GenerationResult:
        """One short generation on a synthetic diagram-like image, so the first request pays no setup."""
        image = Image.new("RGB", (256, 192), "white")
        return self.generate(image, self.defaults.prompt, max_new_tokens=2)
