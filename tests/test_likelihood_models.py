"""Likelihoods on real GGUF models through llama-cpp-python (tiny fabricated ones): the scoring
pass (logits at every position, a chunk at a time) against from-scratch evaluations, and the
ensemble's likelihood at both granularities against a computation from those fresh logits.

On these tiny models batched and from-scratch logits agree to about 1e-6 nats, so the
tolerances here are 1e-3; on real models batching changes logits by about 0.05 nats
(DESIGN.md's numerics note)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from me_local.backends.llama import ContextSettings, LlamaMember, LoadedModel
from me_local.backends.llama import context as llama_context
from me_local.core.likelihood import fit_weights, text_likelihood
from me_local.core.sampling import log_softmax
from me_local.core.scoring import prime, score
from me_local.errors import BackendError, RequestError

TEXT = "Hello world, the quick brown fox.\n\nThe end of the day is near, said the fox."
TOL = 1e-3


class Fresh:
    """From-scratch next-token log-probabilities of a model: each prefix evaluated anew."""

    def __init__(self, model: LoadedModel) -> None:
        self.member = LlamaMember("fresh", model, ContextSettings(n_ctx=1024, n_batch=1024))

    def __call__(self, tokens: list[int]) -> np.ndarray:
        self.member.truncate(0)
        self.member.evaluate(tokens)
        return log_softmax(self.member.logits())

    def close(self) -> None:
        self.member.close()


def member(models, key, name=None, **kw):
    return LlamaMember(name or key, models[key], ContextSettings(**({"n_ctx": 1024} | kw)))


def lse(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.max() + np.log(np.exp(x - x.max()).sum()))


def test_scoring_rows_equal_from_scratch_evaluations_of_each_prefix(models):
    m = member(models, "a1")
    fresh = Fresh(models["a1"])
    try:
        ctx = m.raw_prompt("The")
        toks = models["a1"].tokenize_text(TEXT)
        prime(m, ctx, len(toks))
        s = score(m, toks, top_n=2)
        assert list(m.cached) == ctx + toks
        ws, eog = models["a1"].word_start, models["a1"].eog
        assert eog.sum() == 2  # <|endoftext|> and <|im_end|>
        for i in range(len(toks) + 1):
            lp = fresh(ctx + toks[:i])
            if i < len(toks):
                assert s.logprob[i] == pytest.approx(lp[toks[i]], abs=TOL)
            assert s.start_mass[i] == pytest.approx(lse(lp[ws]), abs=TOL)
            assert s.eog_mass[i] == pytest.approx(lse(lp[eog]), abs=TOL)
            assert [t for t, _ in s.top[i]] == list(np.argsort(-lp)[:2])
        # afterwards the member generates on from its last row, as after evaluate()
        assert np.argmax(m.logits()) == s.top[-1][0][0]
    finally:
        m.close()
        fresh.close()


def test_scoring_in_small_chunks_or_in_batches_larger_than_a_micro_batch_gives_the_same_numbers(
        models, monkeypatch):
    toks = models["a1"].tokenize_text(" ".join([TEXT] * 20))
    assert len(toks) > 512  # one decode of 1024 rows: llama.cpp splits it in micro-batches of 512
    results = {}
    for label, n_batch, chunk_bytes in (("big", 1024, 32 << 20), ("small", 1024, 4 * 527 * 7), ("batch", 64, 32 << 20)):
        monkeypatch.setattr(llama_context, "SCORE_CHUNK_BYTES", chunk_bytes)
        m = member(models, "a1", n_ctx=2048, n_batch=n_batch)
        try:
            assert m.score_rows == {"big": 1024, "small": 7, "batch": 64}[label]
            prime(m, [models["a1"].bos], len(toks))
            results[label] = score(m, toks)
        finally:
            m.close()
    # batching noise grows with the context (f16 keys and values): a median of ~1e-3 nats over 520
    # positions, at most ~0.01; a row out of place would be off by nats
    for label in ("small", "batch"):
        for field in ("logprob", "start_mass"):
            diff = np.abs(getattr(results[label], field) - getattr(results["big"], field))
            assert np.median(diff) < 5 * TOL and diff.max() < 0.05, (label, field, np.median(diff), diff.max())


def test_a_member_without_current_logits_or_room_refuses_to_score(models):
    m = member(models, "a1", n_ctx=16)
    try:
        with pytest.raises(BackendError, match="has no logits to score from; evaluate its context first"):
            list(m.evaluate_rows([1, 2]))
        m.evaluate([1, 2, 3])
        with pytest.raises(BackendError, match="17 tokens do not fit its context of 16"):
            list(m.evaluate_rows(list(range(14))))
    finally:
        m.close()


def test_token_likelihood_of_two_members_is_the_mixture_of_their_fresh_probabilities(models):
    a, b = member(models, "a1"), member(models, "a2")
    fa, fb = Fresh(models["a1"]), Fresh(models["a2"])
    try:
        ctx = a.raw_prompt("Once upon a time")
        weights = [0.7, 0.3]
        tl = text_likelihood([a, b], [ctx, ctx], TEXT, granularity="token", end="eog", weights=weights, top_n=3)
        toks = models["a1"].tokenize_text(TEXT)
        expect = 0.0
        for i in range(len(toks) + 1):
            pa, pb = np.exp(fa(ctx + toks[:i])), np.exp(fb(ctx + toks[:i]))
            mix = weights[0] * pa + weights[1] * pb
            if i < len(toks):
                expect += math.log(mix[toks[i]])
            else:
                expect += math.log(mix[models["a1"].eog].sum())
            assert [t for t, _ in tl.mixture_top[i]] == list(np.argsort(-mix)[:3])
        assert tl.logp(weights) == pytest.approx(expect, abs=TOL * len(toks))
        assert tl.text == TEXT.encode() and tl.n_bytes == len(TEXT.encode())
        fit = fit_weights(tl.units)
        assert fit.log_likelihood >= max(tl.logp(weights), *tl.member_logp())
    finally:
        for x in (a, b, fa, fb):
            x.close()


def test_word_likelihood_across_vocabularies_from_fresh_logits(models):
    """a1 (byte-level BPE) writes the paragraph break as two words, "\\n" and "\\nThe"; s1
    (SentencePiece, with a "\\n\\n" token) as one: that unit is a lattice."""
    a, s = member(models, "a1", "bpe"), member(models, "s1", "spm")
    fa, fs = Fresh(models["a1"]), Fresh(models["s1"])
    try:
        ctxs = [a.raw_prompt("Once"), s.raw_prompt("Once")]
        weights = np.array([0.4, 0.6])
        tl = text_likelihood([a, s], ctxs, TEXT, granularity="word", end="word")
        data = TEXT.encode()
        words = [data[x:y].decode() for x, y in tl.spans]
        assert words[:7] == ["Hello", " world,", " the", " quick", " brown", " fox.", "\n\nThe"]
        assert "".join(words) == TEXT
        lattice_units = [words[u] for u in tl.units.lattices]
        assert lattice_units == ["\n\nThe"]

        def word_logp(k, fresh, ctx, toks, x, y, restricted, ended):
            """log P_k(text[x:y] as one word) from fresh evaluations."""
            ends = np.cumsum([len(models[("a1", "s1")[k]].pieces[t]) for t in toks])
            i0 = 0 if x == 0 else int(np.searchsorted(ends, x)) + 1
            i1 = int(np.searchsorted(ends, y)) + 1
            ws = models[("a1", "s1")[k]].word_start
            out = 0.0
            for i in range(i0, i1):
                lp = fresh(ctx + toks[:i])
                if i == i0 and restricted:
                    out -= lse(lp[ws])
                out += lp[toks[i]]
            if ended:
                out += lse(fresh(ctx + toks[:i1])[ws])
            return out

        toks = [models["a1"].tokenize_text(TEXT), models["s1"].tokenize_text(TEXT)]
        total = 0.0
        for u, (x, y) in enumerate(tl.spans.tolist()):
            restricted = x > 0
            if u in tl.units.lattices:  # a1: "\n" then "\nThe"; s1: one word
                mid = x + 1
                pa = (word_logp(0, fa, ctxs[0], toks[0], x, mid, restricted, True)
                      + word_logp(0, fa, ctxs[0], toks[0], mid, y, True, True))
                ps = word_logp(1, fs, ctxs[1], toks[1], x, y, restricted, True)
                z = weights[0] ** 2 * math.exp(pa) + weights[1] * math.exp(ps)
            else:
                z = sum(weights[k] * math.exp(word_logp(k, f, ctxs[k], toks[k], x, y, restricted, True))
                        for k, f in ((0, fa), (1, fs)))
            assert tl.unit_logp(weights)[u] == pytest.approx(math.log(z), abs=TOL * 10), words[u]
            total += math.log(z)
        assert tl.logp(weights) == pytest.approx(total, abs=TOL * len(words))
        # alone, a member's word likelihood is its token likelihood and the last word's end
        for k, sc in enumerate(tl.scores):
            assert tl.member_logp()[k] == pytest.approx(sc.logprob.sum() + sc.start_mass[-1], abs=1e-6)
    finally:
        for x in (a, s, fa, fs):
            x.close()


def test_a_text_with_the_sentencepiece_space_mark_is_refused_at_word_granularity_with_the_fix(models):
    """SentencePiece reads U+2581 in a text as a space, so its tokens no longer spell the text."""
    a, s = member(models, "a1", "bpe"), member(models, "s1", "spm")
    try:
        with pytest.raises(RequestError, match=r"member 'spm'.s tokens do not spell the text byte for byte "
                                               r"\(at byte 7: 'a mark \u2581 here'\).*replace it in the text"):
            text_likelihood([a, s], [a.raw_prompt("x"), s.raw_prompt("x")], "a mark \u2581 here", granularity="word")
    finally:
        a.close()
        s.close()
