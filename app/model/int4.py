"""QUANTIZATION=int4 on the CPU: a 4-bit copy of a Linear's weight, read by torch's packed int4 kernel.

The kernel (``aten._weight_int4pack_mm_for_cpu``) takes the weight as ``aten._convert_weight_to_int4pack_for_cpu``
packs it: 4-bit codes ``q`` of an ``[N, K]`` int32 tensor, laid out in blocks of output rows, with one scale and one
zero per group of ``group_size`` inputs of each row, ``[K / group_size, N, 2]`` in the activations' dtype
(bfloat16 here, whatever the model's: KERNEL_DTYPE);
``weight = (q - 8) * scale + zero``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.model.decode_context import in_decoding_step

# Measured on Qwen3-VL-2B's shapes (bench/RESULTS.md, "int4"): the group size hardly changes the kernel's speed at
# a few rows, and 32 rounds best (one scale and zero per 32 weights: 4.5 bits a weight in all, bfloat16 pairs).
GROUP_SIZE = 32
GROUP_SIZES = (32, 64, 128, 256)  # what the kernel accepts
# The packing lays output rows out in blocks of 64 (AVX512; 32 with AVX2): packed weights concatenate into the
# packing of the concatenated weight only when every part fills whole blocks. The kernel also wants N % 16 == 0.
PACK_BLOCK_ROWS = 64
ROW_MULTIPLE = 16
QUANTIZE_BLOCK_ROWS = 4096  # a multiple of PACK_BLOCK_ROWS: quantized in blocks, so no float32 copy of a whole head
# The kernel's activations, scales and zeros share one dtype: bfloat16 whatever the model's. Its float32 path is
# some 30x slower (gate|up 12288x2048 at one row, Ice Lake: 24.9 against 0.72 ms), and float32 is what
# TORCH_DTYPE=auto picks on a CPU without native bfloat16; such a model casts its few rows of activations per call.
KERNEL_DTYPE = torch.bfloat16


def pack_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [N, K] as (packed [N', K/2] uint8, scales_zeros [K/group_size, N', 2] in ``dtype``), N' being N
    rounded up to ROW_MULTIPLE (zero rows). Asymmetric min/max groups; codes rounded against the stored
    (already rounded) scale and zero, so the kernel's dequantization is the one the codes were chosen for."""
    rows, inputs = weight.shape
    padded = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
    packed = torch.empty(padded, inputs // 2, dtype=torch.uint8)
    scales_zeros = torch.empty(inputs // group_size, padded, 2, dtype=dtype)
    with torch.no_grad():
        for start in range(0, padded, QUANTIZE_BLOCK_ROWS):
            stop = min(start + QUANTIZE_BLOCK_ROWS, padded)
            block = torch.zeros(stop - start, inputs)
            real = weight[start:min(stop, rows)].float()
            block[:real.shape[0]] = real
            groups = block.view(stop - start, -1, group_size)
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)
            scale = ((high - low) / 15).clamp(min=1e-12).to(dtype).float()
            zero = (low + 8 * scale).to(dtype).float()
            codes = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
            packed[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.view(stop - start, inputs).to(torch.int32), 1)
            scales_zeros[:, start:stop] = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype)
    return packed, scales_zeros


def supports(linear: torch.nn.Linear, group_size: int) -> bool:
    """Whether the kernel takes this layer's shape: inputs in whole groups (an even count of them: two codes a byte)."""
    inputs = linear.in_features
    return group_size in GROUP_SIZES and inputs % group_size == 0 and inputs % 2 == 0


class Int4DecodeLinear(torch.nn.Module):
    """A Linear holding its weight twice: as-is for the prefill (many rows: compute-bound, where the kernel, which
    unpacks every weight again for each group of rows, is 2-4x slower), and as 4-bit groups for the decoding
    steps, which are bound by how many weight bytes they read (decode_context.py)."""

    def __init__(self, linear: torch.nn.Linear, group_size: int = GROUP_SIZE):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.group_size = group_size
        self.out_features = linear.out_features
        packed, scales_zeros = pack_int4(linear.weight, group_size, KERNEL_DTYPE)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_zeros", scales_zeros)

    def requantize(self) -> None:
        """Pack ``weight`` afresh (after fusion replaced it by a concatenation whose parts' packings don't join)."""
        self.out_features = self.weight.shape[0]
        self.weight_int4, self.scales_zeros = pack_int4(self.weight, self.group_size, KERNEL_DTYPE)

    @staticmethod
    def packings_concatenate(sizes: list[int]) -> bool:
        return all(size % PACK_BLOCK_ROWS == 0 for size in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not in_decoding_step():
            return F.linear(x, self.weight, self.bias)
        # Each op is dispatched ~113 times a step, a few microseconds each whatever its size: the reshapes, casts
        # and copies below are made only where they do something (the decoding step's calls need none).
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if flat.dtype != self.scales_zeros.dtype:
            flat = flat.to(self.scales_zeros.dtype)
        scales_zeros = self.scales_zeros
        if not scales_zeros.is_contiguous():
            # The kernel reads the scales as one dense block. A projection fused with others holds a strided view
            # of the fused scales; it is only called on its own in the fallback decoding path, where this is the price.
            scales_zeros = scales_zeros.contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size, scales_zeros)
        if out.shape[-1] != self.out_features:  # rows padded to the kernel's multiple of 16
            out = out[:, :self.out_features]
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], self.out_features)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias
