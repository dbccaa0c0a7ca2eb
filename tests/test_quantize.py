"""QUANTIZATION=int8: the CPU's int8 decode layers and the CUDA path's bitsandbytes layers, on the tiny model."""

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
from app.model.quantize import DECODE_ROWS_MAX, Int8DecodeLinear, quantize_bitsandbytes
from app.model.scheduler import generate
from app.model.sequence import Sequence

from .helpers import diagram_png

LANGUAGE_MODEL_LINEARS = 2 * 7 + 1  # two decoder layers of q/k/v/o/gate/up/down, and lm_head


def load(settings):
    return load_model(settings, resolve_placement(settings.device, settings.torch_dtype))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_use_int8_and_prefill_rows_the_original_weight(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(dtype)
    layer = Int8DecodeLinear(linear)
    with torch.inference_mode():
        prefill = torch.randn(2, DECODE_ROWS_MAX, 256, dtype=dtype)  # 8 rows
        assert torch.equal(layer(prefill), F.linear(prefill, linear.weight, linear.bias))
        decode = torch.randn(DECODE_ROWS_MAX, 1, 256, dtype=dtype)
        out = layer(decode)
        assert out.shape == (DECODE_ROWS_MAX, 1, 96) and out.dtype == dtype
        assert not torch.equal(out, F.linear(decode, linear.weight, linear.bias))  # really the int8 kernel
        assert relative_error(out, F.linear(decode, linear.weight, linear.bias)) < 0.02


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
    # A batch of 6 decodes 6 rows per step, past DECODE_ROWS_MAX: the original weights, so the same tokens as
    # the unquantized model.
    plain = Engine(load(tiny_settings()), ServingDefaults("Describe.", 8, 64), force_max_new_tokens=True)
    def six(target: Engine) -> list[str]:
        return [r.text for r in generate(target, [Sequence(target.prepare(image, "Describe."), 8) for _ in range(6)])]

    quantized_texts, plain_texts = six(engine), six(plain)
    assert quantized_texts == plain_texts


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


def test_int8_on_a_cpu_without_native_bf16_warns(tiny_settings, monkeypatch, caplog):
    model = load(tiny_settings()).model
    monkeypatch.setattr("app.model.loader.cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        _, placement = quantize(model, Placement("cpu", torch.float32))
    assert placement.quantization == "int8-decode"
    assert any("emulates" in record.getMessage() for record in caplog.records)
