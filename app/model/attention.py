"""Attention of one new token per row over its KV slot, in two ways the decoding step can take.

- ``flash``: FlashAttention's varlen kernel through PyTorch's own op, reading only each row's live length
  (``seqused_k``), with grouped-query heads handled by the kernel; CUDA only, capturable in a CUDA graph.
- ``sdpa``: scaled_dot_product_attention over the whole slot with a mask, on every device, with the backends
  pinned: left to choose, torch >= 2.11 on an H100/H200 picks cuDNN for this call, a path nothing here has
  verified, with no fallback, and a cuDNN graph built for every new shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def pinned_sdpa():
    """The context every SDPA decode step runs in (cuDNN left out; see the module's doc)."""
    return sdpa_kernel(SDPA_BACKENDS)


def sdpa_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                scale: float) -> torch.Tensor:
    """query ``[n, heads, dim]``; keys/values ``[n, span, kv_heads, dim]`` (views of the slots: head-major in
    memory on the CPU, kvcache.py, so each head's keys are read as one dense run); visible ``[n, span]``.

    The query heads sharing a KV head become that head's query "positions", so the cache is read as it is,
    never repeated per query head. Returns ``[n, heads * dim]``."""
    n, heads, dim = query.shape
    kv_heads = keys.shape[2]
    grouped = query.reshape(n, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(n, heads * dim)


def flash_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the varlen FlashAttention op can be tried here; else why not."""
    if device.type != "cuda":
        return "FlashAttention runs on CUDA only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention takes float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None or "seqused_k" not in str(op.default._schema):
        return f"torch {torch.__version__} has no _flash_attention_forward with seqused_k"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no FlashAttention kernels"
    return None


def flash_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, live: torch.Tensor,
                 slot_starts: torch.Tensor, query_starts: torch.Tensor, scale: float) -> torch.Tensor:
    """query ``[n, heads, dim]``; keys/values ``[n, slot_tokens, kv_heads, dim]`` (whole slots, contiguous);
    live ``[n]`` int32 keys in use per row; slot_starts ``[n + 1]`` int32 = slot * slot_tokens; query_starts
    ``[n + 1]`` int32 = 0..n. Returns ``[n, heads * dim]``. Every shape is fixed by n, so it captures."""
    n, heads, dim = query.shape
    slot_tokens = keys.shape[1]
    out = torch.ops.aten._flash_attention_forward(
        query, keys.reshape(n * slot_tokens, *keys.shape[2:]), values.reshape(n * slot_tokens, *values.shape[2:]),
        query_starts, slot_starts, 1, slot_tokens, 0.0, False, False, scale=scale, seqused_k=live)[0]
    return out.reshape(n, heads * dim)
