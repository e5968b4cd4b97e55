"""Turning an :class:`EventStream` into an HTTP response, for both APIs.

A request's first event is awaited before any header goes out, so everything
that can go wrong early (unknown member, prompt longer than the context, full
queue) is a proper 4xx/503. After that, a failure becomes an error frame in the
stream. A client that goes away cancels its generation; so does one that stops reading:
a write that waits longer than the write timeout for the client to drain its socket
cancels the generation (reason ``write_timeout``) and aborts the connection. The end of an answer
goes out only once the worker has released its slot, so a client's next request
finds the slot free and the metrics already count the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from ..core import DoneEvent, Event, TokenEvent
from ..errors import MeLocalError
from .bridge import EventStream
from .connection import abort
from .errors import ApiError, from_exception

log = logging.getLogger("me_local.server")

TokenFrames = Callable[[TokenEvent], Iterable[bytes]]
DoneFrames = Callable[[DoneEvent], Iterable[bytes]]
ErrorFrame = Callable[[ApiError], bytes]


class Outlet:
    """A stream's writes to its client, each bounded by ``timeout`` seconds of waiting for the
    client to read. Past it the generation is cancelled (``write_timeout``), the connection
    aborted, and the write raises ConnectionResetError."""

    def __init__(self, request: web.Request, resp: web.StreamResponse, stream: EventStream,
                 timeout: float) -> None:
        self.request, self.resp, self.stream, self.timeout = request, resp, stream, timeout
        self.timed_out = False

    async def write(self, data: bytes) -> None:
        await self._bounded(self.resp.write(data))  # waits only when the socket's buffers are full

    async def write_eof(self) -> None:
        await self._bounded(self.resp.write_eof())

    async def _bounded(self, write: Awaitable[None]) -> None:
        timer = asyncio.get_running_loop().call_later(self.timeout, self._stalled)
        try:
            await write
        finally:
            timer.cancel()
        if self.timed_out:
            raise ConnectionResetError("the client did not read")

    def _stalled(self) -> None:
        self.timed_out = True
        self.stream.cancel("write_timeout")
        log.warning("client %s did not read for %g s; ending its stream on %s", self.request.remote,
                    self.timeout, self.request.path)
        transport = self.request.transport
        if transport is not None:
            abort(transport)  # wakes the write (it fails) and frees the socket at once


async def stream_response(
    request: web.Request,
    stream: EventStream,
    first: Event,
    *,
    content_type: str,
    head: Iterable[bytes],
    on_token: TokenFrames,
    on_done: DoneFrames,
    on_error: ErrorFrame,
    tail: Iterable[bytes] = (),
    write_timeout: float = 30.0,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    await resp.prepare(request)
    out = Outlet(request, resp, stream, write_timeout)
    try:
        for frame in head:
            await out.write(frame)
        ev = first
        while True:
            if isinstance(ev, DoneEvent):
                await stream.wait()  # the slot is free (and counted) before the client hears the end
                for frame in on_done(ev):
                    await out.write(frame)
                for frame in tail:
                    await out.write(frame)
                break
            for frame in on_token(ev):
                await out.write(frame)
            try:
                ev = await stream.next()
            except MeLocalError as exc:
                await out.write(on_error(from_exception(exc)))
                break
            except Exception:
                log.exception("generation failed mid-stream")
                await out.write(on_error(from_exception(RuntimeError())))
                break
        await out.write_eof()
    except ConnectionResetError:
        if not out.timed_out:
            log.info("client went away during a stream on %s", request.path)
        stream.cancel("client_disconnect")  # a no-op after a write timeout: that reason came first
    return resp


async def collect(stream: EventStream, first: Event) -> tuple[list[TokenEvent], DoneEvent]:
    """Every token event, then the done event (for non-streaming answers)."""
    tokens: list[TokenEvent] = []
    ev = first
    while not isinstance(ev, DoneEvent):
        tokens.append(ev)
        try:
            ev = await stream.next()
        except MeLocalError as exc:
            raise from_exception(exc) from None
    await stream.wait()  # the slot is free (and counted) before the client hears the end
    return tokens, ev


def joined_text(tokens: Iterable[TokenEvent], done: DoneEvent) -> str:
    return "".join(t.text for t in tokens) + done.text
