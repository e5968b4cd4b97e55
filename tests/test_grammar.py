"""Grammars in the pure core (docs/grammar.md), with fake members whose grammars are small
automata over their pieces (tests/fakes.py): the output never leaves the grammar in any
mode, a member catching up on what others wrote continues inside it, one step's
distribution is the restricted, renormalised one, word granularity never lets a dropped
boundary token reach a grammar, and lazy triggers."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace

import numpy as np
import pytest

from me_local.config import load_config
from me_local.core import DoneEvent, GrammarSpec, SamplingParams, TokenEvent, generate, sampling
from me_local.core.grammar import token_literals
from me_local.core.sampling import ce_distribution, mixture, softmax, truncate
from me_local.engine import Engine, Request
from me_local.errors import RequestError

from .fakes import FAKE_GRAMMARS, FakeFactory, FakeMember, WordFake, scripted
from .test_core import chi2_critical, chi_square

T1 = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
PIECES = [b"{", b"}", b"a", b"b", b"c", b"ab", b"ba", b"ca", b"cb", b"aa", b" ", b"x", b"{a", b"b}", b"{x", b""]
EOG = len(PIECES) - 1
TOK = {p: i for i, p in enumerate(PIECES)}
PROMPTS = [[11, 11], [11, 11]]
BRACES = FAKE_GRAMMARS["braces"]
BODY = FAKE_GRAMMARS["body"]


def gmember(name: str, seed: int) -> FakeMember:
    """A fake member over :data:`PIECES` whose closing brace is rare (the texts run long)."""
    m = FakeMember(name, seed, n_vocab=len(PIECES), pieces=PIECES, eog=EOG)
    m._table[:, [TOK[b"}"], TOK[b"b}"]]] -= 3.0
    return m


def run(members, weights, params, prompts=PROMPTS, **kw):
    events = list(generate(members, weights, prompts, params, **kw))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    return tokens, done


def text_of(tokens) -> bytes:
    return b"".join(t.piece for t in tokens)


# ------------------------------------------------------------------ token granularity


@pytest.mark.parametrize("params", [T1, SamplingParams(), SamplingParams(top_k=4, top_p=1.0, min_p=0.0)],
                         ids=["untruncated", "defaults", "top-k"])
def test_me_thousands_of_seeded_tokens_never_leave_the_grammar(params):
    members = [gmember("a", 1), gmember("b", 2)]
    total = switches = complete = 0
    for seed in range(120):
        tokens, done = run(members, [1, 1], replace(params, seed=seed, max_tokens=40), grammar=GrammarSpec("braces"))
        text = text_of(tokens)
        assert BRACES.matches(text), text
        whole = BRACES.matches(text, whole=True)
        complete += whole
        assert done.grammar == ("complete" if whole else "incomplete")
        # complete: only the end may follow, so the generation ends there (no end token drawn)
        assert done.finish_reason == ("stop" if whole else "length")
        total += len(tokens)
        writers = [t.member for t in tokens]
        switches += sum(a != b for a, b in itertools.pairwise(writers))
        for m in members:  # each member's grammar followed the shared text: it caught up on the others'
            c = m.constraints[-1]
            assert c.closed
            assert text.startswith(c.accepted)
        assert members[[m.name for m in members].index(writers[-1])].constraints[-1].accepted == text
    assert total >= 2500 and switches >= 800 and complete >= 20, (total, switches, complete)


def test_a_member_catching_up_on_tokens_others_wrote_continues_inside_the_grammar():
    # "a" writes "{" and "a" (its script); "b" is drawn next: without catching up, its grammar
    # would still expect "{", and its next token would be one (its likeliest)
    a = scripted("a", PIECES, [TOK[b"{"], TOK[b"a"]] * 20, prompt_len=2, eog=EOG)
    b = scripted("b", PIECES, [TOK[b"{"]] * 40, prompt_len=2, eog=EOG)
    for seed in range(40):
        tokens, _ = run([a, b], [1, 1], replace(T1, seed=seed, max_tokens=6), grammar=GrammarSpec("braces"))
        text = text_of(tokens)
        assert BRACES.matches(text), (seed, text)
        if [t.member for t in tokens[:3]] == ["a", "a", "b"]:
            assert b.constraints[-1].accepted.startswith(b"{a")
            assert tokens[2].piece != b"{"
            break
    else:
        pytest.fail("no seed drew a, a, b")


def test_single_and_greedy_take_the_best_allowed_token():
    m = gmember("a", 1)
    m.evaluate(PROMPTS[0])
    logits = m.logits()
    m.truncate(0)
    allowed = np.array([BODY.walk(BODY.start, p) is not None and p != b"" for p in PIECES])
    tokens, _ = run([m], [1], SamplingParams(temperature=0, max_tokens=1), prompts=PROMPTS[:1],
                    grammar=GrammarSpec("body"))
    assert tokens[0].id == int(np.argmax(np.where(allowed, logits, -np.inf)))
    assert not allowed[int(np.argmax(logits))], "the test needs a likeliest token the grammar refuses"


# ------------------------------------------------------------------------ one step


def first_step(mode, weights, params, n=4000):
    members = [gmember("a", 1), gmember("b", 2)]
    counts = np.zeros(len(PIECES))
    for seed in range(n):
        tokens, _ = run(members, weights, replace(params, seed=seed, max_tokens=1), mode=mode,
                        grammar=GrammarSpec("body"))
        counts[tokens[0].id] += 1
    probs = []
    for m in members:
        m.truncate(0)
        m.evaluate(PROMPTS[0])
        probs.append(softmax(m.logits()))
    masks = sum(c.masks for m in members for c in getattr(m, "constraints", []))
    return counts, probs, masks


BODY_ALLOWED = np.array([p != b"" and BODY.walk(BODY.start, p) is not None for p in PIECES])


def renorm(p):
    q = np.where(BODY_ALLOWED, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("top_k", [0, 4])
def test_me_step_is_the_mixture_of_each_member_restricted_and_renormalised(top_k):
    params = replace(T1, top_k=top_k)
    counts, (pa, pb), masks = first_step("me", [0.3, 0.7], params)
    want = mixture([truncate(renorm(pa), top_k, 1.0, 0.0), truncate(renorm(pb), top_k, 1.0, 0.0)], [0.3, 0.7])
    stat, dof = chi_square(counts, want)
    assert stat < chi2_critical(dof), (stat, dof)
    if not top_k:  # a draw the grammar allows is kept; a refused one falls back to the whole mask
        assert 0 < masks < 4000, masks
    # the mixture restricted as a whole (ce's semantics) is a different distribution
    wrong = truncate(renorm(mixture([pa, pb], [0.3, 0.7])), top_k, 1.0, 0.0)
    assert chi_square(counts, wrong)[0] > chi2_critical(dof)


@pytest.mark.parametrize("top_k", [0, 4])
def test_ce_step_is_the_mixture_restricted_and_renormalised(top_k):
    counts, (pa, pb), masks = first_step("ce", [0.3, 0.7], replace(T1, top_k=top_k))
    want = truncate(renorm(mixture([pa, pb], [0.3, 0.7])), top_k, 1.0, 0.0)
    stat, dof = chi_square(counts, want)
    assert stat < chi2_critical(dof), (stat, dof)
    if not top_k:
        assert 0 < masks < 4000, masks


class SetConstraint:
    """A constraint that allows a fixed set of tokens (counts its whole-vocabulary masks)."""

    def __init__(self, allowed):
        self._allowed = allowed
        self.masks = 0

    def allowed(self, ids):
        return self._allowed[ids]

    def mask(self):
        self.masks += 1
        return self._allowed


@pytest.mark.parametrize("likely", [True, False], ids=["found-among-candidates", "whole-mask"])
@pytest.mark.parametrize("params", [T1, replace(T1, top_k=3), replace(T1, top_k=3, top_p=0.8, min_p=0.1),
                                    replace(T1, temperature=0)], ids=["untruncated", "top-k", "top-k-p-min", "greedy"])
def test_the_shortcuts_draw_from_the_restricted_distribution_exactly(monkeypatch, params, likely):
    monkeypatch.setattr(sampling, "CANDIDATES", 8)
    rng = np.random.default_rng(5)
    probs = softmax(rng.normal(0, 1.5, 60))
    order = np.argsort(-probs)
    allowed = np.zeros(60, dtype=bool)
    # likely: 5 of the 8 likeliest tokens are allowed (and 10 others); else only unlikely ones
    allowed[order[[0, 2, 3, 5, 7]] if likely else order[[20, 30]]] = True
    allowed[order[40:50]] = True
    c = SetConstraint(allowed)
    n = 1 if params.greedy else 6000
    counts = np.zeros(60)
    for _ in range(n):
        counts[sampling.constrained_draw(probs, params, c, rng)] += 1
    restricted = np.where(allowed, probs, 0) / probs[allowed].sum()
    if params.greedy:
        assert counts[int(np.argmax(restricted))] == 1
    else:
        stat, dof = chi_square(counts, truncate(restricted, params.top_k, params.top_p, params.min_p))
        assert stat < chi2_critical(dof), (stat, dof)
    if params.top_k or params.greedy:  # k allowed (greedy: one) among the candidates: no whole-vocabulary mask
        assert c.masks == (0 if likely else n)
    else:  # a draw the grammar allows is kept, a refused one falls back to the mask
        assert 0 < c.masks < n


def test_ce_distribution_restricts_the_tempered_mixture_then_truncates():
    rows = [np.array([3.0, 1.0, 0.5, -1.0, 0.0]), np.array([1.0, 1.5, 1.0, 0.5, -2.0])]
    allowed = np.array([False, True, True, False, True])
    params = SamplingParams(temperature=0.7, top_k=2, top_p=1.0, min_p=0.0)
    probs, raw = ce_distribution(rows, [0.4, 0.6], params, want_raw=True, allowed=allowed)
    tempered = mixture([softmax(r, 0.7) for r in rows], [0.4, 0.6])
    want = truncate(np.where(allowed, tempered, 0) / tempered[allowed].sum(), 2, 1.0, 0.0)
    assert np.allclose(probs, want) and probs[~allowed].sum() == 0 and (probs > 0).sum() == 2
    assert np.allclose(raw, mixture([softmax(r) for r in rows], [0.4, 0.6]))  # logprobs: unrestricted
    greedy, _ = ce_distribution(rows, [0.4, 0.6], SamplingParams(temperature=0), allowed=allowed)
    assert int(np.argmax(greedy)) == 1  # token 0 is the mixture's best, and refused


def test_ce_greedy_takes_the_best_allowed_token_of_the_mixture():
    members = [gmember("a", 1), gmember("b", 2)]
    tokens, done = run(members, [0.3, 0.7], SamplingParams(temperature=0, max_tokens=1), mode="ce",
                       grammar=GrammarSpec("body"))
    for m in members:
        m.truncate(0)
        m.evaluate(PROMPTS[0])
    mix = mixture([softmax(m.logits()) for m in members], [0.3, 0.7])
    assert tokens[0].id == int(np.argmax(np.where(BODY_ALLOWED, mix, -1)))
    assert done.grammar == "incomplete"


# ------------------------------------------------------------------------ word granularity


def word_pair() -> list[WordFake]:
    return [
        WordFake("a", 1, [b" bad", b"ace", b" cab", b"ab", b" a"], boundary_bias=1.0),
        WordFake("b", 2, [b" bead", b"ab", b" cab", b"cc", b"ba", b" b"], boundary_bias=1.0),
    ]


def test_word_granularity_stays_inside_the_grammar_and_dropped_kept_tokens_never_reach_it():
    members = word_pair()
    dfa = FAKE_GRAMMARS["words"]
    total = switches = 0
    for seed in range(150):
        tokens, done = run(members, [1, 1], replace(T1, seed=seed, max_tokens=30), prompts=[[0, 1], [2, 1]],
                           granularity="word", grammar=GrammarSpec("words"))
        text = text_of(tokens)
        assert dfa.matches(text), (seed, text)
        assert done.grammar == ("complete" if dfa.matches(text, whole=True) else "incomplete")
        if done.finish_reason == "stop":
            assert done.grammar == "complete"
        total += len(tokens)
        writers = [t.member for t in tokens]
        # each switch dropped the boundary token the previous writer had sampled (and kept)
        switches += sum(a != b for a, b in itertools.pairwise(writers))
        for m in members:  # a grammar saw only committed text: never a dropped token
            assert text.startswith(m.constraints[-1].accepted)
    assert total >= 1500 and switches >= 300, (total, switches)


def test_word_granularity_falls_back_to_an_unrestricted_first_token_when_no_word_start_is_allowed(caplog):
    a = WordFake("a", 1, [b"ab", b"ca"], alphabet=b"abc\n", boundary_bias=1.0)
    b = WordFake("b", 2, [b"bc", b"cab"], alphabet=b"abc ")
    b._word_start[b.pieces.index(b"\n")] = False  # b's newline does not begin a word: no word start may follow a
    dfa = FAKE_GRAMMARS["lines"]
    caplog.set_level(logging.DEBUG, logger="me_local.core")
    for seed in range(40):
        tokens, _ = run([a, b], [1, 1], replace(T1, seed=seed, max_tokens=30), prompts=[[0, 1], [2, 1]],
                        granularity="word", grammar=GrammarSpec("lines"))
        assert dfa.matches(text_of(tokens)), text_of(tokens)
    assert "member 'b': the grammar allows none of its word-start tokens here" in caplog.text


# ------------------------------------------------------------------------ lazy grammars


def lazy(gbnf: str, *triggers: str) -> GrammarSpec:
    return GrammarSpec(gbnf, param="tools", triggers=triggers)


def test_a_lazy_grammar_leaves_the_text_free_until_its_trigger():
    x, lb, a = TOK[b"x"], TOK[b"{"], TOK[b"a"]
    for seed in range(10):
        m = scripted("m", PIECES, [x, x, lb, a, a, a, a, a], prompt_len=2, eog=EOG)  # "aa" is not in the grammar
        tokens, done = run([m], [1], replace(T1, seed=seed, max_tokens=8), prompts=PROMPTS[:1],
                           grammar=lazy("braces", "{"))
        text = text_of(tokens)
        assert text.startswith(b"xx{a") and b"aa" not in text
        assert BRACES.matches(text[2:])
        assert done.grammar in ("complete", "incomplete")
        assert m.constraints[-1].accepted == text[2:]


def test_a_trigger_across_tokens_and_one_the_grammar_rejects(caplog):
    x, lb, a, b, rb, lbx = (TOK[p] for p in (b"x", b"{", b"a", b"b", b"}", b"{x"))
    # "{x": the trigger's text goes on with "x", which the grammar rejects: free text again
    m = scripted("m", PIECES, [x, lbx, a, lb, a, b, rb, x, x], prompt_len=2, eog=EOG)
    tokens, done = run([m], [1], replace(T1, seed=1, max_tokens=9), prompts=PROMPTS[:1],
                       grammar=lazy("braces", "{a"))
    assert text_of(tokens) == b"x{xa{ab}"  # "{a" spans two tokens; complete after "}": the end
    assert (done.finish_reason, done.grammar, done.end) == ("stop", "complete", None)
    assert "did not match the text after its trigger" not in caplog.text
    m = scripted("m", PIECES, [x, lbx, a, lb, b, rb, x, x], prompt_len=2, eog=EOG)
    tokens, done = run([m], [1], replace(T1, seed=1, max_tokens=9), prompts=PROMPTS[:1],
                       grammar=lazy("braces", "{"))
    assert text_of(tokens) == b"x{xa{b}"
    assert (done.finish_reason, done.grammar) == ("stop", "complete")
    assert "the grammar of tools did not match the text after its trigger '{'" in caplog.text


def test_a_lazy_grammar_never_triggered_is_untriggered():
    m = scripted("m", PIECES, [TOK[b"x"], TOK[b"a"]] * 4, prompt_len=2, eog=EOG)
    tokens, done = run([m], [1], replace(T1, seed=1, max_tokens=6), prompts=PROMPTS[:1], grammar=lazy("braces", "{"))
    assert text_of(tokens) == b"xaxaxa"
    assert (done.finish_reason, done.grammar) == ("length", "untriggered")
    assert not hasattr(m, "constraints")


def test_a_lazy_grammar_at_word_granularity():
    dfa = FAKE_GRAMMARS["c-then-ab"]
    triggered = 0
    for seed in range(60):
        tokens, done = run(word_pair(), [1, 1], replace(T1, seed=seed, max_tokens=12), prompts=[[0, 1], [2, 1]],
                           granularity="word", grammar=lazy("c-then-ab", "ca"))
        text = text_of(tokens)
        # constrained from the first "ca" the text after which the grammar took: only a and b after it
        starts = [i for i in range(len(text)) if text[i:i + 2] == b"ca" and dfa.matches(text[i:])]
        assert done.grammar == ("complete" if starts else "untriggered"), (seed, text)
        triggered += bool(starts)
    assert 10 <= triggered <= 57, triggered  # both outcomes


# ------------------------------------------------------------------------ errors


def test_a_grammar_the_member_cannot_use_is_a_request_error_naming_its_field():
    with pytest.raises(RequestError) as e:
        run([gmember("a", 1)], [1], T1, prompts=PROMPTS[:1], grammar=GrammarSpec("nonsense", param="format"))
    assert e.value.param == "format"


def test_a_grammar_that_allows_no_token_is_a_clean_error():
    for mode in ("me", "ce"):
        with pytest.raises(RequestError, match=r"the grammar in grammar allows no token of member .* after 0 bytes"):
            run([gmember("a", 1), gmember("b", 2)], [1, 1], T1, mode=mode, grammar=GrammarSpec("impossible"))


def test_members_that_cannot_take_a_grammar_are_refused():
    class Plain:  # a Member without make_constraint
        def __init__(self, m):
            self._m = m

        def __getattr__(self, name):
            if name == "make_constraint":
                raise AttributeError(name)
            return getattr(self._m, name)

    with pytest.raises(RequestError, match="cannot constrain its output to a grammar") as e:
        run([Plain(gmember("a", 1))], [1], T1, prompts=PROMPTS[:1], grammar=GrammarSpec("body", param="json_schema"))
    assert e.value.param == "json_schema"


def test_token_literals_are_found_outside_strings_and_classes():
    assert token_literals('root ::= "<a>" [<>] x <|im_end|> # <no>\nx ::= !<[12]> "\\"<q>"') == ["<|im_end|>", "<[12]>"]
    assert token_literals('root ::= "{" [^"]* "}"') == []


@pytest.fixture
def engine(write_config):
    cfg = write_config("""
        ensembles:
          g:
            members: [{name: a, path: a.gguf}, {name: b, path: b.gguf}]
        """)
    e = Engine(load_config(cfg), FakeFactory())
    yield e
    e.close()


def test_the_engine_refuses_a_bad_grammar_before_it_queues_and_takes_an_empty_one_as_none(engine):
    with pytest.raises(RequestError) as e:
        engine.plan_request(Request(ensemble="g", prompt="hi",
                                    grammar=GrammarSpec("nonsense", param="response_format")))
    assert e.value.param == "response_format"
    events = list(engine.generate(Request(ensemble="g", prompt="hi", params=SamplingParams(seed=3, max_tokens=20),
                                          grammar=GrammarSpec("even"))))
    tokens = [ev for ev in events if isinstance(ev, TokenEvent)]
    assert tokens and all(t.id % 2 == 0 for t in tokens)
    assert events[-1].grammar == "complete"
    events = list(engine.generate(Request(ensemble="g", prompt="hi", params=SamplingParams(seed=3, max_tokens=20),
                                          grammar=GrammarSpec(" \n"))))
    assert any(t.id % 2 for t in events if isinstance(t, TokenEvent))
    assert events[-1].grammar is None
