"""``me-local eval --task FILE --generate``: accuracy by generated answers, per decoding mode.

The paper behind ME compares it with the conventional ensemble (CE) by the answers they
*generate*, not by likelihoods. Each question is asked as a chat message that lists the
choices under letters; each mode (``me``, ``ce`` where the members share a vocabulary, and
each member alone) answers it once per seed; a regular expression takes the letter out of the
answer. Accuracy is the share of right answers over questions and seeds, with a 95% interval
from a bootstrap over questions (a question's seeds resampled together), and the paired
difference ``me`` minus ``ce`` (or minus the best member) the same way."""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from .run import finite
from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from .tasks import Question

LABELS = string.ascii_uppercase
DEFAULT_ANSWER_REGEX = r"\b([A-Z])\b"
"""The first capital letter standing alone that is one of the question's labels."""
INSTRUCTION = "Answer with the letter of the right choice."


def prompt(q: Question) -> str:
    """The user message a question is asked with."""
    if len(q.choices) > len(LABELS):
        raise UsageError(f"line {q.line}: {len(q.choices)} choices; --generate labels at most {len(LABELS)}")
    lines = [q.asked.strip(), ""]
    lines += [f"{LABELS[i]}. {c}" for i, c in enumerate(q.choices)]
    lines += ["", INSTRUCTION]
    return "\n".join(lines)


def compile_extractor(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--answer-regex {pattern!r} is not a regular expression ({exc})") from None
    if rx.groups != 1:
        raise UsageError(f"--answer-regex {pattern!r} must have exactly one group (the letter); it has {rx.groups}")
    return rx


def extract(answer: str, choices: Sequence[str], rx: re.Pattern[str]) -> int | None:
    """The choice an answer names: the first match of ``rx`` whose group is one of the choices'
    letters (case as written); failing that, the one choice whose text the answer contains (as
    words, ignoring case: "The sun rises in the east" names "east"); None otherwise."""
    labels = LABELS[:len(choices)]
    for m in rx.finditer(answer):
        g = (m.group(1) or "").strip()
        if len(g) == 1 and g in labels:
            return labels.index(g)
    named = [i for i, c in enumerate(choices) if c.strip().rstrip(".")
             and re.search(r"(?<!\w)" + re.escape(c.strip().rstrip(".").lower()) + r"(?!\w)", answer.lower())]
    return named[0] if len(named) == 1 else None


@dataclass
class ModeTally:
    """Per question, the seeds' results of one mode."""

    right: list[list[bool]] = field(default_factory=list)
    unanswered: int = 0

    def per_question(self) -> npt.NDArray[np.float64]:
        out: npt.NDArray[np.float64] = np.array([np.mean(r) for r in self.right], dtype=np.float64)
        return out


def bootstrap_means(values: Sequence[npt.NDArray[np.float64]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED, chunk: int = 500) -> list[npt.NDArray[np.float64]]:
    """The means of each vector (all of one length: per question) over the same bootstrap
    resamples of the questions, so differences between them are paired."""
    n = int(values[0].shape[0])
    rng = np.random.default_rng(seed)
    out: list[list[npt.NDArray[np.float64]]] = [[] for _ in values]
    done = 0
    while done < resamples:
        k = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(k, n))
        for i, v in enumerate(values):
            out[i].append(v[idx].mean(axis=1))
        done += k
    return [np.concatenate(o) for o in out]


def _interval(x: npt.NDArray[np.float64]) -> list[float | None]:
    lo, hi = np.quantile(x, [0.025, 0.975])
    return [finite(float(lo)), finite(float(hi))]


Generate = Callable[[str, str, int | None, int], str]
"""Generate an answer: (user message, mode, member index or None, seed) -> text."""


def run_generate(questions: Sequence[Question], modes: Sequence[tuple[str, str, int | None]], generate: Generate,
                 *, seeds: int, rx: re.Pattern[str], advance: Callable[[int], None] = lambda n: None,
                 samples: list[dict[str, Any]] | None = None) -> dict[str, ModeTally]:
    """Ask every question in every mode (``(label, mode, member)``) once per seed (0 .. seeds-1)."""
    tallies = {label: ModeTally() for label, _, _ in modes}
    for q in questions:
        message = prompt(q)
        for label, mode, member in modes:
            right = []
            for seed in range(seeds):
                text = generate(message, mode, member, seed)
                picked = extract(text, q.choices, rx)
                tallies[label].unanswered += picked is None
                right.append(picked == q.answer)
                if samples is not None:
                    samples.append({"line": q.line, "mode": label, "seed": seed, "answer": text,
                                    "picked": None if picked is None else LABELS[picked], "right": picked == q.answer})
            tallies[label].right.append(right)
            advance(1)
    return tallies


def generate_report(task: str, ensemble: str, tallies: dict[str, ModeTally], *, seeds: int, pattern: str,
                    params: dict[str, Any]) -> dict[str, Any]:
    labels = list(tallies)
    per_q = [tallies[m].per_question() for m in labels]
    n = int(per_q[0].shape[0])
    boots = bootstrap_means(per_q)
    modes: dict[str, Any] = {}
    for label, v, b in zip(labels, per_q, boots):
        modes[label] = {"accuracy": finite(float(v.mean())), "ci95": _interval(b),
                        "right": int(sum(sum(r) for r in tallies[label].right)), "answers": n * seeds,
                        "unanswered": tallies[label].unanswered}
    difference: dict[str, Any] = {}
    singles = [m for m in labels if m.startswith("single:")]
    if "me" in tallies:
        others = [("ce", "ce")] if "ce" in tallies else []
        if singles:
            best = max(singles, key=lambda m: (modes[m]["accuracy"] or 0.0, -labels.index(m)))
            others.append(("best member", best))
        for name, other in others:
            i, j = labels.index("me"), labels.index(other)
            d = boots[i] - boots[j]
            difference[f"me minus {name}"] = {"vs": other, "value": finite(float(per_q[i].mean() - per_q[j].mean())),
                                              "ci95": _interval(d)}
    return {"task": task, "ensemble": ensemble, "questions": n, "seeds": seeds, "answer_regex": pattern,
            "sampling": params, "modes": modes, "difference": difference,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED}}


def generate_table(report: dict[str, Any]) -> str:
    sampling = ", ".join(f"{k} {v}" for k, v in report["sampling"].items())
    lines = [f"task {report['task']}: {report['questions']:,} questions x {report['seeds']} seeds, answers "
             f"generated by ensemble {report['ensemble']} ({sampling})", ""]
    width = max(10, *(len(m) for m in report["modes"]))
    lines.append(f"  {'mode':<{width}}  {'accuracy':>8}  {'95% interval':<16}  unanswered")
    for m, r in report["modes"].items():
        lo, hi = r["ci95"]
        lines.append(f"  {m:<{width}}  {r['accuracy']:8.3f}  [{lo:.3f}, {hi:.3f}]    {r['unanswered']}/{r['answers']}")
    if report["difference"]:
        boot = report["bootstrap"]
        lines += ["", f"paired differences (95% bootstrap interval over questions, {boot['resamples']:,} "
                      f"resamples, seed {boot['seed']}):"]
        for name, d in report["difference"].items():
            lo, hi = d["ci95"]
            lines.append(f"  {name} ({d['vs']}): {d['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return "\n".join(lines)
