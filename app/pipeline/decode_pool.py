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

from app.errors import DeadlineExceededError, InvalidImageError, OverloadedError
from app.pipeline.imaging import PreparedImage, VisionGeometry, prepare_image

logger = logging.getLogger(__name__)


class DecoderPool:
    """Worker processes that decode uploads. It recovers from any worker death, idle or busy; a file is blamed
    (400) only when it crashes a fresh worker too, or takes longer than ``decode_timeout_s``."""

    ATTEMPTS = 3

    def __init__(self, workers: int, decode: Callable[..., PreparedImage] = prepare_image,
                 decode_timeout_s: float = 5.0):
        self.workers = workers
        self.decode = decode  # a module-level function, so spawned workers can import it
        self.decode_timeout_s = decode_timeout_s
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_exit_with_parent, initargs=(os.getpid(),))

    def _recycle(self, pool: ProcessPoolExecutor) -> None:
        """Kill ``pool``'s workers (one may be spinning forever) and put a fresh pool in its place. Requests
        that were decoding or queued in it see their future broken or cancelled, and run again on the new one."""
        if pool is self._pool:
            self._pool = self._new_pool()
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, data: bytes, geometry: VisionGeometry, *, page: int, max_decoded_pixels: int,
                      timeout_s: float) -> PreparedImage:
        """Decode within DECODE_TIMEOUT_S and the request's remaining ``timeout_s``; raises only ServiceError."""
        crashed = False
        for _ in range(self.ATTEMPTS):
            pool = self._pool
            try:
                future = pool.submit(self.decode, data, geometry, page=page, max_decoded_pixels=max_decoded_pixels)
            except (BrokenProcessPool, RuntimeError):  # a worker died while idle, or a recycle shut the pool
                self._recycle(pool)
                continue
            own_limit = self.decode_timeout_s <= timeout_s
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), min(self.decode_timeout_s, timeout_s))
            except asyncio.TimeoutError:
                self._recycle(pool)
                if own_limit:
                    logger.warning("decoding an upload took over DECODE_TIMEOUT_S=%g s; its worker was replaced",
                                   self.decode_timeout_s)
                    raise InvalidImageError(f"the file took longer than {self.decode_timeout_s:g} s to decode "
                                            "(DECODE_TIMEOUT_S); send a simpler export") from None
                raise DeadlineExceededError(f"decoding the upload did not finish within {timeout_s:.1f} s") from None
            except BrokenProcessPool:
                if pool is not self._pool:
                    continue  # another request's recycle killed our worker: not this file's doing
                self._recycle(pool)
                if crashed:
                    logger.warning("an upload crashed a fresh decoder worker as well")
                    raise InvalidImageError("the file crashed the image decoder") from None
                crashed = True  # a worker died under us; it may have been something else: try fresh workers once
                continue
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if future.cancelled() and not (task and task.cancelling()):
                    continue  # cancelled by another request's recycle, not by our caller
                raise
        logger.error("the decoder workers failed %d times in a row", self.ATTEMPTS)
        raise OverloadedError("the image decoders are restarting; retry shortly", headers={"Retry-After": "1"})

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
