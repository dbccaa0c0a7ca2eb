"""Decode uploads in worker processes, so a file that makes a decoder spin or crash costs only its worker.

A thread cannot be stopped once a C decoder spins in it; a process can be killed. Workers import only
Pillow and pypdfium2 (spawned, not forked, so none of torch's threads or memory is copied). They run at a lower
priority than the model: torch's threads take every CPU the container has (app/cpu_quota.py), and a decoding step
waits for its slowest thread, so a decoder preempting one of them would stall the whole step.
"""

from __future__ import annotations

import asyncio
import collections
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

DECODER_NICENESS = 10  # added to the workers' nice value: the model's threads win the CPUs they share


class _Worker:
    """One decoder process (a process pool of one): when it dies or spins, it alone is replaced, and the requests
    decoding on the other workers never notice."""

    def __init__(self) -> None:
        self.executor = self._new()

    @staticmethod
    def _new() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(os.getpid(),))

    @property
    def pids(self) -> list[int]:
        return list(getattr(self.executor, "_processes", None) or {})

    def replace(self) -> None:
        """Kill this worker's process (it may be spinning forever) and start a fresh one in its place."""
        old, self.executor = self.executor, self._new()
        for process in list((getattr(old, "_processes", None) or {}).values()):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        for process in list((getattr(self.executor, "_processes", None) or {}).values()):
            process.terminate()
        self.executor.shutdown(wait=True, cancel_futures=True)


class DecoderPool:
    """Worker processes that decode uploads, one file at a time each. A file is blamed (400) only when it crashes a
    fresh worker too, or takes longer than ``decode_timeout_s``; either way only its own worker is replaced."""

    ATTEMPTS = 3

    def __init__(self, workers: int, decode: Callable[..., PreparedImage] = prepare_image,
                 decode_timeout_s: float = 5.0):
        self.workers = workers
        self.decode = decode  # a module-level function, so spawned workers can import it
        self.decode_timeout_s = decode_timeout_s
        self._all = [_Worker() for _ in range(workers)]
        # Free workers and the requests waiting for one: plain lists and per-wait futures rather than an
        # asyncio.Queue, which would bind to the first event loop that waits on it (tests run several).
        self._free: list[_Worker] = list(self._all)
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def _take(self, timeout_s: float) -> _Worker:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._free:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0))
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self._free.pop()

    def _give(self, worker: _Worker) -> None:
        self._free.append(worker)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    @property
    def pids(self) -> list[int]:
        return [pid for worker in self._all for pid in worker.pids]

    async def prepare(self, data: bytes, geometry: VisionGeometry, *, page: int, max_decoded_pixels: int,
                      timeout_s: float) -> PreparedImage:
        """Decode within DECODE_TIMEOUT_S and the request's remaining ``timeout_s``; raises only ServiceError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        crashed = False
        for _ in range(self.ATTEMPTS):
            try:  # waiting for a free worker counts against the request's deadline, not DECODE_TIMEOUT_S
                worker = await self._take(deadline - loop.time())
            except asyncio.TimeoutError:
                raise DeadlineExceededError(f"no image decoder was free within {timeout_s:.1f} s") from None
            left = max(deadline - loop.time(), 0.001)
            own_limit = self.decode_timeout_s <= left
            try:
                future = worker.executor.submit(self.decode, data, geometry, page=page,
                                                max_decoded_pixels=max_decoded_pixels)
            except (BrokenProcessPool, RuntimeError):  # it died while idle
                worker.replace()
                self._give(worker)
                continue
            try:
                result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                                min(self.decode_timeout_s, left))
            except asyncio.TimeoutError:
                worker.replace()
                self._give(worker)
                if own_limit:
                    logger.warning("decoding an upload took over DECODE_TIMEOUT_S=%g s; its worker was replaced",
                                   self.decode_timeout_s)
                    raise InvalidImageError(f"the file took longer than {self.decode_timeout_s:g} s to decode "
                                            "(DECODE_TIMEOUT_S); send a simpler export") from None
                raise DeadlineExceededError(f"decoding the upload did not finish within {timeout_s:.1f} s") from None
            except BrokenProcessPool:
                worker.replace()
                self._give(worker)
                if crashed:
                    logger.warning("an upload crashed a fresh decoder worker as well")
                    raise InvalidImageError("the file crashed the image decoder") from None
                crashed = True  # its worker died under it; it may have been something else: try a fresh one once
                continue
            except asyncio.CancelledError:  # the caller went away: the worker is free once its file is done
                self._free_when_done(worker, future)
                raise
            except BaseException:  # the file's own error (400, 413, 415): the worker is fine
                self._give(worker)
                raise
            self._give(worker)
            return result
        logger.error("the decoder workers failed %d times in a row", self.ATTEMPTS)
        raise OverloadedError("the image decoders are restarting; retry shortly", headers={"Retry-After": "1"})

    def _free_when_done(self, worker: _Worker, future) -> None:
        """Back to the idle workers when its abandoned file is decoded, or replaced if that takes longer than
        DECODE_TIMEOUT_S (a spinning file must not keep a worker after its sender left)."""
        loop = asyncio.get_running_loop()
        handed_back = False

        def hand_back(replace: bool) -> None:
            nonlocal handed_back
            if handed_back:
                return
            handed_back = True
            if replace or not future.done():
                worker.replace()
            self._give(worker)

        future.add_done_callback(lambda _: loop.call_soon_threadsafe(hand_back, False))
        loop.call_later(self.decode_timeout_s, hand_back, True)

    async def warm(self) -> None:
        """Start the workers now, so the first request does not pay for it."""
        await asyncio.gather(*(asyncio.wrap_future(worker.executor.submit(_noop)) for worker in self._all))

    def close(self) -> None:
        """Stop the workers now (one may be spinning on a hostile file) and reap them, so the
        interpreter exits without the pool's exit hook writing to a closed pipe."""
        for worker in self._all:
            worker.stop()


def _noop() -> None:
    return None


def _start_worker(parent_pid: int) -> None:
    """Worker initializer: yield the CPUs to the model's threads, and die with the server."""
    try:
        os.nice(DECODER_NICENESS)
    except OSError:  # not permitted here: decoding still works, at the model's priority
        pass
    _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: a worker whose server was killed (SIGKILL, OOM) must not live on as an orphan."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
