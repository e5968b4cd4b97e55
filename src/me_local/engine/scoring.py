"""Scoring a text under an ensemble through the engine: :class:`ScoreRequest` planned against a
loaded ensemble (which members, their contexts and tokens, the granularity), then run on a slot
taken through the ensemble's queue as a generation takes one (``Engine.score``).

The arithmetic is the core's (:mod:`me_local.core.likelihood`, docs/likelihood.md): each
member scores the text once, in batched passes; the :class:`TextLikelihood` returned gives the
ensemble's likelihood at any weights (``tl.logp(tl.weights)`` at the request's), each member's
alone, per-unit values and, with ``top_n``, the alternatives."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

from ..backends.types import MemberContext
from ..core.likelihood import ENDS, End, TextLikelihood, token_likelihood, word_likelihood
from ..errors import ConfigError, ContextOverflowError, RequestError
from ..settings import GRANULARITIES, TOP_LOGPROBS
from .ensemble import LoadedEnsemble

TOP_N_MAX = int(TOP_LOGPROBS.hi or 0)
"""The most alternatives per position a score request may ask for (as ``top_logprobs``)."""


@dataclass
class ScoreRequest:
    """The likelihood of ``text`` as the continuation of ``context`` under an ensemble.

    ``context`` and ``text`` are raw text or token ids. Text context is tokenized per member
    as a raw prompt is (with the BOS where the model adds one); an empty context is the BOS
    alone (the EOS for a model that adds no BOS, as lm-evaluation-harness does). Text is
    tokenized per member as a continuation (no BOS, markup as text). Token ids need members
    that share one vocabulary. Every member is scored (one pass each), so the result also
    holds each member's own likelihood; ``member`` scores that member alone."""

    ensemble: str | None = None
    context: str | list[int] = ""
    text: str | list[int] = ""
    weights: Mapping[str, float] | None = None
    """Members' weights over the ensemble's (the others keep theirs)."""
    member: str | None = None
    """Score one member alone (weight 1)."""
    granularity: str | None = None
    """token | word (None: the ensemble's, from its VocabularyPlan)."""
    end: str = "prefix"
    """prefix | word | eog: what the likelihood says of the text's end (docs/likelihood.md)."""
    top_n: int = 0
    """Alternatives per position: the mixture's at token granularity (``mixture_top``), each
    member's own at word granularity (``scores[k].top``)."""


@dataclass(frozen=True)
class ScorePlan:
    """How a score request runs on its ensemble."""

    scored: list[int]
    """Indices of the members scored, in the ensemble's order."""
    weights: list[float]
    """Their weights, normalised (the ensemble's, or the request's)."""
    contexts: list[list[int]]
    """Each member's context tokens, by the ensemble's index (empty for one not scored)."""
    tokens: list[list[int]]
    """Each scored member's tokens of the text."""
    text: bytes | None
    """The text's bytes when it was given as text (None: token ids)."""
    granularity: str


def _token_ids(value: object, field: str, n_vocab: int) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{field} must be a string or a list of token ids", param=field)
    out = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise RequestError(f"{field}[{i}] must be a token id (an integer), not {t!r}", param=field)
        if not 0 <= t < n_vocab:
            raise RequestError(f"{field}[{i}] is token id {t}, outside the vocabulary (0..{n_vocab - 1})",
                               param=field)
        out.append(t)
    return out


def plan_score(loaded: LoadedEnsemble, request: ScoreRequest) -> ScorePlan:
    """Check a score request against its ensemble and tokenize it (with slot 0's members, as
    :meth:`Engine.plan_request` does): refused with a :class:`RequestError` naming the field."""
    cfg = loaded.config
    if request.end not in ENDS:
        raise RequestError(f"unknown end {request.end!r}; choose one of {', '.join(ENDS)}", param="end")
    top = request.top_n
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= TOP_N_MAX:
        raise RequestError(f"top_n must be an integer from 0 to {TOP_N_MAX}, not {top!r}", param="top_n")
    if request.granularity is not None and request.granularity not in GRANULARITIES:
        raise RequestError(f"unknown granularity {request.granularity!r}; choose one of {', '.join(GRANULARITIES)}",
                           param="granularity")
    if request.weights and request.member is not None:
        raise RequestError("give weights or member, not both: member scores one member alone", param="member")
    if request.weights:
        try:
            cfg = cfg.with_weights(request.weights)
        except ConfigError as exc:
            raise RequestError(str(exc), param="weights") from None
    members = loaded.members
    if request.member is not None:
        scored = [cfg.member_names.index(cfg.get_member(request.member).name)]
        weights = [1.0]
    else:
        scored = list(range(len(members)))
        total = sum(m.weight for m in cfg.members)
        weights = [m.weight / total for m in cfg.members]
    one_vocabulary = len(scored) == 1 or loaded.vocabulary.shared
    granularity = request.granularity or loaded.vocabulary.granularity
    if granularity == "token" and not one_vocabulary:
        raise RequestError(f"granularity token needs members that share a vocabulary ({loaded.vocabulary.mismatch}); "
                           "use granularity word, or score one member", param="granularity")
    as_ids = [f for f in ("context", "text") if not isinstance(getattr(request, f), str)]
    if as_ids and not one_vocabulary:
        raise RequestError(f"{as_ids[0]} as token ids needs members that share a vocabulary "
                           f"({loaded.vocabulary.mismatch}); give it as text, or score one member", param=as_ids[0])
    n_vocab = members[scored[0]].n_vocab
    ctx_ids = None if isinstance(request.context, str) else _token_ids(request.context, "context", n_vocab)
    text_ids = None if isinstance(request.text, str) else _token_ids(request.text, "text", n_vocab)

    contexts: list[list[int]] = [[] for _ in members]
    tokens: list[list[int]] = []
    by_model: dict[int, tuple[list[int], list[int]]] = {}
    for i in scored:
        m = members[i]
        key = id(m.model)  # one tokenization per model file (members share a model's tokenizer)
        if key not in by_model:
            ctx = ctx_ids if ctx_ids is not None else m.raw_prompt(str(request.context)) if request.context else []
            if not ctx:
                ctx = m.raw_prompt("") or ([m.model.eos] if m.model.eos >= 0 else [])
            if not ctx:
                raise RequestError(f"the model of member {m.name!r} has neither a BOS nor an EOS token to begin "
                                   "an empty context with; give a context", param="context")
            toks = text_ids if text_ids is not None else m.tokenize_text(str(request.text))
            by_model[key] = (list(ctx), list(toks))
        ctx, toks = by_model[key]
        if len(ctx) + len(toks) > loaded.base_n_ctx[i]:
            raise ContextOverflowError(
                f"the context and text are {len(ctx)} + {len(toks)} tokens but member {m.name!r} has a context of "
                f"{loaded.base_n_ctx[i]} tokens; score shorter texts (split a long document) or raise n_ctx in "
                "models.yaml",
                param="text")
        contexts[i] = ctx
        tokens.append(toks)
    if granularity == "token" and any(t != tokens[0] for t in tokens[1:]):
        k = next(j for j, t in enumerate(tokens) if t != tokens[0])
        raise RequestError(f"members {members[scored[0]].name!r} and {members[scored[k]].name!r} tokenize the text "
                           "differently: granularity token needs one vocabulary; use granularity word",
                           param="granularity")
    text = request.text.encode() if isinstance(request.text, str) else None
    return ScorePlan(scored, weights, contexts, tokens, text, granularity)


def run_score(members: Sequence[MemberContext], plan: ScorePlan, request: ScoreRequest,
              cancel: Callable[[], bool] | None = None) -> TextLikelihood:
    """Score a planned request with a slot's members (one batched pass per scored member)."""
    scored = [members[i] for i in plan.scored]
    contexts = [plan.contexts[i] for i in plan.scored]
    end = cast(End, request.end)  # checked by plan_score
    if plan.granularity == "token":
        tl = token_likelihood(scored, contexts, plan.tokens[0], end=end, weights=plan.weights,
                              top_n=request.top_n, cancel=cancel)
    else:
        tl = word_likelihood(scored, contexts, plan.tokens, text=plan.text, end=end, top_n=request.top_n,
                             cancel=cancel)
    return replace(tl, weights=tuple(plan.weights))
