"""QUANTIZATION=int8 / int4: the CPU's int8 and int4 decode layers and the CUDA path's bitsandbytes layers, on the
tiny model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app.errors import ModelLoadError
from app.model.device import Placement, resolve_placement
from app.model.engine import Engine, ServingDefaults
from app.model.loader import load_model, quantize
from app.model import int4
from app.model.fusion import concatenate
from app.model.int4 import Int4DecodeLinear
from app.model.decode_context import decoding_step
from app.model.quantize import Int8DecodeLinear, quantize_bitsandbytes
from app.model.scheduler import generate
from app.model.sequence import Sequence
from app.settings import Quantization

from .helpers import diagram_png

LANGUAGE_MODEL_LINEARS = 2 * 7 + 1  # two decoder layers of q/k/v/o/gate/up/down, and lm_head


def load(settings):
    return load_model(settings, resolve_placement(settings.device, settings.torch_dtype))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_steps_use_int8_and_the_prefill_the_original_weight(dtype):
    """By the kind of call, not its rows: a one-row prefill keeps the weight, an 8-row decoding step reads int8."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(dtype)
    out, expected = prefill_then_decode(Int8DecodeLinear(linear), linear, dtype)
    assert not torch.equal(out, expected)  # really the int8 kernel
    assert relative_error(out, expected) < 0.02


def prefill_then_decode(layer, linear, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-row prefill call gives exactly the original weight's output; then an 8-row decoding step's output
    and what the original weight gives for it."""
    with torch.inference_mode():
        prefill = torch.randn(1, 1, 256, dtype=dtype)
        assert torch.equal(layer(prefill), F.linear(prefill, linear.weight, linear.bias))
        decode = torch.randn(8, 1, 256, dtype=dtype)
        with decoding_step():
            out = layer(decode)
        expected = F.linear(decode, linear.weight, linear.bias)
    assert out.shape == (8, 1, 96) and out.dtype == dtype
    return out, expected


def test_int8_on_cpu_quantizes_the_language_model_only(tiny_settings):
    loaded = load(tiny_settings(quantization="int8"))
    assert loaded.placement.dtype_name == "float32+int8-decode" and loaded.adapter is not None
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8DecodeLinear)]
    assert len(layers) == LANGUAGE_MODEL_LINEARS
    assert all(isinstance(m, torch.nn.Linear) for m in loaded.model.model.visual.modules()
               if "Linear" in type(m).__name__)  # the vision encoder keeps its precision
    image = Image.open(io.BytesIO(diagram_png())).convert("RGB")
    engine = Engine(loaded, ServingDefaults("Describe.", 8, 64), force_max_new_tokens=True)
    single = generate(engine, [Sequence(engine.prepare(image, "Describe."), 8)])[0]
    assert single.completion_tokens == 8
    # A batch of 6 decodes 6 rows per step, with the int8 weights still: the answer does not depend on how many
    # requests decode beside it.
    six = generate(engine, [Sequence(engine.prepare(image, "Describe."), 8) for _ in range(6)])
    assert [result.text for result in six] == [single.text] * 6


def test_bitsandbytes_layers_replace_the_language_model_linears(tiny_settings):
    """The CUDA path's layer swap, run on the CPU (bitsandbytes has a CPU backend, slow but real)."""
    bnb = pytest.importorskip("bitsandbytes")
    loaded = load(tiny_settings())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        reference = loaded.model(input_ids=ids).logits
        quantized = quantize_bitsandbytes(copy.deepcopy(loaded.model), "cpu")
        logits = quantized(input_ids=ids).logits
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == LANGUAGE_MODEL_LINEARS and all(m.weight.dtype == torch.int8 for m in layers)
    assert relative_error(logits, reference) < 0.05


def test_int8_on_mps_is_refused_with_the_reason():
    with pytest.raises(ModelLoadError, match="QUANTIZATION=int8 runs on cpu or cuda"):
        quantize(torch.nn.Linear(2, 2), Placement("mps", torch.float16))


# Bounds, as a share of the full-precision logits' largest magnitude, for the tiny merged model decoding 12 greedy
# tokens (measured: int8 at most 0.028). Tokens must be equal wherever the full-precision model's first choice
# leads its second by more than twice the bound.
INT8_LOGIT_BOUND = 0.04
# One int4 layer (groups of 32, min/max) on the tiny model's N(0, 0.4) weights: measured 0.06-0.08 of the output.
INT4_LAYER_BOUND = 0.1
PROMPTS = ("Describe.", "List every step of this process and who does it.", "Steps?")


def greedy(settings, prompt: str, steps: int = 12) -> tuple[list[int], torch.Tensor, Engine]:
    """Tokens (prefill's first, then each step's) and each step's logits, one request alone."""
    engine = Engine(load(settings), ServingDefaults("Describe.", 16, 64), force_max_new_tokens=True)
    engine.choose_decode_path()
    image = Image.open(io.BytesIO(diagram_png())).convert("RGB")
    sequence = Sequence(engine.prepare(image, prompt), steps + 1)
    tokens, logits = engine.prefill([sequence]), []
    for _ in range(steps):
        tokens.append(engine.decode([sequence])[0][1])
        logits.append(engine.step_logits()[0].clone())
    return tokens, torch.stack(logits), engine


@pytest.mark.parametrize("prompt", PROMPTS)
def test_int8_decoding_stays_with_the_full_precision_model(tiny_settings, prompt):
    reference, reference_logits, _ = greedy(tiny_settings(), prompt)
    tokens, logits, engine = greedy(tiny_settings(quantization="int8"), prompt)
    assert isinstance(engine.model.lm_head, Int8DecodeLinear) and engine.decode_mode == "fused-eager"
    assert tokens[0] == reference[0]  # the prefill's token: full-precision weights in both
    for step, (expected, got) in enumerate(zip(reference_logits, logits)):
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= INT8_LOGIT_BOUND * scale, f"step {step + 1}"
        top = expected.topk(2).values
        if top[0] - top[1] > 2 * INT8_LOGIT_BOUND * scale:
            assert tokens[step + 1] == reference[step + 1], f"step {step + 1}"
        if tokens[step + 1] != reference[step + 1]:
            break  # a near tie went the other way: the contexts differ from here on


def test_int4_decoding_on_the_tiny_model(tiny_settings):
    """Every language-model Linear and the head in 4 bits, fused, and the startup check (same kernels, bfloat16's
    tolerance, the kernel's activations) passes; the prefill's token is the full-precision model's. The later tokens are not compared: the
    tiny model's wide random weights amplify 4-bit rounding into logit changes larger than its top-2 margins."""
    reference, _, _ = greedy(tiny_settings(), PROMPTS[0], steps=2)
    tokens, logits, engine = greedy(tiny_settings(quantization="int4"), PROMPTS[0], steps=2)
    model = engine.model
    assert engine.loaded.placement.dtype_name == "float32+int4-decode"
    assert isinstance(model.lm_head, Int4DecodeLinear)
    assert len([m for m in model.modules() if isinstance(m, Int4DecodeLinear)]) == LANGUAGE_MODEL_LINEARS
    assert engine.decode_mode == "fused-eager" and isinstance(engine.fused_layers[0].qkv, Int4DecodeLinear)
    assert tokens[0] == reference[0] and torch.isfinite(logits).all()
    # Six requests decoding together read the 4-bit weights as one alone does: the same answer under any load.
    for held in list(engine.occupants):  # greedy() leaves its request in its slot
        engine.free(held)
    image = Image.open(io.BytesIO(diagram_png())).convert("RGB")
    single = generate(engine, [Sequence(engine.prepare(image, PROMPTS[0]), 6)])[0].text
    six = generate(engine, [Sequence(engine.prepare(image, PROMPTS[0]), 6) for _ in range(6)])
    assert [result.text for result in six] == [single] * 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rounds_within_bound_in_decoding_steps_and_the_prefill_uses_the_original_weight(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(dtype)
    torch.nn.init.normal_(linear.weight, std=0.4)
    layer = Int4DecodeLinear(linear)
    out, expected = prefill_then_decode(layer, linear, dtype)
    assert layer.weight_int4.dtype == torch.uint8 and layer.weight_int4.shape == (96, 128)  # 2 codes a byte
    # The kernel's fast path, whatever the model's dtype (its float32 path is ~30x slower): a float32 model's
    # activations are cast for the call and its output cast back (prefill_then_decode checks the output's dtype).
    assert layer.scales_zeros.dtype == torch.bfloat16
    assert 0 < relative_error(out, expected) < INT4_LAYER_BOUND


def test_int4_rows_not_a_multiple_of_16_are_padded_for_the_kernel():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40, bias=False)  # e.g. a small vocabulary's head
    layer = Int4DecodeLinear(linear)
    with torch.inference_mode(), decoding_step():
        x = torch.randn(1, 64)
        out, expected = layer(x), F.linear(x, linear.weight)
    assert out.shape == (1, 40) and relative_error(out, expected) < INT4_LAYER_BOUND


@pytest.mark.parametrize("sizes", [[128, 64, 64], [64, 32, 32]])
def test_int4_projections_fuse(sizes):
    """Whole packing blocks (64 rows): the packed weights and scales are joined and the parts become views of them;
    otherwise the fused module packs the joined weight itself. Either way the same numbers as the parts."""
    torch.manual_seed(0)
    parts = [Int4DecodeLinear(torch.nn.Linear(64, size, bias=False)) for size in sizes]
    x = torch.randn(2, 64)
    with torch.inference_mode(), decoding_step():
        before = torch.cat([part(x) for part in parts], dim=-1)
        fused = concatenate(parts)
        assert torch.equal(fused(x), before)
        assert torch.equal(torch.cat([part(x) for part in parts], dim=-1), before)  # the parts still compute
    shared = parts[0].weight_int4.untyped_storage().data_ptr() == fused.weight_int4.untyped_storage().data_ptr()
    assert shared == (sizes[1] % int4.PACK_BLOCK_ROWS == 0)


def test_int4_on_cuda_is_refused_with_the_reason():
    with pytest.raises(ModelLoadError, match="QUANTIZATION=int4 runs on the CPU only"):
        quantize(torch.nn.Linear(2, 2), Placement("cuda", torch.bfloat16), Quantization.int4)
