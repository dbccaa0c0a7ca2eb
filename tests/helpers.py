"""Shared test helpers: in-memory images, a fake engine, waiting for readiness."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw

from app.device import Placement
from app.engine import GenerationResult, ServingDefaults
from app.imaging import VisionGeometry

TABLE = "| № | Наименование действия | Роль |\n|---|---|---|\n| 1 | Принять заявку | Менеджер |"


def diagram_png(width: int = 320, height: int = 240, mode: str = "RGB", fmt: str = "PNG", **save: object) -> bytes:
    """A small diagram-like picture: boxes and arrows on white."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, width // 3, height // 3), outline="black", width=2)
    draw.line((width // 3, height // 6, width // 2, height // 6), fill="black", width=2)
    draw.rectangle((width // 2, 10, width - 10, height // 3), outline="blue", width=2)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


class FakeEngine:
    """Stands in for the model where HTTP behaviour is the point. Sleeps in steps, honouring cancel."""

    def __init__(self, generate_s: float = 0.0, text: str = TABLE):
        self.generate_s = generate_s
        self.text = text
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.geometry = VisionGeometry(factor=32, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
        self.defaults = ServingDefaults(prompt="prompt", max_new_tokens=16, max_image_tokens=64)
        self.loaded = SimpleNamespace(model_id="fake-model", adapter=None,
                                      placement=Placement("cpu", torch.float32))

    def control_tokens_in(self, prompt: str) -> list[str]:
        return [token for token in ("<|image_pad|>",) if token in prompt]

    def prepare(self, image, prompt) -> None:
        """Nothing to prepare: generate_batch below ignores model inputs."""

    def generate_batch(self, requests) -> list[GenerationResult]:
        """Every row takes ``generate_s``, all rows at once; a cancelled row ends at its next step."""
        self.calls += 1
        self.batch_sizes.append(len(requests))
        started = time.perf_counter()
        pending = list(requests)
        while pending:
            elapsed = time.perf_counter() - started
            for request in list(pending):
                if request.cancel.is_set() or elapsed >= self.generate_s:
                    reason = "cancelled" if request.cancel.is_set() else "stop"
                    request.result = GenerationResult(self.text if reason == "stop" else "", 10, 5, 4, reason,
                                                      0.0, elapsed, 0.0)
                    request.on_done(request.result)
                    pending.remove(request)
            time.sleep(0.01)
        return [request.result for request in requests]


def fake_factory(engine: FakeEngine | None = None, load_s: float = 0.0, error: Exception | None = None):
    def build() -> FakeEngine:
        time.sleep(load_s)
        if error is not None:
            raise error
        return engine or FakeEngine()

    return build


def wait_for_status(client, status: str, timeout_s: float = 120.0) -> dict:
    """Poll /health until it reports ``status``; return the body."""
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get("/health").json()
        if body["status"] == status:
            return body
        time.sleep(0.05)
    raise AssertionError(f"/health never reported {status!r}; last body: {body}")

