"""What the routes share: :class:`ServerState` and the typed keys that reach it.

One ``ServerState`` per app (no module-level globals) owns the engine (loaded off the
loop at start-up, swappable for a reload), the streams in flight and the metrics.
The app (:mod:`.app`) and both APIs' routes (:mod:`.openai`, :mod:`.ollama`) import it
from here, so the app can import its routes without a cycle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from ..core import Cancelled, DoneEvent
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
T = TypeVar("T")


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
    if request.tokens is not None:
        return str(request.tokens)
    if request.fim is not None:  # fill in the middle: the gap marked where it is
        fim = request.fim
        extra = "".join(f"[{c.filename}]\n{c.text}" for c in fim.extra)
        return f"{extra}{fim.prefix}{fim.prompt}<|gap|>{fim.suffix}"
    return request.prompt or ""


class Job:
    """Blocking engine work other than a generation (scoring a text) on a thread of its own,
    with the cancel flag the engine checks: set when the client leaves or the server stops."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cancelled = threading.Event()
        self.finished = asyncio.Event()


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
        self.jobs: set[Job] = set()
        """Scoring work in flight (echo), each on its own thread."""
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

    def _in_use(self, engine: Engine) -> bool:
        return any(s.engine is engine for s in self.streams) or any(j.engine is engine for j in self.jobs)

    def _retire(self, engine: Engine) -> None:
        if self._in_use(engine):
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
        self._release(stream.engine)

    def _release(self, engine: Engine) -> None:
        if engine in self._retired and not self._in_use(engine):
            self._retired.discard(engine)
            asyncio.get_running_loop().run_in_executor(None, _close_retired, engine)

    # -- other engine work ------------------------------------------------------------------
    async def run_job(self, work: Callable[[Engine, Callable[[], bool]], T], name: str = "me-local-score") -> T:
        """Run ``work(engine, cancel)`` on a thread of its own (it may wait for a slot: never on
        the loop, nor in the loop's shared executor). A client that leaves (this coroutine
        cancelled) or a server that stops sets the cancel flag; the engine's errors become
        their HTTP answers, and a cancelled job while stopping is a 503."""
        engine = self.require_engine()
        job = Job(engine)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            job.finished.set()
            self.jobs.discard(job)
            self._release(engine)

        def run() -> None:
            try:
                result: tuple[bool, Any] = (True, work(engine, job.cancelled.is_set))
            except BaseException as exc:  # delivered to the handler, never lost
                if not isinstance(exc, (MeLocalError, Cancelled)):
                    log.exception("scoring failed")
                result = (False, exc)
            try:
                loop.call_soon_threadsafe(settle, *result)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

        self.jobs.add(job)
        threading.Thread(target=run, name=name, daemon=True).start()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancelled.set()  # the client left: the engine stops at its next check
            future.add_done_callback(_retrieved)  # its outcome (Cancelled, usually) has no reader now
            raise
        except Cancelled:
            raise ApiError(503, "me-local is shutting down", code="shutting_down",
                           headers={"Retry-After": str(self.retry_after)}) from None
        except MeLocalError as exc:
            raise from_exception(exc, retry_after=self.retry_after) from None

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
        jobs = list(self.jobs)
        for s in streams:
            s.cancel(reason)
        for j in jobs:
            j.cancelled.set()
        if streams or jobs:
            log.info("ending %d stream(s) in flight", len(streams) + len(jobs))
            waits = [asyncio.ensure_future(s.wait()) for s in streams]
            waits += [asyncio.ensure_future(j.finished.wait()) for j in jobs]
            await asyncio.wait(waits, timeout=self.shutdown_grace if timeout is None else timeout)

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            try:
                await self._load_task
            except BaseException:  # cancelled on purpose; its outcome is in load_error
                pass
        await self.stop_streams()
        loop = asyncio.get_running_loop()
        stuck = {s.engine for s in self.streams} | {j.engine for j in self.jobs}
        if stuck:
            log.warning("%d generation(s) did not stop in time; leaving their models to the exit",
                        len(self.streams) + len(self.jobs))
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


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _close_retired(engine: Engine) -> None:
    """Free an engine a reload replaced, then hand the freed heap back to the system: without
    it glibc keeps most of it in its arenas, and resident memory grows with every reload."""
    engine.close()
    trim_heap()


STATE: web.AppKey[ServerState] = web.AppKey("me_local_state", ServerState)
