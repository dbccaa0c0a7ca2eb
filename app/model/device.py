"""Choose the torch device and dtype for a request like DEVICE=auto / TORCH_DTYPE=auto, with honest fallbacks."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from app.settings import Device, TorchDType

logger = logging.getLogger(__name__)

_DTYPES = {
    TorchDType.float16: torch.float16,
    TorchDType.bfloat16: torch.bfloat16,
    TorchDType.float32: torch.float32,
}


@dataclass(frozen=True)
class Placement:
    """Where the model runs and in which precision."""

    device: str
    dtype: torch.dtype
    quantization: str | None = None  # e.g. "int8-decode": int8 weights for the decoding steps
    device_fallback: str | None = None  # why the DEVICE asked for is not the one used

    @property
    def dtype_name(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"{name}+{self.quantization}" if self.quantization else name


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bfloat16 matrix math in hardware (oneDNN uses it), not emulated."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_device(requested: Device) -> tuple[str, list[str]]:
    """Return the device to use and any warnings (an unavailable explicit device falls back to cpu)."""
    if requested == Device.auto:
        if torch.cuda.is_available():
            return "cuda", []
        return ("mps", []) if _mps_available() else ("cpu", [])
    if requested == Device.cpu:
        return "cpu", []
    available, reason = _cuda_status() if requested == Device.cuda else (_mps_available(), "")
    if available:
        return requested.value, []
    because = f" ({reason})" if reason else ""
    return "cpu", [f"DEVICE={requested.value} requested but {requested.value} is not available{because}; "
                   "falling back to cpu"]


def _cuda_status() -> tuple[bool, str]:
    """Whether CUDA works, and if not, torch's own reason (a driver too old for this build names both
    versions), else what is known."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return True, ""
    said = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    if said:
        return False, said[0]
    return False, f"no CUDA device visible to this torch build (CUDA {torch.version.cuda or 'none'})"


# Below this size bfloat16's conversions cost more than its faster matrix math saves on the CPU
# (measured: the tiny demo model runs ~1.8x faster in float32, mid and full sizes faster in bfloat16).
SMALL_MODEL_PARAMETERS = 100_000_000


def resolve_dtype(device: str, requested: TorchDType, parameters: int | None = None) -> tuple[torch.dtype, list[str]]:
    """Return a dtype that runs (and runs fast) on ``device``, with warnings for any substitution.
    ``parameters``, when known, lets the CPU choice account for the model's size."""
    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    if requested == TorchDType.auto:
        if device == "cuda":
            return (torch.bfloat16 if cuda_bf16 else torch.float16), []
        if device == "mps":
            return torch.float16, []
        # CPU: with AMX / AVX512-BF16, bfloat16 makes the image prefill ~3x and decoding ~1.4x faster;
        # without them it is emulated and several times slower (README, "Choice of dtype").
        small = parameters is not None and parameters < SMALL_MODEL_PARAMETERS
        return (torch.bfloat16 if cpu_has_native_bf16() and not small else torch.float32), []
    dtype = _DTYPES[requested]
    if dtype == torch.bfloat16 and device == "cuda" and not cuda_bf16:
        return torch.float16, ["TORCH_DTYPE=bfloat16 is not supported by this GPU; using float16"]
    if dtype == torch.bfloat16 and device == "mps":
        return torch.float16, ["TORCH_DTYPE=bfloat16 is not reliable on mps; using float16"]
    if dtype != torch.float32 and device == "cpu" and not cpu_has_native_bf16():
        return dtype, [f"TORCH_DTYPE={requested.value}: this CPU has no native half-precision math, so it is "
                       "emulated and slow; float32 is faster here"]
    return dtype, []


def resolve_placement(device: Device, dtype: TorchDType) -> Placement:
    """Resolve both and log each fallback once, as a WARNING."""
    chosen_device, device_warnings = resolve_device(device)
    chosen_dtype, dtype_warnings = resolve_dtype(chosen_device, dtype)
    messages = tuple(device_warnings + dtype_warnings)
    for message in messages:
        logger.warning(message)
    return Placement(chosen_device, chosen_dtype,
                     device_fallback=device_warnings[0] if device_warnings else None)
