"""Turning an :class:`EventStream` into an HTTP response, for both APIs.

A request's first event is awaited before any header goes out, so everything
that can go wrong early (unknown member, prompt longer than the context, full
queue) is a proper 4xx/503. After that, a failure becomes an error frame in the
stream. A client that goes away cancels its generation. The end of an answer
goes out only once the worker has released its slot, so a client's next request
finds the slot free and the metrics already count the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from aiohttp import web

from ..core import DoneEvent, Event, TokenEvent
from ..errors import MeLocalError
from .bridge import EventStream
from .errors import ApiError, from_exception

log = logging.getLogger("me_local.server")

TokenFrames = Callable[[TokenEvent], Iterable[bytes]]
DoneFrames = Callable[[DoneEvent], Iterable[bytes]]
ErrorFrame = Callable[[ApiError], bytes]


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
) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    await resp.prepare(request)
    try:
        for frame in head:
            await resp.write(frame)
        ev = first
        while True:
            if isinstance(ev, DoneEvent):
                await stream.wait()  # the slot is free (and counted) before the client hears the end
                for frame in on_done(ev):
                    await resp.write(frame)
                for frame in tail:
                    await resp.write(frame)
                break
            for frame in on_token(ev):
                await resp.write(frame)
            try:
                ev = await stream.next()
            except MeLocalError as exc:
                await resp.write(on_error(from_exception(exc)))
                break
            except Exception:
                log.exception("generation failed mid-stream")
                await resp.write(on_error(from_exception(RuntimeError())))
                break
        await resp.write_eof()
    except ConnectionResetError:
        log.info("client went away during a stream on %s", request.path)
        stream.cancel("client_disconnect")
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
