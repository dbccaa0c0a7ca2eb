"""QUANTIZATION=int8 / int4 after the merge: low-precision weights for the language model, the part that decodes
token by token, its output head included.

The vision encoder runs once per image and is compute-bound, so it keeps its precision on every device.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

from app.model import int4
from app.model.decode_context import in_decoding_step
from app.model.int4 import Int4DecodeLinear

logger = logging.getLogger(__name__)

QUANTIZE_BLOCK_ROWS = 4096


class Int8DecodeLinear(torch.nn.Module):
    """A Linear holding its weight twice: as-is for the prefill (compute-bound: the bfloat16 matmul is faster), and
    per-output-channel int8 for the decoding steps, which are bound by how many weight bytes they read
    (decode_context.py; on an AMX Xeon, Qwen3-VL-2B's MLP shapes: 2.3x faster at 1 row, 1.2x at 4)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight_int8", torch.empty(linear.weight.shape, dtype=torch.int8))
        # The kernel's fast path is bfloat16 (its float32 path measured 3x slower than a float32 matmul).
        self.register_buffer("scales", torch.empty(linear.out_features, dtype=torch.bfloat16))
        with torch.no_grad():  # in blocks of rows: a float32 copy of a 151k-row output head would be 1.2 GB
            for start in range(0, linear.out_features, QUANTIZE_BLOCK_ROWS):
                rows = slice(start, start + QUANTIZE_BLOCK_ROWS)
                block = linear.weight[rows].float()
                scales = (block.abs().amax(dim=1) / 127).to(torch.bfloat16).float().clamp(min=1e-30)
                self.weight_int8[rows] = torch.round(block / scales[:, None]).clamp(-127, 127)
                self.scales[rows] = scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not in_decoding_step():
            return F.linear(x, self.weight, self.bias)
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # no op dispatched that does nothing (int4.py)
        if flat.dtype != torch.bfloat16:
            flat = flat.to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], out.shape[-1])
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias


def decoder_linears(model: Any) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, layer) for each Linear of the language model, the output head included."""
    head = model.get_output_embeddings()
    parents = [*model.get_decoder().modules(), model]
    return [(parent, name, child) for parent in parents for name, child in parent.named_children()
            if isinstance(child, torch.nn.Linear) and (parent is not model or child is head)]


def replace_linears(model: Any, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> int:
    layers = decoder_linears(model)
    for parent, name, linear in layers:
        setattr(parent, name, make(linear))
    return len(layers)


def quantize_int8_decode(model: Any) -> Any:
    """CPU: torch's weight-only int8 kernel for decoding steps, the model's own weights for the prefill."""
    count = replace_linears(model, Int8DecodeLinear)
    logger.info("int8 copies of %d language-model Linear layers for decoding (weight-only, per channel)", count)
    return model


def quantize_int4_decode(model: Any, group_size: int | None = None) -> Any:
    """CPU: torch's packed int4 kernel for decoding steps, the model's own weights for the prefill."""
    group_size = group_size or int4.GROUP_SIZE
    def make(linear: torch.nn.Linear) -> torch.nn.Module:
        return Int4DecodeLinear(linear, group_size) if int4.supports(linear, group_size) else linear

    count = replace_linears(model, make)
    kept = [name for _, name, layer in decoder_linears(model) if type(layer) is torch.nn.Linear]
    logger.info("int4 copies (groups of %d) of %d language-model Linear layers for decoding%s", group_size,
                count - len(kept), f"; {len(kept)} keep their precision, a shape the kernel does not take "
                f"({', '.join(sorted(set(kept)))})" if kept else "")
    return model


def quantize_bitsandbytes(model: Any, device: str) -> Any:
    """CUDA: bitsandbytes LLM.int8 (int8 weights, outlier features kept in 16 bits), on the merged weights.

    Quantizing after the merge keeps the adapter exact; loading the base in 8 bits would round the merge."""
    import bitsandbytes as bnb

    def to_int8(linear: torch.nn.Linear) -> torch.nn.Module:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
        # Int8Params quantizes when moved from the CPU to the device, which is why the weight goes via the CPU.
        layer.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        return layer.to(device)

    count = replace_linears(model, to_int8)
    logger.info("bitsandbytes int8 for %d language-model Linear layers", count)
    return model
