"""Exact likelihoods of a text under an ensemble, at both granularities, and the weights that
maximise them (expectation-maximisation). Pure numpy; docs/likelihood.md has the derivations.

Each member scores the text once (:mod:`.scoring`: one batched pass with logits at every
position); everything after that is arithmetic on the per-position numbers, so the
ensemble's likelihood at any weights, and the fitting of the weights, cost no further
model evaluation.

**Token granularity** (the members share a vocabulary): the units are the tokens and

    log p(text) = Σ_t log Σ_k λ_k p_k(x_t | x_<t)

**Word granularity** (any vocabularies): the probability that word-level ME (:mod:`.words`)
writes the text, with each member writing its own canonical tokenization of it (the one
``tokenize_text`` gives for the whole continuation, as every likelihood of a tokenized text
counts). For member k, a *word* is a token that begins with whitespace (or the text's first
token) and the tokens up to the next such token; written at a word boundary, its
probability is

    P_k(w | text) = Π_{t ∈ w} p_k(t | ·) · M_k(after w) / M_k(before w)

where ``M_k`` is k's probability mass on its word-start tokens (whitespace-initial or end of
generation) at that position: the division is the restricted first token, the factor after
is the probability that k's word ends there. The text's first word is not restricted (no
division), as in generation.

Members split a text into words differently (SmolLM2 writes ``"\\n\\nThe"`` as the words
``"\\n"`` and ``"\\nThe"``; Gemma 3 as one word, ``"\\n\\n"`` + ``"The"``). The **units** are
the pieces between the positions where *every* member's word begins: every way to write the
text passes through them, so the likelihood is a sum over units. Inside a unit where the
members' words differ, the ways to write it form a small lattice (a member drawn per word,
each word from one member, mixing only where a word boundary is shared) and the unit's
probability is its forward sum, not a plain mixture: ``λ_a² P_a + λ_b P_b`` when member a
writes that unit in two words and b in one. Where every member's word boundaries agree
(most units) it is ``Σ_k λ_k P_k(u)``.

Runs of more than 32 bytes without a shared word boundary (CJK, long identifiers) get
forced cuts as generation makes them, at the first position at least
:data:`~.words.WORD_MAX_BYTES` bytes after the unit's start that is a token boundary of
every member (and not inside a UTF-8 character): the unit before ends there with no
word-end factor and the next starts unrestricted. Generation cuts at the writer's own
token boundary instead, so there the two can differ (docs/likelihood.md).

**The text's end** (``end``): ``"prefix"``: the text is how the continuation begins,
nothing is said of what follows (what lm-evaluation-harness scores; the default);
``"word"``: the text ends at a word boundary (its last word is complete: the next token
begins a word or ends the generation); ``"eog"``: the generation ends after the text. The
last two add factors at the end (an extra unit at token granularity, the last unit's
word-end factor and an end unit at word granularity).

**Weights**: :func:`fit_weights` maximises Σ_u log Z_u(λ) over the simplex by EM (λ_k ←
the expected share of member k's draws); every unit's member log-probabilities are
computed once. Without lattice units the objective is concave and EM finds the optimum;
lattices make it a polynomial in λ, where EM still never lowers the likelihood, and the
result is never worse than the best single member (it checks them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..errors import RequestError
from .scoring import ScoringMember, TokenScores, TopList, prime, score, score_shared
from .words import WORD_MAX_BYTES

End = Literal["prefix", "word", "eog"]
ENDS: tuple[End, ...] = ("prefix", "word", "eog")
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_WHITESPACE = b" \t\n\r\x0b\x0c"


# ------------------------------------------------------------------------ unit scores


class Edge(NamedTuple):
    """One word of one member inside a lattice unit: from node ``start`` to node ``end``."""

    start: int
    end: int
    member: int
    logp: float
    """log P_member(this word | the text before it), with its boundary factors."""


@dataclass(frozen=True)
class Lattice:
    """The ways the members can write one unit when their word boundaries inside it differ:
    nodes at byte ``positions`` (the unit's start first, its end last), an edge per word."""

    positions: tuple[int, ...]
    edges: tuple[Edge, ...]

    def log_z(self, log_w: FloatArray) -> float:
        """log of the unit's probability at log-weights ``log_w`` (forward sum)."""
        alpha = np.full(len(self.positions), -np.inf)
        alpha[0] = 0.0
        for e in sorted(self.edges, key=lambda e: e.end):
            alpha[e.end] = np.logaddexp(alpha[e.end], alpha[e.start] + log_w[e.member] + e.logp)
        return float(alpha[-1])

    def draws(self, log_w: FloatArray) -> FloatArray:
        """Expected number of words each member writes in this unit at ``log_w`` (forward-backward)."""
        n = len(self.positions)
        alpha = np.full(n, -np.inf)
        beta = np.full(n, -np.inf)
        alpha[0] = 0.0
        beta[-1] = 0.0
        for e in sorted(self.edges, key=lambda e: e.end):
            alpha[e.end] = np.logaddexp(alpha[e.end], alpha[e.start] + log_w[e.member] + e.logp)
        for e in sorted(self.edges, key=lambda e: -e.start):
            beta[e.start] = np.logaddexp(beta[e.start], beta[e.end] + log_w[e.member] + e.logp)
        out = np.zeros(log_w.shape[0])
        z = alpha[-1]
        if not np.isfinite(z):
            return out
        for e in self.edges:
            out[e.member] += math.exp(alpha[e.start] + log_w[e.member] + e.logp + beta[e.end] - z)
        return out


@dataclass(frozen=True)
class UnitScores:
    """Per-unit member log-probabilities of some text (one text, or many concatenated):
    what every measure and the weight fitting need, computed once.

    ``logp[u, k]`` is log P_k(unit u | the text before it) with member k alone (weight 1);
    the ensemble's probability of unit u is Σ_k λ_k exp(logp[u, k]), except for the units in
    ``lattices``, where the members' words inside the unit differ (see the module doc)."""

    logp: FloatArray
    """Shape ``(n_units, n_members)``."""
    n_bytes: IntArray
    """UTF-8 bytes of each unit (0 for an end unit)."""
    n_words: IntArray
    """Whitespace-separated words that begin in each unit."""
    lattices: Mapping[int, Lattice] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return int(self.logp.shape[0])

    @property
    def n_members(self) -> int:
        return int(self.logp.shape[1])

    def member_logp(self) -> FloatArray:
        """Each member's log-likelihood of the whole text, alone."""
        out: FloatArray = self.logp.sum(axis=0)
        return out

    def unit_logp(self, weights: Sequence[float] | FloatArray) -> FloatArray:
        """The ensemble's log-probability of each unit at ``weights`` (normalised here)."""
        log_w = log_weights(weights, self.n_members)
        out = _logsumexp(self.logp + log_w[None, :], axis=1)
        for u, lat in self.lattices.items():
            out[u] = lat.log_z(log_w)
        return out

    def total(self, weights: Sequence[float] | FloatArray) -> float:
        """The ensemble's log-likelihood of the whole text at ``weights``."""
        return float(self.unit_logp(weights).sum())

    def take(self, units: Sequence[int] | IntArray) -> UnitScores:
        """The units at these indices (in this order)."""
        idx = np.asarray(units, dtype=np.int64)
        where = {int(u): i for i, u in enumerate(idx)}
        lat = {where[u]: v for u, v in self.lattices.items() if u in where}
        return UnitScores(self.logp[idx], self.n_bytes[idx], self.n_words[idx], lat)

    @staticmethod
    def concat(parts: Sequence[UnitScores]) -> UnitScores:
        """Units of several texts, one after the other (their members in the same order)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        lat: dict[int, Lattice] = {}
        at = 0
        for p in parts:
            lat.update({at + u: v for u, v in p.lattices.items()})
            at += p.n_units
        return UnitScores(np.concatenate([p.logp for p in parts]), np.concatenate([p.n_bytes for p in parts]),
                          np.concatenate([p.n_words for p in parts]), lat)


def log_weights(weights: Sequence[float] | FloatArray, n: int) -> FloatArray:
    """log of ``weights`` normalised (-inf for a weight of 0)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{w.shape[0] if w.ndim == 1 else w.shape} weights for {n} members")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise RequestError("weights must be >= 0 with at least one positive", param="weights")
    with np.errstate(divide="ignore"):
        out: FloatArray = np.log(w / w.sum())
    return out


def _logsumexp(a: FloatArray, axis: int) -> FloatArray:
    m = a.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out: FloatArray = np.log(np.exp(a - m).sum(axis=axis)) + np.squeeze(m, axis=axis)
    return out


# ------------------------------------------------------------------------ measures


def bits_per_byte(logp: float, n_bytes: int) -> float:
    """−log2 p / bytes: comparable across tokenizers (UTF-8 bytes of the text)."""
    return -logp / (n_bytes * math.log(2)) if n_bytes else float("nan")


def perplexity_per_word(logp: float, n_words: int) -> float:
    """exp(−log p / words), words as :func:`count_words` counts them."""
    return math.exp(-logp / n_words) if n_words else float("nan")


def count_words(text: str | bytes) -> int:
    """Whitespace-separated words (maximal runs without ASCII whitespace): ``len(text.split())``
    for ASCII whitespace."""
    data = text.encode() if isinstance(text, str) else text
    return len(data.split())


def _word_heads(data: bytes) -> IntArray:
    """Byte offsets where a whitespace-separated word begins."""
    b = np.frombuffer(data, dtype=np.uint8)
    ws = np.isin(b, np.frombuffer(_WHITESPACE, dtype=np.uint8))
    prev_ws = np.concatenate([[True], ws[:-1]])
    return np.nonzero(~ws & prev_ws)[0].astype(np.int64)


def _count_in(heads: IntArray, starts: IntArray, ends: IntArray) -> IntArray:
    out: IntArray = (np.searchsorted(heads, ends, side="left") - np.searchsorted(heads, starts, side="left")
                     ).astype(np.int64)
    return out


# ------------------------------------------------------------------------ building units


def token_units(scores: Sequence[TokenScores], pieces: Sequence[bytes], *, end: End = "prefix"
                ) -> tuple[UnitScores, IntArray]:
    """Token granularity: one unit per token (``pieces``: each token's bytes), plus an end
    unit for ``end`` ``"word"`` (the next token begins a word) or ``"eog"`` (it ends the
    generation). Returns the units and their byte spans ``(n_units, 2)``."""
    _check_end(end)
    if not scores:
        raise ValueError("no members")
    toks = scores[0].tokens
    for s in scores[1:]:
        if not np.array_equal(s.tokens, toks):
            raise ValueError("token granularity needs every member to score the same tokens")
    if len(pieces) != toks.shape[0]:
        raise ValueError(f"{len(pieces)} pieces for {toks.shape[0]} tokens")
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    cols = [s.logprob for s in scores]
    n_bytes = int(ends[-1]) if lengths.size else 0
    spans = np.stack([starts, ends], axis=1) if lengths.size else np.zeros((0, 2), dtype=np.int64)
    if end != "prefix":
        cols = [np.append(c, (s.start_mass if end == "word" else s.eog_mass)[-1]) for c, s in zip(cols, scores)]
        spans = np.concatenate([spans, [[n_bytes, n_bytes]]]).astype(np.int64)
    heads = _word_heads(b"".join(pieces))
    units = UnitScores(np.stack(cols, axis=1), (spans[:, 1] - spans[:, 0]).astype(np.int64),
                       _count_in(heads, spans[:, 0], spans[:, 1]))
    return units, spans


def word_units(text: bytes, scores: Sequence[TokenScores], pieces: Sequence[Sequence[bytes]],
               starts_word: Sequence[npt.NDArray[np.bool_]], *, end: End = "prefix",
               names: Sequence[str] | None = None) -> tuple[UnitScores, IntArray]:
    """Word granularity over members with any vocabularies. Member k scored its own tokens
    of ``text`` (``scores[k]``); ``pieces[k]`` are their bytes (they must spell ``text``
    exactly) and ``starts_word[k]`` says which of them begin a word (whitespace-initial).
    Returns the units (see the module doc) and their byte spans ``(n_units, 2)``."""
    _check_end(end)
    k_n = len(scores)
    if not k_n or len(pieces) != k_n or len(starts_word) != k_n:
        raise ValueError("one score, piece list and word-start list per member")
    names = list(names) if names is not None else [f"#{k}" for k in range(k_n)]
    nb = len(text)
    bounds: list[IntArray] = []
    wstarts: list[IntArray] = []
    cums: list[FloatArray] = []
    for k in range(k_n):
        lengths = np.array([len(p) for p in pieces[k]], dtype=np.int64)
        spelled = b"".join(pieces[k])
        if spelled != text or (lengths == 0).any() or lengths.shape[0] != scores[k].n:
            at = next((i for i, (x, y) in enumerate(zip(spelled, text)) if x != y), min(len(spelled), nb))
            near = text[max(0, at - 10):at + 10].decode("utf-8", "replace")
            raise RequestError(f"member {names[k]!r}'s tokens do not spell the text byte for byte (at byte {at}: "
                               f"{near!r}), so its words cannot be placed in it; a SentencePiece vocabulary "
                               "reads the character U+2581 as a space: replace it in the text, or score "
                               "the members at token granularity or alone", param="prompt")
        b = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # n + 1 token boundaries
        bounds.append(b)
        flags = np.asarray(starts_word[k], dtype=bool)
        ws = b[:-1][flags]
        wstarts.append(np.union1d(ws, [0]).astype(np.int64) if nb else np.zeros(0, dtype=np.int64))
        cums.append(np.concatenate([[0.0], np.cumsum(scores[k].logprob)]))
    shared = wstarts[0]
    common_tok = bounds[0]
    for k in range(1, k_n):
        shared = np.intersect1d(shared, wstarts[k])
        common_tok = np.intersect1d(common_tok, bounds[k])

    # unit boundaries: shared word starts, forced cuts, the end; kinds: restricted start or not
    cut_at: list[int] = []
    marks = [int(x) for x in shared] + [nb]
    for a, b_ in itertools.pairwise(marks):
        s = a
        while True:
            i = int(np.searchsorted(common_tok, s + WORD_MAX_BYTES, side="left"))
            while i < common_tok.shape[0] and int(common_tok[i]) < nb and 0x80 <= text[int(common_tok[i])] < 0xC0:
                i += 1  # not inside a UTF-8 character
            if i >= common_tok.shape[0] or int(common_tok[i]) > b_:
                break
            s = int(common_tok[i])
            cut_at.append(s)
            if s == b_:
                break
    cuts = set(cut_at)
    points = np.array(sorted(set(marks) | cuts), dtype=np.int64)  # [0, ..., nb] when nb > 0
    if nb == 0:
        points = np.zeros(0, dtype=np.int64)
    starts_u = points[:-1]
    ends_u = points[1:]
    n_u = starts_u.shape[0]
    restricted_start = np.array([p != 0 and int(p) not in cuts for p in starts_u], dtype=bool)
    end_factor = np.array([int(p) not in cuts and (int(p) < nb or end != "prefix") for p in ends_u], dtype=bool)

    logp = np.zeros((n_u, k_n))
    idx_of: list[tuple[IntArray, IntArray]] = []
    for k in range(k_n):
        i0 = np.searchsorted(bounds[k], starts_u)
        i1 = np.searchsorted(bounds[k], ends_u)
        idx_of.append((i0, i1))
        m = scores[k].start_mass
        logp[:, k] = (cums[k][i1] - cums[k][i0] - np.where(restricted_start, m[i0], 0.0)
                      + np.where(end_factor, m[i1], 0.0))

    # units where some member has a word start of its own inside: lattices
    lattices: dict[int, Lattice] = {}
    inner: dict[int, list[tuple[int, int]]] = {}
    point_set = set(int(p) for p in points)
    for k in range(k_n):
        for p in wstarts[k]:
            if int(p) not in point_set:
                u = int(np.searchsorted(points, p, side="right")) - 1
                inner.setdefault(u, []).append((k, int(p)))
    for u, found in inner.items():
        a, b_ = int(starts_u[u]), int(ends_u[u])
        positions = sorted({a, b_} | {p for _, p in found})
        node = {p: i for i, p in enumerate(positions)}
        edges: list[Edge] = []
        for k in range(k_n):
            own = [a] + sorted(p for kk, p in found if kk == k) + [b_]
            m = scores[k].start_mass
            for p, q in itertools.pairwise(own):
                ip = int(np.searchsorted(bounds[k], p))
                iq = int(np.searchsorted(bounds[k], q))
                lp = cums[k][iq] - cums[k][ip]
                if p != a or restricted_start[u]:
                    lp -= m[ip]
                if q != b_ or end_factor[u]:
                    lp += m[iq]
                edges.append(Edge(node[p], node[q], k, float(lp)))
        lattices[u] = Lattice(tuple(positions), tuple(edges))

    spans = np.stack([starts_u, ends_u], axis=1) if n_u else np.zeros((0, 2), dtype=np.int64)
    if end == "eog":  # the end: a draw whose first token ends the generation
        end_restricted = nb > 0 and nb not in cuts
        row = [s.eog_mass[-1] - (s.start_mass[-1] if end_restricted else 0.0) for s in scores]
        logp = np.concatenate([logp, np.array([row])])
        spans = np.concatenate([spans, [[nb, nb]]]).astype(np.int64)
    heads = _word_heads(text)
    units = UnitScores(logp, (spans[:, 1] - spans[:, 0]).astype(np.int64),
                       _count_in(heads, spans[:, 0], spans[:, 1]), lattices)
    return units, spans.astype(np.int64)


def _check_end(end: str) -> None:
    if end not in ENDS:
        raise RequestError(f"unknown end {end!r}; choose one of {', '.join(ENDS)}", param="end")


# ------------------------------------------------------------------------ from members


@runtime_checkable
class TextMember(ScoringMember, Protocol):
    """A member that can score a text: :class:`ScoringMember` plus its tokenizer for
    continuation text (as :class:`~.words.WordMember` has it)."""

    def tokenize_text(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class TextLikelihood:
    """A text's likelihood under each member and the material for the ensemble's at any
    weights: ``units`` (the per-unit member log-probabilities), their byte ``spans`` in the
    text, each member's :class:`TokenScores` of its own tokens, and at token granularity
    with ``top_n`` the mixture's top alternatives per position."""

    granularity: Literal["token", "word"]
    end: End
    members: tuple[str, ...]
    text: bytes
    units: UnitScores
    spans: IntArray
    scores: tuple[TokenScores, ...]
    mixture_top: list[TopList] | None = None
    """Token granularity with ``top_n``: per row (``n + 1``, as :class:`TokenScores`) the
    mixture's most probable tokens ``(id, log Σ_k λ_k p_k)`` at the weights given."""
    weights: tuple[float, ...] | None = None
    """The ensemble's weights for these members (normalised), where the caller knows them
    (``Engine.score`` sets them): ``logp(tl.weights)`` is the ensemble's likelihood."""

    @property
    def n_bytes(self) -> int:
        return len(self.text)

    @property
    def n_words(self) -> int:
        return count_words(self.text)

    def member_logp(self) -> FloatArray:
        """Each member's log-likelihood of the text, alone."""
        return self.units.member_logp()

    def logp(self, weights: Sequence[float] | FloatArray) -> float:
        """The ensemble's log-likelihood of the text at ``weights``."""
        return self.units.total(weights)

    def unit_logp(self, weights: Sequence[float] | FloatArray) -> FloatArray:
        """The ensemble's log-probability of each unit (they sum to :meth:`logp`)."""
        return self.units.unit_logp(weights)


def text_likelihood(
    members: Sequence[TextMember],
    contexts: Sequence[Sequence[int]],
    text: str,
    *,
    granularity: Literal["token", "word"],
    end: End = "prefix",
    weights: Sequence[float] | None = None,
    top_n: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> TextLikelihood:
    """Score ``text`` as the continuation of each member's ``contexts[k]`` (its own prompt
    tokens: at least one token, the BOS at least; a member's cache is reused where it holds
    the context already) and return its likelihood material. One batched pass per member.

    ``token`` granularity needs members that share a vocabulary (they must tokenize the
    text identically); ``weights`` (default equal) matter only for ``mixture_top``, which
    ``top_n`` asks for. ``word`` granularity takes any vocabularies; ``top_n`` then gives
    each member's own top tokens in its :class:`TokenScores`."""
    _check_end(end)
    if len(members) != len(contexts) or not members:
        raise ValueError("one context per member, and at least one member")
    if granularity == "token":
        tokens = members[0].tokenize_text(text)
        for m in members[1:]:
            if m.tokenize_text(text) != tokens:
                raise RequestError(f"members {members[0].name!r} and {m.name!r} tokenize the text differently: "
                                   "granularity token needs one vocabulary; use granularity word",
                                   param="granularity")
        return token_likelihood(members, contexts, tokens, end=end, weights=weights, top_n=top_n, cancel=cancel)
    if granularity != "word":
        raise RequestError(f"unknown granularity {granularity!r}; choose one of token, word", param="granularity")
    return word_likelihood(members, contexts, [m.tokenize_text(text) for m in members], text=text.encode(),
                           end=end, top_n=top_n, cancel=cancel)


def word_likelihood(
    members: Sequence[ScoringMember],
    contexts: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    *,
    text: bytes | None = None,
    end: End = "prefix",
    top_n: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> TextLikelihood:
    """Word granularity over each member's own tokens of one text (``tokens[k]``: member k's
    tokenization of it, as ``tokenize_text`` gives it; their bytes must spell ``text``,
    default the first member's bytes): score them after each member's context (one batched
    pass per member) and place the members' words in the text. ``top_n`` gives each
    member's own top tokens."""
    _check_end(end)
    if len(members) != len(contexts) or len(members) != len(tokens) or not members:
        raise ValueError("one context and one token list per member, and at least one member")
    scores = []
    pieces = []
    starts = []
    for m, ctx, toks in zip(members, contexts, tokens):
        prime(m, ctx, len(toks), cancel)
        scores.append(score(m, toks, top_n=top_n, cancel=cancel))
        pieces.append([m.token_bytes(t) for t in toks])
        starts.append(np.asarray(m.word_start, dtype=bool)[np.asarray(list(toks), dtype=np.int64)])
    data = b"".join(pieces[0]) if text is None else text
    names = tuple(m.name for m in members)
    units, spans = word_units(data, scores, pieces, starts, end=end, names=names)
    return TextLikelihood("word", end, names, data, units, spans, tuple(scores))


def token_likelihood(
    members: Sequence[ScoringMember],
    contexts: Sequence[Sequence[int]],
    tokens: Sequence[int],
    *,
    end: End = "prefix",
    weights: Sequence[float] | None = None,
    top_n: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> TextLikelihood:
    """Token granularity over token ids (members that share a vocabulary): score ``tokens``
    after each member's context, in lockstep (one batched pass per member), with the
    mixture's exact top-``top_n`` alternatives at ``weights`` when asked."""
    _check_end(end)
    if len(members) != len(contexts) or not members:
        raise ValueError("one context per member, and at least one member")
    toks = list(tokens)
    for m, ctx in zip(members, contexts):
        prime(m, ctx, len(toks), cancel)
    shared = score_shared(members, toks, weights, top_n=top_n, cancel=cancel)
    pieces = [members[0].token_bytes(t) for t in toks]
    units, spans = token_units(shared.members, pieces, end=end)
    return TextLikelihood("token", end, tuple(m.name for m in members), b"".join(pieces), units, spans,
                          tuple(shared.members), shared.mixture_top)


# ------------------------------------------------------------------------ fitting weights


@dataclass(frozen=True)
class WeightFit:
    """:func:`fit_weights`' result."""

    weights: FloatArray
    """The fitted weights (sum 1)."""
    log_likelihood: float
    """The log-likelihood of the fitting units at ``weights``."""
    trace: tuple[float, ...]
    """The log-likelihood at the starting weights, then after each EM iteration (never decreasing)."""
    iterations: int
    converged: bool
    """The last iteration gained less than the tolerance."""


def fit_weights(units: UnitScores, *, start: Sequence[float] | None = None, tol: float = 1e-9,
                max_iter: int = 10_000) -> WeightFit:
    """The weights that maximise the ensemble's log-likelihood of ``units``, by EM from
    ``start`` (default equal): λ_k ← member k's expected share of the draws (its mean
    responsibility where every member writes a unit as one word), until an iteration gains
    less than ``tol`` nats per unit. The result is never worse than the best single member:
    if one alone (weight 1) scores higher than where EM stopped (an optimum on the boundary
    that EM only approaches, or a local optimum of a lattice), that member is returned."""
    k_n = units.n_members
    w = np.full(k_n, 1.0 / k_n) if start is None else np.exp(log_weights(start, k_n))
    if units.n_units == 0:
        return WeightFit(w, 0.0, (0.0,), 0, True)
    simple = np.ones(units.n_units, dtype=bool)
    simple[list(units.lattices)] = False
    ls = units.logp[simple]
    lats = list(units.lattices.values())
    trace = [units.total(w)]
    converged = False
    it = 0
    while it < max_iter:
        it += 1
        with np.errstate(divide="ignore"):
            log_w = np.log(w)
        a = ls + log_w[None, :]
        resp = np.exp(a - _logsumexp(a, axis=1)[:, None])
        counts = np.nan_to_num(resp).sum(axis=0)
        for lat in lats:
            counts += lat.draws(log_w)
        w = counts / counts.sum()
        trace.append(units.total(w))
        if trace[-1] - trace[-2] < tol * units.n_units:
            converged = True
            break
    best = units.total(w)
    for k in range(k_n):  # a single member: the corners of the simplex
        corner = np.zeros(k_n)
        corner[k] = 1.0
        alone = float(units.logp[:, k].sum())
        if alone > best:
            w, best = corner, alone
    return WeightFit(w, best, tuple(trace), it, converged)


def split_units(units: UnitScores, holdout: float, *, seed: int = 0) -> tuple[UnitScores, UnitScores]:
    """Split units at random into (fit, held out), ``holdout`` the held-out share (0 < h < 1),
    each part in the original order. The held-out part's bits per byte (its ``n_bytes``) say
    how fitted weights do on text they were not fitted to."""
    if not 0.0 < holdout < 1.0:
        raise RequestError(f"holdout must be between 0 and 1 (exclusive), not {holdout}", param="holdout")
    n = units.n_units
    n_hold = min(max(1, round(holdout * n)), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    held = np.sort(perm[:n_hold])
    fit = np.sort(perm[n_hold:])
    return units.take(fit), units.take(held)
