"""One weight for projections that read the same input: q|k|v of each attention and gate|up of each MLP.

A decoding step reads each weight once per token, so three small matrix products become one larger one (one
kernel, one pass over the input). The model's own modules keep working on views of the fused weight, so the
prefill (the model's forward) and the decoding step share the memory: nothing is held twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from app.model.int4 import Int4DecodeLinear
from app.model.quantize import Int8DecodeLinear

# What a fusable projection holds, by module type: each tensor and the dimension its outputs run along.
_FUSABLE = {
    torch.nn.Linear: {"weight": 0, "bias": 0},
    Int8DecodeLinear: {"weight": 0, "bias": 0, "weight_int8": 0, "scales": 0},
    Int4DecodeLinear: {"weight": 0, "bias": 0, "weight_int4": 0, "scales_zeros": 1},
}
# The tensors a quantized module can make again from its weight, when its parts' copies cannot be joined.
_REMADE = {Int4DecodeLinear: ("weight_int4", "scales_zeros")}


@dataclass(frozen=True)
class FusedLayer:
    qkv: torch.nn.Module  # [q heads | k heads | v heads] x head_dim outputs
    gate_up: torch.nn.Module  # [gate | up] outputs
    q_heads: int
    kv_heads: int
    intermediate: int


def concatenate(modules: list[torch.nn.Module]) -> torch.nn.Module | None:
    """A module of the same type whose outputs are the given modules' outputs side by side; each given module's
    tensors become views into it. None when they cannot be fused (mixed or unknown types, bias on some only)."""
    kind = type(modules[0])
    dims = _FUSABLE.get(kind)
    if dims is None or any(type(module) is not kind for module in modules):
        return None
    fused = copy.copy(modules[0])  # the module's own settings; its tensors are replaced below
    fused._parameters, fused._buffers = dict(fused._parameters), dict(fused._buffers)
    sizes = [module.weight.shape[0] for module in modules]
    remake = kind in _REMADE and not kind.packings_concatenate(sizes)
    if remake:  # each part keeps its own packing; the fused module packs the joined weight (small models only)
        dims = {name: dim for name, dim in dims.items() if name not in _REMADE[kind]}
    for name in dims:
        parts = [getattr(module, name) for module in modules]
        if all(part is None for part in parts):
            continue
        if any(part is None for part in parts):
            return None
    for name, dim in dims.items():
        parts = [getattr(module, name) for module in modules]
        if parts[0] is None:
            continue
        with torch.no_grad():
            whole = torch.cat([part.detach() for part in parts], dim=dim)
        _assign(fused, name, whole, parts[0])
        for module, view, part in zip(modules, whole.split(sizes, dim=dim), parts):
            _assign(module, name, view, part)
    if hasattr(fused, "out_features"):
        fused.out_features = sum(sizes)
    if remake:
        fused.requantize()
    return fused


def _assign(module: torch.nn.Module, name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if isinstance(like, torch.nn.Parameter):
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        module._buffers[name] = tensor


def fuse_layers(model: Any) -> list[FusedLayer] | None:
    """Fuse every decoder layer's projections (after the LoRA merge and any quantization); None if a layer's
    cannot be fused (the modules then compute as before)."""
    layers = model.model.language_model.layers
    kinds = {type(module) for layer in layers for module in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj)}
    if not kinds <= set(_FUSABLE) or len(kinds) != 1:
        return None
    fused = []
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        head_dim = attention.head_dim
        qkv = concatenate([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = concatenate([mlp.gate_proj, mlp.up_proj])
        if qkv is None or gate_up is None:  # bias on some only: the views made so far hold the same numbers
            return None
        fused.append(FusedLayer(qkv, gate_up, attention.q_proj.weight.shape[0] // head_dim,
                                attention.k_proj.weight.shape[0] // head_dim, mlp.gate_proj.weight.shape[0]))
    return fused
