"""Settings are typed and validated; a bad value stops startup with one readable line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from app.model.device import cpu_has_native_bf16, resolve_device, resolve_dtype
from app.settings import Device, SettingsError, TorchDType, load_settings


def test_defaults_follow_the_seed(monkeypatch):
    for name in ("BASE_MODEL_ID", "ADAPTER_PATH", "DEVICE", "TORCH_DTYPE", "MAX_NEW_TOKENS", "PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.base_model_id == "Qwen/Qwen3-VL-2B-Instruct"
    assert str(settings.adapter_path) == "/app/models/weights"
    assert settings.device == Device.auto and settings.torch_dtype == TorchDType.auto
    assert settings.max_new_tokens == 384 and settings.port == 8002


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("MAX_NEW_TOKENS", "100")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.device == Device.cpu and settings.max_new_tokens == 100 and settings.log_level.value == "DEBUG"
    assert settings.explicitly_set("max_new_tokens") and not settings.explicitly_set("prompt")


@pytest.mark.parametrize("name, value, expected", [
    ("DEVICE", "gpu", "'auto', 'cuda', 'mps' or 'cpu'"),
    ("MAX_NEW_TOKENS", "-1", "greater than or equal to 1"),
    ("TORCH_DTYPE", "fp8", "'float16', 'bfloat16' or 'float32'"),
    ("PORT", "http", "valid integer"),
])
def test_invalid_value_names_the_variable_and_the_allowed_values(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid {name}={value!r}")
    assert expected in message and "\n" not in message


def test_python_m_app_exits_with_a_readable_error():
    env = {**os.environ, "DEVICE": "gpu"}
    result = subprocess.run([sys.executable, "-m", "app"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid DEVICE='gpu'" in result.stderr
    assert "Traceback" not in result.stderr


def test_auto_device_and_dtype_on_this_machine():
    device, warnings = resolve_device(Device.auto)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device == expected and warnings == []
    if device == "cpu":
        expected_dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        assert resolve_dtype("cpu", TorchDType.auto) == (expected_dtype, [])


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_unavailable_mps_falls_back_to_cpu():
    device, warnings = resolve_device(Device.mps)
    assert device == "cpu" and "falling back to cpu" in warnings[0]


def test_half_precision_on_cpu_is_honoured_and_warned_about_only_when_emulated():
    dtype, warnings = resolve_dtype("cpu", TorchDType.bfloat16)
    assert dtype == torch.bfloat16
    assert bool(warnings) is not cpu_has_native_bf16()
    assert resolve_dtype("cpu", TorchDType.float32) == (torch.float32, [])


def test_bf16_on_mps_becomes_fp16():
    assert resolve_dtype("mps", TorchDType.bfloat16)[0] == torch.float16
    assert resolve_dtype("mps", TorchDType.auto) == (torch.float16, [])


def test_small_models_stay_in_float32_on_the_cpu():
    assert resolve_dtype("cpu", TorchDType.auto, parameters=250_000) == (torch.float32, [])
    expected_large = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("cpu", TorchDType.auto, parameters=2_000_000_000) == (expected_large, [])
    assert resolve_dtype("cpu", TorchDType.bfloat16, parameters=250_000)[0] == torch.bfloat16  # explicit wins


def test_removed_settings_are_named_with_what_replaced_them():
    from app.settings import removed_settings_in

    warnings = removed_settings_in({"torch_compile": "true", "BATCH_WAIT_MS": "50", "MAX_QUEUE": "4"})
    assert len(warnings) == 2
    assert any(w.startswith("BATCH_WAIT_MS is no longer used") for w in warnings)
    assert any("TORCH_COMPILE" in w and "CUDA graphs" in w for w in warnings)
    assert removed_settings_in({"MAX_QUEUE": "4"}) == []
