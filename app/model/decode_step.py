"""One greedy decoding step for the rows in slots 0..n-1.

Its inputs live in static buffers (token, position, rope offset per slot), the attention reads the slot
cache, and it writes its output back into the buffers: no host sync, no allocation that depends on data, the
same code eagerly on every device and under CUDA graph capture.

Two ways to compute a layer, the same numbers (checked at startup against the model's own forward):
- ``fused`` (the default): one q|k|v and one gate|up product (fusion.py), ``F.rms_norm`` (one kernel on CUDA),
  cos/sin looked up in a table made once instead of recomputed, RoPE applied once over q|k; ~18 kernels a
  layer on CUDA where the model's modules launch ~56.
- ``modules``: the model's own modules, one by one: slower, and the rung below when the fused step fails.
Attention is ``sdpa`` (every device) or ``flash`` (CUDA: live lengths only; see attention.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from app.model.attention import flash_decode, pinned_sdpa, sdpa_decode
from app.model.decode_context import decoding_step
from app.model.fusion import FusedLayer
from app.model.kvcache import SlotKVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RopeTable:
    """cos/sin for every text position a slot can reach, made once by the model's own rotary embedding. A
    generated token is text: its three M-RoPE components are equal, so its position alone picks the row."""

    def __init__(self, rotary: Any, positions: int, dtype: torch.dtype, device: torch.device):
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = rotary(probe, torch.arange(positions, device=device)[None])
        self.cos = cos[0].contiguous()  # [position, head_dim]
        half = self.cos.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_a | sin_b]: one roll instead of two slices and a cat.
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()
        self.last = positions - 1

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for ``positions`` ``[n]``, as ``[n, 1, dim]``: looked up once per step."""
        return self.cos[positions][:, None], self.signed_sin[positions][:, None]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x ``[n, heads, dim]`` rotated by what ``at`` looked up."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class DecodeStep:
    def __init__(self, model: Any, cache: SlotKVCache, fused: list[FusedLayer] | None = None,
                 attention: str = "sdpa"):
        if attention == "flash" and cache.head_major:
            raise ValueError("FlashAttention reads a token-major cache (attention.py); this one is head-major")
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        self.cache = cache
        self.fused = fused
        self.attention = attention
        slots, self.slot_tokens = cache.shape.slots, cache.shape.slot_tokens
        device = cache.keys.device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # the token each row feeds next
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # where its keys/values go
        self.rope_offsets = torch.zeros(slots, dtype=torch.long, device=device)  # M-RoPE text offset per row
        # Rows 0..active_rows-1 are live; the padding rows of a graph bucket read one key and stay in place.
        self.active_rows = torch.zeros((), dtype=torch.long, device=device)
        self._rows = torch.arange(slots, device=device)
        self._cache_index = torch.arange(self.slot_tokens, device=device)
        self._slot_starts = (torch.arange(slots + 1, device=device) * self.slot_tokens).to(torch.int32)
        self._query_starts = torch.arange(slots + 1, device=device, dtype=torch.int32)
        first = self.text.layers[0]
        self.head_dim = first.self_attn.head_dim
        self.kv_heads = cache.shape.kv_heads
        self.scaling = first.self_attn.scaling
        self.eps = first.input_layernorm.variance_epsilon
        self.rope = RopeTable(self.text.rotary_emb, self.slot_tokens, cache.keys.dtype, device)
        if fused is not None:  # q_norm and k_norm as one multiply after an unweighted norm over q|k
            self._qk_norm = [torch.cat([layer.self_attn.q_norm.weight.expand(part.q_heads, -1),
                                        layer.self_attn.k_norm.weight.expand(part.kv_heads, -1)])
                             for layer, part in zip(self.text.layers, fused)]
        # The last step's logits, [slots, vocab]: the startup check compares them with the model's forward.
        self.logits = torch.zeros(slots, self.lm_head.weight.shape[0], dtype=cache.keys.dtype, device=device)

    @property
    def name(self) -> str:
        return f"{'fused' if self.fused is not None else 'modules'}+{self.attention}"

    def reset(self) -> None:
        """Zero the buffers (after graph warm-up runs wrote into them)."""
        for buffer in (self.tokens, self.positions, self.rope_offsets):
            buffer.zero_()

    def set_active(self, rows: int) -> None:
        self.active_rows.fill_(rows)  # no host sync: a fill is queued like any kernel

    def run(self, rows: int, kv_tokens: int | None = None) -> torch.Tensor:
        """The eager step: every row given is live."""
        self.set_active(rows)
        return self(rows, kv_tokens)

    @torch.inference_mode()
    def __call__(self, rows: int, kv_tokens: int | None = None) -> torch.Tensor:
        """Advance rows ``0..rows-1`` by one token; return their new tokens (a view of the token buffer).

        ``kv_tokens`` bounds the SDPA attention to the first positions of each slot; eager callers pass the
        longest active row, graphs attend over the whole slot (shapes must not depend on data)."""
        with pinned_sdpa(), decoding_step():  # decoding_step: quantized layers read their low-bit copy
            n, span = rows, kv_tokens or self.slot_tokens
            live = self._rows[:n] < self.active_rows
            positions = self.positions[:n]
            write_at = positions.clamp(max=self.slot_tokens - 1)  # padding rows never write past their slot
            rope_at = (positions + self.rope_offsets[:n]).clamp(0, self.rope.last)
            if self.attention == "flash":
                context = (torch.where(live, write_at + 1, 1).to(torch.int32),)
            else:
                context = ((self._cache_index[:span][None, :] <= positions[:, None]),)
            hidden = self.text.embed_tokens(self.tokens[:n])
            if self.fused is not None:
                layer_step, rope = self._fused_layer, self.rope.at(rope_at)
            else:
                layer_step, rope = self._modules_layer, self.text.rotary_emb(hidden, rope_at[:, None])
            for index, layer in enumerate(self.text.layers):
                hidden = layer_step(index, layer, hidden, rope, write_at, span, context)
            logits = self.lm_head(self.text.norm(hidden))
            self.logits[:n].copy_(logits)
            self.tokens[:n].copy_(logits.argmax(dim=-1))
            self.positions[:n].add_(live)
            return self.tokens[:n]

    def _attend(self, index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                write_at: torch.Tensor, span: int, context: tuple) -> torch.Tensor:
        """Write the new key/value into the slots, then attend: query ``[n, heads, dim]``, key/value
        ``[n, kv_heads, dim]``; returns ``[n, heads * dim]``."""
        n = query.shape[0]
        keys, values = self.cache.keys[index], self.cache.values[index]
        rows = self._rows[:n]
        keys.index_put_((rows, write_at), key)
        values.index_put_((rows, write_at), value)
        if self.attention == "flash":
            return flash_decode(query, keys[:n], values[:n], context[0], self._slot_starts[:n + 1],
                                self._query_starts[:n + 1], self.scaling)
        return sdpa_decode(query, keys[:n, :span], values[:n, :span], context[0], self.scaling)

    def _fused_layer(self, index: int, layer: Any, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     write_at: torch.Tensor, span: int, context: tuple) -> torch.Tensor:
        part = self.fused[index]
        n, dim, heads, kv_heads = hidden.shape[0], self.head_dim, part.q_heads, part.kv_heads
        qkv = part.qkv(rms_norm(hidden, layer.input_layernorm.weight, self.eps)).view(n, -1, dim)
        qk = self.rope.rotate(rms_norm(qkv[:, :heads + kv_heads], None, self.eps) * self._qk_norm[index], *rope)
        attended = self._attend(index, qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:], write_at, span,
                                context)
        hidden = hidden + layer.self_attn.o_proj(attended)
        gate, up = part.gate_up(rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps)).split(
            part.intermediate, dim=-1)
        return hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _modules_layer(self, index: int, layer: Any, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       write_at: torch.Tensor, span: int, context: tuple) -> torch.Tensor:
        attention, n, dim = layer.self_attn, hidden.shape[0], self.head_dim
        x = layer.input_layernorm(hidden)
        query = attention.q_norm(attention.q_proj(x).view(n, 1, -1, dim)).transpose(1, 2)
        key = attention.k_norm(attention.k_proj(x).view(n, 1, -1, dim)).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *rope)
        attended = self._attend(index, query[:, :, 0], key[:, :, 0], attention.v_proj(x).view(n, -1, dim),
                                write_at, span, context)
        hidden = hidden + attention.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
