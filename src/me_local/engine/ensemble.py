"""A loaded ensemble: its slots (a member context per member, created on first use, grown
when a request asks for a larger context), the line of requests waiting for one, how long it
stays loaded once idle (``keep_alive``), its vocabulary plan (shared: token by token;
different: word by word), and its members' embedding contexts (created on first use, apart
from the slots)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..backends.types import Embedder, EmbedderFactory, MemberContext, MemberFactory
from ..config import EnsembleConfig
from ..core import Cancelled, common_prefix
from ..errors import BackendError, ConfigError, QueueFullError, RequestError, VocabMismatchError
from .tools import ToolPlanner

CANCEL_POLL_S = 0.05
"""How often a request waiting for a slot checks whether it was cancelled."""


class Unloading(Exception):
    """The ensemble is being unloaded: load it again (the engine does) rather than use this one."""


class Slot:
    """One lane of an ensemble: a context per member, sharing the weights."""

    def __init__(self, index: int, members: list[MemberContext]) -> None:
        self.index = index
        self.members = members
        self.busy = False

    def cached_prefix(self, prompts: Sequence[Sequence[int]]) -> int:
        return max((common_prefix(m.cached, p) for m, p in zip(self.members, prompts) if p), default=0)

    def fits(self, contexts: Sequence[int] | None) -> bool:
        """Whether every member's context holds ``contexts[i]`` tokens already (None: any size)."""
        return contexts is None or all(m.n_ctx >= n for m, n in zip(self.members, contexts))

    def fit(self, contexts: Sequence[int] | None) -> None:
        """Grow the contexts smaller than ``contexts[i]`` (a new context: that member's cache is lost)."""
        if contexts is not None:
            for m, n in zip(self.members, contexts):
                if m.n_ctx < n:
                    m.resize(n)

    @property
    def memory_bytes(self) -> int:
        return sum(m.memory_bytes for m in self.members)

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

    Its life: it is unloaded (its contexts closed, its models released) ``keep_alive``
    seconds after it was last in use (None: never); work that is not a request but reads
    its members (tokenizing) holds it meanwhile (:meth:`hold`). Once it is being unloaded
    (:meth:`retire`) it admits nothing (:class:`Unloading`): the engine loads it anew, while
    the requests it admitted before finish here.
    """

    def __init__(self, config: EnsembleConfig, factory: MemberFactory) -> None:
        self.config = config
        self._factory = factory
        self.keep_alive: float | None = None
        """Seconds it stays loaded once idle (None: for ever); set by each request."""
        self.on_idle: Callable[[], None] | None = None
        """Called (outside its lock) when it falls idle with a keep_alive, or its keep_alive changes."""
        self._idle_since: float | None = None
        self._users = 0
        """Holds by work that is not a request (:meth:`hold`)."""
        self._closing = False
        self._slots: list[Slot] = []
        self._cond = threading.Condition()
        self._line: deque[Ticket] = deque()
        """Requests admitted without a slot yet (being tokenized, or waiting), in arrival order."""
        self._holding = 0
        """Requests holding a slot or opening one."""
        self._opening = 0
        self._open_lock = threading.Lock()
        """Slots are opened one at a time, outside ``_cond`` (a context takes a while to create)."""
        self._embedders: dict[int, Embedder] = {}
        self._embedder_locks: dict[int, threading.Lock] = {}
        self._embed_lock = threading.Lock()
        """Embedding contexts are made one at a time."""
        # the first slot is built now: it loads the models and checks the vocabulary
        self._slots.append(self._new_slot(0))
        try:
            self.vocabulary = plan_vocabulary(config, self._slots[0].members)
            check_ensemble_bias(config, self._slots[0].members, self.vocabulary)
            self.tools = ToolPlanner(self._slots[0].members)
            """The members' tool-call format and whether they can carry tools (engine/tools.py)."""
        except BaseException:
            self.close()  # not yet in the engine's table: nobody else would free it
            raise
        self._members = self._slots[0].members
        self.base_n_ctx = [m.n_ctx for m in self._members]
        """Each member's context as loaded: what a request gets unless it asks for another size."""
        self.n_ctx_train = [m.model.n_ctx_train for m in self._members]
        """Each member's model's trained context (0: unknown): the most a request may give it."""
        self._idle_since = time.monotonic()  # loaded: idle from now

    def _new_slot(self, index: int) -> Slot:
        members: list[MemberContext] = []
        try:
            for mc in self.config.members:
                members.append(self._factory(mc, self.config))
        except BaseException:
            for m in members:
                m.close()
            raise
        return Slot(index, members)

    @property
    def members(self) -> list[MemberContext]:
        """Slot 0's members (for tokenizing and model facts; closed once it is unloaded)."""
        return self._members

    @property
    def busy(self) -> bool:
        """Requests are in line or hold a slot, or other work holds it."""
        return bool(self._holding or self._line or self._opening or self._users)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def context_length(self) -> int:
        """The largest context a member of it holds now."""
        return max((m.n_ctx for s in list(self._slots) for m in s.members), default=0)

    @property
    def memory_bytes(self) -> int:
        """Its weights (each model once, though other ensembles may share them), every slot's contexts and
        its embedding contexts."""
        return self._memory(lambda m: 1.0)

    @property
    def gpu_bytes(self) -> int:
        """The part of :attr:`memory_bytes` on a GPU (the offloaded layers' share)."""
        return self._memory(lambda m: m.model.offloaded)

    def _memory(self, share: Callable[[MemberContext], float]) -> int:
        models = {id(m.model): m.model.weights_bytes * share(m) for m in self._members}
        contexts = sum(m.memory_bytes * share(m) for s in list(self._slots) for m in s.members)
        embedding = sum(e.memory_bytes * share(self._members[i]) for i, e in list(self._embedders.items()))
        return int(sum(models.values()) + contexts + embedding)

    # -- its life ----------------------------------------------------------------
    def set_keep_alive(self, seconds: float | None) -> None:
        """How long it stays loaded once idle: None for ever, 0 unloaded as soon as it is idle."""
        with self._cond:
            changed = seconds != self.keep_alive
            self.keep_alive = seconds
        if changed:
            self._idle()

    def deadline(self) -> float | None:
        """When (time.monotonic) it is to be unloaded; None: not now (in use, or kept for ever)."""
        with self._cond:
            if self.busy or self._closing or self.keep_alive is None or self._idle_since is None:
                return None
            return self._idle_since + self.keep_alive

    def expires_in(self) -> float | None:
        """Seconds until it is unloaded (in use: its keep_alive, which counts from its last use);
        None: never."""
        with self._cond:
            if self.keep_alive is None:
                return None
            if self.busy or self._idle_since is None:
                return self.keep_alive
            return max(0.0, self._idle_since + self.keep_alive - time.monotonic())

    def expire(self, now: float) -> bool:
        """Begin unloading it if it is idle and its time has come (then it admits nothing more)."""
        with self._cond:
            if self.busy or self._closing or self.keep_alive is None or self._idle_since is None:
                return False
            if self._idle_since + self.keep_alive > now:
                return False
            self._closing = True
            return True

    def retire(self) -> None:
        """Admit nothing more, wait until the requests it admitted have left (and holds ended),
        then close it."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self.busy:
                self._cond.wait()
        self.close()

    def hold(self) -> None:
        """Keep it loaded while work that is not a request reads its members (until :meth:`release`)."""
        with self._cond:
            if self._closing:
                raise Unloading
            self._users += 1
            self._idle_since = None

    def release(self) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()
            idle = self._went_idle()
        if idle:
            self._idle()

    def _went_idle(self) -> bool:
        """Under ``_cond``: note when it fell idle; whether anyone should hear of it."""
        if self.busy:
            return False
        self._idle_since = time.monotonic()
        return self.keep_alive is not None

    def _idle(self) -> None:
        if self.on_idle is not None:
            self.on_idle()

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
            if self._closing:
                raise Unloading
            if self._holding + len(self._line) >= self.config.parallel + limit:
                raise QueueFullError(
                    f"ensemble {self.config.name!r} is busy ({self.config.parallel} slots, "
                    f"{len(self._line)} waiting); retry shortly"
                )
            ticket = Ticket()
            self._line.append(ticket)
            self._idle_since = None
            return ticket

    def acquire(self, ticket: Ticket, prompts: Sequence[Sequence[int]], timeout: float | None = None,
                cancel: Callable[[], bool] | None = None, contexts: Sequence[int] | None = None) -> Slot | None:
        """Wait for a slot, first come, first served: only the head of the line takes a
        free slot, the one sharing the longest prefix with its prompts among those whose
        contexts hold ``contexts[i]`` tokens already (a new one, up to ``parallel``, when
        none shares a prefix). Returns None when ``cancel`` fires while waiting (the client
        left); raises QueueFullError when ``timeout`` passes. A request that leaves the line
        wakes the ones behind it. The slot's contexts may still be smaller than ``contexts``:
        :meth:`Slot.fit` grows them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            try:
                while True:
                    if self._line[0] is ticket:
                        slot = self._free_slot(prompts, contexts)
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

    def _free_slot(self, prompts: Sequence[Sequence[int]], contexts: Sequence[int] | None = None) -> Slot | None:
        """The free slot with the longest cached prefix, among those large enough for
        ``contexts`` first (growing a context loses its cache); None when there is none, or
        when none shares a prefix and a new slot may still be opened (an empty slot is
        as good and keeps the warm caches for others)."""
        free = [s for s in self._slots if not s.busy]
        if not free:
            return None

        def reuse(s: Slot) -> int:
            return s.cached_prefix(prompts) if s.fits(contexts) else 0

        best = max(free, key=lambda s: (reuse(s), s.fits(contexts)))
        if reuse(best) > 0 or len(self._slots) + self._opening >= self.config.parallel:
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
            idle = self._went_idle()
        if idle:
            self._idle()

    def embedder(self, index: int) -> tuple[Embedder, float]:
        """Member ``index``'s embedding context, made on first use (a llama context of its own over the
        member's weights: generation slots are never touched), and the seconds making it took now."""
        with self._embed_lock:
            found = self._embedders.get(index)
            if found is not None:
                return found, 0.0
            if not isinstance(self._factory, EmbedderFactory):
                raise BackendError(f"the members of ensemble {self.config.name!r} come from a backend that makes "
                                   "no embeddings")
            t0 = time.perf_counter()
            made = self._factory.embedder(self.config.members[index], self.config)
            self._embedders[index] = made
            self._embedder_locks[index] = threading.Lock()
            return made, time.perf_counter() - t0

    @contextlib.contextmanager
    def using_embedder(self, index: int, cancel: Callable[[], bool] | None = None) -> Iterator[Embedder]:
        """Member ``index``'s embedding context (made already, by :meth:`embedder`), held for one
        request at a time; ``cancel`` firing while another holds it raises Cancelled."""
        embedder, _ = self.embedder(index)
        lock = self._embedder_locks[index]
        while not lock.acquire(timeout=CANCEL_POLL_S):
            if cancel is not None and cancel():
                raise Cancelled
        try:
            yield embedder
        finally:
            lock.release()

    @property
    def embedders(self) -> dict[int, Embedder]:
        """The embedding contexts made so far, by member index."""
        return dict(self._embedders)

    def close(self) -> None:
        """Close every slot's contexts (giving back their models). Its members stay readable for
        the facts that live in Python (pieces, vocabulary texts); tokenizing with them fails."""
        for s in self._slots:
            s.close()
        self._slots.clear()
        with self._embed_lock:
            for e in self._embedders.values():
                e.close()
            self._embedders.clear()


@dataclass(frozen=True)
class VocabularyPlan:
    """Whether an ensemble's members share one vocabulary, and so the granularity ``me``
    works at unless a request asks for another."""

    shared: bool
    granularity: str
    reason: str
    """Why that granularity, in a few words (`me-local models`, /api/show)."""
    mismatch: str = ""
    """Where the first two vocabularies differ (empty when shared)."""

    def check(self, mode: str, granularity: str | None) -> str:
        """The granularity a request runs at, or a RequestError saying why it cannot."""
        if granularity is not None and mode != "me":
            raise RequestError(
                f"granularity is what mode me draws a member for; mode {mode} has none: drop the granularity "
                "or use mode me", param="ensemble.granularity")
        if self.shared or mode == "single":
            return "token" if mode != "me" else granularity or self.granularity
        if mode == "ce":
            raise RequestError(
                f"mode ce needs members that share a vocabulary ({self.mismatch}): it mixes their next-token "
                "distributions; use mode me, which mixes words across vocabularies", param="ensemble.mode")
        if granularity == "token":
            raise RequestError(
                f"granularity token needs members that share a vocabulary ({self.mismatch}); use granularity "
                "word", param="ensemble.granularity")
        return "word"


def plan_vocabulary(config: EnsembleConfig, members: Sequence[MemberContext]) -> VocabularyPlan:
    """Compare the members' vocabularies: shared, the ensemble works token by token unless its
    models.yaml says ``granularity: word``; different, it works word by word, and asking for
    ``granularity: token`` or ``mode: ce`` in models.yaml is refused with the reason."""
    first = members[0]
    mismatch = ""
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
        mismatch = (f"members {first.name!r} ({a.path.name}) and {other.name!r} ({b.path.name}) do not share a "
                    f"vocabulary: {detail}")
        break
    if not mismatch:
        if config.granularity == "word":
            return VocabularyPlan(True, "word", "word (models.yaml), though the members share a vocabulary")
        return VocabularyPlan(True, "token", "token: the members share a vocabulary")
    key = f"ensembles.{config.name}"
    if config.granularity == "token":
        raise VocabMismatchError(f"{mismatch}; granularity token needs one shared vocabulary: set granularity: "
                                 "word (or leave it out) to ensemble them word by word",
                                 file=config.file, key=f"{key}.granularity")
    if config.mode == "ce":
        raise VocabMismatchError(f"{mismatch}; mode ce mixes next-token distributions and needs one shared "
                                 "vocabulary: use mode me, which mixes words", file=config.file, key=f"{key}.mode")
    return VocabularyPlan(False, "word", "word: the members' vocabularies differ", mismatch)


def check_ensemble_bias(config: EnsembleConfig, members: Sequence[MemberContext], plan: VocabularyPlan) -> None:
    """models.yaml's ``sampling.logit_bias`` names token ids of one vocabulary: the members must
    share it, and every id must be in it."""
    bias = config.sampling.logit_bias
    if not bias:
        return
    key = f"ensembles.{config.name}.sampling.logit_bias"
    if not plan.shared:
        raise VocabMismatchError(f"{plan.mismatch}; logit_bias names token ids, which mean different tokens to "
                                 "them: remove it", file=config.file, key=key)
    n_vocab = members[0].n_vocab
    bad = [t for t, _ in bias if t >= n_vocab]
    if bad:
        raise ConfigError(f"names token {bad[0]}, which is not in the vocabulary (0..{n_vocab - 1})",
                          file=config.file, key=key)
