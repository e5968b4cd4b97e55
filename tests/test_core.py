"""The pure core against fake members: selection, ledger, sampling, text."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from me_local.core import DoneEvent, SamplingParams, TokenEvent, generate
from me_local.core.sampling import ce_distribution, mixture, softmax, transform, truncate
from me_local.errors import ContextOverflowError, RequestError

from .fakes import FakeMember, scripted

T1 = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def run(members, weights, prompts, params, **kw):
    events = list(generate(members, weights, prompts, params, **kw))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return tokens, done


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    n = counts.sum()
    expected = probs * n
    mask = expected >= 5  # pool small cells
    stat = float((((counts[mask] - expected[mask]) ** 2) / expected[mask]).sum())
    rest_o, rest_e = counts[~mask].sum(), expected[~mask].sum()
    dof = int(mask.sum()) - 1
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        dof += 1
    return stat, dof


def chi2_critical(dof: int) -> float:
    # Wilson-Hilferty approximation of the 99.9% quantile
    z = 3.090
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


# ----------------------------------------------------------------- distributions


def first_token_counts(mode: str, weights, n: int = 4000, params=T1) -> np.ndarray:
    members = [FakeMember("a", 1), FakeMember("b", 2)]
    counts = np.zeros(12)
    for seed in range(n):
        p = SamplingParams(**{**params.__dict__, "seed": seed, "max_tokens": 1})
        tokens, _ = run(members, weights, [[3, 4], [3, 4]], p, mode=mode)
        counts[tokens[0].id] += 1
    return counts


def test_me_samples_the_mixture_and_not_a_single_member():
    a, b = FakeMember("a", 1), FakeMember("b", 2)
    a.evaluate([3, 4])
    b.evaluate([3, 4])
    pa, pb = softmax(a.logits()), softmax(b.logits())
    mix = mixture([pa, pb], [0.3, 0.7])
    counts = first_token_counts("me", [0.3, 0.7])
    stat, dof = chi_square(counts, mix)
    assert stat < chi2_critical(dof), (stat, dof)
    # the same test rejects draws from either member alone
    for single in (pa, pb):
        stat_single, dof_single = chi_square(counts, single)
        assert stat_single > chi2_critical(dof_single), stat_single


def test_ce_samples_the_same_mixture_at_temperature_one():
    a, b = FakeMember("a", 1), FakeMember("b", 2)
    a.evaluate([3, 4])
    b.evaluate([3, 4])
    mix = mixture([softmax(a.logits()), softmax(b.logits())], [0.3, 0.7])
    counts = first_token_counts("ce", [0.3, 0.7])
    stat, dof = chi_square(counts, mix)
    assert stat < chi2_critical(dof)


def test_me_with_truncation_samples_the_mixture_of_truncated_members():
    params = SamplingParams(temperature=0.7, top_k=3, top_p=1.0, min_p=0.0)
    a, b = FakeMember("a", 1), FakeMember("b", 2)
    a.evaluate([3, 4])
    b.evaluate([3, 4])
    expected = mixture([transform(a.logits(), params), transform(b.logits(), params)], [0.5, 0.5])
    ce_probs, _ = ce_distribution([a.logits(), b.logits()], [0.5, 0.5], params)
    assert not np.allclose(expected, ce_probs)  # the two semantics differ here
    counts = first_token_counts("me", [0.5, 0.5], n=3000, params=params)
    assert counts[expected == 0].sum() == 0
    stat, dof = chi_square(counts, expected)
    assert stat < chi2_critical(dof)


def test_greedy_me_takes_the_drawn_members_argmax_and_ce_the_mixtures():
    a, b = FakeMember("a", 1), FakeMember("b", 2)
    a.evaluate([3, 4])
    b.evaluate([3, 4])
    argmaxes = {int(np.argmax(a.logits())), int(np.argmax(b.logits()))}
    mix_arg = int(np.argmax(mixture([softmax(a.logits()), softmax(b.logits())], [0.5, 0.5])))
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    seen = set()
    for seed in range(40):
        tokens, _ = run([FakeMember("a", 1), FakeMember("b", 2)], [1, 1], [[3, 4]] * 2,
                        SamplingParams(temperature=0.0, max_tokens=1, seed=seed))
        seen.add(tokens[0].id)
    assert seen == argmaxes
    tokens, _ = run([FakeMember("a", 1), FakeMember("b", 2)], [1, 1], [[3, 4]] * 2, greedy, mode="ce")
    assert tokens[0].id == mix_arg


def test_truncate_order_and_bounds():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    assert np.allclose(truncate(p, 2, 1.0, 0.0), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    assert np.allclose(truncate(p, 0, 0.7, 0.0), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    assert np.allclose(truncate(p, 0, 0.71, 0.0)[:3].sum(), 1.0)
    assert np.allclose(truncate(p, 0, 1.0, 0.3), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    assert truncate(p, 0, 0.0, 0.0)[0] == 1.0  # always keeps the best token


# ----------------------------------------------------------------- the ledger


def test_me_catches_up_in_one_batch_and_never_evaluates_an_unneeded_tail():
    members = [FakeMember("a", 1), FakeMember("b", 2), FakeMember("c", 3)]
    prompt = [1, 2, 3]
    tokens, done = run(members, [1, 1, 1], [prompt] * 3, SamplingParams(seed=7, max_tokens=40, **_t1()))
    generated = [t.id for t in tokens]
    assert len(generated) == 40
    by_member = [t.member for t in tokens]
    for m in members:
        picks = [i for i, name in enumerate(by_member) if name == m.name]
        if not picks:
            assert m.calls == []
            continue
        # one evaluate() per selection: prompt (+ catch-up) in a single call each time
        assert len(m.calls) == len(picks)
        assert m.calls[0] == prompt + generated[: picks[0]]
        # its cache holds exactly the sequence up to its last selection, no more
        assert list(m.cached) == prompt + generated[: picks[-1]]
        st = next(s for s in done.stats.members if s.name == m.name)
        assert st.selected == len(picks)
        assert st.prompt_tokens == len(prompt)
        assert st.catchup_tokens == picks[-1]
    assert sum(s.selected for s in done.stats.members) == 40
    assert done.stats.generated_tokens == 40


def test_only_the_first_drawn_member_prefills_before_the_first_token():
    members = [FakeMember("a", 1), FakeMember("b", 2)]
    gen = generate(members, [1, 1], [[1, 2, 3]] * 2, SamplingParams(seed=3, max_tokens=5))
    first = next(gen)
    assert isinstance(first, TokenEvent)
    evaluated = [m.name for m in members if m.calls]
    assert evaluated == [first.member]


def test_ce_evaluates_every_member_every_token():
    members = [FakeMember("a", 1), FakeMember("b", 2)]
    tokens, done = run(members, [1, 1], [[1, 2]] * 2, SamplingParams(seed=1, max_tokens=10), mode="ce")
    assert all(t.member is None for t in tokens)
    for m in members:
        assert len(m.calls) == 10
        assert list(m.cached) == [1, 2] + [t.id for t in tokens][:9]
    assert [s.selected for s in done.stats.members] == [10, 10]


def test_single_runs_one_member_only():
    members = [FakeMember("a", 1), FakeMember("b", 2)]
    tokens, done = run(members, [1, 1], [[1, 2]] * 2, SamplingParams(seed=1, max_tokens=8), mode="single", single=1)
    assert {t.member for t in tokens} == {"b"}
    assert members[0].calls == []
    assert done.stats.members[1].selected == 8


def test_per_member_prompts_and_kv_reuse_across_turns():
    a, b = FakeMember("a", 1, n_ctx=200), FakeMember("b", 2, n_ctx=200)
    pa, pb = [1, 2, 3], [1, 5, 6, 7]
    tokens, _ = run([a, b], [1, 1], [pa, pb], SamplingParams(seed=5, max_tokens=6, **_t1()))
    gen = [t.id for t in tokens]
    # next turn: the previous sequence plus new user tokens
    a.calls.clear(), b.calls.clear()
    _, done2 = run([a, b], [1, 1], [pa + gen + [8, 9], pb + gen + [8, 9]],
                         SamplingParams(seed=6, max_tokens=3, **_t1()))
    for m, p in ((a, pa), (b, pb)):
        if m.calls:
            first = m.calls[0]
            reused = next(s for s in done2.stats.members if s.name == m.name).cached_prompt_tokens
            assert reused >= len(p)  # at least its old prompt came from the cache
            assert len(first) <= len(gen) + 2 + 3  # only what was new was evaluated


def test_zero_weight_members_are_never_drawn_and_weights_set_the_shares():
    members = [FakeMember("a", 1), FakeMember("b", 2), FakeMember("c", 3)]
    _, done = run(members, [0.8, 0.2, 0.0], [[1]] * 3, SamplingParams(seed=11, max_tokens=60, **_t1()))
    counts = {s.name: s.selected for s in done.stats.members}
    assert counts["c"] == 0 and members[2].calls == []
    assert 38 <= counts["a"] <= 58  # 48 expected


def test_seed_fixes_schedule_and_tokens():
    def once(seed):
        ms = [FakeMember("a", 1), FakeMember("b", 2)]
        tokens, _ = run(ms, [1, 1], [[1]] * 2, SamplingParams(seed=seed, max_tokens=30, **_t1()))
        return [(t.id, t.member) for t in tokens]

    assert once(42) == once(42)
    assert once(42) != once(43)


def _t1():
    return {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


# ----------------------------------------------------------------- endings and text


def test_stop_string_spanning_tokens_is_never_emitted():
    pieces = [b"Hel", b"lo, ", b"wor", b"ld", b"!", b"END"]
    m = scripted("s", pieces, [0, 1, 2, 3, 4], prompt_len=1)
    tokens, done = run([m], [1], [[5]], SamplingParams(seed=0, max_tokens=20, stop=("o, w",)))
    text = "".join(t.text for t in tokens) + done.text
    assert text == "Hell"
    assert done.finish_reason == "stop"


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    pieces = [b"ab", b"c", b"d", b"x"]
    m = scripted("s", pieces, [0, 1, 2], prompt_len=1)
    tokens, done = run([m], [1], [[3]], SamplingParams(seed=0, max_tokens=3, stop=("cx",)))
    texts = [t.text for t in tokens]
    assert texts == ["ab", "", "cd"]  # "c" held until "d" showed it is no stop
    assert done.finish_reason == "length"


def test_split_utf8_character_is_held_back_until_complete():
    euro = "€".encode()  # 3 bytes
    pieces = [b"A", euro[:1], euro[1:2], euro[2:], b"B"]
    m = scripted("s", pieces, [0, 1, 2, 3, 4], prompt_len=1)
    tokens, _ = run([m], [1], [[0]], SamplingParams(seed=0, max_tokens=5))
    assert [t.text for t in tokens] == ["A", "", "", "€", "B"]
    assert [t.piece for t in tokens][1:4] == [euro[:1], euro[1:2], euro[2:]]


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    pieces = [b"A", "é".encode()[:1]]
    m = scripted("s", pieces, [0, 1], prompt_len=1)
    tokens, done = run([m], [1], [[0]], SamplingParams(seed=0, max_tokens=2))
    assert "".join(t.text for t in tokens) + done.text == "A\ufffd"


def test_eog_of_the_selected_member_ends_the_generation():
    pieces = [b"a", b"b", b"<eos>"]
    m = scripted("s", pieces, [0, 1, 2, 0], prompt_len=1, eog=2)
    tokens, done = run([m], [1], [[0]], SamplingParams(seed=0, max_tokens=10))
    assert [t.text for t in tokens] == ["a", "b"]
    assert done.finish_reason == "stop"
    assert done.stats.generated_tokens == 2
    # the end token is not text, but the done event names it (completions' echo lists it)
    assert done.end is not None and (done.end.id, done.end.index, done.end.member, done.end.text) == (2, 2, "s", "")
    assert tokens[-1].logprob is None and done.end.logprob is None  # logprobs not asked for
    tokens, done = run([m], [1], [[0]], SamplingParams(seed=0, max_tokens=10, logprobs=True))
    assert done.end.logprob == pytest.approx(0.0, abs=1e-6)
    tokens, done = run([m], [1], [[0]], SamplingParams(seed=0, max_tokens=2))
    assert done.finish_reason == "length" and done.end is None


def test_a_full_context_ends_with_length():
    m = FakeMember("a", 1, n_ctx=10)
    tokens, done = run([m], [1], [[1, 2, 3, 4]], SamplingParams(seed=0, max_tokens=100))
    assert done.finish_reason == "length"
    assert len(tokens) == 7  # 4 prompt + 6 evaluated generated = 10 cells; the 7th is sampled, never evaluated
    assert len(m.cached) == 10


def test_prompt_longer_than_context_is_a_clear_error():
    m = FakeMember("a", 1, n_ctx=4)
    with pytest.raises(ContextOverflowError, match="shorten the prompt or raise n_ctx"):
        list(generate([m], [1], [[1, 2, 3, 4, 5]], SamplingParams()))


def test_bad_mode_and_weights_are_request_errors():
    m = FakeMember("a", 1)
    with pytest.raises(RequestError, match="unknown mode"):
        list(generate([m], [1], [[1]], SamplingParams(), mode="xx"))
    with pytest.raises(RequestError, match="weights"):
        list(generate([m], [0], [[1]], SamplingParams()))


def test_cancellation_stops_within_one_step_and_between_prefill_chunks():
    m = FakeMember("a", 1, n_ctx=100)
    flag = {"stop": False}
    gen = generate([m], [1], [[1, 2]], SamplingParams(seed=0, max_tokens=50), cancel=lambda: flag["stop"])
    next(gen), next(gen)
    flag["stop"] = True
    rest = list(gen)
    assert len(rest) == 1 and rest[0].finish_reason == "cancelled"
    # during a long prefill: stops at a chunk boundary, the cache stays truthful
    m2 = FakeMember("b", 2, n_ctx=100)
    calls = {"n": 0}

    def cancel_on_third_check():
        calls["n"] += 1
        return calls["n"] >= 3

    events = list(generate([m2], [1], [list(range(1, 11)) * 3], SamplingParams(max_tokens=5),
                           cancel=cancel_on_third_check))
    assert events[-1].finish_reason == "cancelled"
    assert list(m2.cached) == (list(range(1, 11)) * 3)[:4]


def test_logprobs_are_the_members_log_softmax_and_the_ce_mixture():
    a, b = FakeMember("a", 1), FakeMember("b", 2)
    params = SamplingParams(seed=3, max_tokens=1, logprobs=True, top_logprobs=3, **_t1())
    tokens, _ = run([a, b], [1, 1], [[3, 4]] * 2, params)
    ev = tokens[0]
    drawn = a if ev.member == "a" else b
    expected = np.log(softmax(drawn._table[4]))
    assert ev.logprob == pytest.approx(expected[ev.id])
    assert [t for t, _ in ev.top_logprobs] == list(np.argsort(-expected)[:3])
    a2, b2 = FakeMember("a", 1), FakeMember("b", 2)
    tokens, _ = run([a2, b2], [1, 3], [[3, 4]] * 2, params, mode="ce")
    mix = mixture([softmax(a2._table[4]), softmax(b2._table[4])], [0.25, 0.75])
    assert tokens[0].logprob == pytest.approx(np.log(mix[tokens[0].id]))


def test_the_core_imports_no_llama_cpp_aiohttp_or_click():
    code = (
        "import sys, me_local.core, me_local.core.ensemble, me_local.core.sampling, me_local.core.text,"
        " me_local.core.scoring, me_local.core.likelihood;"
        "bad = [m for m in ('llama_cpp', 'aiohttp', 'click') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"core imported: {proc.stdout} {proc.stderr}"


def test_only_backends_llama_imports_llama_cpp():
    import ast
    from pathlib import Path

    import me_local

    root = Path(me_local.__file__).parent
    importers = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in names):
                importers.append(path.relative_to(root).as_posix())
    assert importers, "the scan found no importer at all: it is broken"
    assert {p for p in importers if not p.startswith("backends/llama/")} == set()
    # and the layers above it import it only when they load a model
    code = ("import sys, me_local.engine, me_local.server, me_local.backends.types, me_local.runtime;"
            "print('llama_cpp' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def _reference_truncate(p, top_k, top_p, min_p):
    """The textbook definition: full sorts over the whole vocabulary."""
    p = np.array(p, dtype=np.float64)
    if 0 < top_k < len(p):
        order = np.argsort(-p, kind="stable")
        p[order[top_k:]] = 0.0
        p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        p[order[int(np.searchsorted(cum, top_p, side="left")) + 1:]] = 0.0
        p /= p.sum()
    if min_p > 0.0:
        p[p < min_p * p.max()] = 0.0
        p /= p.sum()
    return p


def test_truncate_matches_the_full_sort_definition():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 400))
        p = softmax(rng.normal(0, rng.uniform(0.1, 4), size=n))
        top_k = int(rng.choice([0, 1, 5, 40, n + 3]))
        top_p = float(rng.choice([1.0, 0.5, 0.9, 0.95]))
        min_p = float(rng.choice([0.0, 0.05, 0.2]))
        assert np.allclose(truncate(p, top_k, top_p, min_p), _reference_truncate(p, top_k, top_p, min_p))


def test_a_member_that_cannot_drop_a_tail_starts_over_and_says_so():
    class Forgetful(FakeMember):
        def truncate(self, n: int) -> None:  # like a recurrent memory: all or nothing
            if n < len(self._cached):
                self._cached.clear()

    m = Forgetful("a", 1, n_ctx=100)
    run([m], [1], [[1, 2, 3]], SamplingParams(seed=1, max_tokens=4))
    m.calls.clear()
    _, second = run([m], [1], [[1, 2, 3, 9]], SamplingParams(seed=2, max_tokens=1))
    assert second.stats.members[0].cached_prompt_tokens == 0
    assert m.calls[0] == [1, 2, 3, 9]  # evaluated from scratch, not on a stale cache
    assert second.stats.members[0].prompt_tokens == 4
