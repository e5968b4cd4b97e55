"""The engine: the one object both ``me-local chat`` (in-process) and
``me-local serve`` drive.

It loads ensembles (sharing weights through the backend's ModelStore),
checks that members share a vocabulary, keeps ``parallel`` slots per ensemble
(each with its own context per member, created on first use), serves waiting
requests in arrival order, gives each the free slot with the longest cached
prefix, and runs the pure core's
generation loop. Work runs on the caller's thread (``generate``) or on a worker
thread (``start``), with a cancel flag checked between decode calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .config import Config, EnsembleConfig
from .core import DoneEvent, Event, GenerationStats, MemberStats, SamplingParams, common_prefix, generate
from .core.ensemble import check_fits
from .errors import ConfigError, MeLocalError, QueueFullError, RequestError, VocabMismatchError

log = logging.getLogger("me_local.engine")

ROLES = ("system", "user", "assistant", "tool", "developer")
CANCEL_POLL_S = 0.05
"""How often a request waiting for a slot checks whether it was cancelled."""


@dataclass
class Request:
    """One generation. Exactly one of ``messages`` (chat) and ``prompt`` (raw text) is set."""

    ensemble: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: str | None = None
    weights: Mapping[str, float] | None = None
    member: str | None = None


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Validate chat messages; content may be a string or OpenAI-style text parts."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with `role` and `content`", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", param="messages"
            )
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise RequestError(
                        f"messages[{i}].content: only text parts are supported", param="messages"
                    )
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class Slot:
    """One lane of an ensemble: a context per member, sharing the weights."""

    def __init__(self, index: int, members: list[Any]) -> None:
        self.index = index
        self.members = members
        self.busy = False

    def cached_prefix(self, prompts: Sequence[Sequence[int]]) -> int:
        return max((common_prefix(m.cached, p) for m, p in zip(self.members, prompts) if p), default=0)

    def close(self) -> None:
        for m in self.members:
            m.close()


class Ticket:
    """One request's place in an ensemble, from its admission (before its prompt is
    tokenized) until it leaves: with its slot, or without one (refused, failed, cancelled)."""

    __slots__ = ("left", "slot")

    def __init__(self) -> None:
        self.slot: Slot | None = None
        self.left = False


class LoadedEnsemble:
    """An ensemble's slots and its line of waiting requests.

    A request joins the line when it is admitted (:meth:`admit`, before its prompt is
    tokenized); past ``parallel`` running and ``max_queue`` in line it is refused at
    once. The line is served in arrival order: only its head may take a slot
    (:meth:`acquire`). A request leaves with :meth:`leave`, which frees its slot.
    """

    def __init__(self, config: EnsembleConfig, factory: MemberFactory) -> None:
        self.config = config
        self._factory = factory
        self._slots: list[Slot] = []
        self._cond = threading.Condition()
        self._line: deque[Ticket] = deque()
        """Requests admitted without a slot yet (being tokenized, or waiting), in arrival order."""
        self._holding = 0
        """Requests holding a slot or opening one."""
        self._opening = 0
        self._open_lock = threading.Lock()
        """Slots are opened one at a time, outside ``_cond`` (a context takes a while to create)."""
        # the first slot is built now: it loads the models and checks the vocabulary
        self._slots.append(self._new_slot(0))
        try:
            check_vocabularies(config, self._slots[0].members)
        except BaseException:
            self.close()  # not yet in the engine's table: nobody else would free it
            raise

    def _new_slot(self, index: int) -> Slot:
        members = []
        try:
            for mc in self.config.members:
                members.append(self._factory(mc, self.config))
        except BaseException:
            for m in members:
                m.close()
            raise
        return Slot(index, members)

    @property
    def members(self) -> list[Any]:
        """Slot 0's members (for tokenizing and model facts)."""
        return self._slots[0].members

    @property
    def busy_slots(self) -> int:
        return sum(s.busy for s in self._slots)

    @property
    def waiting(self) -> int:
        """Requests admitted that have no slot yet: being tokenized, or waiting for a slot."""
        return len(self._line)

    def admit(self, max_queue: int | None = None) -> Ticket:
        """Put a request in line before any work is done for it; refuse it (QueueFullError)
        when ``parallel`` requests run and ``max_queue`` wait already."""
        limit = self.config.max_queue if max_queue is None else max_queue
        with self._cond:
            if self._holding + len(self._line) >= self.config.parallel + limit:
                raise QueueFullError(
                    f"ensemble {self.config.name!r} is busy ({self.config.parallel} slots, "
                    f"{len(self._line)} waiting); retry shortly"
                )
            ticket = Ticket()
            self._line.append(ticket)
            return ticket

    def acquire(self, ticket: Ticket, prompts: Sequence[Sequence[int]], timeout: float | None = None,
                cancel: Callable[[], bool] | None = None) -> Slot | None:
        """Wait for a slot, first come, first served: only the head of the line takes a
        free slot, the one sharing the longest prefix with its prompts (a new one, up to
        ``parallel``, when none shares a prefix). Returns None when ``cancel`` fires
        while waiting (the client left); raises QueueFullError when ``timeout`` passes.
        A request that leaves the line wakes the ones behind it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            try:
                while True:
                    if self._line[0] is ticket:
                        slot = self._free_slot(prompts)
                        if slot is not None:
                            self._line.popleft()
                            self._cond.notify_all()  # the next in line may find a free slot too
                            slot.busy = True
                            ticket.slot = slot
                            self._holding += 1
                            return slot
                        if len(self._slots) + self._opening < self.config.parallel:
                            self._line.popleft()
                            self._cond.notify_all()
                            self._opening += 1
                            self._holding += 1
                            break  # open a slot, outside the lock
                    if cancel is not None and cancel():
                        return None
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise QueueFullError(f"ensemble {self.config.name!r} stayed busy; retry shortly")
                    # wait in short slices so a cancelled waiter leaves the line promptly
                    slice_s = CANCEL_POLL_S if cancel is not None else None
                    if remaining is not None:
                        slice_s = remaining if slice_s is None else min(slice_s, remaining)
                    self._cond.wait(slice_s)
            finally:
                self._step_out(ticket)  # cancelled, timed out or failed: make way at once
        return self._open_slot(ticket)

    def _step_out(self, ticket: Ticket) -> None:
        if ticket.slot is None and ticket in self._line:
            self._line.remove(ticket)
            self._cond.notify_all()

    def _free_slot(self, prompts: Sequence[Sequence[int]]) -> Slot | None:
        """The free slot with the longest cached prefix; None when there is none, or
        when none shares a prefix and a new slot may still be opened (an empty slot is
        as good and keeps the warm caches for others)."""
        free = [s for s in self._slots if not s.busy]
        if not free:
            return None
        best = max(free, key=lambda s: s.cached_prefix(prompts))
        if best.cached_prefix(prompts) > 0 or len(self._slots) + self._opening >= self.config.parallel:
            return best
        return None

    def _open_slot(self, ticket: Ticket) -> Slot:
        try:
            with self._open_lock:
                slot = self._new_slot(len(self._slots))
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._holding -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._opening -= 1
            slot.index = len(self._slots)
            self._slots.append(slot)
            slot.busy = True
            ticket.slot = slot
        return slot

    def leave(self, ticket: Ticket) -> None:
        """The request is done: out of the line, or its slot (if it got one) is free.
        Idempotent."""
        with self._cond:
            if ticket.left:
                return
            ticket.left = True
            self._step_out(ticket)
            if ticket.slot is not None:
                ticket.slot.busy = False
                ticket.slot = None
                self._holding -= 1
            self._cond.notify_all()

    def close(self) -> None:
        for s in self._slots:
            s.close()
        self._slots.clear()


MemberFactory = Callable[[Any, EnsembleConfig], Any]


def check_vocabularies(config: EnsembleConfig, members: Sequence[Any]) -> None:
    first = members[0]
    for other in members[1:]:
        if other.model.fingerprint == first.model.fingerprint:
            continue
        a, b = first.model, other.model
        diff = next((i for i in range(min(a.n_vocab, b.n_vocab)) if a.token_texts[i] != b.token_texts[i]), None)
        if a.n_vocab != b.n_vocab:
            detail = f"{a.n_vocab} vs {b.n_vocab} tokens"
        elif diff is not None:
            detail = f"token {diff} is {a.token_texts[diff]!r} vs {b.token_texts[diff]!r}"
        elif (a.bos, a.eos) != (b.bos, b.eos):
            detail = f"same tokens, but BOS/EOS ids {a.bos}/{a.eos} vs {b.bos}/{b.eos}"
        else:
            detail = "same tokens, but a different tokenizer type"
        raise VocabMismatchError(
            f"members {first.name!r} ({a.path.name}) and {other.name!r} ({b.path.name}) do not share a "
            f"vocabulary ({detail}); ensemble only models with the same tokenizer",
            file=config.file,
            key=f"ensembles.{config.name}.members",
        )


def llama_member_factory(store: Any = None) -> MemberFactory:
    """Members backed by llama.cpp, sharing loaded weights through one ModelStore."""
    from .backends.llama import ContextSettings, LlamaMember, LoadSettings, ModelStore

    store = ModelStore() if store is None else store

    def make(mc: Any, ens: EnsembleConfig) -> Any:
        load = LoadSettings.resolve(mc.repack, mmap=mc.mmap, n_gpu_layers=mc.n_gpu_layers)
        model = store.acquire(mc.resolve_path(), load)
        try:
            settings = ContextSettings(n_ctx=ens.n_ctx, n_batch=ens.n_batch, n_threads=mc.n_threads,
                                       kv_cache_type=ens.kv_cache_type)
            member = LlamaMember(mc.name, model, settings, system=mc.system, gate=store.gate)
        except ConfigError as exc:
            store.release(model)
            if exc.file:
                raise
            raise ConfigError(exc.message, file=ens.file, key=f"ensembles.{ens.name}.kv_cache_type") from None
        except BaseException:
            store.release(model)
            raise
        close = member.close

        def close_and_release() -> None:
            close()
            store.release(model)

        member.close = close_and_release  # type: ignore[method-assign]
        return member

    make.store = store  # type: ignore[attr-defined]
    return make


class Engine:
    def __init__(self, config: Config, factory: MemberFactory | None = None) -> None:
        self.config = config
        self._factory = factory or llama_member_factory()
        self._loaded: dict[str, LoadedEnsemble] = {}
        self._lock = threading.Lock()

    # -- loading -----------------------------------------------------------------
    def ensemble(self, name: str | None = None) -> LoadedEnsemble:
        cfg = self.config.get(name)
        with self._lock:
            loaded = self._loaded.get(cfg.name)
            if loaded is None:
                loaded = self._loaded[cfg.name] = LoadedEnsemble(cfg, self._factory)
            return loaded

    def load_all(self) -> None:
        for name in self.config.ensembles:
            self.ensemble(name)

    @property
    def loaded(self) -> dict[str, LoadedEnsemble]:
        return dict(self._loaded)

    def close(self) -> None:
        with self._lock:
            for e in self._loaded.values():
                e.close()
            self._loaded.clear()

    # -- requests ----------------------------------------------------------------
    def plan(self, request: Request) -> tuple[LoadedEnsemble, str, int, list[float], list[list[int]]]:
        """Resolve a request: ensemble, mode, single-member index, weights, per-member prompts."""
        loaded = self.ensemble(request.ensemble)
        return (loaded, *self._plan(loaded, request))

    def _plan(self, loaded: LoadedEnsemble, request: Request) -> tuple[str, int, list[float], list[list[int]]]:
        cfg = loaded.config
        if request.weights:
            try:
                cfg = cfg.with_weights(request.weights)
            except ConfigError as exc:
                raise RequestError(str(exc), param="weights") from None
        mode = request.mode or cfg.mode
        if mode not in ("me", "ce", "single"):
            raise RequestError(f"unknown mode {mode!r}; choose one of me, ce, single", param="mode")
        single = 0
        if request.member is not None or mode == "single":
            name = request.member or cfg.member or cfg.members[0].name
            single = cfg.member_names.index(cfg.get_member(name).name)
            if request.member is not None and request.mode is None:
                mode = "single"
        weights = [m.weight for m in cfg.members]
        active = [single] if mode == "single" else [i for i, w in enumerate(weights) if w > 0]
        if (request.messages is None) == (request.prompt is None):
            raise RequestError("give either chat messages or a raw prompt", param="messages")
        members = loaded.members
        prompts: list[list[int]] = [[] for _ in members]
        cache: dict[tuple[int, str | None], list[int]] = {}
        for i in active:
            m = members[i]
            key = (id(m.model), m.system)
            if key not in cache:
                if request.messages is not None:
                    cache[key] = m.chat_prompt(normalize_messages(request.messages))
                else:
                    cache[key] = m.raw_prompt(request.prompt or "")
            prompts[i] = cache[key]
        check_fits([prompts[i] for i in active], [members[i] for i in active])
        return mode, single, weights, prompts

    def generate(
        self,
        request: Request,
        cancel: Callable[[], bool] | None = None,
        *,
        queue_timeout: float | None = None,
    ) -> Iterator[Event]:
        """Run one request on the calling thread, yielding core events.

        The request counts against the ensemble's queue from here, before its prompt
        is tokenized, so a flood beyond ``parallel + max_queue`` is refused at once
        (QueueFullError) rather than tokenized."""
        loaded = self.ensemble(request.ensemble)
        ticket = loaded.admit()
        try:
            mode, single, weights, prompts = self._plan(loaded, request)
            slot = loaded.acquire(ticket, prompts, timeout=queue_timeout, cancel=cancel)
            if slot is None:  # cancelled while queued: nothing was evaluated
                stats = GenerationStats(mode=mode, seed=request.params.seed or 0,
                                        members=[MemberStats(name=m.name) for m in loaded.members])
                yield DoneEvent("cancelled", stats)
                return
            yield from generate(
                slot.members,
                weights,
                prompts,
                request.params,
                mode=mode,
                single=single,
                cancel=cancel or (lambda: False),
            )
        finally:
            loaded.leave(ticket)

    def start(
        self,
        request: Request,
        on_event: Callable[[Event | BaseException], None],
        *,
        on_finish: Callable[[], None] | None = None,
        name: str = "me-local-generate",
    ) -> Run:
        """Run a request on a worker thread; events (or the error) go to on_event.
        ``on_finish`` runs on that thread once it has left the engine (its slot is free)."""
        run = Run()

        def work() -> None:
            try:
                for ev in self.generate(request, cancel=run.cancelled.is_set):
                    on_event(ev)
            except BaseException as exc:  # delivered to the caller, never lost
                if not isinstance(exc, MeLocalError):
                    log.exception("generation failed")
                on_event(exc)
            finally:
                run.finished.set()
                if on_finish is not None:
                    on_finish()

        run.thread = threading.Thread(target=work, name=name, daemon=True)
        run.thread.start()
        return run


class Run:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.thread: threading.Thread | None = None

    def cancel(self) -> None:
        self.cancelled.set()


def collect(events: Iterator[Event]) -> tuple[str, DoneEvent]:
    """Run a generation to its end: (text, done event)."""
    parts = []
    for ev in events:
        if isinstance(ev, DoneEvent):
            parts.append(ev.text)
            return "".join(parts), ev
        parts.append(ev.text)
    raise RuntimeError("generation ended without a done event")


def sampling_params(defaults: Any, **overrides: Any) -> SamplingParams:
    """SamplingParams from an ensemble's defaults and the non-None overrides."""
    base = SamplingParams(
        temperature=defaults.temperature,
        top_k=defaults.top_k,
        top_p=defaults.top_p,
        min_p=defaults.min_p,
        max_tokens=defaults.max_tokens,
    )
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
