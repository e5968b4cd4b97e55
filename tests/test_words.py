"""Word-level ME (members with different vocabularies) in the pure core, with fake members
whose next-token distributions can be enumerated exactly."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from me_local.core import DoneEvent, SamplingParams, TokenEvent, generate
from me_local.core.sampling import softmax
from me_local.core.words import WORD_MAX_BYTES
from me_local.errors import RequestError

from .fakes import WordFake
from .test_core import chi2_critical, chi_square

T1 = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def pair(bias: float = 1.0, eog_bias: float = -3.0) -> list[WordFake]:
    """Two members over the same alphabet with different multi-character pieces (and so
    different vocabulary sizes and ids)."""
    return [
        WordFake("a", 1, [b" bad", b"ace", b" cab", b"de"], boundary_bias=bias, eog_bias=eog_bias),
        WordFake("b", 2, [b" bead", b"ab", b" dab", b"cc", b"ed", b" a"], boundary_bias=bias, eog_bias=eog_bias),
    ]


PROMPTS = [[0, 1], [2, 1]]


def run(members, weights, params, prompts=PROMPTS):
    events = list(generate(members, weights, prompts, SamplingParams(**params), granularity="word"))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return [e for e in events if isinstance(e, TokenEvent)], done


@functools.cache
def word_probs(m: WordFake, last: int, restricted: bool, eps: float = 1e-6) -> dict[str, float]:
    """Exact P_m(word | the last token is ``last``): the probability that m writes the word
    and then a word boundary (a word-start token, or a forced boundary at WORD_MAX_BYTES),
    over every tokenization of it. ``restricted``: its first token is drawn among word-start
    tokens only (renormalised). The empty word is the end of generation."""
    mask = m.word_start
    out: Counter[str] = Counter()
    rows = [softmax(row).tolist() for row in m._table]
    ends = [float(softmax(row)[mask].sum()) for row in m._table]
    inner = [int(t) for t in np.nonzero(~mask)[0]]

    def dfs(word: bytes, prev: int, prob: float) -> None:
        r = rows[prev]
        out[word.decode()] += prob * ends[prev]
        for t in inner:
            p = prob * r[t]
            if p < eps:
                continue
            w = word + m.pieces[t]
            if len(w) >= WORD_MAX_BYTES:
                out[w.decode()] += p
            else:
                dfs(w, t, p)

    q = softmax(m._table[last])
    if restricted:
        q = np.where(mask, q, 0.0)
        q /= q.sum()
    for t in np.nonzero(q > eps)[0]:
        if m.is_eog(int(t)):
            out[""] += float(q[t])
        else:
            dfs(m.pieces[t], int(t), float(q[t]))
    return dict(out)


def split_word(text: str) -> tuple[str, str]:
    """The first word of ``text`` (up to the next whitespace after its first character), and the rest."""
    for i in range(1, len(text)):
        if text[i] in " \n":
            return text[:i], text[i:]
    return text, ""


def compare(counts: Counter[str], expected: dict[str, float]) -> tuple[float, float]:
    keys = sorted(expected, key=lambda k: -expected[k])
    total = sum(counts.values())
    obs = np.array([counts.get(k, 0) for k in keys] + [total - sum(counts.get(k, 0) for k in keys)], float)
    probs = np.array([expected[k] for k in keys] + [max(0.0, 1.0 - sum(expected.values()))])
    stat, dof = chi_square(obs, probs / probs.sum())
    return stat, chi2_critical(dof)


def mix(dists: Sequence[dict[str, float]], weights: Sequence[float]) -> dict[str, float]:
    out: Counter[str] = Counter()
    w = np.asarray(weights, float) / sum(weights)
    for wi, d in zip(w, dists):
        for k, v in d.items():
            out[k] += wi * v
    return dict(out)


# ----------------------------------------------------------------- distributions


def test_the_first_word_is_drawn_from_the_word_level_mixture_and_not_from_one_member():
    members = pair()
    weights = [0.35, 0.65]
    counts: Counter[str] = Counter()
    for seed in range(3000):
        text = ""
        for ev in generate(members, weights, PROMPTS, SamplingParams(seed=seed, max_tokens=40, **T1),
                           granularity="word"):
            if isinstance(ev, DoneEvent):
                break
            text += ev.text
            if split_word(text)[1]:
                break  # the first word is complete: a second one began
        counts[split_word(text)[0]] += 1
    pa, pb = (word_probs(m, 1, restricted=False) for m in members)
    stat, critical = compare(counts, mix([pa, pb], weights))
    assert stat < critical, (stat, critical)
    for alone in (pa, pb):  # the same test rejects either member alone
        stat_alone, critical_alone = compare(counts, alone)
        assert stat_alone > critical_alone


def test_the_next_word_after_a_boundary_is_the_mixture_restricted_to_word_starts():
    """Whoever wrote the first word, the second is Σ λ_m P_m(w | text, a word starts here):
    the writer keeps its boundary token when redrawn (a restricted sample), another member
    samples its first token among word-start tokens."""
    members = pair()
    weights = [0.5, 0.5]
    counts: Counter[str] = Counter()
    conditions: Counter[tuple[int, ...]] = Counter()
    n = 0
    for seed in range(2000):
        tokens, done = run(members, weights, dict(seed=seed, max_tokens=30, **T1))
        text = "".join(t.text for t in tokens)
        first, rest = split_word(text)
        if not first or (not rest and done.finish_reason != "stop"):
            continue  # no first word (the text ended at once), or the limit cut it
        n_first = 0
        acc = ""
        while acc != first:
            acc += tokens[n_first].text
            n_first += 1
        writer = tokens[0].member
        states = []
        for m in members:
            if m.name == writer:
                states.append(tokens[n_first - 1].id)  # its own last token
            else:
                states.append(m.tokenize_text(first)[-1])
        conditions[tuple(states)] += 1
        second, after = split_word(rest)  # "": the text ended at the boundary
        complete = bool(after) or done.finish_reason == "stop"
        counts[second if complete else "\0incomplete"] += 1
        n += 1
    assert n > 1200
    expected: Counter[str] = Counter()  # Σ over the runs of each run's own expected distribution
    for states, times in conditions.items():
        for k, v in mix([word_probs(m, s, restricted=True) for m, s in zip(members, states)], weights).items():
            expected[k] += times * v
    probs = {k: v / n for k, v in expected.items()}
    stat, critical = compare(counts, probs)
    assert stat < critical, (stat, critical)
    # an unrestricted first token would be another distribution, and the test sees it
    unrestricted = mix([word_probs(m, 1, restricted=False) for m in members], weights)
    assert compare(counts, unrestricted)[0] > compare(counts, unrestricted)[1]


# ----------------------------------------------------------------- the ledger


def segments(tokens: Sequence[TokenEvent]) -> list[tuple[str, str]]:
    """(member, text) runs of the output, merged while one member writes."""
    out: list[tuple[str, str]] = []
    for t in tokens:
        if out and out[-1][0] == t.member:
            out[-1] = (t.member, out[-1][1] + t.text)
        else:
            out.append((t.member or "", t.text))
    return out


def test_catch_up_is_lazy_batched_and_a_dropped_boundary_token_is_never_evaluated():
    members = pair(eog_bias=-9.0)
    for m in members:
        m.calls.clear()
    tokens, done = run(members, [0.5, 0.5], dict(seed=11, max_tokens=80, **T1))
    assert len(tokens) == 80 and done.finish_reason == "length"
    segs = segments(tokens)
    assert len({m for m, _ in segs}) == 2 and len(segs) >= 6  # they took turns
    text = "".join(t.text for t in tokens)
    for m, prompt in zip(members, PROMPTS):
        own = sum(1 for t in tokens if t.member == m.name)
        turns = sum(1 for s, _ in segs if s == m.name)
        # one call per turn that catches up (prompt and the text it missed, batched),
        # then one per token it wrote (except a word's last when a boundary token followed)
        assert len(m.calls) <= turns + own
        assert len(m.calls) >= turns
        assert list(m.cached[: len(prompt)]) == prompt
        # what its cache holds is the text, as far as it has seen it
        seen = b"".join(m.pieces[t] for t in m.cached[len(prompt):]).decode()
        assert text.startswith(seen)
        # the text others wrote is in its cache as its own tokenization of that text
        pos = 0
        cached_text_ends = np.cumsum([len(m.pieces[t]) for t in m.cached[len(prompt):]])
        for writer, seg in segs:
            end = pos + len(seg.encode())
            if writer != m.name and end <= len(seen.encode()) and pos in cached_text_ends:
                i0 = int(np.searchsorted(cached_text_ends, pos, side="right"))
                i1 = int(np.searchsorted(cached_text_ends, end, side="right"))
                assert list(m.cached[len(prompt) + i0: len(prompt) + i1]) == m.tokenize_text(seg)
            pos = end
    st = {s.name: s for s in done.stats.members}
    assert done.stats.granularity == "word"
    assert done.stats.words == sum(s.selected for s in done.stats.members)
    assert sum(s.generated_tokens or 0 for s in done.stats.members) == 80
    for m in members:
        assert st[m.name].generated_tokens == sum(1 for t in tokens if t.member == m.name)
        assert st[m.name].prompt_tokens == len(PROMPTS[0])  # each evaluated its prompt once
    assert sum(s.catchup_tokens for s in done.stats.members) > 0


def test_a_member_redrawn_keeps_its_boundary_token_and_evaluates_nothing_else():
    members = pair()
    a = members[0]
    tokens, _ = run(members, [1.0, 0.0], dict(seed=5, max_tokens=30, **T1))
    assert {t.member for t in tokens} == {"a"}
    assert members[1].calls == []  # a member of weight 0 never runs
    # alone, a writes token by token: its prompt, then each token it sampled, one call each
    assert a.calls[0] == PROMPTS[0]
    assert [c for c in a.calls[1:]] == [[t.id] for t in tokens[:-1]]
    assert list(a.cached) == PROMPTS[0] + [t.id for t in tokens[:-1]]


def test_single_member_word_mode_matches_its_own_token_by_token_sampling_in_text():
    """Alone at word granularity a member writes text from its own distribution: the text
    per seed differs from token mode (other streams), but both only use its tokens."""
    members = pair()
    tokens, done = run(members, [0.0, 1.0], dict(seed=3, max_tokens=25, **T1))
    assert all(t.member == "b" for t in tokens)
    assert done.stats.members[0].selected == 0


def test_stop_strings_eog_and_limits_across_members():
    members = pair()
    for seed in range(40):
        tokens, done = run(members, [0.5, 0.5], dict(seed=seed, max_tokens=50, stop=("ab",), **T1))
        text = "".join(t.text for t in tokens) + done.text
        assert "ab" not in text
        assert done.finish_reason in ("stop", "length")
        if done.finish_reason == "length":
            assert len(tokens) == 50
    # an end-of-generation token as a word's first token ends the text at the boundary
    ends = [run(pair(eog_bias=1.0), [0.5, 0.5], dict(seed=s, max_tokens=50, **T1)) for s in range(30)]
    assert any(d.finish_reason == "stop" for _, d in ends)
    eog = {m.name: m.eog_id for m in pair()}  # each vocabulary's own
    for _, d in ends:  # no stop strings: a stop is the end token, which the done event names
        assert (d.end is not None) == (d.finish_reason == "stop")
        if d.end is not None:
            assert d.end.id == eog[d.end.member] and d.end.text == ""


def test_text_without_whitespace_gets_forced_boundaries_so_members_keep_mixing():
    members = [WordFake("a", 1, [b"ace", b"de"], alphabet=b"abcde", eog_bias=-9.0),
               WordFake("b", 2, [b"ab", b"cc", b"ed"], alphabet=b"abcde", eog_bias=-9.0)]
    tokens, done = run(members, [0.5, 0.5], dict(seed=1, max_tokens=120, **T1))
    text = "".join(t.text for t in tokens)
    assert " " not in text and len(tokens) == 120
    segs = segments(tokens)
    assert len(segs) >= 3  # several members wrote
    assert done.stats.words is not None and done.stats.words >= len(text.encode()) // (WORD_MAX_BYTES + 3)
    for _, seg in segs[:-1]:
        assert len(seg.encode()) >= WORD_MAX_BYTES  # a turn ends only at a forced boundary


def test_cancel_and_greedy_and_logprobs_at_word_granularity():
    members = pair()
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 12

    events = list(generate(members, [0.5, 0.5], PROMPTS, SamplingParams(seed=1, max_tokens=100, **T1),
                           granularity="word", cancel=cancel))
    assert events[-1].finish_reason == "cancelled"
    assert 0 < len(events) - 1 < 100
    tokens, _ = run(pair(), [0.5, 0.5], dict(seed=2, max_tokens=20, logprobs=True, top_logprobs=3,
                                             temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    for t in tokens:
        assert t.logprob is not None and t.logprob <= 0
        m = next(m for m in pair() if m.name == t.member)
        assert t.top_logprobs is not None and len(t.top_logprobs) == 3
        assert t.top_pieces == [m.pieces[i] for i, _ in t.top_logprobs]
    g1, _ = run(pair(), [0.5, 0.5], dict(seed=9, max_tokens=20, temperature=0.0))
    g2, _ = run(pair(), [0.5, 0.5], dict(seed=9, max_tokens=20, temperature=0.0))
    assert [t.text for t in g1] == [t.text for t in g2]


def test_word_granularity_refuses_ce_and_members_without_a_word_tokenizer():
    from .fakes import FakeMember

    with pytest.raises(RequestError, match="granularity"):
        list(generate(pair(), [1, 1], PROMPTS, SamplingParams(max_tokens=3), mode="ce", granularity="word"))
    with pytest.raises(RequestError, match="granularity"):
        list(generate([FakeMember("x", 1), FakeMember("y", 2)], [1, 1], [[1], [1]], SamplingParams(max_tokens=3),
                      granularity="word"))
    with pytest.raises(RequestError, match="granularity"):
        list(generate(pair(), [1, 1], PROMPTS, SamplingParams(max_tokens=3), granularity="sentence"))


def test_split_utf8_is_held_back_until_complete_across_members():
    euro = "€".encode()
    members = [WordFake("a", 1, [euro[:2], euro[2:], b" \xe2\x82\xac"], boundary_bias=0.5),
               WordFake("b", 2, [euro[:1], euro[1:], b" ab"], boundary_bias=0.5)]
    saw_euro = False
    for seed in range(30):
        tokens, done = run(members, [0.5, 0.5], dict(seed=seed, max_tokens=40, **T1))
        pieces = b"".join(t.piece for t in tokens)
        text = "".join(t.text for t in tokens) + done.text
        assert text == pieces.decode("utf-8", "replace")
        for t in tokens:  # no event releases half a character
            assert t.text.encode("utf-8").decode("utf-8") == t.text
        saw_euro |= "€" in text and any(len(t.piece) < 3 and t.piece[:1] == b"\xe2" for t in tokens)
    assert saw_euro  # a euro sign was written in pieces, and came out whole


def test_slots_keep_word_level_state_apart(tiny_models=None):
    """Two generations interleaved on separate member sets give the texts they give alone."""
    def gen(seed):
        return generate(pair(), [0.5, 0.5], PROMPTS, SamplingParams(seed=seed, max_tokens=30, **T1),
                        granularity="word")

    alone = ["".join(e.text for e in gen(s) if isinstance(e, TokenEvent)) for s in (1, 2)]
    g1, g2 = gen(1), gen(2)
    texts = ["", ""]
    done = [False, False]
    while not all(done):
        for i, g in enumerate((g1, g2)):
            if not done[i]:
                ev = next(g)
                if isinstance(ev, DoneEvent):
                    done[i] = True
                else:
                    texts[i] += ev.text
    assert texts == alone
