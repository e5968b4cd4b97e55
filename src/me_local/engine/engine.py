"""The :class:`Engine`: requests planned (ensemble, mode, per-member prompts), queued for a
slot and run through the core's generation loop, on the caller's thread (``generate``) or
on a worker thread (``start``), with a cancel flag checked between decode calls."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypedDict

from ..backends.types import MemberContext, MemberFactory
from ..config import Config, SamplingDefaults
from ..core import Cancelled, DoneEvent, Event, GenerationStats, GrammarSpec, MemberStats, SamplingParams, generate
from ..core.ensemble import check_fits
from ..core.grammar import token_literals
from ..core.likelihood import TextLikelihood
from ..errors import ConfigError, MeLocalError, RequestError
from ..settings import GRANULARITIES, MODES, SAMPLING_DEFAULTS
from .ensemble import LoadedEnsemble
from .factory import llama_member_factory
from .messages import normalize_messages
from .scoring import ScoreRequest, plan_score, run_score

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("me_local.engine")


@dataclass
class Request:
    """One generation. Exactly one of ``messages`` (chat), ``prompt`` (raw text) and ``tokens``
    (a raw prompt as token ids, for members that share one vocabulary) is set."""

    ensemble: str | None = None
    messages: list[dict[str, Any]] | None = None
    """As the client sent them (JSON): checked by :func:`normalize_messages` when planned."""
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: str | None = None
    weights: Mapping[str, float] | None = None
    member: str | None = None
    granularity: str | None = None
    """token | word (None: the ensemble's)."""
    tokens: list[int] | None = None
    """A raw prompt as token ids, taken as they are (no BOS added)."""
    grammar: GrammarSpec | None = None
    """Constrain the output to a grammar (docs/grammar.md); an empty ``gbnf`` is no grammar."""


@dataclass(frozen=True)
class Plan:
    """How a request runs on its ensemble."""

    mode: str
    single: int
    """The member ``single`` mode runs."""
    weights: list[float]
    prompts: list[list[int]]
    """Each member's own prompt tokens (empty for a member that does not run)."""
    granularity: str
    """token | word."""
    grammar: GrammarSpec | None = None
    """The request's grammar, checked (None: none, or an empty one)."""


class Engine:
    def __init__(self, config: Config, factory: MemberFactory | None = None) -> None:
        self.config = config
        self._factory: MemberFactory = llama_member_factory() if factory is None else factory
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
        """Resolve a request: ensemble, mode, single-member index, weights, per-member prompts
        (:meth:`plan_request` has its granularity too)."""
        loaded, p = self.plan_request(request)
        return loaded, p.mode, p.single, p.weights, p.prompts

    def plan_request(self, request: Request) -> tuple[LoadedEnsemble, Plan]:
        """Resolve a request: its ensemble, and how it runs there."""
        loaded = self.ensemble(request.ensemble)
        return loaded, self._plan(loaded, request)

    def _plan(self, loaded: LoadedEnsemble, request: Request) -> Plan:
        cfg = loaded.config
        if request.weights:
            try:
                cfg = cfg.with_weights(request.weights)
            except ConfigError as exc:
                raise RequestError(str(exc), param="weights") from None
        mode = request.mode or cfg.mode
        if mode not in MODES:
            raise RequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", param="mode")
        if request.granularity is not None and request.granularity not in GRANULARITIES:
            raise RequestError(f"unknown granularity {request.granularity!r}; choose one of "
                               f"{', '.join(GRANULARITIES)}", param="granularity")
        single = 0
        if request.member is not None or mode == "single":
            name = request.member or cfg.member or cfg.members[0].name
            single = cfg.member_names.index(cfg.get_member(name).name)
            if request.member is not None and request.mode is None:
                mode = "single"
        weights = [m.weight for m in cfg.members]
        active = [single] if mode == "single" else [i for i, w in enumerate(weights) if w > 0]
        if sum(x is not None for x in (request.messages, request.prompt, request.tokens)) != 1:
            raise RequestError("give either chat messages or a raw prompt", param="messages")
        messages = normalize_messages(request.messages) if request.messages is not None else None
        members = loaded.members
        prompts: list[list[int]] = [[] for _ in members]
        cache: dict[tuple[int, str | None, str | None], list[int]] = {}
        for i in active:
            m = members[i]
            key = (id(m.model), m.system, m.chat_template)  # members differing in either get their own prompt
            if key not in cache:
                if messages is not None:
                    cache[key] = m.chat_prompt(messages)
                elif request.tokens is not None:
                    cache[key] = prompt_ids(loaded, active, request.tokens)
                else:
                    cache[key] = m.raw_prompt(request.prompt or "")
            prompts[i] = cache[key]
        granularity = loaded.vocabulary.check(mode, request.granularity)
        check_fits([prompts[i] for i in active], [members[i] for i in active])
        grammar = request.grammar if request.grammar is not None and request.grammar.gbnf.strip() else None
        if grammar is not None:
            check_grammar(grammar, [members[i] for i in active], granularity)
        return Plan(mode, single, weights, prompts, granularity, grammar)

    def generate(
        self,
        request: Request,
        cancel: Callable[[], bool] | None = None,
        *,
        queue_timeout: float | None = None,
    ) -> Generator[Event, None, None]:
        """Run one request on the calling thread, yielding core events.

        The request counts against the ensemble's queue from here, before its prompt
        is tokenized, so a flood beyond ``parallel + max_queue`` is refused at once
        (QueueFullError) rather than tokenized."""
        loaded = self.ensemble(request.ensemble)
        ticket = loaded.admit()
        try:
            plan = self._plan(loaded, request)
            slot = loaded.acquire(ticket, plan.prompts, timeout=queue_timeout, cancel=cancel)
            if slot is None:  # cancelled while queued: nothing was evaluated
                stats = GenerationStats(mode=plan.mode, seed=request.params.seed or 0,
                                        members=[MemberStats(name=m.name) for m in loaded.members])
                state = None if plan.grammar is None else "untriggered" if plan.grammar.triggers else "incomplete"
                yield DoneEvent("cancelled", stats, grammar=state)
                return
            yield from generate(
                slot.members,
                plan.weights,
                plan.prompts,
                request.params,
                mode=plan.mode,
                single=plan.single,
                granularity=plan.granularity,
                cancel=cancel or (lambda: False),
                grammar=plan.grammar,
            )
        finally:
            loaded.leave(ticket)

    def score(
        self,
        request: ScoreRequest,
        cancel: Callable[[], bool] | None = None,
        *,
        queue_timeout: float | None = None,
    ) -> TextLikelihood:
        """The likelihood of ``request.text`` after ``request.context`` under the ensemble, on the
        calling thread: each member scores it once, in batched passes (docs/likelihood.md).

        It takes a slot through the ensemble's queue exactly as :meth:`generate` does (counted
        from admission, first in first out, QueueFullError past ``max_queue`` or
        ``queue_timeout``). A request that cannot be done is refused before it waits, with a
        :class:`RequestError` naming the field (a :class:`ContextOverflowError` when the context
        and text do not fit a member's ``n_ctx``). ``cancel`` firing while it waits or between
        scoring chunks raises :class:`Cancelled`."""
        loaded = self.ensemble(request.ensemble)
        ticket = loaded.admit()
        try:
            plan = plan_score(loaded, request)
            slot = loaded.acquire(ticket, plan.contexts, timeout=queue_timeout, cancel=cancel)
            if slot is None:  # cancelled while queued: nothing was evaluated
                raise Cancelled
            return run_score(slot.members, plan, request, cancel)
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


def check_grammar(spec: GrammarSpec, members: Sequence[MemberContext], granularity: str) -> None:
    """Refuse a grammar the members cannot use, before the request waits for a slot: GBNF
    llama.cpp cannot parse, and token literals across vocabularies (word granularity).
    Each model's vocabulary parses it once."""
    if granularity == "word":
        literals = token_literals(spec.gbnf)
        if literals:
            raise RequestError(
                f"the grammar in {spec.param} names tokens ({', '.join(literals[:3])}), which differ between the "
                "members' vocabularies (granularity word); write them as text (\"...\") instead", param=spec.param)
    seen: set[int] = set()
    for m in members:
        if id(m.model) not in seen:
            seen.add(id(m.model))
            m.make_constraint(spec).close()


def prompt_ids(loaded: LoadedEnsemble, active: list[int], tokens: list[int], param: str = "prompt") -> list[int]:
    """A prompt of token ids checked for members ``active`` of ``loaded``: they must share one
    vocabulary, and every id must be in it."""
    if len(active) > 1 and not loaded.vocabulary.shared:
        raise RequestError(f"a prompt of token ids needs members that share one vocabulary "
                           f"({loaded.vocabulary.mismatch}); send the prompt as text", param=param)
    n_vocab = loaded.members[active[0]].n_vocab if active else 0
    for j, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
            raise RequestError(f"{param}[{j}] is {t!r}, not a token id of the vocabulary (0..{n_vocab - 1})",
                               param=param)
    return list(tokens)


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


class SamplingOverrides(TypedDict, total=False):
    """What a request may set over an ensemble's sampling defaults (None: keep the default)."""

    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    max_tokens: int | None
    seed: int | None
    stop: tuple[str, ...] | None
    logprobs: bool | None
    top_logprobs: int | None


def sampling_params(defaults: SamplingDefaults, **overrides: Unpack[SamplingOverrides]) -> SamplingParams:
    """SamplingParams from an ensemble's defaults and the non-None overrides. The ensemble's
    stop strings stay in force beside a request's own."""
    base = SamplingParams(**{s.name: getattr(defaults, s.name) for s in SAMPLING_DEFAULTS})
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}  # each typed above
    if "stop" in given:
        given["stop"] = tuple(dict.fromkeys((*defaults.stop, *given["stop"])))
    return replace(base, **given)
