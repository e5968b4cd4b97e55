"""Sampling transforms in numpy: the reference semantics of the logit bias, the
penalties, temperature, top-k, top-p and min-p, the mixture used by ``ce`` mode,
and log-probabilities.

``me`` and ``single`` mode normally sample through the backend's native
sampler chain (no vocabulary-sized Python work per token); these functions
define what that chain must match and serve ``ce`` mode and fake members.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from .types import Constraint, Logits, NoTokenAllowed, Probs, SamplingParams


def softmax(logits: Logits, temperature: float = 1.0) -> Probs:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    probs: Probs = e / e.sum()
    return probs


def log_softmax(logits: Logits) -> Probs:
    z = np.asarray(logits, dtype=np.float64)
    m = z.max()
    out: Probs = z - (m + np.log(np.exp(z - m).sum()))
    return out


def penalize(logits: Logits, window: Sequence[int], params: SamplingParams) -> Probs:
    """llama.cpp's logit-bias sampler, then its penalties sampler, on a copy of ``logits``
    (float64). ``window`` is the generated tokens the penalties count (see
    :meth:`SamplingParams.penalty_window`). A token that occurs c > 0 times in it gets

        l -> (l / r if l > 0 else l * r) - c * frequency_penalty - presence_penalty

    with r the repeat penalty; the bias is added first."""
    out = np.array(logits, dtype=np.float64)
    if params.logit_bias:
        ids = np.fromiter((t for t, _ in params.logit_bias), dtype=np.int64, count=len(params.logit_bias))
        out[ids] += np.fromiter((b for _, b in params.logit_bias), dtype=np.float64, count=len(ids))
    if params.penalized and len(window):
        tokens, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
        lt = out[tokens]
        r = params.repeat_penalty
        lt = np.where(lt <= 0.0, lt * r, lt / r)
        out[tokens] = lt - (counts * params.frequency_penalty + params.presence_penalty)
    return out


def shaped_logits(logits: Logits, history: Sequence[int], params: SamplingParams) -> Logits:
    """``logits`` after the bias and the penalties over ``history`` (the generated tokens so far),
    or ``logits`` themselves when neither applies."""
    if not params.shapes_logits:
        return logits
    return penalize(logits, params.penalty_window(history), params)


def truncate(probs: Probs, top_k: int, top_p: float, min_p: float) -> Probs:
    """Apply top-k, then top-p, then min-p to a probability vector; renormalised.

    Always keeps at least the most probable token. After top-k only its k
    survivors are sorted for top-p, not the whole vocabulary.
    """
    p = np.asarray(probs, dtype=np.float64)
    n = p.shape[0]
    idx = np.argpartition(-p, top_k - 1)[:top_k] if 0 < top_k < n else None
    cand: Probs = p.copy() if idx is None else p[idx]
    cand /= cand.sum()
    if top_p < 1.0:
        order = np.argsort(-cand, kind="stable")
        cum = np.cumsum(cand[order])
        # smallest prefix whose mass reaches top_p (the crossing token included)
        cut = int(np.searchsorted(cum, top_p, side="left")) + 1
        cand[order[cut:]] = 0.0
        cand /= cand.sum()
    if min_p > 0.0:
        cand[cand < min_p * cand.max()] = 0.0
        cand /= cand.sum()
    if idx is None:
        return cand
    out = np.zeros(n, dtype=np.float64)
    out[idx] = cand
    return out


def transform(logits: Logits, params: SamplingParams) -> Probs:
    """softmax(l / T) then truncation: one member's sampling distribution."""
    if params.greedy:
        out = np.zeros(np.asarray(logits).shape[0], dtype=np.float64)
        out[int(np.argmax(logits))] = 1.0
        return out
    return truncate(softmax(logits, params.temperature), params.top_k, params.top_p, params.min_p)


def mixture(prob_rows: Sequence[Probs], weights: Sequence[float]) -> Probs:
    """Σ λ_i p_i with λ normalised."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = np.zeros_like(np.asarray(prob_rows[0], dtype=np.float64))
    for wi, row in zip(w, prob_rows):
        if wi > 0:
            out += wi * row
    return out


def ce_distribution(
    logit_rows: Sequence[Logits], weights: Sequence[float], params: SamplingParams, *, want_raw: bool = False,
    history: Sequence[int] = (), allowed: npt.NDArray[np.bool_] | None = None,
) -> tuple[Probs, Probs | None]:
    """``ce`` mode: trunc(Σ λ_i softmax(l_i / T)), and, when ``want_raw`` (logprobs were
    asked for), the untransformed mixture Σ λ_i softmax(l_i) (else None).

    Greedy takes the argmax of the untransformed mixture. With ``allowed`` (a grammar's mask)
    the tempered mixture is restricted to it and renormalised before the truncation (greedy:
    the argmax among the allowed tokens); the raw mixture stays unrestricted.

    A logit bias and the penalties (over ``history``, the generated tokens) apply to the
    mixture as to one model's logits: q, the mixture at temperature T, is softmax(L / T) for
    the logits L = T log q, which go through :func:`penalize` and back (softmax(L' / T)).
    At T = 1 that is the log of the mixture; a repeated token's q becomes q^r whatever T
    (T log q <= 0); an additive penalty d becomes a factor exp(-d / T), as it would on a
    member's logits. The untransformed mixture is then softmax(L') at T = 1, and greedy takes
    its argmax.
    """
    tempered, raw = ce_mixture(logit_rows, weights, params, want_raw=want_raw, history=history)
    if allowed is not None:
        tempered = restrict(tempered, allowed)
    if params.greedy:
        out = np.zeros_like(tempered)
        out[int(np.argmax(tempered))] = 1.0
        return out, raw
    return truncate(tempered, params.top_k, params.top_p, params.min_p), raw


def ce_mixture(
    logit_rows: Sequence[Logits], weights: Sequence[float], params: SamplingParams, *, want_raw: bool = False,
    history: Sequence[int] = (),
) -> tuple[Probs, Probs | None]:
    """``ce`` mode before truncation: the tempered mixture Σ λ_i softmax(l_i / T) (greedy: the
    untransformed one, whose argmax it takes), shaped by the bias and the penalties over
    ``history`` (see :func:`ce_distribution`), and the untransformed mixture when ``want_raw``."""
    if params.shapes_logits:
        return _ce_shaped(logit_rows, weights, params, want_raw, params.penalty_window(history))
    need_raw = want_raw or params.greedy or params.temperature == 1.0
    raw = mixture([softmax(row) for row in logit_rows], weights) if need_raw else None
    if params.greedy or params.temperature == 1.0:
        assert raw is not None
        tempered = raw
    else:
        tempered = mixture([softmax(row, params.temperature) for row in logit_rows], weights)
    return tempered, raw if want_raw else None


def restrict(probs: Probs, allowed: npt.NDArray[np.bool_]) -> Probs:
    """``probs`` restricted to ``allowed`` and renormalised (NoTokenAllowed when none has mass)."""
    out = np.where(allowed, probs, 0.0)
    total = out.sum()
    if not total > 0:
        raise NoTokenAllowed("no token is allowed")
    res: Probs = out / total
    return res


CANDIDATES = 1024
"""How many of the most likely tokens a constrained draw checks before it asks the constraint
for its whole-vocabulary mask (as the native sampler does)."""


def constrained_draw(probs: Probs, params: SamplingParams, constraint: Constraint, rng: np.random.Generator) -> int:
    """A draw from trunc(probs restricted to what ``constraint`` allows, renormalised): ``probs``
    is the distribution before truncation (softmax(l/T), or a tempered mixture; zero where a
    token is excluded otherwise); greedy, the most likely allowed token of ``probs``.

    The exact shortcuts of docs/grammar.md come first, so the whole vocabulary's mask is
    needed only when they do not apply: without truncation, a draw from ``probs`` kept if
    allowed (p(x)/p(G) overall); with top-k, the restricted top-k found among the
    :data:`CANDIDATES` most likely tokens; greedy, the first allowed among them."""
    n = probs.shape[0]
    m = min(n, CANDIDATES)
    k = params.top_k
    untruncated = (k <= 0 or k >= n) and params.top_p >= 1.0 and params.min_p <= 0.0

    def top(count: int) -> npt.NDArray[np.intp]:
        idx = np.flatnonzero(probs >= np.partition(probs, n - count)[n - count]) if count < n else np.arange(n)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        out: npt.NDArray[np.intp] = idx[probs[idx] > 0]
        return out

    if params.greedy:
        cand = top(m)
        ok = constraint.allowed(cand)
        if ok.any():
            return int(cand[int(np.argmax(ok))])
    elif untruncated:
        token = draw(probs, rng)
        if constraint.allowed(np.array([token]))[0]:
            return token
    elif 0 < k < n:
        cand = top(min(n, max(m, 4 * k)))
        keep = cand[constraint.allowed(cand)][:k]
        if len(keep) == k:
            sub = probs[keep] / probs[keep].sum()
            return int(keep[draw(truncate(sub, 0, params.top_p, params.min_p), rng)])
    restricted = restrict(probs, constraint.mask())
    if params.greedy:
        return int(np.argmax(restricted))
    return draw(truncate(restricted, k, params.top_p, params.min_p), rng)


def _ce_shaped(logit_rows: Sequence[Logits], weights: Sequence[float], params: SamplingParams, want_raw: bool,
               window: Sequence[int]) -> tuple[Probs, Probs | None]:
    """:func:`ce_mixture` with a bias or penalties (the mixture's logits shaped)."""
    need_raw = want_raw or params.greedy or params.temperature == 1.0
    raw = None
    if need_raw:
        with np.errstate(divide="ignore"):
            raw = softmax(penalize(np.log(mixture([softmax(row) for row in logit_rows], weights)), window, params))
    if params.greedy or params.temperature == 1.0:
        assert raw is not None
        tempered = raw
    else:
        t = params.temperature
        with np.errstate(divide="ignore"):
            mix_logits = t * np.log(mixture([softmax(row, t) for row in logit_rows], weights))
        tempered = softmax(penalize(mix_logits, window, params), t)
    return tempered, raw if want_raw else None


def draw(probs: Probs, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from a probability vector."""
    cum = np.cumsum(probs)
    u = rng.random() * cum[-1]
    idx = int(np.searchsorted(cum, u, side="right"))
    idx = min(idx, len(probs) - 1)
    while probs[idx] <= 0.0 and idx > 0:  # float edge: never return a zero-probability token
        idx -= 1
    return idx


def top_logprobs(logprobs: Probs, n: int) -> list[tuple[int, float]]:
    """The n most probable tokens as (id, logprob), best first."""
    if n <= 0:
        return []
    n = min(n, logprobs.shape[0])
    idx = np.argpartition(-logprobs, n - 1)[:n]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


class NumpySampler:
    """A TokenSampler over a logits callable, with the reference semantics.
    Used by fake members in tests and by backends without a native chain.

    Its penalties count the tokens it sampled and the ones it was shown (``observe``), as
    llama.cpp's penalties sampler counts the tokens it is given with ``llama_sampler_accept``;
    ``allowed`` restricts it (word-level ME's word starts) before anything else."""

    def __init__(self, get_logits: Callable[[], Logits], params: SamplingParams, seed: int,
                 allowed: npt.NDArray[np.bool_] | None = None) -> None:
        self._get_logits = get_logits
        self._params = params
        self._rng = np.random.default_rng(seed)
        self._allowed = allowed
        self.history: list[int] = []
        """The generated tokens it has seen, in order (the penalties count their window)."""

    def logits(self) -> Logits:
        """The current logits after the restriction, the bias and the penalties (before the transforms)."""
        logits = self._get_logits()
        if self._allowed is not None:  # restricted: the others' probability is 0 before the transforms
            logits = np.where(self._allowed, np.asarray(logits, dtype=np.float64), -np.inf)
        return shaped_logits(logits, self.history, self._params)

    def distribution(self) -> Probs:
        """What :meth:`sample` draws from now (without a constraint)."""
        return transform(self.logits(), self._params)

    def sample(self, constraint: Constraint | None = None) -> int:
        if constraint is not None:
            probs = softmax(self.logits(), 1.0 if self._params.greedy else self._params.temperature)
            token = constrained_draw(probs, self._params, constraint, self._rng)
        elif self._params.greedy:
            token = int(np.argmax(self.logits()))
        else:
            token = draw(self.distribution(), self._rng)
        self.history.append(token)
        return token

    def observe(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)

    def forget(self) -> None:
        self.history.clear()

