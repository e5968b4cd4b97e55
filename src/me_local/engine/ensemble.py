"""A loaded ensemble: its slots (a member context per member, created on first use),
the line of requests waiting for one, its vocabulary plan (shared: token by token;
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


class Slot:
    """One lane of an ensemble: a context per member, sharing the weights."""

    def __init__(self, index: int, members: list[MemberContext]) -> None:
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
