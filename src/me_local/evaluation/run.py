"""Driving the scoring for ``me-local eval`` and ``me-local tune``: text files in windows, task
files question by question, each piece scored once per member through a :class:`Scorer`
(:class:`EngineScorer`: ``Engine.score`` in-process; :class:`.remote.RemoteScorer`: a running
daemon's echo). Everything is summed as it goes, so memory stays bounded by a window (``tune``
keeps the per-unit member log-probabilities, a few numbers per token or word, to fit the
weights on)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..core.likelihood import TextLikelihood, TextMember, UnitScores, count_words
from ..engine import Engine, ScoreRequest
from ..errors import ContextOverflowError, UsageError
from .tasks import Question
from .windows import Counter, pieces, read_text, split_half, windows


@dataclass(frozen=True)
class Scored:
    """A continuation's log-likelihood under each member alone and under the ensemble at its
    weights (``units``: the per-unit member log-probabilities, where the scorer has them)."""

    member_logp: npt.NDArray[np.float64]
    ensemble_logp: float
    units: UnitScores | None = None


class Scorer(Protocol):
    """Scores ``text`` as the continuation of ``context`` (empty: the members' BOS alone).
    Raises ContextOverflowError when they do not fit a member's context."""

    def __call__(self, context: str, text: str) -> Scored: ...


@dataclass(frozen=True)
class EngineScorer:
    """In-process: ``Engine.score`` (each member scores the text once)."""

    engine: Engine
    ensemble: str
    weights: dict[str, float] | None = None
    granularity: str | None = None

    def __call__(self, context: str, text: str) -> Scored:
        tl = self.engine.score(ScoreRequest(ensemble=self.ensemble, context=context, text=text, weights=self.weights,
                                            granularity=self.granularity, end="prefix"))
        return Scored(tl.member_logp(), tl.logp(_weights(tl)), tl.units)

WINDOW_MARGIN = 8
"""Tokens a window leaves free below a member's context (tokenizing joined pieces may differ
from the sum of the pieces' counts by a token at a join); a window that still overflows is
halved and scored in two."""


@dataclass
class Totals:
    """Log-likelihoods of some text, summed: each member alone and the ensemble at its weights."""

    members: tuple[str, ...]
    member_logp: npt.NDArray[np.float64]
    ensemble_logp: float = 0.0
    n_bytes: int = 0
    n_words: int = 0
    windows: int = 0

    @classmethod
    def empty(cls, members: Sequence[str]) -> Totals:
        return cls(tuple(members), np.zeros(len(members)))

    def add(self, s: Scored, text: str) -> None:
        self.member_logp = self.member_logp + s.member_logp
        self.ensemble_logp += s.ensemble_logp
        self.n_bytes += len(text.encode())
        self.n_words += count_words(text)
        self.windows += 1

    def merge(self, other: Totals) -> None:
        self.member_logp = self.member_logp + other.member_logp
        self.ensemble_logp += other.ensemble_logp
        self.n_bytes += other.n_bytes
        self.n_words += other.n_words
        self.windows += other.windows


def _weights(tl: TextLikelihood) -> tuple[float, ...]:
    if tl.weights is None:
        raise ValueError("the scorer must give the ensemble's weights")
    return tl.weights


@dataclass
class TextScorer:
    """Scores text files in windows of at most ``budget`` tokens per member."""

    score: Scorer
    members: tuple[str, ...]
    count: Counter
    budget: int
    keep_units: bool = False
    advance: Callable[[int], None] = lambda n: None
    """Called with the bytes of each window scored (a progress bar)."""
    units: list[UnitScores] = field(default_factory=list)

    def file(self, path: str | Path) -> Totals:
        """One file's totals (a UsageError for an empty or unreadable one)."""
        totals = Totals.empty(self.members)
        for window in windows(pieces(read_text(path)), self.count, self.budget):
            totals.merge(self.text(window))
        if totals.n_bytes == 0:
            raise UsageError(f"{path} is empty: there is nothing to evaluate")
        return totals

    def text(self, text: str) -> Totals:
        """One window's totals; a window that does not fit after all is halved."""
        totals = Totals.empty(self.members)
        try:
            s = self.score("", text)
        except ContextOverflowError:
            if len(text) < 2:
                raise
            for half in split_half(text):
                totals.merge(self.text(half))
            return totals
        totals.add(s, text)
        if self.keep_units:
            if s.units is None:
                raise UsageError("this scorer gives no per-unit figures to fit weights on")
            self.units.append(s.units)
        self.advance(len(text.encode()))
        return totals


def check_spelling(path: str | Path, members: Sequence[TextMember]) -> None:
    """Word granularity places each member's tokens in the text by their bytes, so they must
    spell it byte for byte (a SentencePiece vocabulary reads U+2581 as a space). Checked over the
    whole file before anything is scored (tokenizing is cheap next to scoring), so that a file
    that cannot be scored fails at once, naming its line, not after its first windows."""
    line = 1
    for piece in pieces(read_text(path)):
        data = piece.encode()
        for m in members:
            spelled = b"".join(m.token_bytes(t) for t in m.tokenize_text(piece))
            if spelled != data:
                at = next((i for i, (x, y) in enumerate(zip(spelled, data)) if x != y), min(len(spelled), len(data)))
                near = data[max(0, at - 12):at + 12].decode("utf-8", "replace")
                where = line + data[:at].count(b"\n")
                raise UsageError(f"{path}: line {where}: member {m.name!r}'s tokens do not spell the text byte for "
                                 f"byte (near {near!r}), so its words cannot be placed in it; a SentencePiece "
                                 "vocabulary reads the character U+2581 as a space: replace it in the text, or "
                                 "evaluate at --granularity token (members with one vocabulary)")
        line += piece.count("\n")


def window_budget(n_ctx: int, context_tokens: int, requested: int | None = None) -> int:
    """Tokens a window may hold: the smallest member context less its BOS and a margin, or
    ``requested`` when it is smaller. A UsageError when nothing fits."""
    room = n_ctx - context_tokens - WINDOW_MARGIN
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--window must be at least 1 token, not {requested}")
        if requested > n_ctx - context_tokens:
            raise UsageError(f"--window {requested} does not fit the members' context of {n_ctx} tokens "
                             f"(with {context_tokens} for the BOS); give at most {n_ctx - context_tokens}, "
                             "or raise n_ctx in models.yaml")
        return requested
    if room < 1:
        raise UsageError(f"the members' context of {n_ctx} tokens leaves no room for text; raise n_ctx in models.yaml")
    return room


# --------------------------------------------------------------------------- tasks


@dataclass
class ChoiceScores:
    """One question's choices: each system's log-likelihood of each choice (rows: members,
    then the ensemble) and the bytes of each choice (for the per-byte normalisation)."""

    question: Question
    logp: npt.NDArray[np.float64]
    """Shape ``(n_members + 1, n_choices)``; the last row is the ensemble at its weights."""
    n_bytes: npt.NDArray[np.int64]

    def predictions(self, norm: bool) -> npt.NDArray[np.int64]:
        """Each system's chosen answer: the most likely choice (per byte with ``norm``); the
        first of equals."""
        x = self.logp / self.n_bytes[None, :] if norm else self.logp
        out: npt.NDArray[np.int64] = np.argmax(x, axis=1).astype(np.int64)
        return out


def score_question(score: Scorer, q: Question, *, delimiter: str, file: str) -> ChoiceScores:
    """Each choice scored as the continuation ``delimiter + choice`` of the question's context."""
    cols = []
    for choice in q.choices:
        try:
            s = score(q.context, delimiter + choice)
        except ContextOverflowError as exc:
            raise UsageError(f"{file}: line {q.line}: {exc}") from None
        cols.append(np.append(s.member_logp, s.ensemble_logp))
    n_bytes = np.array([max(1, len(c.encode())) for c in q.choices], dtype=np.int64)
    return ChoiceScores(q, np.stack(cols, axis=1), n_bytes)


@dataclass
class TaskTally:
    """Per question and system, whether it chose the right answer (raw and per byte)."""

    systems: tuple[str, ...]
    """The members' names, then ``"ensemble"``."""
    acc: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    acc_norm: list[npt.NDArray[np.bool_]] = field(default_factory=list)

    def add(self, cs: ChoiceScores) -> None:
        self.acc.append(cs.predictions(norm=False) == cs.question.answer)
        self.acc_norm.append(cs.predictions(norm=True) == cs.question.answer)

    @property
    def n(self) -> int:
        return len(self.acc)

    def correct(self, metric: str) -> npt.NDArray[np.bool_]:
        """Shape ``(n_systems, n_questions)``."""
        rows = self.acc if metric == "acc" else self.acc_norm
        if not rows:
            return np.zeros((len(self.systems), 0), dtype=bool)
        out: npt.NDArray[np.bool_] = np.stack(rows, axis=1)
        return out


def finite(x: float) -> float | None:
    """A number for JSON (NaN and infinities become null)."""
    return x if math.isfinite(x) else None
