"""vlm-inference: process diagram image -> markdown table of steps and roles (Qwen3-VL + merged LoRA)."""

__version__ = "0.1.0"
SERVICE_NAME = "vlm-inference"
