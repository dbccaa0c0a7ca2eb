"""The decoder pool bounds a spinning or crashing decoder to its own worker process."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.errors import DeadlineExceededError, InvalidImageError, UnsupportedMediaError
from app.pipeline.decode_pool import DecoderPool
from app.pipeline.imaging import VisionGeometry

from .helpers import diagram_png
from .hostile import hostile_decode

GEOMETRY = VisionGeometry(factor=32, min_pixels=64 * 64, max_pixels=32 * 32 * 64)


def run(coro):
    return asyncio.run(coro)


async def decode(pool: DecoderPool, data: bytes, timeout_s: float = 20.0):
    return await pool.prepare(data, GEOMETRY, page=1, max_decoded_pixels=10_000_000, timeout_s=timeout_s)


def test_spinning_decoder_is_killed_at_the_deadline_and_the_pool_recovers():
    pool = DecoderPool(1, decode=hostile_decode)

    async def scenario():
        await pool.warm()
        started = time.perf_counter()
        with pytest.raises(DeadlineExceededError):
            await decode(pool, b"SPIN", timeout_s=1.0)
        assert time.perf_counter() - started < 3.0
        prepared = await decode(pool, diagram_png())
        assert prepared.image.mode == "RGB"

    try:
        run(scenario())
    finally:
        pool.close()


def test_crashing_decoder_is_a_400_and_the_pool_recovers():
    pool = DecoderPool(1, decode=hostile_decode)

    async def scenario():
        with pytest.raises(InvalidImageError, match="crashed"):
            await decode(pool, b"CRASH")
        assert (await decode(pool, diagram_png())).source_format == "PNG"

    try:
        run(scenario())
    finally:
        pool.close()


def test_typed_errors_cross_the_process_boundary():
    pool = DecoderPool(1)

    async def scenario():
        with pytest.raises(UnsupportedMediaError, match="accepted formats"):
            await decode(pool, b"not an image at all")

    try:
        run(scenario())
    finally:
        pool.close()


def test_workers_exit_when_their_server_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    script = ("import asyncio, os, sys\n"
              "from app.pipeline.decode_pool import DecoderPool\n"
              "pool = DecoderPool(2)\n"
              "asyncio.run(pool.warm())\n"
              "print(' '.join(str(p) for p in pool.pids), flush=True)\n"
              "import time; time.sleep(60)\n")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
    workers = [int(pid) for pid in server.stdout.readline().split()]
    assert len(workers) == 2
    server.send_signal(signal.SIGKILL)
    server.wait()
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
        time.sleep(0.2)
    assert not alive, f"orphaned decoder workers: {alive}"
