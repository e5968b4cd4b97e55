"""A grammar together with the penalties and a logit bias on a real llama.cpp sampler: the
constrained path shapes the logits in numpy over the tokens the native penalties count, and
counts the token it draws as llama_sampler_sample would (docs/grammar.md, architecture.md)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from me_local.backends.llama import ContextSettings, LlamaMember
from me_local.core import GrammarSpec, SamplingParams

GRAMMAR = GrammarSpec("root ::= [a-m] [a-z ]*")


def _allowed(pieces: list[bytes]) -> np.ndarray:
    return np.array([bool(re.fullmatch(rb"[a-m][a-z ]*", p)) for p in pieces])


@contextmanager
def evaluated(model, spec: GrammarSpec = GRAMMAR) -> Iterator[tuple[LlamaMember, object, np.ndarray]]:
    """A member of ``model`` that has read a short prompt, a grammar over its vocabulary, and its logits."""
    member = LlamaMember("one", model, ContextSettings(n_ctx=128))
    g = model.make_grammar(spec, "one")
    try:
        member.evaluate(model.tokenize("Hello world, the", add_special=False))
        yield member, g, np.array(member.logits(), dtype=np.float64)
    finally:
        g.close()
        member.close()


def test_penalties_and_the_grammar_count_the_same_tokens(models):
    m = models["a1"]
    with evaluated(m) as (member, g, logits):
        ok = _allowed(m.pieces)
        order = [int(t) for t in np.argsort(-logits, kind="stable")]
        allowed_order = [t for t in order if ok[t]]
        t1, t2 = allowed_order[:2]
        d = 4.0  # presence 2 + frequency 2 for a token seen once
        params = SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0, repeat_last_n=-1)
        sampler = member.make_sampler(params, 1)
        sampler.observe([t1])  # another member wrote t1: its penalty must push it below t2
        assert logits[t1] - d < logits[t2], "the test needs the penalty to reorder the two"
        assert sampler.sample(g) == t2
        # the constrained draw counted t2 in llama.cpp's own penalties: unconstrained, both are penalised
        unpenalised = [t for t in order if t not in (t1, t2)]
        expect = max([t1, t2, unpenalised[0]], key=lambda t: logits[t] - (d if t in (t1, t2) else 0.0))
        assert expect != t2, "the test needs the penalty to matter for t2"
        assert sampler.sample() == expect


def test_a_logit_bias_applies_under_the_grammar(models):
    m = models["a1"]
    with evaluated(m) as (member, g, logits):
        ok = _allowed(m.pieces)
        allowed = [int(t) for t in np.argsort(logits, kind="stable") if ok[t]]
        low = allowed[0]  # the least likely allowed token, forced by the bias
        banned = int(np.argmax(np.where(ok, -np.inf, logits)))  # a token the grammar refuses, pushed up
        params = SamplingParams(temperature=0, logit_bias=tuple(sorted(((low, 100.0), (banned, 100.0)))))
        token = member.make_sampler(params, 1).sample(g)
        assert token == low and ok[token]


def test_a_constrained_draw_counts_in_llama_cpps_own_penalties(models):
    with evaluated(models["a1"], GrammarSpec(r"root ::= [^\x00]*")) as (member, g, logits):  # allows the likely tokens
        first, second = (int(t) for t in np.argsort(-logits, kind="stable")[:2])
        assert logits[first] - 4.0 < logits[second], "the test needs the penalty to reorder the two"
        sampler = member.make_sampler(
            SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0, repeat_last_n=-1), 1)
        assert sampler.sample(g) == first
        # unconstrained, llama.cpp's chain draws: it must have counted the constrained draw
        assert sampler.sample() == second
