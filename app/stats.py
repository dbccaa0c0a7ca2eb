"""Counters behind the JSON /metrics (the seed's fields). Updated on the event loop only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InferenceStats:
    inference_count: int = 0
    total_inference_time: float = 0.0
    failed_count: int = 0
    rejected_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def record_success(self, inference_time_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.inference_count += 1
        self.total_inference_time += inference_time_s
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    @property
    def avg_inference_time(self) -> float:
        return self.total_inference_time / self.inference_count if self.inference_count else 0.0


def gpu_memory_bytes() -> tuple[int, int]:
    """(allocated, reserved) bytes on the current CUDA device; zeros without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def gpu_memory_gb() -> tuple[float | None, float | None]:
    """(allocated, reserved) GiB on the current CUDA device, or (None, None) without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None, None  # JSON says null without CUDA, where Prometheus says 0
    allocated, reserved = gpu_memory_bytes()
    return allocated / 1024 ** 3, reserved / 1024 ** 3
