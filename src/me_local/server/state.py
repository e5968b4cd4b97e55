"""What the routes share: :class:`ServerState` and the typed keys that reach it.

One ``ServerState`` per app (no module-level globals) owns the engine (loaded off the
loop at start-up, swappable for a reload), the streams in flight and the metrics.
The app (:mod:`.app`) and both APIs' routes (:mod:`.openai`, :mod:`.ollama`) import it
from here, so the app can import its routes without a cycle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..core import DoneEvent
from ..engine import Engine, Request
from ..errors import MeLocalError
from ..logs import AccessLog
from . import metrics as prom
from .bridge import EventStream
from .errors import ApiError, from_exception
from .resources import trim_heap
from .security import AccessPolicy

log = logging.getLogger("me_local.server")

Loader = Callable[[], Engine]
"""Builds and fully loads an Engine; runs on a worker thread."""


@dataclass
class AccessNote:
    """What a handler tells the access log about its request (filled as it goes)."""

    model: str | None = None
    prompt: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


NOTE: web.RequestKey[AccessNote] = web.RequestKey("me_local_access_note", AccessNote)


def prompt_text(request: Request) -> str:
    """The request's input as text, for ``--log-prompts``."""
    if request.messages is not None:
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in request.messages)
    return request.prompt or ""


class ServerState:
    """Everything the routes share; one per app (no module-level globals)."""

    def __init__(self, loader: Loader, policy: AccessPolicy | None = None, *, retry_after: int = 1,
                 shutdown_grace: float = 10.0, body_timeout: float = 60.0, write_timeout: float = 30.0,
                 access: AccessLog | None = None, autoload: bool = True) -> None:
        self.loader = loader
        self.autoload = autoload
        """Start loading when the app starts; a Server loads only once its socket listens."""
        self.policy = policy or AccessPolicy()
        self.access = access or AccessLog()
        self.retry_after = retry_after
        self.shutdown_grace = shutdown_grace
        self.body_timeout = body_timeout
        """Seconds a request body may take to arrive (408 past it)."""
        self.write_timeout = write_timeout
        """Seconds one write of a stream may wait for its client to read (the stream ends past it)."""
        self.metrics = prom.Metrics()
        self.engine: Engine | None = None
        self.status = "loading"  # loading | ready | failed | stopping
        self.load_error: BaseException | None = None
        self.loaded = asyncio.Event()
        """Set when loading ended, well or not (see ``status``)."""
        self.streams: set[EventStream] = set()
        self._notes: dict[EventStream, AccessNote] = {}
        self._retired: set[Engine] = set()
        self._load_task: asyncio.Task[None] | None = None
        self.started = time.time()

    # -- the engine's life ------------------------------------------------------------
    def begin_loading(self) -> None:
        if self._load_task is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            engine = await asyncio.get_running_loop().run_in_executor(None, self.loader)
        except asyncio.CancelledError as exc:  # shutting down while loading
            self.load_error = exc
            self.loaded.set()
            raise
        except Exception as exc:  # reported through status and load_error, never lost
            self.load_error = exc
            if self.status == "loading":
                self.status = "failed"
            if isinstance(exc, MeLocalError):
                log.error("loading the models failed: %s", exc)
            else:
                log.exception("loading the models failed")
            self.loaded.set()
            return
        if self.status == "stopping":
            await asyncio.get_running_loop().run_in_executor(None, engine.close)
        else:
            self.engine = engine
            self.status = "ready"
            log.info("models loaded: %s", ", ".join(engine.config.ensembles))
        self.loaded.set()

    async def wait_loaded(self) -> None:
        await self.loaded.wait()

    def swap_engine(self, engine: Engine) -> Engine | None:
        """Serve new requests from ``engine``; the old one finishes its streams, then closes."""
        old, self.engine = self.engine, engine
        if self.status == "loading":
            self.status = "ready"
            self.loaded.set()
        if old is not None and old is not engine:
            self._retire(old)
        return old

    def _retire(self, engine: Engine) -> None:
        if any(s.engine is engine for s in self.streams):
            self._retired.add(engine)
        else:
            asyncio.get_running_loop().run_in_executor(None, _close_retired, engine)

    def require_engine(self) -> Engine:
        if self.status == "ready" and self.engine is not None:
            return self.engine
        headers = {"Retry-After": str(self.retry_after)}
        if self.status == "loading":
            raise ApiError(503, "me-local is loading its models; retry shortly", code="loading", headers=headers)
        if self.status == "stopping":
            raise ApiError(503, "me-local is shutting down", code="shutting_down", headers=headers)
        raise ApiError(503, f"me-local could not load its models: {self.load_error}", code="load_failed")

    # -- streams ------------------------------------------------------------------------
    def open_stream(self, request: Request, ensemble: str, note: AccessNote | None = None) -> EventStream:
        engine = self.require_engine()
        stream = EventStream(engine, request, ensemble=ensemble, on_finish=self._stream_finished,
                             on_token_gap=self._token_gap)
        if note is not None:
            note.prompt = prompt_text(request)
            self._notes[stream] = note
        self.streams.add(stream)
        return stream.start()

    def _token_gap(self, ensemble: str, seconds: float) -> None:
        self.metrics.token_latency.observe(seconds, ensemble=ensemble)

    def _stream_finished(self, stream: EventStream) -> None:
        self.streams.discard(stream)
        note = self._notes.pop(stream, None)
        if stream.done is not None:
            self.metrics.record_generation(stream.ensemble, stream.done.finish_reason, stream.done.stats,
                                           stream.cancel_reason)
            if note is not None:
                note.prompt_tokens = stream.done.stats.prompt_tokens
                note.completion_tokens = stream.done.stats.generated_tokens
        engine = stream.engine
        if engine in self._retired and not any(s.engine is engine for s in self.streams):
            self._retired.discard(engine)
            asyncio.get_running_loop().run_in_executor(None, _close_retired, engine)

    async def first_event(self, stream: EventStream) -> Any:
        """The first event of a stream, or the error response it turned into (before any header went out)."""
        try:
            ev = await stream.next()
        except MeLocalError as exc:
            raise from_exception(exc, retry_after=self.retry_after) from None
        if isinstance(ev, DoneEvent) and ev.finish_reason == "cancelled" and self.status == "stopping":
            raise ApiError(503, "me-local is shutting down", code="shutting_down",
                           headers={"Retry-After": str(self.retry_after)})
        return ev

    async def stop_streams(self, reason: str = "shutdown", timeout: float | None = None) -> None:
        """Stop accepting generations, cancel those in flight, and wait for their workers."""
        self.status = "stopping"
        streams = list(self.streams)
        for s in streams:
            s.cancel(reason)
        if streams:
            log.info("ending %d stream(s) in flight", len(streams))
            await asyncio.wait([asyncio.ensure_future(s.wait()) for s in streams],
                               timeout=self.shutdown_grace if timeout is None else timeout)

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            try:
                await self._load_task
            except BaseException:  # cancelled on purpose; its outcome is in load_error
                pass
        await self.stop_streams()
        loop = asyncio.get_running_loop()
        stuck = {s.engine for s in self.streams}
        if stuck:
            log.warning("%d generation(s) did not stop in time; leaving their models to the exit", len(self.streams))
        for engine in [self.engine, *self._retired]:
            if engine is not None and engine not in stuck:
                await loop.run_in_executor(None, engine.close)
        self.engine = None
        self._retired.clear()

    # -- figures --------------------------------------------------------------------------
    def ensemble_figures(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        if self.engine is None:
            return out
        for name, loaded in self.engine.loaded.items():
            out[name] = {"slots": loaded.config.parallel, "busy_slots": loaded.busy_slots,
                         "queued": loaded.waiting}
        return out


def _close_retired(engine: Engine) -> None:
    """Free an engine a reload replaced, then hand the freed heap back to the system: without
    it glibc keeps most of it in its arenas, and resident memory grows with every reload."""
    engine.close()
    trim_heap()


STATE: web.AppKey[ServerState] = web.AppKey("me_local_state", ServerState)
