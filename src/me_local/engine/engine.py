"""The :class:`Engine`: requests planned (ensemble, mode, per-member prompts), queued for a
slot and run through the core's generation loop, on the caller's thread (``generate``) or
on a worker thread (``start``), with a cancel flag checked between decode calls."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypedDict

from ..backends.types import MemberContext, MemberFactory
from ..config import Config, SamplingDefaults
from ..core import Cancelled, DoneEvent, Event, GenerationStats, GrammarSpec, MemberStats, SamplingParams, generate
from ..core.grammar import token_literals
from ..core.likelihood import TextLikelihood
from ..errors import ConfigError, ContextOverflowError, MeLocalError, RequestError
from ..fim import FimInput, FimPrompt, fim_prompt, lacking_fim
from ..settings import GRANULARITIES, MODES, SAMPLING_DEFAULTS
from ..tools import Format, ToolPrompt, ToolSpec, uses_tools
from ..tools import prepare as prepare_tools
from ..tools.grammar import tool_grammar
from .embedding import EmbedRequest, EmbedResult, run_embed
from .ensemble import LoadedEnsemble, Ticket, Unloading
from .factory import llama_member_factory
from .limits import LineLimits, apply_limits
from .messages import Messages, fit_messages, normalize_messages
from .scoring import ScoreRequest, plan_score, run_score

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("me_local.engine")


@dataclass
class Request:
    """One generation. Exactly one of ``messages`` (chat), ``prompt`` (raw text), ``tokens``
    (a raw prompt as token ids, for members that share one vocabulary) and ``fim`` (a
    fill-in-the-middle prompt, which every member builds from its own FIM tokens) is set."""

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
    fim: FimInput | None = None
    """Fill in the middle: each active member's prompt is :func:`me_local.fim.fim_prompt` of its own model
    (a member without FIM tokens is a RequestError naming it)."""
    limits: LineLimits | None = None
    """llama-server's ``n_indent`` and ``t_max_predict_ms`` (:mod:`.limits`)."""
    on_plan: Callable[[Plan], None] | None = field(default=None, compare=False, repr=False)
    """Called (on the generating thread) with the plan once the request is planned, before it waits for a
    slot: what each member's prompt became (a FIM prompt's cuts, for the answer to report)."""
    grammar: GrammarSpec | None = None
    """Constrain the output to a grammar (docs/grammar.md); an empty ``gbnf`` is no grammar."""
    tools: ToolSpec | None = None
    """The functions the model may call (chat messages only; :mod:`me_local.tools`)."""
    n_ctx: int | None = None
    """The context size the request asks for (Ollama's ``num_ctx``): up to the ensemble's
    ``max_ctx``; each member gets at most its model's trained context. None: the ensemble's n_ctx."""
    truncate: bool = False
    """Chat messages that do not fit a member's context: leave out the oldest turns (never a
    system message or the latest message) until the prompt leaves room for the answer
    (:func:`fit_messages`). False: such a prompt is refused (ContextOverflowError)."""
    keep_alive: float | None = None
    """Seconds the ensemble stays loaded after its last request (0: unloaded once idle); None: for ever."""


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
    fim: dict[str, FimPrompt] = field(default_factory=dict)
    """A FIM request's prompt per active member (by name): what each kept and dropped."""
    grammar: GrammarSpec | None = None
    """The request's grammar, checked (None: none, or an empty one)."""
    tool_format: Format | None = None
    """How the members write calls, when the request has tools or a conversation with calls."""
    n_ctx: list[int] = field(default_factory=list)
    """Each member's context for this request (empty: each member's own)."""
    dropped: list[int] = field(default_factory=list)
    """Chat messages each member's prompt left out to fit its context."""


class Engine:
    def __init__(self, config: Config, factory: MemberFactory | None = None) -> None:
        self.config = config
        self._factory: MemberFactory = llama_member_factory() if factory is None else factory
        self._loaded: dict[str, LoadedEnsemble] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        """One lock per ensemble name: it is loaded once, without holding up the others."""
        self._changed = threading.Condition(self._lock)
        """Wakes the reaper: an ensemble fell idle, or its keep_alive changed."""
        self._reaper: threading.Thread | None = None
        self._closed = False
        self.on_unload: Callable[[str], None] | None = None
        """Called (on the unloading thread) once an ensemble was unloaded: the server gives the heap back."""

    # -- loading -----------------------------------------------------------------
    def ensemble(self, name: str | None = None) -> LoadedEnsemble:
        """The loaded ensemble (loaded now if it is not)."""
        cfg = self.config.get(name)
        with self._lock:
            loaded = self._loaded.get(cfg.name)
            if loaded is not None:
                return loaded
            gate = self._loading.setdefault(cfg.name, threading.Lock())
        with gate:
            with self._lock:
                loaded = self._loaded.get(cfg.name)
            if loaded is None:
                loaded = LoadedEnsemble(cfg, self._factory)
                loaded.on_idle = self._wake
                with self._lock:
                    self._loaded[cfg.name] = loaded
            return loaded

    def load_all(self) -> None:
        for name in self.config.ensembles:
            self.ensemble(name)

    @property
    def loaded(self) -> dict[str, LoadedEnsemble]:
        return dict(self._loaded)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            for e in self._loaded.values():
                e.close()
            self._loaded.clear()

    @contextlib.contextmanager
    def hold(self, name: str | None = None) -> Iterator[LoadedEnsemble]:
        """The loaded ensemble (loaded now if it is not), kept loaded until the block ends: for
        work that reads its members outside a request (tokenizing)."""
        while True:
            loaded = self.ensemble(name)
            try:
                loaded.hold()
            except Unloading:
                continue
            break
        try:
            yield loaded
        finally:
            loaded.release()

    @contextlib.contextmanager
    def peek(self, name: str | None = None) -> Iterator[LoadedEnsemble]:
        """As :meth:`hold`, for reading an ensemble's facts (``/api/show``): one that this loads
        (``keep_alive`` had unloaded it) is unloaded again once the block ends, unless a request
        gives it a keep_alive of its own meanwhile."""
        cfg = self.config.get(name)
        before = self._loaded.get(cfg.name)
        with self.hold(cfg.name) as loaded:
            if loaded is not before:
                loaded.set_keep_alive(0)
            yield loaded

    def _admit(self, name: str | None) -> tuple[LoadedEnsemble, Ticket]:
        while True:
            loaded = self.ensemble(name)
            try:
                return loaded, loaded.admit()
            except Unloading:  # it is being unloaded: the next request loads it anew
                continue

    # -- unloading ---------------------------------------------------------------
    def unload(self, name: str | None = None) -> bool:
        """Unload an ensemble: its requests in flight finish first (new ones load it anew), then
        its contexts close and the models no other loaded ensemble uses are freed. False: it was
        not loaded."""
        cfg = self.config.get(name)
        with self._lock:
            loaded = self._loaded.pop(cfg.name, None)
        if loaded is None:
            return False
        loaded.retire()
        self._unloaded(cfg.name, "asked to")
        return True

    def keep_alive(self, name: str | None, seconds: float | None) -> None:
        """How long the (loaded) ensemble stays loaded once idle: None for ever, 0 until it is idle."""
        self.ensemble(name).set_keep_alive(seconds)

    def _unloaded(self, name: str, why: str) -> None:
        log.info("unloaded ensemble %s (%s)", name, why)
        if self.on_unload is not None:
            self.on_unload(name)

    def _wake(self) -> None:
        """An ensemble fell idle with a keep_alive, or its keep_alive changed: the reaper looks again."""
        with self._lock:
            if self._closed:
                return
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="me-local-keep-alive", daemon=True)
                self._reaper.start()
            self._changed.notify_all()

    def _reap(self) -> None:
        """Unload each ensemble whose keep_alive has run out since its last request."""
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                due: tuple[str, LoadedEnsemble] | None = None
                wait: float | None = None
                for name, loaded in self._loaded.items():
                    deadline = loaded.deadline()
                    if deadline is None:
                        continue
                    if deadline <= now and loaded.expire(now):
                        due = (name, loaded)
                        break
                    if deadline > now:
                        wait = deadline - now if wait is None else min(wait, deadline - now)
                if due is None:
                    self._changed.wait(wait)
                    continue
                del self._loaded[due[0]]  # expired: it admits nothing more; the next request loads it anew
            name, loaded = due
            try:
                loaded.close()
                self._unloaded(name, f"keep_alive {loaded.keep_alive:g} s ran out")
            except Exception:  # the reaper must go on for the others
                log.exception("unloading ensemble %s failed", name)

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

    def _active(self, loaded: LoadedEnsemble, request: Request) -> tuple[str, int, list[float], list[int]]:
        """A request's mode, single member, weights and the members that run."""
        cfg = loaded.config
        if request.weights:
            try:
                cfg = cfg.with_weights(request.weights)
            except ConfigError as exc:
                raise RequestError(str(exc), param="weights") from None
        mode = request.mode or cfg.mode
        if mode not in MODES:
            raise RequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", param="mode")
        single = 0
        if request.member is not None or mode == "single":
            name = request.member or cfg.member or cfg.members[0].name
            single = cfg.member_names.index(cfg.get_member(name).name)
            if request.member is not None and request.mode is None:
                mode = "single"
        weights = [m.weight for m in cfg.members]
        active = [single] if mode == "single" else [i for i, w in enumerate(weights) if w > 0]
        return mode, single, weights, active

    def tool_support(self, request: Request) -> tuple[Format, str | None]:
        """The format the members a request runs write calls in, and why they cannot carry tools
        (None: they can). See :mod:`me_local.engine.tools`."""
        loaded = self.ensemble(request.ensemble)
        active = self._active(loaded, request)[3]
        return loaded.tools.format(active), loaded.tools.problem(active)

    def _plan(self, loaded: LoadedEnsemble, request: Request) -> Plan:
        mode, single, weights, active = self._active(loaded, request)
        if request.granularity is not None and request.granularity not in GRANULARITIES:
            raise RequestError(f"unknown granularity {request.granularity!r}; choose one of "
                               f"{', '.join(GRANULARITIES)}", param="granularity")
        if sum(x is not None for x in (request.messages, request.prompt, request.tokens, request.fim)) != 1:
            raise RequestError("give either chat messages or a raw prompt", param="messages")
        if request.tools is not None and request.messages is None:
            raise RequestError("tools need chat messages, not a raw prompt", param="tools")
        messages = normalize_messages(request.messages) if request.messages is not None else None
        tool_format = None
        chat = None
        if messages is not None and (request.tools is not None or uses_tools(messages)):
            tool_format = loaded.tools.format(active)
            if request.tools is not None and request.tools.active:
                problem = loaded.tools.problem(active)
                if problem is not None:
                    raise RequestError(f"{loaded.config.name} does not support tools: {problem}", param="tools")
            chat = prepare_tools(messages, request.tools, tool_format)
        members = loaded.members
        if request.params.infill and mode == "ce":
            raise RequestError("the infill sampler works on one member's distribution, and mode ce samples their "
                               "mixture; use mode me or single, or leave `infill` out of `samplers`", param="samplers")
        fim = request.fim
        if fim is not None:
            lacking = lacking_fim([(members[i].name, members[i].model.path.name, members[i].model.fim)
                                   for i in active])
            if lacking is not None:
                raise RequestError(lacking, param=fim.param)
        # members that do not run keep their own size: growing them would only cost memory
        n_ctx = [n if i in active else loaded.base_n_ctx[i] for i, n in enumerate(self._contexts(loaded, request))]
        prompts: list[list[int]] = [[] for _ in members]
        dropped = [0 for _ in members]
        fims: dict[str, FimPrompt] = {}
        cache: dict[tuple[int, str | None, str | None, int], tuple[list[int], int]] = {}
        fim_cache: dict[tuple[int, int], FimPrompt] = {}
        for i in active:
            m = members[i]
            if fim is not None:  # the same for every member of a model: no system prompt or chat template
                if (id(m.model), n_ctx[i]) not in fim_cache:
                    reserve = min(request.params.max_tokens, n_ctx[i] // 4)
                    fim_cache[id(m.model), n_ctx[i]] = fim_prompt(m.model, fim, n_ctx=n_ctx[i], reserve=reserve)
                fims[m.name] = fim_cache[id(m.model), n_ctx[i]]
                prompts[i] = fims[m.name].tokens
                continue
            # members differing in model, system prompt, template or context get their own prompt
            key = (id(m.model), m.system, m.chat_template, n_ctx[i])
            if key not in cache:
                render = _renderer(m, chat)
                if messages is not None and request.truncate:
                    room = min(request.params.max_tokens, n_ctx[i] // 4)  # for the answer
                    cache[key] = fit_messages(Messages(chat.messages) if chat is not None else messages, render,
                                              max(1, n_ctx[i] - room))
                elif messages is not None:
                    cache[key] = (list(render(Messages(chat.messages) if chat is not None else messages)), 0)
                elif request.tokens is not None:
                    cache[key] = (prompt_ids(loaded, active, request.tokens), 0)
                else:
                    cache[key] = (m.raw_prompt(request.prompt or ""), 0)
            prompts[i], dropped[i] = cache[key]
        granularity = loaded.vocabulary.check(mode, request.granularity)
        if request.params.logit_bias:
            check_logit_bias(loaded, active, request.params.logit_bias)
        for i in active:
            if not prompts[i]:
                raise RequestError("the prompt is empty; give some text to continue", param="prompt")
            if len(prompts[i]) >= n_ctx[i]:
                raise ContextOverflowError(_overflow(loaded, i, len(prompts[i]), n_ctx[i], request, dropped[i]))
        grammar = request.grammar if request.grammar is not None and request.grammar.gbnf.strip() else None
        if request.tools is not None and request.tools.active and tool_format is not None:
            if grammar is not None:
                raise RequestError(f"tools and the grammar of {grammar.param} cannot both shape one answer; drop one "
                                   "of them", param=grammar.param)
            grammar = self._tool_grammar(request.tools, tool_format)
        if grammar is not None:
            check_grammar(grammar, [members[i] for i in active], granularity)
        return Plan(mode, single, weights, prompts, granularity, fim=fims, grammar=grammar, tool_format=tool_format,
                    n_ctx=n_ctx, dropped=dropped)

    def _tool_grammar(self, spec: ToolSpec, fmt: Format) -> GrammarSpec:
        """The grammar of the calls ``spec`` allows (lazy where text may come first; tools/grammar.py)."""
        g = tool_grammar(spec, fmt)
        return GrammarSpec(g.gbnf, param="tools", triggers=g.triggers)

    @staticmethod
    def _contexts(loaded: LoadedEnsemble, request: Request) -> list[int]:
        """Each member's context for a request: the one it asks for, at most the model's trained
        context; its own otherwise."""
        if request.n_ctx is None:
            return list(loaded.base_n_ctx)
        cfg = loaded.config
        if request.n_ctx > cfg.ctx_ceiling:
            raise RequestError(
                f"the context asked for ({request.n_ctx} tokens) is more than ensemble {cfg.name!r} allows "
                f"(max_ctx {cfg.ctx_ceiling}); ask for at most that, or raise max_ctx in models.yaml",
                param="num_ctx")
        if request.n_ctx < 1:
            raise RequestError(f"the context asked for must be at least 1 token, got {request.n_ctx}",
                               param="num_ctx")
        return [min(request.n_ctx, train) if train > 0 else request.n_ctx for train in loaded.n_ctx_train]

    def generate(
        self,
        request: Request,
        cancel: Callable[[], bool] | None = None,
        *,
        queue_timeout: float | None = None,
        admitted: Callable[[LoadedEnsemble], None] | None = None,
    ) -> Generator[Event, None, None]:
        """Run one request on the calling thread, yielding core events.

        The request counts against the ensemble's queue from here, before its prompt
        is tokenized, so a flood beyond ``parallel + max_queue`` is refused at once
        (QueueFullError) rather than tokenized. ``admitted`` hears which loaded ensemble
        took it (it stays readable after an unload, for the facts its members keep)."""
        loaded, ticket = self._admit(request.ensemble)
        try:
            loaded.set_keep_alive(request.keep_alive)
            if admitted is not None:
                admitted(loaded)
            plan = self._plan(loaded, request)
            if request.on_plan is not None:
                request.on_plan(plan)
            slot = loaded.acquire(ticket, plan.prompts, timeout=queue_timeout, cancel=cancel, contexts=plan.n_ctx)
            if slot is None:  # cancelled while queued: nothing was evaluated
                stats = GenerationStats(mode=plan.mode, seed=request.params.seed or 0,
                                        members=[MemberStats(name=m.name) for m in loaded.members])
                state = None if plan.grammar is None else "untriggered" if plan.grammar.triggers else "incomplete"
                yield DoneEvent("cancelled", stats, grammar=state)
                return
            limits = request.limits if request.limits is not None and request.limits.active else None
            reached = threading.Event()  # a limit ends the loop as a cancel does (checked before every token)

            def stopped() -> bool:
                return reached.is_set() or (cancel is not None and cancel())

            slot.fit(plan.n_ctx)
            events = generate(
                slot.members,
                plan.weights,
                plan.prompts,
                request.params,
                mode=plan.mode,
                single=plan.single,
                granularity=plan.granularity,
                cancel=stopped if limits is not None else cancel or (lambda: False),
                grammar=plan.grammar,
                n_ctx=plan.n_ctx,
            )
            for ev in apply_limits(events, limits, reached) if limits is not None else events:
                if isinstance(ev, DoneEvent):
                    _report_context(plan, request, ev.stats)
                yield ev
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
        loaded, ticket = self._admit(request.ensemble)
        try:
            loaded.set_keep_alive(None)
            plan = plan_score(loaded, request)
            slot = loaded.acquire(ticket, plan.contexts, timeout=queue_timeout, cancel=cancel)
            if slot is None:  # cancelled while queued: nothing was evaluated
                raise Cancelled
            return run_score(slot.members, plan, request, cancel)
        finally:
            loaded.leave(ticket)

    def embed(self, request: EmbedRequest, cancel: Callable[[], bool] | None = None) -> EmbedResult:
        """Embed ``request``'s inputs on the calling thread (engine/embedding.py): each member of the
        embedding through its own embedding context, made on first use and kept with the ensemble.
        Generation slots are not involved: an embedding never waits for one. ``cancel`` firing while
        another request holds an embedding context, or between decodes, raises :class:`Cancelled`.
        It holds the ensemble as a request does (an unload waits for it, a new load serves it
        meanwhile) and sets its ``keep_alive``."""
        with self.hold(request.ensemble) as loaded:
            loaded.set_keep_alive(request.keep_alive)
            return run_embed(loaded, request, cancel)

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
                for ev in self.generate(request, cancel=run.cancelled.is_set, admitted=run.admitted):
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


def _renderer(m: MemberContext, chat: ToolPrompt | None) -> Callable[[Messages], Sequence[int]]:
    """How member ``m`` renders chat messages: with a request's tools (and their labels, while the
    messages are the prepared ones), or plainly."""
    if chat is None:
        return m.chat_prompt
    prepared = chat

    def render(messages: Messages) -> Sequence[int]:
        whole = len(messages) == len(prepared.messages)
        return m.chat_prompt(messages, tools=prepared.tools, labels=prepared.labels if whole else None)
    return render


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


def _overflow(loaded: LoadedEnsemble, i: int, n_prompt: int, n_ctx: int, request: Request, dropped: int) -> str:
    """Why member i's prompt does not fit its context, and what to do about it."""
    m, cfg = loaded.members[i], loaded.config
    what = f"the prompt is {n_prompt} tokens" + (f" (leaving out the {dropped} oldest messages)" if dropped else "")
    if request.n_ctx is None:
        return (f"{what} but member {m.name!r} has a context of {n_ctx} tokens; shorten the prompt or raise n_ctx "
                f"in models.yaml (or ask for a larger context: Ollama's num_ctx, up to max_ctx {cfg.ctx_ceiling})")
    if n_ctx < request.n_ctx:
        fix = (f"that is its model's trained context, the most it gets; shorten the prompt, or leave the member out "
               f"(`ensemble.weights` {{{m.name!r}: 0}})")
    else:
        fix = f"shorten the prompt or ask for a larger context (num_ctx, up to max_ctx {cfg.ctx_ceiling})"
    turns = [t for t in request.messages or [] if isinstance(t, dict) and t.get("role") != "system"]
    if len(turns) > 1 and not request.truncate:
        fix += ", or let the oldest messages be left out (truncate)"
    return f"{what} but member {m.name!r} has a context of {n_ctx} tokens for this request; {fix}"


def _report_context(plan: Plan, request: Request, stats: GenerationStats) -> None:
    """The figures a request's context decisions leave in its statistics: each member's context
    (when the request asked for one) and the messages left out to fit it."""
    for i, ms in enumerate(stats.members):
        if i < len(plan.prompts) and plan.prompts[i]:
            if request.n_ctx is not None:
                ms.n_ctx = plan.n_ctx[i]
            if plan.dropped and plan.dropped[i]:
                ms.dropped_messages = plan.dropped[i]
    most = max(plan.dropped, default=0)
    stats.dropped_messages = most or None


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


def check_logit_bias(loaded: LoadedEnsemble, active: list[int], bias: tuple[tuple[int, float], ...]) -> None:
    """A logit bias names token ids of one vocabulary: the members that run must share one, and
    every id must be in it."""
    if len(active) > 1 and not loaded.vocabulary.shared:
        raise RequestError(f"logit_bias names token ids, which mean different tokens to these members "
                           f"({loaded.vocabulary.mismatch}); send it for one member (mode single: the model "
                           "ENSEMBLE/MEMBER in the APIs, --member on the command line) or drop it", param="logit_bias")
    n_vocab = min(loaded.members[i].n_vocab for i in active)
    bad = [t for t, _ in bias if t >= n_vocab]
    if bad:
        raise RequestError(f"logit_bias names token {bad[0]}, which is not in the vocabulary (0..{n_vocab - 1})",
                           param="logit_bias")


class Run:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.thread: threading.Thread | None = None
        self.loaded: LoadedEnsemble | None = None
        """The loaded ensemble that admitted the request (set before its first event)."""

    def admitted(self, loaded: LoadedEnsemble) -> None:
        self.loaded = loaded

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
    repeat_penalty: float | None
    repeat_last_n: int | None
    frequency_penalty: float | None
    presence_penalty: float | None
    logit_bias: Mapping[int, float] | None
    infill: bool | None


def sampling_params(defaults: SamplingDefaults, **overrides: Unpack[SamplingOverrides]) -> SamplingParams:
    """SamplingParams from an ensemble's defaults and the non-None overrides. The ensemble's
    stop strings stay in force beside a request's own, and its logit bias under the request's
    (a token the request biases takes the request's bias)."""
    base = SamplingParams(**{s.name: getattr(defaults, s.name) for s in SAMPLING_DEFAULTS})
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}  # each typed above
    if "stop" in given:
        given["stop"] = tuple(dict.fromkeys((*defaults.stop, *given["stop"])))
    if "logit_bias" in given:
        given["logit_bias"] = tuple(sorted({**dict(defaults.logit_bias), **given["logit_bias"]}.items()))
    return replace(base, **given)
