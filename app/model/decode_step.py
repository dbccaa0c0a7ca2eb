"""One greedy decoding step for the rows in slots 0..n-1, written with the model's own modules.

Its inputs live in static buffers (token, position, rope offset per slot), the attention reads the slot
cache through a mask built from those positions, and it writes its output back into the buffers: no host
sync, no allocation that depends on data, the same code eagerly on every device and under CUDA graph capture.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from app.model.kvcache import SlotKVCache


class DecodeStep:
    def __init__(self, model: Any, cache: SlotKVCache):
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        self.cache = cache
        slots, self.slot_tokens = cache.shape.slots, cache.shape.slot_tokens
        device = cache.keys.device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # the token each row feeds next
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # where its keys/values go
        self.rope_offsets = torch.zeros(slots, dtype=torch.long, device=device)  # M-RoPE text offset per row
        self._rows = torch.arange(slots, device=device)
        self._cache_index = torch.arange(self.slot_tokens, device=device)
        attention = self.text.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.kv_heads = cache.shape.kv_heads
        self.scaling = attention.scaling
        self.logits: torch.Tensor | None = None  # see keep_logits

    def keep_logits(self) -> None:
        """Also copy each step's logits into a static buffer (benchmarks compare graph and eager steps)."""
        self.logits = torch.zeros(self.tokens.shape[0], self.lm_head.out_features, dtype=self.cache.keys.dtype,
                                  device=self.tokens.device)

    def reset(self) -> None:
        """Zero the buffers (after graph warm-up runs wrote into them)."""
        for buffer in (self.tokens, self.positions, self.rope_offsets):
            buffer.zero_()

    @torch.inference_mode()
    def __call__(self, rows: int, kv_tokens: int | None = None) -> torch.Tensor:
        """Advance rows ``0..rows-1`` by one token; return their new tokens (a view of the token buffer).

        ``kv_tokens`` bounds the attention to the first positions of each slot; eager callers pass the
        longest active row, graphs attend over the whole slot (shapes must not depend on data)."""
        n, span = rows, kv_tokens or self.slot_tokens
        positions = self.positions[:n]
        hidden = self.text.embed_tokens(self.tokens[:n])[:, None, :]
        # A generated token is text: its three M-RoPE components are equal, offset by the image's extent.
        cos, sin = self.text.rotary_emb(hidden, (positions + self.rope_offsets[:n])[:, None])
        write_at = positions.clamp(max=self.slot_tokens - 1)  # idle padding rows of a graph bucket keep counting
        visible = (self._cache_index[:span][None, :] <= positions[:, None])[:, None, None, :]
        rows_index = self._rows[:n]
        for index, layer in enumerate(self.text.layers):
            hidden = hidden + self._attention(layer, index, layer.input_layernorm(hidden), cos, sin,
                                              rows_index, write_at, visible, span)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.lm_head(self.text.norm(hidden)[:, 0])
        if self.logits is not None:
            self.logits[:n].copy_(logits)
        self.tokens[:n].copy_(logits.argmax(dim=-1))
        self.positions[:n].add_(1)
        return self.tokens[:n]

    def _attention(self, layer: Any, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   rows: torch.Tensor, write_at: torch.Tensor, visible: torch.Tensor, span: int) -> torch.Tensor:
        attention, n, dim = layer.self_attn, x.shape[0], self.head_dim
        query = attention.q_norm(attention.q_proj(x).view(n, 1, -1, dim)).transpose(1, 2)
        key = attention.k_norm(attention.k_proj(x).view(n, 1, -1, dim)).transpose(1, 2)
        value = attention.v_proj(x).view(n, -1, dim)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        keys, values = self.cache.keys[index], self.cache.values[index]
        keys.index_put_((rows, write_at), key[:, :, 0])
        values.index_put_((rows, write_at), value)
        # Grouped-query attention with one query token per row: the query heads sharing a KV head become that
        # head's query "positions", so the cache is read as it is, never repeated per query head.
        grouped = query.reshape(n, self.kv_heads, -1, dim)
        out = F.scaled_dot_product_attention(
            grouped, keys[:n, :span].transpose(1, 2), values[:n, :span].transpose(1, 2),
            attn_mask=visible, scale=self.scaling)
        return attention.o_proj(out.reshape(n, 1, -1))
