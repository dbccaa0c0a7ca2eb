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
    """Keys and values seen as ``[layer, slot, position, kv_head, head_dim]``: a slot's new token is one
    ``index_put_`` per layer, and a slot's history reads as ``[head, position, dim]`` without a copy.

    How they lie in memory is a choice per device; ``keys``/``values`` are the same view either way:
    - ``head_major`` (the CPU): ``[layer, slot, kv_head, position, dim]``, so a head's history is one dense run
      that the CPU's attention streams (Qwen3-VL-2B, 800 keys: 12.6 against 18.2 ms a step for 28 layers,
      bench/RESULTS.md); a new token's write is strided (Qwen3-VL-2B: 8 runs of 128 values), nothing beside
      the reads;
    - token-major (CUDA): each position's heads side by side, what FlashAttention's varlen kernel reads a slot
      as (``[tokens, kv_heads, dim]``, attention.py)."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str,
                 head_major: bool = False):
        self.shape = shape
        self.head_major = head_major
        seen = (shape.layers, shape.slots, shape.slot_tokens, shape.kv_heads, shape.head_dim)
        stored = (*seen[:2], seen[3], seen[2], seen[4]) if head_major else seen  # position and head swapped
        self.keys, self.values = (torch.zeros(stored, dtype=dtype, device=device) for _ in range(2))
        if head_major:
            self.keys, self.values = self.keys.transpose(2, 3), self.values.transpose(2, 3)

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
