"""Synchronous model work over a fixed set of KV slots: prepare a request's inputs, prefill requests into free
slots, advance every occupied slot by one greedy token, free a slot. No web imports, no threads, no policy:
the scheduler decides which sequences run; this decides how a step runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature

from app.errors import ModelLoadError, one_line
from app.model.cuda_graphs import BucketedStep, GraphedDecodeStep
from app.model.decode_paths import DecodePath, candidate_paths, check_decoding
from app.model.decode_step import DecodeStep
from app.model.fusion import fuse_layers
from app.model.grammar import GrammarError, Grammars, JsonFormat
from app.model.kvcache import CacheShape, SlotKVCache
from app.model.loader import LoadedModel
from app.model.sampling import RowSampler, SamplingParams
from app.model.sequence import GenerationResult, PreparedInputs, Sequence, StopRules
from app.pipeline.imaging import VisionGeometry
from app.pipeline.repetition import RepetitionGuard
from app.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["Engine", "GenerationResult", "PromptTooLongError", "ServingDefaults"]

# The processor's per-token outputs (padded when rows are batched); the others are per image.
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids"})


@dataclass(frozen=True)
class LaunchedStep:
    """A decoding step queued on the device: its rows in slot order, and the host buffer its tokens are being
    copied into (ready once ``done`` has passed; None off CUDA, where the copy is done when queued)."""

    rows: list[Sequence]
    host: torch.Tensor
    done: Any


class PromptTooLongError(ValueError):
    """The prompt's text does not fit the KV slot budget (MAX_PROMPT_TOKENS)."""


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
class EngineLimits:
    """How much the engine holds at once: its KV slots and what one slot must fit."""

    max_rows: int = 8  # KV slots: requests decoded together
    max_prompt_tokens: int = 1024  # text tokens of a prompt (chat template included), besides the image


class Engine:
    """Owns the loaded model, its processor and the slot cache; every method but ``prepare`` is for the
    model thread. Occupied slots are kept contiguous (0..n-1), so a step runs on a prefix of the cache."""

    def __init__(self, loaded: LoadedModel, defaults: ServingDefaults,
                 repetition_guard: RepetitionGuard | None = RepetitionGuard(), force_max_new_tokens: bool = False,
                 limits: EngineLimits = EngineLimits()):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.defaults = defaults
        self.limits = limits
        image_processor = self.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        self.geometry = VisionGeometry(
            factor=factor,
            min_pixels=int(image_processor.size["shortest_edge"]),
            max_pixels=min(int(image_processor.size["longest_edge"]), defaults.max_image_tokens * factor * factor),
        )
        self._merge = image_processor.merge_size ** 2
        config = self.model.generation_config
        eos = config.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_rules = StopRules(eos_ids, force_max_new_tokens, repetition_guard)
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        self.grammars = Grammars(self.processor.tokenizer, self.model.lm_head.weight.shape[0], sorted(eos_ids))
        # In a prompt these would be read as structure, not text: an image placeholder breaks the processor's
        # count of image tokens, a turn marker rewrites the conversation.
        self.control_tokens = tuple(self.processor.tokenizer.all_special_tokens)
        text_config = self.model.config.text_config
        attention = self.model.model.language_model.layers[0].self_attn
        self.max_image_tokens = self.geometry.max_pixels // (factor * factor)
        self.cache = SlotKVCache(
            CacheShape(layers=text_config.num_hidden_layers, slots=limits.max_rows,
                       slot_tokens=self.max_image_tokens + limits.max_prompt_tokens + defaults.max_new_tokens,
                       kv_heads=text_config.num_key_value_heads, head_dim=attention.head_dim),
            dtype=self.model.dtype, device=self.model.device, head_major=self.model.device.type == "cpu")
        self.fused_layers = fuse_layers(self.model)  # the modules' weights become views: nothing held twice
        self._step = DecodeStep(self.model, self.cache, self.fused_layers)
        self._run_step: Any = self._step.run
        # Unchecked until choose_decode_path (the service always calls it; tests and benchmarks may not).
        self.decode_mode = self._step.name
        self.decode_fallback: str | None = None  # why faster paths are not served
        self.occupants: list[Sequence] = []  # occupants[i] holds slot i
        # Host/device overlap (decode): pays on CUDA, where the device runs ahead; elsewhere a step runs on the
        # calling thread and launching one early only wastes the tokens of rows that stop.
        self.overlap = self.model.device.type == "cuda"
        self._in_flight: LaunchedStep | None = None
        pinned = self.model.device.type == "cuda"
        self._host_tokens = [torch.zeros(limits.max_rows, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._host_index = 0

    @property
    def max_rows(self) -> int:
        return self.limits.max_rows

    @property
    def slots_in_use(self) -> int:
        return len(self.occupants)

    # --- before the queue (any thread) ------------------------------------------------------------
    def control_tokens_in(self, prompt: str) -> list[str]:
        return [token for token in self.control_tokens if token in prompt]

    def prepare(self, image: Image.Image, prompt: str, system: str | None = None) -> PreparedInputs:
        """One request's unpadded model inputs (chat template, token ids, image patches), on the CPU;
        ``system``, when given, is the chat template's system turn.

        Safe to call from any thread. The service calls it before queueing, so one request's preprocessing
        neither holds up the model thread nor, if it fails, the other rows."""
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if system:
            turns.insert(0, {"role": "system", "content": system})  # a string: every Qwen template takes it
        text = self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        image_tokens = int(inputs["image_grid_thw"].prod(dim=-1).sum()) // self._merge
        prompt_tokens = int(inputs["input_ids"].shape[1])
        text_tokens = prompt_tokens - image_tokens
        if text_tokens > self.limits.max_prompt_tokens:
            raise PromptTooLongError(f"the prompt takes {text_tokens} tokens with the chat template; this service "
                                     f"takes at most {self.limits.max_prompt_tokens} (MAX_PROMPT_TOKENS)")
        # The vision encoder casts the patches to its dtype first thing; casting here instead halves what a
        # queued bfloat16 request holds (a 1024-token image is 25 MB of float32 patches).
        tensors = {key: value.to(self.model.dtype) if value.is_floating_point() else value
                   for key, value in inputs.items()}
        # M-RoPE positions here, on the CPU where the ids already are: on the model thread over device tensors
        # they cost dozens of host syncs per prefill.
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
        positions = positions[:, 0]  # [3, prompt_tokens]
        return PreparedInputs(tensors, prompt_tokens, image_tokens, rope_positions=positions,
                              rope_offset=int(positions.max()) + 1 - prompt_tokens)

    def sampler(self, inputs: PreparedInputs, sampling: SamplingParams,
                json_format: JsonFormat | None = None) -> RowSampler | None:
        """How a request picks its tokens when not plain greedy (None when it is). Compiles its grammar (cached
        per schema), so call it where ``prepare`` is called, off the model thread. GrammarError: unusable schema."""
        if sampling.is_greedy and json_format is None:
            return None
        matcher = (self.grammars.matcher(self.grammars.compile(json_format), json_format.param)
                   if json_format is not None else None)
        return RowSampler(sampling, inputs.tensors["input_ids"], matcher)

    def compile_grammar(self, json_format: JsonFormat, timeout_s: float) -> None:
        """Compile a schema's grammar now (cached: its requests then start at once), so an unusable schema is told
        before anything runs, e.g. when a job is submitted. GrammarError / OverloadedError as ``sampler``."""
        self.grammars.compile(json_format, timeout_s)

    def decode_tokens(self, tokens: list[int]) -> str:
        """Text of some generated tokens, as they are (streaming decodes the answer piece by piece with it)."""
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def detokenize(self, tokens: list[int]) -> str:
        """The answer: the text of all its tokens, stripped."""
        return self.decode_tokens(tokens).strip()

    # --- the model thread ---------------------------------------------------------------------------
    def choose_decode_path(self, cuda_graphs: bool = True) -> None:
        """Serve the fastest decoding path that passes its startup check (decode_paths.py); raise
        ModelLoadError when none does. Needs every slot free: the check and the capture use them."""
        if self.occupants:
            raise RuntimeError("the decoding path is chosen before any request holds a slot")
        paths, reasons = candidate_paths(self.model.device, self.model.dtype, graphs_allowed=cuda_graphs,
                                         fusable=self.fused_layers is not None,
                                         quantization=self.loaded.placement.quantization)
        for path in paths:
            runner = None
            try:
                runner = self.use_decode_path(path)
                problem = check_decoding(self)
            except Exception as error:  # noqa: BLE001 - a path that raises is a path that failed its check
                logger.exception("decoding path %s raised", path.mode)
                problem = one_line(error)
            if problem is None:
                self.decode_mode = path.mode
                self.decode_fallback = "; ".join(reasons) or None
                logger.info("decoding with %s (passed its startup check)%s", path.mode,
                            f"; not faster paths: {self.decode_fallback}" if reasons else "")
                return
            logger.warning("decoding path %s failed its startup check, not served: %s", path.mode, problem)
            reasons.append(f"{path.mode}: {problem}")
            self.release_all()
            if isinstance(runner, GraphedDecodeStep):
                runner.release()
        raise ModelLoadError("no decoding path passed its startup check: " + "; ".join(reasons))

    def use_decode_path(self, path: DecodePath, emulate_graphs: bool = False) -> Any:
        """Build that path's step (capturing its graphs) and decode with it from now on, unchecked.
        ``emulate_graphs`` runs a graph path's exact semantics eagerly (full bucket, whole slot), on any device."""
        if self.occupants:
            raise RuntimeError("the decoding step is replaced only while no slot is occupied")
        step = DecodeStep(self.model, self.cache, self.fused_layers if path.fused else None, path.attention)
        self._step, self._run_step, self.decode_mode = step, step.run, path.mode
        if not path.graphs:
            return step
        runner = BucketedStep(step, self.max_rows) if emulate_graphs else GraphedDecodeStep(step, self.max_rows)
        runner.capture()
        self._run_step = runner
        return runner

    def step_logits(self) -> torch.Tensor:
        """The last decoding step's logits per slot (what the startup check compares)."""
        return self._step.logits

    def reset_step(self) -> None:
        self._step.reset()

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> BatchFeature:
        """Rows from ``prepare`` as one prefill batch: per-token tensors right-padded (each row's keys and
        values then start at position 0, as in its slot; causal attention never looks at the padding after a
        row), per-image tensors concatenated in row order."""
        length = max(int(row["input_ids"].shape[1]) for row in rows)
        batch = {}
        for key in rows[0]:
            if key in TOKEN_KEYS:
                fill = self.pad_token_id if key == "input_ids" else 0
                batch[key] = torch.cat([F.pad(row[key], (0, length - row[key].shape[1]), value=fill)
                                        for row in rows])
            else:
                batch[key] = torch.cat([row[key] for row in rows])
        return BatchFeature({key: self._to_device(value) for key, value in batch.items()})

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On CUDA through pinned memory, so the copy (megabytes of image patches) does not hold the thread."""
        if self.model.device.type != "cuda":
            return tensor.to(self.model.device)
        return tensor.pin_memory().to(self.model.device, non_blocking=True)

    @torch.inference_mode()
    def prefill(self, sequences: list[Sequence]) -> list[int]:
        """Run the prompts (vision encoder, deepstack, M-RoPE: the model's own forward) as one batch, its keys
        and values written straight into free slots, and return each one's first generated token."""
        if len(self.occupants) + len(sequences) > self.max_rows:
            raise RuntimeError(f"{len(sequences)} sequences do not fit the {self.max_rows - len(self.occupants)} "
                               "free slots")
        batch = self.collate([sequence.inputs.tensors for sequence in sequences])
        host_lengths = [sequence.inputs.prompt_tokens for sequence in sequences]
        longest = max(host_lengths)
        # Padding positions take 1, as the model's own get_rope_index gives them: masked, they never count.
        position_ids = self._to_device(torch.stack([
            F.pad(sequence.inputs.rope_positions, (0, longest - length), value=1)
            for sequence, length in zip(sequences, host_lengths)], dim=1))
        first_slot = len(self.occupants)
        writer = self.cache.writer(first_slot, self.model.config.text_config)
        hidden = self.model.model(**batch, position_ids=position_ids, cache=writer, use_cache=True).last_hidden_state
        last = self._to_device(torch.tensor(host_lengths)) - 1
        logits = self.model.lm_head(hidden[torch.arange(len(sequences), device=hidden.device), last])
        first = logits.argmax(dim=-1)
        for row, sequence in enumerate(sequences):
            if sequence.sampler is not None:
                first[row] = self._sampled(sequence, logits[row], first[row])
        for row, sequence in enumerate(sequences):
            sequence.slot = first_slot + row
            sequence.position = host_lengths[row]
            self.occupants.append(sequence)
        new = slice(first_slot, first_slot + len(sequences))
        step = self._step
        step.tokens[new].copy_(first)
        step.positions[new].copy_(last + 1)
        step.rope_offsets[new].copy_(self._to_device(torch.tensor([s.inputs.rope_offset for s in sequences])))
        return first.tolist()

    def decode(self, sequences: list[Sequence]) -> list[tuple[Sequence, int]]:
        """One greedy step for every occupied slot; ``sequences`` must be exactly the occupants. Returns the
        rows that got a token, with it, from a single device-to-host copy.

        With ``overlap`` (CUDA), the next step is launched before this one's tokens are read, so the device
        computes step t+1 while the host runs stop rules and streaming for step t. A row that stops at step t
        has computed one token more, inside its own slot, which is never read; a row admitted meanwhile gets
        its first step's token at the next call."""
        if len(sequences) != len(self.occupants):
            raise RuntimeError(f"decode of {len(sequences)} sequences, {len(self.occupants)} slots occupied")
        choosing = [sequence for sequence in self.occupants if sequence.sampler is not None]
        if self._in_flight is not None and choosing:  # launched before they came: hand it over, then wait
            ready, self._in_flight = self._in_flight, None
            return self._collect(ready)
        if choosing:  # their tokens are picked on the host side and fed to the next step: no running ahead
            return self._choose(self._collect(self._launch()), choosing)
        if not self.overlap:
            return self._collect(self._launch())
        if self._in_flight is None or not any(row.slot is not None for row in self._in_flight.rows):
            self._in_flight = self._launch()
        ready, self._in_flight = self._in_flight, self._launch()
        return self._collect(ready)

    def _choose(self, advanced: list[tuple[Sequence, int]], choosing: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Replace the step's argmax for rows that sample or follow a grammar, in the step's token buffer too
        (the next step feeds on it)."""
        logits, tokens = self._step.logits, self._step.tokens
        chosen = {sequence: self._sampled(sequence, logits[sequence.slot], tokens[sequence.slot])
                  for sequence in choosing}
        for sequence, token in chosen.items():
            tokens[sequence.slot] = token
        return [(sequence, chosen.get(sequence, token)) for sequence, token in advanced]

    @staticmethod
    def _sampled(sequence: Sequence, logits: torch.Tensor, fallback: Any) -> Any:
        """Its own choice of token; if that fails, the error is its alone (the scheduler ends it with it) and the
        step's argmax stands in, so the rows beside it go on."""
        try:
            return sequence.sampler.choose(logits, sequence.tokens)
        except GrammarError as error:  # the request's schema admits no answer: its 400, no traceback
            logger.info("a request's JSON schema came to a dead end: %s", error)
            sequence.error = error
        except Exception as error:  # noqa: BLE001 - one request's sampler or grammar must not fail the batch
            logger.exception("token choice failed for one request")
            sequence.error = error
        return fallback

    def _launch(self) -> "LaunchedStep":
        rows = list(self.occupants)  # rows[i] is in slot i while the step runs
        longest = max(sequence.position for sequence in rows) + 1  # eager SDPA reads no further
        tokens = self._run_step(len(rows), longest)
        self._host_index ^= 1  # two host buffers: one being read while the next step's copy is queued
        host = self._host_tokens[self._host_index][:len(rows)]
        host.copy_(tokens, non_blocking=True)
        done = None
        if tokens.is_cuda:
            done = torch.cuda.Event()
            done.record()
        for sequence in rows:
            sequence.position += 1  # the device's position: compaction copies what this step writes too
        return LaunchedStep(rows, host, done)

    @staticmethod
    def _collect(step: "LaunchedStep") -> list[tuple[Sequence, int]]:
        if step.done is not None:
            step.done.synchronize()
        tokens = step.host.tolist()
        return [(sequence, token) for sequence, token in zip(step.rows, tokens) if sequence.slot is not None]

    def free(self, sequence: Sequence) -> None:
        """Give its slot back; the last occupant moves into it, so occupied slots stay 0..n-1."""
        slot = sequence.slot
        if slot is None:
            return
        sequence.slot = None
        last = self.occupants.pop()
        if last is sequence:
            return
        self.cache.move(last.slot, slot, last.position)
        step = self._step
        for buffer in (step.tokens, step.positions, step.rope_offsets):
            buffer[slot].copy_(buffer[last.slot])
        last.slot = slot
        self.occupants[slot] = last

    def release_all(self) -> None:
        """Forget every occupant (after a device error failed them all)."""
        self._in_flight = None
        for sequence in self.occupants:
            sequence.slot = None
        self.occupants.clear()

    def cache_info(self) -> dict[str, int]:
        shape = self.cache.shape
        return {"slots": shape.slots, "slot_tokens": shape.slot_tokens, "bytes": self.cache.nbytes,
                "slots_in_use": len(self.occupants)}

