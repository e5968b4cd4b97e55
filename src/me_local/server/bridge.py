"""From the engine's worker thread to the event loop.

:class:`EventStream` runs one request on its own worker thread (llama.cpp work
never runs on the loop) and hands each event to the loop with
``loop.call_soon_threadsafe``; the handler reads them with ``await stream.next()``.
Cancelling (client gone, server stopping) sets the flag the engine checks before
every token and between prefill chunks; the worker then ends with a
``DoneEvent(finish_reason="cancelled")``. ``finished`` is set only once the
worker has left the engine, so the slot is free again by then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..core import DoneEvent, Event, TokenEvent
from ..engine import Engine, LoadedEnsemble, Request, Run

log = logging.getLogger("me_local.server")

Item = Event | BaseException


class _Finished:
    """Sent after the worker has left the engine (its slot released)."""


_FINISHED = _Finished()


class EventStream:
    """The events of one generation, delivered on the event loop."""

    def __init__(
        self,
        engine: Engine,
        request: Request,
        *,
        ensemble: str,
        on_finish: Callable[[EventStream], None] | None = None,
        on_token_gap: Callable[[str, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.request = request
        self.ensemble = ensemble
        self.loop = asyncio.get_running_loop()
        self.done: DoneEvent | None = None
        self.error: BaseException | None = None
        self.cancel_reason: str | None = None
        self.finished = asyncio.Event()
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._on_finish = on_finish
        self._on_token_gap = on_token_gap
        self._last_token_at: float | None = None
        self.run: Run | None = None

    @property
    def loaded(self) -> LoadedEnsemble:
        """The loaded ensemble that admitted the request (known once its first event came)."""
        loaded = self.run.loaded if self.run is not None else None
        return loaded if loaded is not None else self.engine.ensemble(self.ensemble)

    def start(self) -> EventStream:
        self.run = self.engine.start(self.request, self._post, on_finish=lambda: self._post(_FINISHED),
                                     name=f"me-local-{self.ensemble}")
        return self

    # -- worker thread side ---------------------------------------------------------
    def _post(self, item: Item | _Finished) -> None:
        stamp = time.perf_counter()
        try:
            self.loop.call_soon_threadsafe(self._deliver, item, stamp)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    # -- loop side --------------------------------------------------------------------
    def _deliver(self, item: Item | _Finished, stamp: float) -> None:
        if isinstance(item, _Finished):
            self.finished.set()
            if self._on_finish is not None:
                try:
                    self._on_finish(self)
                except Exception:  # bookkeeping must never break delivery
                    log.exception("finishing a stream failed")
            return
        if isinstance(item, TokenEvent):
            if self._last_token_at is not None and self._on_token_gap is not None:
                self._on_token_gap(self.ensemble, stamp - self._last_token_at)
            self._last_token_at = stamp
        elif isinstance(item, DoneEvent):
            self.done = item
        else:
            self.error = item
        self._queue.put_nowait(item)

    async def next(self) -> Event:
        """The next event; re-raises the worker's exception (a MeLocalError, usually)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def ended(self) -> bool:
        """The generation has produced its last event (done or error)."""
        return self.done is not None or self.error is not None

    def cancel(self, reason: str) -> None:
        """Stop the generation (idempotent; the first reason is the one counted)."""
        if self.ended:
            return
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.run is not None:
            self.run.cancel()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the worker has left the engine; False on timeout."""
        try:
            await asyncio.wait_for(self.finished.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def __repr__(self) -> str:
        state = "finished" if self.finished.is_set() else "running"
        return f"<EventStream {self.ensemble} {state} cancel={self.cancel_reason}>"
