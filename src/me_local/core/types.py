"""Plain data the ensemble core speaks: requests' sampling parameters, the
events a generation yields, its statistics, and the Member protocol a backend
implements. No llama_cpp, aiohttp or click here; the defaults come from
:mod:`me_local.settings`, which imports nothing outside the standard library."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .. import settings as S

Logits = npt.NDArray[np.floating[Any]]
"""A vector of raw next-token logits over the vocabulary (float32 from llama.cpp, any float precision)."""
Probs = npt.NDArray[np.float64]
"""A probability vector over the vocabulary."""

MODES = S.MODES
GRANULARITIES = ("token", "word")


def tokens_per_second(tokens: int, span_s: float) -> float:
    """Generation speed after the first token: ``tokens - 1`` more arrived in the ``span_s``
    seconds from the first token to the last (0 when fewer than two tokens or no time)."""
    return (tokens - 1) / span_s if tokens >= 2 and span_s > 0 else 0.0
FINISH_REASONS = ("stop", "length", "cancelled")


class Cancelled(Exception):
    """Raised by a Member's evaluate() when the cancel callback fired between chunks."""


GRAMMAR_STATES = ("complete", "incomplete", "untriggered")
""":attr:`DoneEvent.grammar` when the request had a grammar: the output matches it whole
(``complete``), was cut before it did (``incomplete``: the token limit, a stop string, a
cancel), or a lazy grammar's trigger never took (``untriggered``: the output is free text)."""


@dataclass(frozen=True)
class GrammarSpec:
    """A request's grammar: the output is constrained to text that ``gbnf`` (llama.cpp's GBNF,
    with a ``root`` rule) matches. docs/grammar.md has the semantics in every mode."""

    gbnf: str
    """GBNF text with a ``root`` rule; character-level (no ``<token>`` literals needed)."""
    param: str = "grammar"
    """The request field it came from, named in errors (e.g. ``response_format``)."""
    triggers: tuple[str, ...] = ()
    """``()``: the whole output is constrained from its first token. Else lazy: the output is
    free until its text contains one of these strings; from the first byte of that trigger
    on it is constrained (the grammar sees the trigger's bytes first, so its root must start
    with it)."""


class GrammarRejected(Exception):
    """Raised by :meth:`Constraint.accept` / :meth:`Constraint.accept_bytes` when the grammar
    does not allow the token or bytes (the constraint's state is unchanged)."""


class NoTokenAllowed(Exception):
    """Raised by :meth:`TokenSampler.sample` when the constraint (with the sampler's own
    restriction) allows no token of the vocabulary."""


@runtime_checkable
class Constraint(Protocol):
    """A grammar's state over one member's vocabulary: which tokens may come next, advanced
    only by what is committed to the text. One per (request, member), used on the
    generation's thread only. Besides the grammar, it disallows tokens whose text the grammar
    would read differently from the text me-local writes (control tokens), and end-of-
    generation tokens until the grammar is complete."""

    def allowed(self, ids: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.bool_]:
        """Per token of ``ids``: whether it may come next."""
        ...

    def mask(self) -> npt.NDArray[np.bool_]:
        """Per token id of the whole vocabulary: whether it may come next."""
        ...

    def accept(self, token: int) -> None:
        """Advance over ``token`` (never an end-of-generation token). Raises
        :class:`GrammarRejected`, leaving the state as it was, if it is not allowed."""
        ...

    def accept_bytes(self, data: bytes) -> None:
        """Advance over text another member wrote (any tokenization of it; may end inside a
        UTF-8 character). Raises :class:`GrammarRejected` if the grammar rejects it."""
        ...

    def complete(self) -> bool:
        """Whether the text so far is a whole match (end of generation is allowed now)."""
        ...

    def only_end(self) -> bool:
        """Complete, and no token but end-of-generation may follow (the output is done)."""
        ...

    def close(self) -> None:
        """Free what the constraint holds. Idempotent."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Truncation applies per member in ``me`` mode and to the
    mixture in ``ce`` mode; the order is the logit bias, the penalties, then temperature,
    top-k, top-p, min-p (docs/architecture.md, "Penalties and logit bias")."""

    temperature: float = S.TEMPERATURE.default
    top_k: int = S.TOP_K.default
    top_p: float = S.TOP_P.default
    min_p: float = S.MIN_P.default
    max_tokens: int = S.MAX_TOKENS.default
    seed: int | None = S.SEED.default
    stop: tuple[str, ...] = S.STOP.default
    logprobs: bool = False
    top_logprobs: int = S.TOP_LOGPROBS.default
    repeat_penalty: float = S.REPEAT_PENALTY.default
    repeat_last_n: int = S.REPEAT_LAST_N.default
    """The generated tokens the penalties count: the last n (-1: all, 0: none)."""
    frequency_penalty: float = S.FREQUENCY_PENALTY.default
    presence_penalty: float = S.PRESENCE_PENALTY.default
    logit_bias: tuple[tuple[int, float], ...] = S.LOGIT_BIAS.default
    """(token id, bias) pairs, sorted by id: added to those logits before anything else."""
    infill: bool = False
    """llama.cpp's infill sampler after the truncations (llama-server's ``samplers: [..., "infill"]``): it
    merges the probability of tokens that begin with another candidate's text and prefers ending the
    generation when end tokens carry enough of it. Applied by the backend's native chain, per member
    (``me``/``single``); ``ce`` mode refuses it."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        """Whether the penalties change anything (then a sampler must know the generated tokens)."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0)

    @property
    def shapes_logits(self) -> bool:
        """Whether a logit bias or the penalties apply before the transforms."""
        return self.penalized or bool(self.logit_bias)

    def penalty_window(self, tokens: Sequence[int]) -> Sequence[int]:
        """The tokens the penalties count: the last ``repeat_last_n`` of ``tokens`` (-1: all)."""
        n = self.repeat_last_n
        if n < 0 or n >= len(tokens):
            return tokens
        return tokens[len(tokens) - n:] if n else tokens[:0]


@runtime_checkable
class TokenSampler(Protocol):
    """A member's sampler for one generation. Its penalties count the generated tokens it has
    seen: the ones it sampled itself (``sample`` takes each into account) and the ones it is
    shown with ``observe``; never show it a token it sampled."""

    def sample(self, constraint: Constraint | None = None) -> int:
        """Draw a token from the owning member's current (last-position) logits; with a
        ``constraint``, from the distribution restricted to the tokens it allows (renormalised
        before the transforms), without advancing it. Raises :class:`NoTokenAllowed` when
        nothing is allowed."""
        ...

    def observe(self, tokens: Sequence[int]) -> None:
        """Count generated tokens the sampler did not sample itself (the other members'), in order."""
        ...

    def forget(self) -> None:
        """Count nothing seen so far (its random stream goes on): the caller observes the tokens
        again, when the tokens it counted are no longer the text's."""
        ...


@runtime_checkable
class Member(Protocol):
    """One ensemble member as the core sees it: a model plus its own KV cache."""

    name: str

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def cached(self) -> Sequence[int]:
        """The tokens whose keys/values are in this member's cache, in order."""
        ...

    def truncate(self, n: int) -> None:
        """Forget every cached token from position n on. A memory that cannot drop a
        tail may forget more (down to nothing); ``cached`` always says what remains."""
        ...

    def evaluate(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None) -> None:
        """Append tokens to the cache in as few batches as possible; afterwards
        logits() holds the last token's next-token logits. May raise Cancelled
        between chunks, leaving ``cached`` true to what was evaluated."""
        ...

    def logits(self) -> Logits:
        """Raw next-token logits after the last evaluated token (valid until the next evaluate)."""
        ...

    def make_sampler(self, params: SamplingParams, seed: int) -> TokenSampler: ...

    def is_eog(self, token: int) -> bool: ...

    def token_bytes(self, token: int) -> bytes: ...


@runtime_checkable
class GrammarMember(Member, Protocol):
    """A member that can constrain its output to a grammar."""

    def make_constraint(self, spec: GrammarSpec) -> Constraint:
        """A fresh constraint for ``spec`` over this member's vocabulary; a grammar that
        cannot be used raises :class:`~me_local.errors.RequestError` naming ``spec.param``."""
        ...


@dataclass
class TokenEvent:
    """One generated token. ``text`` is the text this token released to the
    output (possibly empty while a UTF-8 character or a possible stop string is
    held back); the concatenation of every event's text is the output."""

    index: int
    id: int
    text: str
    member: str | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    piece: bytes = b""
    """The token's own bytes (may be part of a UTF-8 character)."""
    top_pieces: list[bytes] | None = None
    """The bytes of each ``top_logprobs`` token, in its member's vocabulary."""


@dataclass
class MemberStats:
    name: str
    selected: int = 0
    catchup_tokens: int = 0
    """Generated tokens this member evaluated after missing them (batched catch-up)."""
    prompt_tokens: int = 0
    """Prompt tokens this member evaluated (cached prefix excluded)."""
    cached_prompt_tokens: int = 0
    generated_tokens: int | None = None
    """At word granularity: the tokens this member wrote (``selected`` counts its words)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class GenerationStats:
    mode: str
    seed: int
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    prompt_eval_s: float = 0.0
    members: list[MemberStats] = field(default_factory=list)
    granularity: str | None = None
    """``word`` for word-level ME (None: token by token, as every same-vocabulary mode)."""
    words: int | None = None
    """At word granularity: the words drawn."""

    @property
    def tokens_per_s(self) -> float:
        """Generation speed after the first token (see :func:`tokens_per_second`)."""
        if self.ttft_s is None:
            return 0.0
        return tokens_per_second(self.generated_tokens, self.total_s - self.ttft_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_s"] = round(self.tokens_per_s, 3)
        d["members"] = [m.to_dict() for m in self.members]
        return {k: v for k, v in d.items() if v is not None or k == "ttft_s"}


@dataclass
class DoneEvent:
    """The end of a generation. ``text`` is held-back output flushed at the end
    (for example a partial stop string when the token limit was hit)."""

    finish_reason: str
    stats: GenerationStats
    text: str = ""
    end: TokenEvent | None = None
    """The end-of-generation token the model drew to end it (finish ``stop``), which is not part
    of the text: completions' ``echo`` lists it after the generated tokens, as OpenAI does."""
    grammar: str | None = None
    """With a grammar: one of :data:`GRAMMAR_STATES` (complete, incomplete, untriggered);
    None without one. ``length`` with ``incomplete`` means the structured output was cut."""


Event = TokenEvent | DoneEvent
