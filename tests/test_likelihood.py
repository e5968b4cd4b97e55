"""Likelihoods of a text under an ensemble (core.scoring, core.likelihood) against fake members
whose distributions are known exactly: every number is checked against an independent
computation from the members' own logits, and word-level likelihoods against the process
that word-level generation runs (and against its sampling frequencies)."""

from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np
import pytest

from me_local.core import DoneEvent, SamplingParams, TokenEvent, generate
from me_local.core.likelihood import (
    UnitScores,
    bits_per_byte,
    count_words,
    fit_weights,
    perplexity_per_word,
    split_units,
    text_likelihood,
    token_likelihood,
)
from me_local.core.sampling import log_softmax, softmax
from me_local.core.scoring import prime, score, score_shared
from me_local.core.words import WORD_MAX_BYTES
from me_local.errors import ContextOverflowError, RequestError

from .fakes import FakeMember, WordFake
from .test_core import chi2_critical, chi_square

T1 = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def lse(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


# ------------------------------------------------------------------ the seam: scoring rows


def test_scoring_gives_each_position_its_log_probability_word_start_and_end_mass_and_top_tokens():
    m = WordFake("a", 1, [b" bad", b"ace"], n_ctx=64)
    prime(m, [0, 1])
    tokens = [7, 2, 3, 4, 2, 5, 6, 0, 1, 3]  # 10 tokens: three chunks of 4, 4, 2 after the first row
    s = score(m, tokens, top_n=3)
    assert [len(c) for c in m.calls] == [2, 10]  # the context, then one scoring pass
    assert list(m.cached) == [0, 1, *tokens]
    prev = [1, *tokens]  # the fake's row depends on the last token only
    for i in range(len(tokens) + 1):
        lp = log_softmax(m._table[prev[i]])
        if i < len(tokens):
            assert s.logprob[i] == pytest.approx(lp[tokens[i]], abs=1e-5)
        assert s.start_mass[i] == pytest.approx(lse(lp[m.word_start]), abs=1e-5)
        assert s.eog_mass[i] == pytest.approx(lp[m.eog_id], abs=1e-5)
        want = np.argsort(-lp)[:3]
        assert [t for t, _ in s.top[i]] == list(want)
        assert [v for _, v in s.top[i]] == pytest.approx(lp[want], abs=1e-5)
    assert len(s.top) == len(tokens) + 1


def test_a_mass_that_underflows_in_float32_is_computed_exactly():
    m = FakeMember("a", 0, n_vocab=6, pieces=[b"a", b"b", b" c", b"d", b"e", b""], eog=5)
    m._table[:] = 0.0
    m._table[:, 2] = -200.0  # the only word-start token besides the end, far below the rest
    m._table[:, 5] = -300.0
    prime(m, [0])
    s = score(m, [1])
    assert s.start_mass[0] == pytest.approx(lse(log_softmax(m._table[0])[[2, 5]]), abs=1e-6)
    assert s.eog_mass[1] == pytest.approx(-300.0 - math.log(4), abs=1e-6)


def test_a_chunk_is_reduced_a_cache_sized_block_of_rows_at_a_time_with_the_same_numbers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from me_local.core import scoring

    rng = np.random.default_rng(5)
    n_vocab, n_rows = 1000, 23
    ws = rng.random(n_vocab) < 0.4
    eog = np.zeros(n_vocab, dtype=bool)
    eog[[3, 9]] = True
    rows = rng.normal(0.0, 3.0, (n_rows, n_vocab)).astype(np.float32)
    rows[4, ws] -= 200.0  # a word-start mass that underflows in float32, inside the second block
    targets = rng.integers(0, n_vocab, n_rows)
    targets[-1] = -1
    whole = scoring._Reducer(ws, eog)
    whole.block = n_rows  # the whole chunk at once, as before blocks
    want = whole.reduce(rows, targets)
    # the default block is a few MB of rows: at least one row of any vocabulary
    assert scoring._Reducer(np.zeros(262_144, dtype=bool), eog).block == 4
    assert scoring._Reducer(np.zeros(4_000_000, dtype=bool), eog).block == 1
    monkeypatch.setattr(scoring, "REDUCE_BLOCK_BYTES", 4 * n_vocab * 3)  # three rows a block
    blocked = scoring._Reducer(ws, eog)
    assert blocked.block == 3
    got = blocked.reduce(rows, targets)
    assert blocked._buf is not None and blocked._buf.shape[0] == 3  # never a chunk-sized buffer
    for a, b in zip(got, want):  # bit for bit: every number is per row
        assert a.shape == (n_rows,) and np.array_equal(a, b, equal_nan=True)
    assert np.isnan(got[1][-1]) and np.isfinite(got[2][4])


def test_prime_reuses_the_cached_prefix_and_always_leaves_fresh_logits():
    m = FakeMember("a", 3, n_ctx=20)
    prime(m, [1, 2, 3, 4])
    prime(m, [1, 2, 3, 9, 9])
    assert m.calls == [[1, 2, 3, 4], [9, 9]]
    prime(m, [1, 2, 3, 9, 9])  # held already: only the last token again, for its logits
    assert m.calls[-1] == [9]
    with pytest.raises(ContextOverflowError, match="no context to predict the first token from"):
        prime(m, [])
    with pytest.raises(ContextOverflowError, match=r"21 tokens but member 'a' has a context of 20 tokens"):
        prime(m, [1, 2, 3], n_more=18)


def test_scoring_is_cancellable_between_chunks_and_the_cache_stays_true():
    from me_local.core import Cancelled

    m = FakeMember("a", 3, n_ctx=64)
    prime(m, [1])
    polls = iter([False, True])
    with pytest.raises(Cancelled):
        score(m, list(range(10)), cancel=lambda: next(polls))
    assert list(m.cached) == [1, 0, 1, 2, 3]  # the first chunk of 4, then cancelled


# ------------------------------------------------------------------ token granularity


def test_token_likelihood_is_the_sum_of_log_mixtures_of_each_members_own_probabilities():
    members = [FakeMember(n, s, n_ctx=64, pieces=[bytes([97 + i]) for i in range(11)] + [b" "], eog=10)
               for n, s in (("a", 1), ("b", 2), ("c", 3))]
    contexts = [[0, 4], [3, 4], [5]]
    tokens = [2, 11, 7, 7, 1, 11, 0, 3, 9]
    weights = [0.5, 0.3, 0.2]
    tl = token_likelihood(members, contexts, tokens, weights=weights, top_n=4)
    assert tl.granularity == "token" and tl.units.n_units == len(tokens)
    # independently: each member from scratch, one position at a time
    expect = []
    rows = []
    for i in range(len(tokens) + 1):
        per = []
        for m, ctx in zip(members, contexts):
            fresh = FakeMember(m.name, 0, n_ctx=64)
            fresh._table = m._table
            fresh.evaluate(ctx + tokens[:i])
            per.append(softmax(fresh.logits()))
        rows.append(per)
        if i < len(tokens):
            expect.append(math.log(sum(w * p[tokens[i]] for w, p in zip(weights, per))))
    assert tl.unit_logp(weights) == pytest.approx(expect, abs=1e-5)
    assert tl.logp(weights) == pytest.approx(sum(expect), abs=1e-4)
    assert tl.member_logp() == pytest.approx(
        [sum(math.log(rows[i][k][tokens[i]]) for i in range(len(tokens))) for k in range(3)], abs=1e-4)
    # the mixture's own top alternatives, exact (lockstep), with the text's offsets
    for i, per in enumerate(rows):
        mix = sum(w * p for w, p in zip(weights, per))
        want = np.argsort(-mix)[:4]
        assert [t for t, _ in tl.mixture_top[i]] == list(want)
        assert [v for _, v in tl.mixture_top[i]] == pytest.approx(np.log(mix[want]), abs=1e-5)
    assert tl.text == b"c h hbla jd"[:0] + b"".join(members[0].pieces[t] for t in tokens)
    assert tl.spans[:3].tolist() == [[0, 1], [1, 2], [2, 3]]
    # the end: "eog" adds log Σ λ p(end), "word" log Σ λ (word-start mass)
    for end, col in (("eog", [10]), ("word", [10, 11])):
        ended = token_likelihood(members, contexts, tokens, end=end)
        extra = math.log(sum(w * p[col].sum() for w, p in zip(weights, rows[-1])))
        assert ended.logp(weights) == pytest.approx(sum(expect) + extra, abs=1e-4)
        assert ended.spans[-1].tolist() == [len(tokens), len(tokens)] and ended.units.n_bytes[-1] == 0


def test_score_shared_needs_every_member_to_yield_its_rows_and_reuses_the_members_chunks():
    a, b = FakeMember("a", 1, n_ctx=64), FakeMember("b", 2, n_ctx=64)
    prime(a, [1])
    prime(b, [2])
    shared = score_shared([a, b], [3, 4, 5, 6, 7, 8], [0.0, 1.0], top_n=2)
    # weight 0: the mixture's alternatives are b's own
    assert [t for t, _ in shared.mixture_top[3]] == [t for t, _ in shared.members[1].top[3]]
    assert [v for _, v in shared.mixture_top[3]] == pytest.approx([v for _, v in shared.members[1].top[3]], abs=1e-5)
    assert list(a.cached) == [1, 3, 4, 5, 6, 7, 8] and list(b.cached) == [2, 3, 4, 5, 6, 7, 8]


def test_token_granularity_refuses_members_that_tokenize_the_text_differently():
    a = WordFake("a", 1, [b" bad"])
    b = WordFake("b", 2, [b" bead"])
    with pytest.raises(RequestError, match="tokenize the text differently: granularity token needs one vocabulary"):
        text_likelihood([a, b], [[0], [0]], "ab bad", granularity="token")


# ------------------------------------------------------------------ word granularity


def generation_probability(members, weights, prompts, text: bytes, end: str) -> float:
    """The probability that word-level ME (core.words) writes ``text`` after ``prompts``, from
    its rules directly: a member drawn per word; its first token restricted to word-start
    tokens except at the text's start and after a forced cut; the word ends where it samples
    a word-start token (kept if it is drawn again, an exact restricted sample) or is cut at
    WORD_MAX_BYTES; summed over every writer and every tokenization (a fake's row depends on
    its last token: the writer's own last token, the others' last token of the text so far).
    ``end``: prefix (the last word may go on), word (it is complete), eog (the text ends)."""
    w = np.asarray(weights, float) / sum(weights)
    nb = len(text)
    rows = [[softmax(r) for r in m._table] for m in members]

    def mass(k, prev):
        return float(rows[k][prev][members[k].word_start].sum())

    def context(k, pos):
        return members[k].tokenize_text(text[:pos].decode())[-1] if pos else prompts[k][-1]

    @functools.cache
    def after(pos: int, restricted: bool, writer: int, last: int) -> float:
        """P(text[pos:], then the end condition | a word boundary at pos)."""
        lasts = [last if k == writer else context(k, pos) for k in range(len(members))]
        if pos == nb:
            if end != "eog":
                return 1.0
            return sum(w[k] * rows[k][lasts[k]][members[k].eog_id] / (mass(k, lasts[k]) if restricted else 1.0)
                       for k in range(len(members)))
        return sum(w[k] * word(k, pos, restricted, lasts[k]) for k in range(len(members)) if w[k] > 0)

    def word(k, pos, restricted, prev) -> float:
        m = members[k]
        total = 0.0

        def dfs(at, prev, prob, first):
            nonlocal total
            for t, piece in enumerate(m.pieces):
                if not piece or not text.startswith(piece, at):
                    continue
                ws = bool(m.word_start[t])
                if first:
                    if restricted and not ws:
                        continue
                    p = prob * rows[k][prev][t] / (mass(k, prev) if restricted else 1.0)
                elif ws:
                    continue  # a word-start token ends the word instead
                else:
                    p = prob * rows[k][prev][t]
                if p < 1e-300:
                    continue
                q = at + len(piece)
                if q - pos >= WORD_MAX_BYTES:  # forced cut (ASCII texts: always a whole character)
                    if q == nb and end == "prefix":
                        total += p
                    else:
                        total += p * after(q, False, k, t)
                    continue
                if q == nb:
                    total += p if end == "prefix" else p * mass(k, t) * after(q, True, k, t)
                else:
                    total += p * mass(k, t) * after(q, True, k, t)  # ends here (a word starts at q)
                    dfs(q, t, p, False)  # or goes on

        dfs(pos, prev, 1.0, True)
        return total

    return after(0, False, -1, -1)


def trio():
    """a writes a paragraph break as one token (it has no single newline but its byte fallback,
    never sampled); b and c write it as two words. No piece is made of others, so each text has
    one tokenization (but for the fallback, of probability e^-60): the one that counts."""
    return [
        WordFake("a", 1, [b"\n\n"], alphabet=b"abc ", boundary_bias=1.0),
        WordFake("b", 2, [], alphabet=b"abc \n", boundary_bias=1.0),
        WordFake("c", 3, [], alphabet=b"\n cba", boundary_bias=0.5),
    ]


PROMPTS3 = [[0, 1], [2, 1], [1]]


@pytest.mark.parametrize("end", ["prefix", "word", "eog"])
@pytest.mark.parametrize("text", ["ab\n\nca b", "c ab\n\nb", "a", " b  c", "ba\n\nc ab\n"])
def test_word_likelihood_is_the_probability_that_word_level_generation_writes_the_text(text, end):
    members = trio()
    weights = [0.5, 0.3, 0.2]
    tl = text_likelihood(members, PROMPTS3, text, granularity="word", end=end)
    want = generation_probability(members, weights, PROMPTS3, text.encode(), end)
    # (the masses are float32 sums: 1e-6 nats; a wrong factor or path would cost 1e-2 or more)
    assert tl.logp(weights) == pytest.approx(math.log(want), abs=1e-6)
    # each member alone is its own token-level likelihood (the boundary factors cancel), plus the end
    for k, sc in enumerate(tl.scores):
        tail = {"prefix": 0.0, "word": sc.start_mass[-1], "eog": sc.eog_mass[-1]}[end] if text else 0.0
        assert tl.member_logp()[k] == pytest.approx(sc.logprob.sum() + tail, abs=1e-9)
        alone = np.zeros(3)
        alone[k] = 1.0
        assert tl.logp(alone) == pytest.approx(math.log(generation_probability(members, alone, PROMPTS3,
                                                                               text.encode(), end)), abs=1e-6)
        assert tl.member_logp()[k] == pytest.approx(tl.logp(alone), rel=1e-12)
    # the per-unit values add up to it, and the units tile the text
    assert tl.unit_logp(weights).sum() == pytest.approx(tl.logp(weights))
    assert tl.spans[0, 0] == 0 and tl.spans[-1, 1] == len(text.encode())
    assert (tl.spans[1:, 0] == tl.spans[:-1, 1]).all()
    assert tl.units.n_words.sum() == count_words(text) and tl.units.n_bytes.sum() == len(text.encode())


def test_with_several_tokenizations_of_a_text_the_likelihood_counts_the_canonical_one_a_lower_bound():
    members = [WordFake("a", 1, [b"ab", b" b"], alphabet=b"ab "), WordFake("b", 2, [], alphabet=b"ab ")]
    text = "ab ba"
    tl = text_likelihood(members, [[0], [1]], text, granularity="word", end="word")
    assert [members[0].pieces[t] for t in tl.scores[0].tokens] == [b"ab", b" b", b"a"]
    every_way = generation_probability(members, [0.5, 0.5], [[0], [1]], text.encode(), "word")
    assert math.log(every_way) - 3.0 < tl.logp([0.5, 0.5]) < math.log(every_way) - 1e-3


def test_a_member_that_would_write_on_after_another_members_inner_word_is_not_counted_a_lower_bound():
    """Three newlines: b and c write them as three words, a (which has only "\n\n") as "\n\n" and a
    byte it never samples. Generation can also let b write one newline and a the other two,
    a tokenization of a's that its one pass over the whole text does not see."""
    members = trio()
    text = "ba\n\n\nc ab"
    tl = text_likelihood(members, PROMPTS3, text, granularity="word")
    assert [members[0].pieces[t] for t in tl.scores[0].tokens][2:4] == [b"\n\n", b"\n"]
    every_way = generation_probability(members, [0.5, 0.3, 0.2], PROMPTS3, text.encode(), "prefix")
    assert tl.logp([0.5, 0.3, 0.2]) < math.log(every_way) - 0.1


def test_where_members_split_words_differently_the_unit_is_a_lattice_not_a_plain_mixture():
    members = trio()
    text = "ab\n\nca b"
    tl = text_likelihood(members, PROMPTS3, text, granularity="word")
    # shared word starts: 0, 2 ("\n\n" for a, "\n" for b and c) and 6 (" b"); c's " c"? no: "ca" follows
    assert tl.spans.tolist() == [[0, 2], [2, 6], [6, 8]]
    lat = tl.units.lattices[1]
    assert lat.positions == (2, 3, 6)  # b and c also begin a word at the second newline
    assert sorted(e.member for e in lat.edges) == [0, 1, 1, 2, 2]
    weights = np.array([0.5, 0.3, 0.2])
    plain = math.log((weights * np.exp(tl.units.logp[1])).sum())
    assert abs(tl.unit_logp(weights)[1] - plain) > 0.05  # b's and c's two draws, and their mixing, count
    assert list(tl.units.lattices) == [1]


def test_a_run_without_whitespace_is_cut_as_generation_cuts_it_and_the_next_word_is_unrestricted():
    members = [WordFake("a", 1, [], alphabet=b"ab "), WordFake("b", 2, [], alphabet=b"ab ")]
    text = "ab" * 20 + " ba"  # 40 bytes without whitespace: a forced cut after 32
    for end in ("prefix", "word", "eog"):
        tl = text_likelihood(members, [[0], [1]], text, granularity="word", end=end)
        assert tl.spans[:3].tolist() == [[0, WORD_MAX_BYTES], [WORD_MAX_BYTES, 40], [40, 43]]
        want = generation_probability(members, [0.7, 0.3], [[0], [1]], text.encode(), end)
        assert tl.logp([0.7, 0.3]) == pytest.approx(math.log(want), abs=1e-5)  # float32 sums over 43 rows
    exact = "ab" * 16  # a cut exactly at the end: the end is unrestricted, the last word complete
    for end in ("word", "eog"):
        tl = text_likelihood(members, [[0], [1]], exact, granularity="word", end=end)
        want = generation_probability(members, [0.7, 0.3], [[0], [1]], exact.encode(), end)
        assert tl.logp([0.7, 0.3]) == pytest.approx(math.log(want), abs=1e-5)


def test_the_empty_text_is_certain_unless_the_generation_must_end_at_once():
    members = trio()
    assert text_likelihood(members, PROMPTS3, "", granularity="word").logp([1, 1, 1]) == 0.0
    tl = text_likelihood(members, PROMPTS3, "", granularity="word", end="eog")
    want = generation_probability(members, [1, 1, 1], PROMPTS3, b"", "eog")
    assert tl.logp([1, 1, 1]) == pytest.approx(math.log(want))


def test_word_likelihood_matches_how_often_generation_writes_each_text():
    """The likelihood of a whole text (end: eog) is the frequency with which core.generate at
    word granularity writes exactly that text (chi-square over the most frequent texts)."""
    members = [WordFake("a", 1, [b" ab"], alphabet=b"ab ", boundary_bias=1.5, eog_bias=0.5),
               WordFake("b", 2, [b"ba"], alphabet=b"ab ", boundary_bias=1.0, eog_bias=0.0)]
    prompts = [[0, 1], [1]]
    weights = [0.6, 0.4]
    counts: Counter[str] = Counter()
    n = 3000
    for seed in range(n):
        out = ""
        for ev in generate(members, weights, prompts, SamplingParams(seed=seed, max_tokens=40, **T1),
                           granularity="word"):
            if isinstance(ev, TokenEvent):
                out += ev.text
            elif isinstance(ev, DoneEvent):
                out += ev.text
                if ev.finish_reason != "stop":  # cut by the limit: not a whole text, among the others
                    out = "\0" + out
        counts[out] += 1
    common = [t for t, c in counts.most_common() if c >= 15 and not t.startswith("\0")]
    assert len(common) >= 8
    probs = np.array([math.exp(text_likelihood(members, prompts, t, granularity="word", end="eog").logp(weights))
                      for t in common])
    obs = np.array([counts[t] for t in common] + [n - sum(counts[t] for t in common)], float)
    stat, dof = chi_square(obs, np.append(probs, 1.0 - probs.sum()))
    assert stat < chi2_critical(dof), (stat, dof)
    # the canonical tokenization is all that counts: " ab" for member a, never " " + "ab"
    a_only = text_likelihood(members, prompts, "ab ab", granularity="word", end="eog")
    assert members[0].tokenize_text(" ab") == [members[0].pieces.index(b" ab")]
    assert a_only.scores[0].n == 3


def test_a_text_a_member_cannot_spell_byte_for_byte_is_refused_with_its_name():
    class Lossy(WordFake):
        def tokenize_text(self, text):
            return super().tokenize_text(text.replace("b", "a"))

    members = [WordFake("a", 1, []), Lossy("lossy", 2, [])]
    with pytest.raises(RequestError, match=r"member 'lossy'.s tokens do not spell the text byte for byte "
                                           r"\(at byte 1: 'ab ab'\)"):
        text_likelihood(members, [[0], [0]], "ab ab", granularity="word")


# ------------------------------------------------------------------ measures


def test_bits_per_byte_perplexity_and_words():
    assert bits_per_byte(-math.log(2) * 16, 8) == pytest.approx(2.0)
    assert perplexity_per_word(-2 * math.log(10), 2) == pytest.approx(10.0)
    assert count_words("  two\twords\n") == 2 and count_words("über naïve café") == 3
    assert math.isnan(bits_per_byte(0.0, 0))


# ------------------------------------------------------------------ fitting weights


def sample_tokens(members, weights, prompts, n, seed):
    events = list(generate(members, weights, prompts, SamplingParams(seed=seed, max_tokens=n, **T1)))
    return [e.id for e in events if isinstance(e, TokenEvent)]


def token_trio(n_ctx=4096):
    return [FakeMember(n, s, n_vocab=12, n_ctx=n_ctx, scale=1.5) for n, s in (("a", 1), ("b", 2), ("c", 3))]


def test_em_recovers_the_weights_of_the_mixture_that_wrote_the_text():
    """3000 tokens sampled by token-level ME at weights (0.6, 0.3, 0.1): the fitted weights are
    within 0.05 of them (over 12 seeds the estimates spread by 0.022, 0.018 and 0.009)."""
    members = token_trio()
    truth = [0.6, 0.3, 0.1]
    prompts = [[0], [0], [0]]
    tokens = sample_tokens(members, truth, prompts, 3000, seed=7)
    tl = token_likelihood(members, prompts, tokens)
    fit = fit_weights(tl.units)
    assert fit.converged
    assert fit.weights == pytest.approx(truth, abs=0.05)
    assert np.all(np.diff(fit.trace) >= -1e-9 * abs(fit.trace[0]))
    assert fit.log_likelihood == pytest.approx(tl.logp(fit.weights))
    assert fit.log_likelihood >= tl.logp(truth) - 1e-9  # the maximum, so at least the truth's
    assert fit.log_likelihood > tl.member_logp().max() + 50


def test_em_at_word_granularity_recovers_the_weights_of_word_level_generation():
    members = [WordFake("a", 1, [b"\n\n", b"ab"], alphabet=b"abc ", boundary_bias=1.0, eog_bias=-30.0, n_ctx=8192),
               WordFake("b", 2, [], alphabet=b"abc \n", boundary_bias=1.0, eog_bias=-30.0, n_ctx=8192)]
    prompts = [[0, 1], [1]]
    truth = [0.3, 0.7]
    events = list(generate(members, truth, prompts, SamplingParams(seed=3, max_tokens=3000, **T1),
                           granularity="word"))
    text = "".join(e.text for e in events if isinstance(e, TokenEvent)) + events[-1].text
    tl = text_likelihood(members, prompts, text, granularity="word")
    assert tl.units.lattices  # paragraph breaks: a writes them as one word, b as two
    fit = fit_weights(tl.units)
    assert fit.weights == pytest.approx(truth, abs=0.06)
    assert np.all(np.diff(fit.trace) >= -1e-9 * abs(fit.trace[0]))


def test_em_is_never_worse_than_the_best_single_member_and_never_lowers_the_likelihood():
    members = token_trio()
    prompts = [[0], [0], [0]]
    rng = np.random.default_rng(0)
    for alone in range(3):  # text from one member: the optimum is a corner EM only approaches
        w = [0.0, 0.0, 0.0]
        w[alone] = 1.0
        tl = token_likelihood(members, prompts, sample_tokens(members, w, prompts, 400, seed=alone))
        fit = fit_weights(tl.units, max_iter=50)
        assert fit.log_likelihood >= tl.member_logp().max()
        assert int(np.argmax(fit.weights)) == alone
    for _ in range(20):  # random units, lattices included, random starts
        logp = rng.normal(-3, 2, size=(40, 3))
        from me_local.core.likelihood import Edge, Lattice

        lat = {u: Lattice((0, 1, 2), (Edge(0, 2, 0, float(logp[u, 0])),
                                      Edge(0, 1, 1, float(rng.normal(-2, 1))), Edge(1, 2, 1, float(rng.normal(-2, 1))),
                                      Edge(0, 1, 2, float(rng.normal(-2, 1))), Edge(1, 2, 2, float(rng.normal(-2, 1)))))
               for u in rng.choice(40, size=8, replace=False)}
        for u, la in lat.items():  # a member alone writes the unit as the sum of its words
            for k in (1, 2):
                logp[u, k] = sum(e.logp for e in la.edges if e.member == k)
        units = UnitScores(logp, np.ones(40, dtype=np.int64), np.ones(40, dtype=np.int64), lat)
        fit = fit_weights(units, start=rng.dirichlet([1, 1, 1]), tol=0.0, max_iter=200)
        assert np.all(np.diff(fit.trace) >= -1e-9 * abs(fit.trace[0])), np.diff(fit.trace).min()
        assert fit.log_likelihood >= units.member_logp().max()
        assert fit.weights.sum() == pytest.approx(1.0)


def test_a_lattice_unit_counts_every_way_to_write_it():
    """Two draws of b for a unit b writes as two words: λ_b², and c may follow b."""
    from me_local.core.likelihood import Edge, Lattice

    lat = Lattice((0, 1, 2), (Edge(0, 2, 0, math.log(0.2)), Edge(0, 1, 1, math.log(0.5)),
                              Edge(1, 2, 1, math.log(0.4)), Edge(0, 1, 2, math.log(0.3)), Edge(1, 2, 2, math.log(0.6))))
    w = np.array([0.5, 0.3, 0.2])
    z = w[0] * 0.2 + (w[1] * 0.5 + w[2] * 0.3) * (w[1] * 0.4 + w[2] * 0.6)
    assert lat.log_z(np.log(w)) == pytest.approx(math.log(z))
    draws = lat.draws(np.log(w))
    p_a = w[0] * 0.2 / z
    assert draws.sum() == pytest.approx(p_a + 2 * (1 - p_a))
    assert draws[0] == pytest.approx(p_a)


def test_split_units_holds_out_a_share_in_order_and_bits_per_byte_follow():
    logp = np.arange(20, dtype=float).reshape(10, 2) * -1
    units = UnitScores(logp, np.arange(1, 11, dtype=np.int64), np.ones(10, dtype=np.int64))
    fit, held = split_units(units, 0.3, seed=1)
    assert (fit.n_units, held.n_units) == (7, 3)
    rows = {tuple(r) for r in fit.logp} | {tuple(r) for r in held.logp}
    assert len(rows) == 10
    assert list(held.n_bytes) == sorted(held.n_bytes)
    assert split_units(units, 0.3, seed=1)[1].n_bytes.tolist() == held.n_bytes.tolist()
    both = UnitScores.concat([fit, held])
    assert both.total([1, 1]) == pytest.approx(units.total([1, 1]))
    assert bits_per_byte(held.total([1, 0]), int(held.n_bytes.sum())) > 0
    with pytest.raises(RequestError, match="holdout must be between 0 and 1"):
        split_units(units, 1.0)
