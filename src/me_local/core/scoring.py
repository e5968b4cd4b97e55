"""Scoring a token sequence: each position's log-probability under one member, from logits
at every position, computed in chunks so that ``n_positions x n_vocab`` never exists at once.

The seam is one backend method, :meth:`ScoringMember.evaluate_rows`: append tokens to the
cache with logits at every position and hand the raw rows back in chunks. Everything else
is here, in numpy, and identical for every backend:

- :func:`prime` brings a member's cache to a context (reusing the prefix it holds), so
  that its last logits predict the first token to score;
- :func:`score` reduces one member's rows to a :class:`TokenScores`: per position the
  log-probability of the next token of the sequence, the log of the probability mass of
  the member's word-start tokens and of its end-of-generation tokens, and optionally the
  top-N ``(id, logprob)``;
- :func:`score_shared` scores several members that share a vocabulary over the same
  tokens in lockstep (chunk by chunk), so that the mixture's own top-N alternatives are
  exact: they need every member's row of a position at once.

Rows: for ``n`` scored tokens there are ``n + 1`` rows. Row ``i < n`` is the distribution
that predicts ``tokens[i]`` (row 0 comes from the last cached token, before the span);
row ``n`` follows the last token (what the text's end needs: the word-start mass that
says its last word is complete, the end-of-generation mass).

Numerics: the normaliser and the word-start mass are sums of ``exp(l - max)`` in float32
(one in-place pass of exp per row, a pairwise sum, a dot product with the word-start mask:
about 1e-6 relative, 0.3 ms per row of 262,144 on this machine's CPU); a word-start mass that underflows there (every
word-start token more than ~87 nats below the row's best) is recomputed exactly in float64
for that row. The end-of-generation mass (a few tokens) comes straight from their logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..errors import ContextOverflowError
from .draw import common_prefix
from .types import Member

LogitRows = npt.NDArray[np.floating[Any]]
"""A chunk of next-token logit rows, shape ``(rows, n_vocab)``."""
TopList = list[tuple[int, float]]
"""The most probable tokens of a row as ``(id, logprob)``, best first."""


@runtime_checkable
class ScoringMember(Member, Protocol):
    """A :class:`Member` that can score text: logits at every position, and which of its
    tokens begin a word and which end a generation."""

    @property
    def word_start(self) -> npt.NDArray[np.bool_]:
        """Per token id: whether it may begin a word (whitespace-initial piece, or it ends
        the generation): word-level ME's restricted first token draws from these."""
        ...

    @property
    def eog(self) -> npt.NDArray[np.bool_]:
        """Per token id: whether it ends a generation."""
        ...

    def evaluate_rows(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None
                      ) -> Iterator[LogitRows]:
        """Append ``tokens`` to the cache, yielding the raw next-token logits of every position
        from the last cached token on: ``len(tokens) + 1`` rows in order, in chunks. The first
        chunk is the current logits (one row, from the last evaluate), before anything is
        decoded; the cache must hold at least one token whose logits are current (see
        :func:`prime`). A chunk is valid until the iterator advances (copy what you keep);
        the backend bounds a chunk's rows so that memory stays small whatever the length.
        Afterwards :meth:`Member.logits` is the last row. May raise :class:`Cancelled`
        between chunks, leaving ``cached`` true to what was evaluated."""
        ...


@dataclass(frozen=True)
class TokenScores:
    """One member's scores of a token sequence appended to a context (``n`` tokens, ``n + 1``
    rows; row ``i`` predicts ``tokens[i]``, row ``n`` follows the last token)."""

    tokens: npt.NDArray[np.int64]
    """The scored tokens, shape ``(n,)``."""
    logprob: npt.NDArray[np.float64]
    """``log p(tokens[i] | context, tokens[:i])``, shape ``(n,)``."""
    start_mass: npt.NDArray[np.float64]
    """log of the probability mass of the member's word-start tokens at each row, ``(n + 1,)``."""
    eog_mass: npt.NDArray[np.float64]
    """log of the probability mass of its end-of-generation tokens at each row, ``(n + 1,)``."""
    top: list[TopList] | None = None
    """With ``top_n``: each row's most probable tokens, ``n + 1`` lists."""

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])


REDUCE_BLOCK_BYTES = 4 << 20
"""Rows are reduced a block of at most this many bytes at a time (at least one row): the
block's ``exp`` buffer stays in the CPU's cache through the passes over it (subtract, exp,
sum, dot) instead of streaming a whole chunk through memory once per pass. Measured on this
machine's CPU with SmolLM2's 49,152-token vocabulary: 0.21 ms a row in chunks of 341 rows
(67 MB) and 0.35 in chunks of 512, against 0.075 in chunks of 128 (docs/performance.md)."""


class _Reducer:
    """Reduces chunks of logit rows of one vocabulary to log-probabilities and masses."""

    def __init__(self, word_start: npt.NDArray[np.bool_], eog: npt.NDArray[np.bool_]) -> None:
        self.ws = np.asarray(word_start, dtype=bool)
        self.ws_f32 = self.ws.astype(np.float32)
        self.eog_ids = np.nonzero(np.asarray(eog, dtype=bool))[0]
        self.block = max(1, REDUCE_BLOCK_BYTES // (4 * max(1, self.ws.shape[0])))
        self._buf: npt.NDArray[np.float32] | None = None

    def reduce(self, rows: LogitRows, targets: npt.NDArray[np.int64]
               ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64],
                          npt.NDArray[np.float64]]:
        """For each row: its log normaliser, the target's log-probability (``targets[i] < 0``:
        no target, NaN), and the log masses of the word-start and end sets (row by row, a
        cache-sized block of rows at a time: :data:`REDUCE_BLOCK_BYTES`)."""
        x = np.asarray(rows, dtype=np.float32)
        n = x.shape[0]
        if n <= self.block:
            return self._reduce(x, targets)
        parts = [self._reduce(x[i:i + self.block], targets[i:i + self.block]) for i in range(0, n, self.block)]
        lse, lp, ws, eg = (np.concatenate(p) for p in zip(*parts))
        return lse, lp, ws, eg

    def _reduce(self, x: npt.NDArray[np.float32], targets: npt.NDArray[np.int64]
                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64],
                           npt.NDArray[np.float64]]:
        n = x.shape[0]
        if self._buf is None or self._buf.shape[0] < n or self._buf.shape[1] != x.shape[1]:
            self._buf = np.empty(x.shape, dtype=np.float32)
        e = self._buf[:n]
        mx32 = x.max(axis=1)
        np.subtract(x, mx32[:, None], out=e)
        np.exp(e, out=e)  # one pass of exp over the rows, in place
        mx = mx32.astype(np.float64)
        total = e.sum(axis=1).astype(np.float64)  # numpy's pairwise sum: ~1e-7 relative
        # a dot product per row (BLAS): several times faster here than one matrix-vector product
        ws = np.array([np.dot(r, self.ws_f32) for r in e], dtype=np.float64)
        lse = mx + np.log(total)
        with np.errstate(divide="ignore"):
            ws_mass = mx + np.log(ws) - lse
        for i in np.nonzero(ws == 0.0)[0]:  # underflow in float32: exactly, in float64
            if self.ws.any():
                sub = np.asarray(x[i], dtype=np.float64)[self.ws]
                m = sub.max()
                ws_mass[i] = m + np.log(np.exp(sub - m).sum()) - lse[i]
        if self.eog_ids.size:  # a few tokens: straight from their logits
            sub = x[:, self.eog_ids].astype(np.float64)
            m = sub.max(axis=1)
            eog_mass = m + np.log(np.exp(sub - m[:, None]).sum(axis=1)) - lse
        else:
            eog_mass = np.full(n, -np.inf)
        have = targets >= 0
        lp = np.full(targets.shape[0], np.nan)
        if have.any():
            idx = np.nonzero(have)[0]
            lp[idx] = x[idx, targets[idx]].astype(np.float64) - lse[idx]
        return lse, lp, ws_mass, eog_mass


def _top(rows: npt.NDArray[np.floating[Any]], n: int) -> list[TopList]:
    """Each row's ``n`` largest entries as (id, value), best first (rows are log-probabilities)."""
    n = min(n, rows.shape[1])
    part = np.argpartition(-rows, n - 1, axis=1)[:, :n]
    out = []
    for r, idx in zip(rows, part):
        idx = idx[np.argsort(-r[idx], kind="stable")]
        out.append([(int(i), float(r[i])) for i in idx])
    return out


def prime(member: Member, context: Sequence[int], n_more: int = 0,
          cancel: Callable[[], bool] | None = None) -> None:
    """Make ``member``'s cache exactly ``context`` with the last token's logits current,
    evaluating only what it does not hold already (at least the last context token), and
    check that ``n_more`` tokens will fit after it."""
    if not context:
        raise ContextOverflowError(
            f"member {member.name!r} has no context to predict the first token from; "
            "give a context of at least one token (the model's BOS, or the prompt)", param="prompt")
    if len(context) + n_more > member.n_ctx:
        raise ContextOverflowError(
            f"the context and text are {len(context) + n_more} tokens but member {member.name!r} has a "
            f"context of {member.n_ctx} tokens; score shorter texts or raise n_ctx in models.yaml")
    keep = min(common_prefix(member.cached, context), len(context) - 1)
    member.truncate(keep)
    member.evaluate(list(context[len(member.cached):]), cancel)


def score(member: ScoringMember, tokens: Sequence[int], *, top_n: int = 0,
          cancel: Callable[[], bool] | None = None) -> TokenScores:
    """Score ``tokens`` appended to ``member``'s cache (its last logits must be current:
    :func:`prime` it first) in one batched pass. The cache then holds the tokens too."""
    reducer = _Reducer(member.word_start, member.eog)
    toks = np.asarray(list(tokens), dtype=np.int64)
    targets = np.append(toks, -1)
    n_rows = toks.shape[0] + 1
    lp = np.empty(n_rows)
    ws = np.empty(n_rows)
    eg = np.empty(n_rows)
    top: list[TopList] | None = [] if top_n > 0 else None
    at = 0
    for rows in member.evaluate_rows(toks.tolist(), cancel):
        m = rows.shape[0]
        lse, lp[at:at + m], ws[at:at + m], eg[at:at + m] = reducer.reduce(rows, targets[at:at + m])
        if top is not None:
            top.extend(_top(np.asarray(rows, dtype=np.float32) - lse[:, None].astype(np.float32), top_n))
        at += m
    if at != n_rows:
        raise RuntimeError(f"member {member.name!r} gave {at} rows for {n_rows - 1} tokens")
    return TokenScores(toks, lp[:-1], ws, eg, top)


@dataclass(frozen=True)
class SharedScores:
    """:func:`score_shared`'s result: each member's scores, and with ``top_n`` the mixture's
    own most probable tokens per row (``n + 1`` lists of ``(id, log Σ_k λ_k p_k(id))``)."""

    members: list[TokenScores]
    mixture_top: list[TopList] | None


def score_shared(members: Sequence[ScoringMember], tokens: Sequence[int], weights: Sequence[float] | None = None,
                 *, top_n: int = 0, cancel: Callable[[], bool] | None = None) -> SharedScores:
    """Score the same ``tokens`` under members that share a vocabulary (each primed to its own
    context), chunk by chunk in lockstep: the mixture's top-N with ``weights`` (None: equal)
    needs every member's row of a position together. One batched pass per member."""
    k = len(members)
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    toks = np.asarray(list(tokens), dtype=np.int64)
    targets = np.append(toks, -1)
    n_rows = toks.shape[0] + 1
    reducers = [_Reducer(m.word_start, m.eog) for m in members]
    lp = np.empty((k, n_rows))
    ws = np.empty((k, n_rows))
    eg = np.empty((k, n_rows))
    tops: list[list[TopList]] | None = [[] for _ in members] if top_n > 0 else None
    mix_top: list[TopList] | None = [] if top_n > 0 else None
    iters = [m.evaluate_rows(toks.tolist(), cancel) for m in members]
    chunks: list[LogitRows | None] = [None] * k
    offs = [0] * k
    at = 0
    while at < n_rows:
        for j in range(k):  # a member whose chunk is used up moves on (its old chunk is dead then)
            chunk = chunks[j]
            if chunk is None or offs[j] == chunk.shape[0]:
                nxt = next(iters[j], None)
                if nxt is None:
                    raise RuntimeError(f"member {members[j].name!r} gave {at} rows for {n_rows - 1} tokens")
                chunks[j], offs[j] = nxt, 0
        width = min(c.shape[0] - o for c, o in zip(chunks, offs) if c is not None)
        sl = slice(at, at + width)
        mix = None
        for j in range(k):
            chunk = chunks[j]
            assert chunk is not None
            rows = chunk[offs[j]:offs[j] + width]
            lse, lp[j, sl], ws[j, sl], eg[j, sl] = reducers[j].reduce(rows, targets[sl])
            if tops is not None:
                logp = np.asarray(rows, dtype=np.float32) - lse[:, None].astype(np.float32)
                tops[j].extend(_top(logp, top_n))
                if w[j] > 0:
                    part = w[j] * np.exp(logp)
                    mix = part if mix is None else mix + part
            offs[j] += width
        if mix_top is not None and mix is not None:
            with np.errstate(divide="ignore"):
                mix_top.extend(_top(np.log(mix), top_n))
        at += width
    for it in iters:  # run each to its end: the backend finishes its bookkeeping there
        for _ in it:
            raise RuntimeError("a member gave more rows than tokens")
    scores = [TokenScores(toks, lp[j, :-1].copy(), ws[j].copy(), eg[j].copy(), tops[j] if tops else None)
              for j in range(k)]
    return SharedScores(scores, mix_top)
