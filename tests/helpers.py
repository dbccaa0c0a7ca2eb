"""Shared test helpers: in-memory images, a fake engine, waiting for readiness."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw

from app.model.device import Placement
from app.model.engine import ServingDefaults
from app.model.sequence import PreparedInputs, StopRules
from app.pipeline.imaging import VisionGeometry

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
    """Stands in for the model where HTTP behaviour is the point: the engine's four scheduler calls, with each
    sequence taking ``generate_s`` of decoding steps (at least ``step_s`` each) and then ending its turn."""

    EOS, FILLER = 1, 2

    def __init__(self, generate_s: float = 0.0, text: str = TABLE, max_rows: int = 8, step_s: float = 0.01):
        self.generate_s = generate_s
        self.text = text
        self.step_s = step_s
        self.max_rows = max_rows
        self.rows_per_step: list[int] = []  # how many sequences each decoding step advanced
        self.prefills = 0
        self.occupants: list = []
        self.stop_rules = StopRules(frozenset({self.EOS}), repetition_guard=None)
        self.decode_mode, self.decode_fallback = "fused-eager", None
        self.geometry = VisionGeometry(factor=32, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
        self.defaults = ServingDefaults(prompt="prompt", max_new_tokens=16, max_image_tokens=64)
        self.loaded = SimpleNamespace(model_id="fake-model", adapter=None, processor=object(),
                                      placement=Placement("cpu", torch.float32))

    @property
    def slots_in_use(self) -> int:
        return len(self.occupants)

    def cache_info(self) -> dict:
        return {"slots": self.max_rows, "slot_tokens": 100, "bytes": 0, "slots_in_use": len(self.occupants)}

    def control_tokens_in(self, prompt: str) -> list[str]:
        return [token for token in ("<|image_pad|>",) if token in prompt]

    def prepare(self, image, prompt, system=None) -> PreparedInputs:
        return PreparedInputs({}, prompt_tokens=10, image_tokens=4)

    def sampler(self, inputs, sampling, json_format=None):
        return None  # the fake's tokens are scripted: nothing to sample

    def compile_grammar(self, json_format, timeout_s) -> None:
        pass  # no grammar: the fake answers every schema alike

    def prefill(self, sequences) -> list[int]:
        self.prefills += 1
        self.occupants.extend(sequences)
        return [self.FILLER for _ in sequences]

    def decode(self, sequences) -> list[tuple]:
        """Steps of generate_s / 8 (so the answer comes within max_new_tokens), ``step_s`` at least."""
        time.sleep(max(self.step_s, self.generate_s / 8))
        self.rows_per_step.append(len(sequences))
        now = time.perf_counter()
        return [(sequence, self.EOS if now - sequence.started_at >= self.generate_s else self.FILLER)
                for sequence in sequences]

    def free(self, sequence) -> None:
        if sequence in self.occupants:
            self.occupants.remove(sequence)

    def release_all(self) -> None:
        self.occupants.clear()

    def decode_tokens(self, tokens: list[int]) -> str:
        return self.text if tokens and tokens[-1] == self.EOS else ""

    def detokenize(self, tokens: list[int]) -> str:
        return self.decode_tokens(tokens).strip()


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

