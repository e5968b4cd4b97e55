"""Running the daemon: bind, load, serve, reload, stop.

:class:`Server` is what ``me-local serve`` runs and what the service layer
(systemd/launchd) hooks into:

* ``server.on_ready``: callbacks run once the models are loaded *and* the socket
  is listening (``/health`` answers 200 from then on): the place for ``READY=1``.
* ``server.on_stopping``: callbacks run when shutdown begins: ``STOPPING=1``.
* ``await server.reload()``: build a new engine from the config (off the loop) and
  swap it in; in-flight requests finish on the old one; on failure the old one
  keeps serving and ``False`` is returned: the body of a SIGHUP handler.
* ``server.request_shutdown()``: thread-safe; what SIGTERM/SIGINT call.
* ``server.reloader``: what SIGHUP runs (default ``server.reload``), e.g. a wrapper
  that tells systemd ``RELOADING=1`` ... ``READY=1`` around it.

Callbacks get the server and may be plain functions or coroutine functions.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..config import load_config
from ..engine import Engine
from ..errors import ServiceError, UsageError
from ..logs import AccessLog
from ..settings import BODY_TIMEOUT, HEADER_TIMEOUT, HOST, MAX_BODY_SIZE, PORT, WRITE_TIMEOUT
from .app import create_app
from .connection import Runner, abort
from .resources import AcceptErrors
from .security import AccessPolicy, check_bind, make_policy
from .state import Loader, ServerState

log = logging.getLogger("me_local.server")

DEFAULT_PORT = PORT.default
"""One above Ollama's 11434, so both daemons can run side by side."""

Callback = Callable[["Server"], Any]

ABORT_MARGIN = 1.0
"""Seconds after the shutdown grace before connections still answering are aborted."""


@dataclass(frozen=True)
class ServerSettings:
    """Every setting of ``me-local serve``. Those with a flag take their defaults and bounds from
    :mod:`me_local.settings`; ``check`` refuses what the flags refuse."""

    host: str = HOST.default
    port: int = DEFAULT_PORT
    """0 picks a free port (see ``Server.port``)."""
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    insecure: bool = False
    max_body_bytes: int = MAX_BODY_SIZE.default
    shutdown_grace: float = 10.0
    """Seconds streams in flight get to end with a final chunk at shutdown."""
    retry_after: int = 1
    """The Retry-After of 503 answers (full queue, loading, shutting down), in seconds."""
    log_prompts: bool = False
    """Put each request's prompt text in its access-log line."""
    header_timeout: float = HEADER_TIMEOUT.default
    """Seconds a connection may take to send complete request headers, counted from its opening
    or, between the requests of a keep-alive connection, from the end of the last answer."""
    body_timeout: float = BODY_TIMEOUT.default
    """Seconds a request body may take to arrive; past it the answer is 408 and the connection closes."""
    write_timeout: float = WRITE_TIMEOUT.default
    """Seconds one write of a stream may wait for its client to read; past it the generation is
    cancelled (``write_timeout`` in the cancellation metric) and the connection aborted."""

    def check(self) -> None:
        if not PORT.within(self.port):
            raise UsageError(f"--port must be between {PORT.lo} and {PORT.hi}, got {self.port}")
        if not MAX_BODY_SIZE.within(self.max_body_bytes):
            raise UsageError(f"the body size limit must be at least {MAX_BODY_SIZE.lo} bytes, "
                             f"got {self.max_body_bytes}")
        for setting in (HEADER_TIMEOUT, BODY_TIMEOUT, WRITE_TIMEOUT):
            value = getattr(self, setting.name)
            if not setting.within(value):
                raise UsageError(f"{setting.flag} must be between {setting.lo} and {setting.hi} seconds, "
                                 f"got {value}")
        check_bind(self.host, self.api_key, self.insecure)

    def policy(self) -> AccessPolicy:
        return make_policy(api_key=self.api_key, allow_hosts=self.allow_hosts, allow_origins=self.allow_origins,
                           bind_host=self.host, max_body_bytes=self.max_body_bytes)


def config_loader(config_path: str | None = None) -> Loader:
    """Read models.yaml (again, on every call: a reload sees the new file) and load every ensemble."""

    def load() -> Engine:
        engine = Engine(load_config(config_path))
        try:
            engine.load_all()
        except BaseException:
            engine.close()
            raise
        return engine

    return load


class Server:
    def __init__(self, settings: ServerSettings, loader: Loader) -> None:
        settings.check()
        self.settings = settings
        self.state = ServerState(loader, settings.policy(), retry_after=settings.retry_after,
                                 shutdown_grace=settings.shutdown_grace, body_timeout=settings.body_timeout,
                                 write_timeout=settings.write_timeout,
                                 access=AccessLog(log_prompts=settings.log_prompts), autoload=False)
        self.app = create_app(self.state)
        self.on_ready: list[Callback] = []
        self.on_stopping: list[Callback] = []
        self.reloader: Callable[[Server], Awaitable[bool]] | None = None
        """What SIGHUP runs (default: :meth:`reload`); the service layer wraps it with notifications."""
        self.port: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._runner: Runner | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._became_ready = False
        self._reloading: asyncio.Future[bool] | None = None
        self._ready_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def describe(self) -> str:
        engine = self.state.engine
        names = ", ".join(engine.config.ensembles) if engine is not None else "(loading)"
        return f"serving {names} on {self.url}"

    # -- start ------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen, and load the models in the background (ready callbacks follow)."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.loop.set_exception_handler(AcceptErrors(self.loop.get_exception_handler()))
        self._runner = Runner(self.app, header_timeout=self.settings.header_timeout, handler_cancellation=True,
                              access_log=None, shutdown_timeout=self.settings.shutdown_grace + 5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ServiceError(
                f"cannot listen on {self.settings.host}:{self.settings.port} ({exc.strerror or exc}); "
                "choose another --port or stop the program using it"
            ) from None
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.settings.port
        log.info("listening on %s; loading the models", self.url)
        self.state.begin_loading()
        self._ready_task = self.loop.create_task(self._when_loaded())

    async def _when_loaded(self) -> None:
        await self.state.wait_loaded()
        if self.state.status == "ready":
            self._became_ready = True
            log.info("ready: %s", self.describe())
            await self._run_callbacks(self.on_ready)
        elif self.state.load_error is not None:
            self.request_shutdown()

    async def wait_ready(self) -> None:
        """Wait until the models are loaded; raises what loading raised."""
        await self.state.wait_loaded()
        if self.state.load_error is not None and self.state.engine is None:
            raise self.state.load_error
        if self._ready_task is not None:
            await asyncio.shield(self._ready_task)

    async def _run_callbacks(self, callbacks: list[Callback]) -> None:
        for cb in list(callbacks):
            try:
                result = cb(self)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("a server callback failed")

    # -- reload ----------------------------------------------------------------------
    async def reload(self, loader: Loader | None = None) -> bool:
        """Load a new engine (default: the config again) and swap it in; False keeps the old one."""
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(None, loader or self.state.loader)
        except Exception as exc:
            log.error("reload failed; still serving the previous models: %s", exc)
            return False
        if self._stopping:
            await loop.run_in_executor(None, engine.close)
            return False
        if loader is not None:
            self.state.loader = loader
        self.state.swap_engine(engine)
        log.info("reloaded: %s", self.describe())
        return True

    # -- stop ------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        """Ask the server to stop (safe from any thread and from signal handlers)."""
        if self.loop is None or self._stop is None:
            return
        stop = self._stop
        try:
            self.loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop is already closed
            pass

    async def shutdown(self) -> None:
        """Stop accepting, end streams in flight with a final chunk, free the models."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down")
        self.state.status = "stopping"
        await self._run_callbacks(self.on_stopping)
        if self._ready_task is not None and not self._ready_task.done():
            self._ready_task.cancel()
        if self._runner is not None:
            # Streams get the grace period to end with a final chunk; a client that does not read
            # them must not hold the shutdown past it (aiohttp would wait for its handler, twice).
            loop = asyncio.get_running_loop()
            aborter = loop.call_later(self.settings.shutdown_grace + ABORT_MARGIN, self._abort_connections)
            try:
                await self._runner.cleanup()  # stop listening -> end streams -> wait for handlers -> close engine
            finally:
                aborter.cancel()
        log.info("stopped")

    def connections(self) -> list[RequestHandler]:
        """The open HTTP connections (aiohttp's protocol objects)."""
        server = self._runner.server if self._runner is not None else None
        return server.connections if server is not None else []

    def _abort_connections(self) -> None:
        stuck = [c.transport for c in self.connections() if c.transport is not None]
        if stuck:
            log.warning("aborting %d connection(s) still answering %g s into the shutdown "
                        "(their clients do not read)", len(stuck), self.settings.shutdown_grace + ABORT_MARGIN)
        for transport in stuck:
            abort(transport)

    # -- all together -------------------------------------------------------------------
    async def serve(self, *, handle_signals: bool = True) -> None:
        """Start, serve until asked to stop (SIGTERM/SIGINT), shut down. Raises a loading failure."""
        await self.start()
        assert self._stop is not None and self.loop is not None
        signals = [(signal.SIGTERM, self._on_signal), (signal.SIGINT, self._on_signal)]
        if hasattr(signal, "SIGHUP"):
            signals.append((signal.SIGHUP, self._on_hangup))
        if handle_signals:
            for sig, handler in signals:
                try:
                    self.loop.add_signal_handler(sig, handler, sig)
                except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
                    pass
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()
            if handle_signals:
                for sig, _ in signals:
                    try:
                        self.loop.remove_signal_handler(sig)
                    except (NotImplementedError, RuntimeError):
                        pass
        error = self.state.load_error
        if not self._became_ready and isinstance(error, Exception):
            raise error

    def _on_signal(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        self.request_shutdown()

    def _on_hangup(self, sig: int) -> None:
        """SIGHUP: re-read models.yaml (never the default action, which would end the daemon)."""
        if self._stopping or self.state.status != "ready":
            log.warning("received SIGHUP while %s; not reloading", self.state.status)
            return
        if self._reloading is not None and not self._reloading.done():
            log.warning("received SIGHUP during a reload; not starting another")
            return
        log.info("received SIGHUP: reloading the models")
        reload = self.reloader(self) if self.reloader is not None else self.reload()
        self._reloading = asyncio.ensure_future(reload)

    def run(self) -> None:
        """Blocking: serve until SIGTERM/SIGINT."""
        asyncio.run(self.serve())
