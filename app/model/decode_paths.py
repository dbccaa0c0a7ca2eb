"""Which decoding step serves: the fastest one that proves itself at startup.

The paths, fastest first (those that cannot run here are left out):
  flash-graphs   fused layers, FlashAttention over live lengths, CUDA graphs      (CUDA, bf16/fp16)
  sdpa-graphs    fused layers, SDPA with its backends pinned, CUDA graphs          (CUDA)
  fused-eager    fused layers, SDPA, one kernel launch at a time                   (every device)
  modules-eager  the model's own modules, SDPA                                     (every device)
Each candidate runs a few steps of real prompts at once (rows of different lengths, and on CUDA a padding row in
its graph bucket), and its logits are compared with the model's own forward over the same tokens. A path that
raises or disagrees is never served: the next one is tried, and why shows in /health (decode_fallback), the log
and the vlm_decode_mode gauge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from app.model.attention import flash_available
from app.model.decode_context import decoding_step
from app.model.sequence import Sequence

CHECK_STEPS = 6
CHECK_PROMPTS = ("Describe the diagram.", "List every step of this process and who does it.", "Steps?")
# Largest logit difference allowed, as a share of the reference's largest logit: float32 paths differ only in
# the order of additions; half precision rounds every layer. The CPU's int8/int4 decode kernels compute each row
# alone, so the reference (same kernels, see reference_logits) agrees as closely as the dtype allows: bfloat16's,
# whatever the model's, since they take bfloat16 activations (a float32 step and its reference, a rounding apart
# before a projection, can round its input to different bfloat16 values); bitsandbytes' int8 keeps the outlier
# columns of a whole call in 16 bits, so its rows depend on their neighbours.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.05}
QUANTIZED_TOLERANCE = 0.1
ROW_DEPENDENT_QUANTIZATION = ("int8-bitsandbytes",)
BFLOAT16_KERNELS = ("int8-decode", "int4-decode")


@dataclass(frozen=True)
class DecodePath:
    mode: str
    fused: bool
    attention: str  # sdpa | flash
    graphs: bool


ALL_PATHS = (
    DecodePath("flash-graphs", True, "flash", True),
    DecodePath("sdpa-graphs", True, "sdpa", True),
    DecodePath("fused-eager", True, "sdpa", False),
    DecodePath("modules-eager", False, "sdpa", False),
)
DECODE_MODES = tuple(path.mode for path in ALL_PATHS)


def candidate_paths(device: torch.device, dtype: torch.dtype, *, graphs_allowed: bool, fusable: bool,
                    quantization: str | None) -> tuple[list[DecodePath], list[str]]:
    """The paths to try here, fastest first, and why the faster ones left out cannot run (CUDA only: on
    other devices graphs never apply, and saying so would be noise)."""
    skipped: list[str] = []
    paths = []
    for path in ALL_PATHS:
        why = None
        if path.graphs and device.type != "cuda":
            continue
        if path.graphs and not graphs_allowed:
            why = "CUDA_GRAPHS=false"
        elif path.graphs and quantization:
            why = f"{quantization} kernels are not captured"
        elif path.fused and not fusable:
            why = "the decoder's projections cannot be fused"
        elif path.attention == "flash":
            why = flash_available(device, dtype)
        if why is None:
            paths.append(path)
        else:
            skipped.append(f"{path.mode}: {why}")
    return paths, skipped


def check_image() -> Image.Image:
    image = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(image)
    for box in range(3):
        draw.rectangle((20 + box * 100, 70, 100 + box * 100, 130), outline="black", width=2)
    return image


@torch.inference_mode()
def check_decoding(engine) -> str | None:
    """Run CHECK_STEPS steps of a few prompts at once through the engine's current step; None when every
    step's logits agree with the model's own forward over the same tokens, else what disagreed."""
    image = check_image()
    rows = min(len(CHECK_PROMPTS), engine.max_rows)
    sequences = [Sequence(engine.prepare(image, prompt), CHECK_STEPS + 1) for prompt in CHECK_PROMPTS[:rows]]
    fed = [[token] for token in engine.prefill(sequences)]
    logits: list[list[torch.Tensor]] = [[] for _ in sequences]
    overlap, engine.overlap = engine.overlap, False  # the step buffer's logits must be this step's
    try:
        for _ in range(CHECK_STEPS):
            tokens = dict(engine.decode(sequences))
            step_logits = engine.step_logits()
            for row, sequence in enumerate(sequences):
                logits[row].append(step_logits[sequence.slot].to("cpu", torch.float32, copy=True))
                fed[row].append(tokens[sequence])
    finally:
        engine.overlap = overlap
        for sequence in sequences:
            engine.free(sequence)
        engine.reset_step()
    tolerance = check_tolerance(engine)
    for row, sequence in enumerate(sequences):
        reference = reference_logits(engine, sequence, fed[row][:CHECK_STEPS])
        problem = compare(torch.stack(logits[row]), reference, tolerance)
        if problem:
            return f"row {row} ({sequence.inputs.prompt_tokens}-token prompt): {problem}"
    return None


def check_tolerance(engine) -> float:
    """The largest logit difference the check allows on this engine, as a share of the logit scale."""
    quantization = engine.loaded.placement.quantization
    if quantization in ROW_DEPENDENT_QUANTIZATION:
        return QUANTIZED_TOLERANCE
    return TOLERANCE.get(torch.bfloat16 if quantization in BFLOAT16_KERNELS else engine.model.dtype, 0.05)


def reference_logits(engine, sequence: Sequence, fed: list[int]) -> torch.Tensor:
    """The model's own forward over the prompt, then over each token the step was fed, one call each with the
    model's own cache: the logits at each of them. The prompt runs as the prefill runs it and each token as a
    decoding step (decode_context.py), so a quantized layer reads the weights the engine's calls read: the check
    compares the decoding path, not the rounding of the weights."""
    inputs = sequence.inputs
    batch = engine.collate([inputs.tensors])
    device = batch["input_ids"].device
    cache = engine.model(**batch, position_ids=inputs.rope_positions[:, None].to(device), use_cache=True,
                         logits_to_keep=1).cache
    logits = []
    for index, token in enumerate(fed):
        # A generated token is text: its three M-RoPE components are its position plus the prompt's offset.
        position = torch.full((3, 1, 1), inputs.prompt_tokens + index + inputs.rope_offset, device=device)
        with decoding_step():
            output = engine.model(input_ids=torch.tensor([[token]], device=device), position_ids=position,
                                  cache=cache, use_cache=True)
        logits.append(output.logits[0, -1])
        cache = output.cache
    return torch.stack(logits).float().cpu()


def compare(candidate: torch.Tensor, reference: torch.Tensor, tolerance: float) -> str | None:
    """[steps, vocab] each. Within tolerance of the reference's scale, and the same choice wherever the
    reference's first choice leads its second by more than that tolerance (closer ones are ties)."""
    scale = reference.abs().max().item()
    allowed = tolerance * scale + 1e-4
    for step in range(reference.shape[0]):
        difference = (candidate[step] - reference[step]).abs().max().item()
        if not difference <= allowed:  # a NaN fails too
            return f"logits differ from the model's forward by {difference:.4g} at step {step + 1} " \
                   f"(allowed {allowed:.4g})"
        top = reference[step].topk(2).values
        if top[0] - top[1] > allowed and candidate[step].argmax() != reference[step].argmax():
            return f"a different token than the model's forward at step {step + 1}"
    return None
