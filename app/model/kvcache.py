"""The KV cache as a fixed set of slots: one per concurrently decoding request, each as long as the longest
sequence a request can reach. Allocated once at load, so a decoding step never allocates and its shapes are
fixed (what lets it be replayed as a CUDA graph)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def store(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A prefilled prompt's keys and values, ``[layer, kv_head, position, head_dim]``, into ``slot``."""
        length = keys.shape[2]
        self.keys[:, slot, :length] = keys.transpose(1, 2)
        self.values[:, slot, :length] = values.transpose(1, 2)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of one slot into another (compaction when a row leaves)."""
        self.keys[:, target, :length] = self.keys[:, source, :length]
        self.values[:, target, :length] = self.values[:, source, :length]
