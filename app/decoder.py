"""Decode uploads in worker processes, so a file that makes a decoder spin or crash costs only its worker.

A thread cannot be stopped once a C decoder spins in it; a process can be killed. Workers import only
Pillow and pypdfium2 (spawned, not forked, so none of torch's threads or memory is copied).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from .errors import DeadlineExceededError, InvalidImageError
from .imaging import PreparedImage, VisionGeometry, prepare_image

logger = logging.getLogger(__name__)


class DecoderPool:
    def __init__(self, workers: int, decode: Callable[..., PreparedImage] = prepare_image):
        self.workers = workers
        self.decode = decode  # a module-level function, so spawned workers can import it
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_exit_with_parent, initargs=(os.getpid(),))

    def _recycle(self, pool: ProcessPoolExecutor) -> None:
        """Kill ``pool``'s workers (one may be spinning forever) and put a fresh pool in its place."""
        if pool is self._pool:
            self._pool = self._new_pool()
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, data: bytes, geometry: VisionGeometry, *, page: int, max_decoded_pixels: int,
                      timeout_s: float) -> PreparedImage:
        """Decode within ``timeout_s``; raises only ServiceError subclasses."""
        for attempt in (1, 2):
            pool = self._pool
            future = pool.submit(self.decode, data, geometry, page=page, max_decoded_pixels=max_decoded_pixels)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("decoding the upload took over %.1f s; its worker was killed", timeout_s)
                self._recycle(pool)
                raise DeadlineExceededError(f"decoding the upload did not finish within {timeout_s:.1f} s") from None
            except BrokenProcessPool:
                if pool is not self._pool and attempt == 1:
                    continue  # another request's recycle killed our worker: run ours again
                logger.warning("a decoder worker died on this upload")
                self._recycle(pool)
                raise InvalidImageError("the file crashed the image decoder") from None
        raise AssertionError("unreachable")

    async def warm(self) -> None:
        """Start the workers now, so the first request does not pay for it."""
        await asyncio.gather(*(asyncio.wrap_future(self._pool.submit(_noop)) for _ in range(self.workers)))

    def close(self) -> None:
        """Stop the workers now (one may be spinning on a hostile file) and reap them, so the
        interpreter exits without the pool's exit hook writing to a closed pipe."""
        pool = self._pool
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _noop() -> None:
    return None


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: a worker whose server was killed (SIGKILL, OOM) must not live on as an orphan."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
