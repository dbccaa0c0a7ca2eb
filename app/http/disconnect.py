"""A client that hangs up stops its work: a request waiting for its answer, or a stream of events mid-way.

Both watch the connection for ``http.disconnect`` while they wait, instead of finding out at the next write:
a request still queued or decoding writes nothing for a long time, and its KV slot should go to someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import ClientClosedError

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it if the client disconnects, so its queue slot and the device are freed."""
    task = asyncio.ensure_future(work)
    disconnected = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if disconnected.is_set():
            logger.info("client disconnected; request abandoned")
            raise ClientClosedError("client disconnected") from None
        raise
    finally:
        watcher.cancel()


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop, and close their generator (which stops the generation), the moment the
    client disconnects. Proxies are asked not to buffer them."""

    media_type = "text/event-stream"

    def __init__(self, content, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(content, **kwargs)
        self.headers["Cache-Control"] = "no-cache"
        self.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream_then_close(send))
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        done: set[asyncio.Future] = set()
        try:
            done, _ = await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watcher):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await streaming
        # A client that read to the end and then hung up abandoned nothing: only a stream cut short is logged.
        if watcher in done and streaming not in done:
            logger.info("client disconnected; stream abandoned")

    async def _stream_then_close(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
