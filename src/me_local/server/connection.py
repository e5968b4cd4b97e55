"""HTTP connections: what aiohttp's server leaves unbounded.

:class:`Runner` is aiohttp's ``AppRunner`` whose connections are :class:`Connection`\\ s:

* **header timeout**: a connection that has not sent complete request headers within
  ``header_timeout`` seconds of opening is closed. The same bound applies between
  requests of a keep-alive connection (aiohttp's ``keepalive_timeout``, which also
  closes a connection whose next request stalls halfway through its headers). Without
  it, clients that connect and send half a request hold a descriptor each, for ever.
* **malformed requests** (no ``Host`` on HTTP/1.1, an over-long request line or header,
  ``Content-Length`` with ``chunked``...) still get aiohttp's 400, logged as one INFO line
  instead of an ERROR with a traceback: they are the client's fault, not the daemon's.

The body timeout is the handlers' (:func:`me_local.server.params.read_json`), the write
timeout the streams' (:mod:`me_local.server.respond`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("me_local.server")


def abort(transport: asyncio.Transport) -> None:
    """Close a connection at once, dropping what its client has not read: a reset (SO_LINGER 0),
    so neither the descriptor nor the kernel's send buffer waits for a client that does not read."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # already closed, or not a TCP socket: abort() alone will do
            pass
    transport.abort()


class Connection(RequestHandler):
    """aiohttp's protocol for one connection, closing it when no request arrives in time."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.header_timeout = header_timeout
        self._first_request: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._first_request = asyncio.get_running_loop().call_later(self.header_timeout, self._no_request)

    def request_started(self) -> None:
        """Complete headers arrived (from here on, keep-alive's timeout takes over between requests)."""
        if self._first_request is not None:
            self._first_request.cancel()
            self._first_request = None

    def _no_request(self) -> None:
        self._first_request = None
        log.debug("closing a connection that sent no complete request headers within %g s", self.header_timeout)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.request_started()  # nothing to time out any more
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            client = peer[0] if isinstance(peer, (tuple, list)) and peer else "a client"
            reason = " ".join(str(exc.message).split())
            log.info("rejected a malformed HTTP request from %s: %s", client, reason[:300])
            return
        super().log_exception(*args, **kwargs)


class _Server(web.Server):
    """aiohttp's low-level server, making :class:`Connection`\\ s."""

    def __init__(self, base: web.Server, header_timeout: float) -> None:
        super().__init__(base.request_handler, request_factory=self._make_request_started,
                         handler_cancellation=base.handler_cancellation, loop=asyncio.get_running_loop(),
                         **base._kwargs)
        self._base_factory = base.request_factory
        self.header_timeout = header_timeout

    def _make_request_started(self, message: Any, payload: Any, protocol: RequestHandler, writer: Any,
                              task: Any) -> web.BaseRequest:
        if isinstance(protocol, Connection):
            protocol.request_started()
        return self._base_factory(message, payload, protocol, writer, task)

    def __call__(self) -> RequestHandler:
        return Connection(self, loop=asyncio.get_running_loop(), header_timeout=self.header_timeout,
                          **self._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` with a header timeout (see the module's docstring)."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=header_timeout, **kwargs)
        self.header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # starts the app; aiohttp's server with every setting
        return _Server(base, self.header_timeout)
