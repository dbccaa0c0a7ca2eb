"""The KV cache as a fixed set of slots: one per concurrently decoding request, each as long as the longest
sequence a request can reach. Allocated once at load, so a decoding step never allocates and its shapes are
fixed (what lets it be replayed as a CUDA graph)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class CacheShape:
    layers: int
    slots: int
    slot_tokens: int  # image budget + prompt text budget + MAX_NEW_TOKENS
    kv_heads: int
    head_dim: int

    def nbytes(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * self.slots * self.slot_tokens * self.kv_heads * self.head_dim * element


class SlotKVCache:
    """Keys and values as ``[layer, slot, position, kv_head, head_dim]``: a slot's new token is one
    ``index_put_`` per layer, and a slot's history reads as ``[head, position, dim]`` without a copy."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str):
        self.shape = shape
        size = (shape.layers, shape.slots, shape.slot_tokens, shape.kv_heads, shape.head_dim)
        self.keys = torch.zeros(size, dtype=dtype, device=device)
        self.values = torch.zeros(size, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def writer(self, first_slot: int, config) -> "SlotWriter":
        """The cache object a prefill passes to the model: rows 0..B-1 of its batch go to slots
        ``first_slot..first_slot+B-1``."""
        return SlotWriter(self, first_slot, config)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of one slot into another (compaction when a row leaves)."""
        self.keys[:, target, :length] = self.keys[:, source, :length]
        self.values[:, target, :length] = self.values[:, source, :length]


class SlotWriter(DynamicCache):
    """What the model's forward sees as its (empty) cache during a prefill: each layer's keys and values are
    written straight into the slots, once, and handed back for the prompt's own attention. Nothing is kept:
    no DynamicCache growing per layer, no stack of the layers, no second copy into the slots."""

    def __init__(self, cache: SlotKVCache, first_slot: int, config):
        super().__init__(config=config)
        self.slots = cache
        self.first_slot = first_slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows, length = key_states.shape[0], key_states.shape[2]  # [row, kv_head, position, head_dim]
        target = slice(self.first_slot, self.first_slot + rows)
        # Padding positions after a shorter row are written too: decode overwrites a position before reading it.
        self.slots.keys[layer_idx, target, :length] = key_states.transpose(1, 2)
        self.slots.values[layer_idx, target, :length] = value_states.transpose(1, 2)
        return key_states, value_states
