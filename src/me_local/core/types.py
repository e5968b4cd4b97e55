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


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Truncation applies per member in ``me`` mode and to the
    mixture in ``ce`` mode; the order is temperature, top-k, top-p, min-p."""

    temperature: float = S.TEMPERATURE.default
    top_k: int = S.TOP_K.default
    top_p: float = S.TOP_P.default
    min_p: float = S.MIN_P.default
    max_tokens: int = S.MAX_TOKENS.default
    seed: int | None = S.SEED.default
    stop: tuple[str, ...] = S.STOP.default
    logprobs: bool = False
    top_logprobs: int = S.TOP_LOGPROBS.default

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@runtime_checkable
class TokenSampler(Protocol):
    def sample(self) -> int:
        """Draw a token from the owning member's current (last-position) logits."""
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
    n_ctx: int | None = None
    """The member's context for this request, when the request asked for a context size."""
    dropped_messages: int | None = None
    """Chat messages left out of this member's prompt to fit its context (None: none)."""

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
    dropped_messages: int | None = None
    """The most chat messages a member's prompt left out to fit its context (None: none)."""

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


Event = TokenEvent | DoneEvent
