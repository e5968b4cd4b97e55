"""Penalties and logit bias in the pure core, on fake members: the numpy reference is llama.cpp's
formula; each sampler counts exactly the generated tokens its member holds (in ``me`` mode the
tokens the other members wrote too, at word granularity its own tokenization of the text), each
once; ``ce`` shapes the mixture; logprobs are taken after the bias and the penalties."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from me_local.core import DoneEvent, SamplingParams, TokenEvent, generate
from me_local.core.sampling import (
    NumpySampler,
    ce_distribution,
    log_softmax,
    mixture,
    penalize,
    softmax,
    transform,
    truncate,
)

from .fakes import FakeMember, WordFake

FLAT = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def reference(logits: Sequence[float], window: Sequence[int], *, r: float = 1.0, f: float = 0.0, p: float = 0.0,
              bias: dict[int, float] | None = None) -> np.ndarray:
    """llama.cpp's logit-bias then penalties samplers, written out token by token."""
    out = [float(x) for x in logits]
    for t, b in (bias or {}).items():
        out[t] += b
    for t in set(window):
        c = list(window).count(t)
        out[t] = out[t] * r if out[t] <= 0 else out[t] / r
        out[t] -= c * f + (1.0 if c > 0 else 0.0) * p
    return np.array(out)


def test_penalize_is_llama_cpps_formula():
    # llama.cpp's own penalties sampler, given these logits and tokens 1, 1, 3, gives exactly these
    params = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5, repeat_last_n=3)
    out = penalize([2.0, -2.0, 4.0, 1.0, 0.5], [1, 1, 3], params)
    assert out.tolist() == [2.0, -5.0, 4.0, -0.25, 0.5]
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 50).astype(np.float32)
    window = rng.integers(0, 50, 30).tolist()
    bias = {3: -100.0, 7: 2.5, 11: 100.0}
    params = SamplingParams(repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.7,
                            logit_bias=tuple(sorted(bias.items())))
    np.testing.assert_allclose(penalize(logits, window, params),
                               reference(logits, window, r=1.3, f=0.4, p=-0.7, bias=bias), rtol=1e-12)
    # the input is not touched; a banned (-inf) token stays banned
    assert logits.dtype == np.float32
    assert float(penalize([-np.inf, 1.0], [0, 0], replace(params, logit_bias=((0, 100.0),)))[0]) == -np.inf


@pytest.mark.parametrize(("last_n", "expected"), [(-1, [1, 2, 3, 4, 5]), (0, []), (2, [4, 5]), (9, [1, 2, 3, 4, 5])])
def test_the_window_is_the_last_repeat_last_n_tokens(last_n, expected):
    assert list(SamplingParams(repeat_last_n=last_n).penalty_window([1, 2, 3, 4, 5])) == expected


def test_which_params_shape_the_logits():
    assert not SamplingParams().shapes_logits  # the defaults: off, as llama.cpp's
    assert SamplingParams(repeat_penalty=1.1).penalized
    assert not SamplingParams(repeat_penalty=1.1, repeat_last_n=0).penalized
    assert SamplingParams(logit_bias=((1, 0.5),)).shapes_logits and not SamplingParams(logit_bias=((1, 0.5),)).penalized


def test_the_numpy_sampler_draws_from_the_penalised_transformed_distribution():
    logits = np.random.default_rng(1).normal(0, 2, 12)
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.02, repeat_penalty=1.5,
                            frequency_penalty=0.3, presence_penalty=0.2, repeat_last_n=4, logit_bias=((0, 3.0),))
    sampler = NumpySampler(lambda: logits, params, seed=0)
    sampler.observe([5, 5, 9, 2, 5, 1])  # the window is the last 4: 9, 2, 5, 1
    expected = transform(reference(logits, [9, 2, 5, 1], r=1.5, f=0.3, p=0.2, bias={0: 3.0}), params)
    np.testing.assert_allclose(sampler.distribution(), expected, rtol=1e-12)
    token = sampler.sample()
    assert sampler.history[-1] == token and len(sampler.history) == 7  # its own draw is counted, once
    sampler.forget()
    np.testing.assert_allclose(sampler.distribution(), transform(reference(logits, [], bias={0: 3.0}), params))


def test_a_bias_of_100_forces_a_token_and_minus_100_bans_it():
    logits = np.random.default_rng(2).normal(0, 2, 12)
    forced = NumpySampler(lambda: logits, SamplingParams(logit_bias=((4, 100.0),)), seed=0)
    assert {forced.sample() for _ in range(50)} == {4}
    top = int(np.argmax(logits))
    banned = NumpySampler(lambda: logits, SamplingParams(temperature=0, logit_bias=((top, -100.0),)), seed=0)
    assert banned.sample() == int(np.argsort(logits)[-2])


# --------------------------------------------------------------------------- ce: the mixture


def test_ce_shapes_the_mixture_as_one_models_logits():
    rng = np.random.default_rng(3)
    rows = [rng.normal(0, 2, 12), rng.normal(0, 2, 12)]
    w = [0.3, 0.7]
    history = [2, 2, 5, 7, 2, 9]
    params = SamplingParams(**FLAT, repeat_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.25,
                            repeat_last_n=5, logit_bias=((1, -2.0), (3, 1.5)))
    window, bias = history[-5:], {1: -2.0, 3: 1.5}
    q = mixture([softmax(r) for r in rows], w)
    expected = softmax(reference(np.log(q), window, r=1.4, f=0.5, p=0.25, bias=bias))
    probs, raw = ce_distribution(rows, w, params, want_raw=True, history=history)
    np.testing.assert_allclose(probs, expected, rtol=1e-10)
    np.testing.assert_allclose(raw, expected, rtol=1e-10)  # logprobs: after the bias and penalties, at T 1
    # at temperature T the mixture's logits are T log q; then / T and the truncation
    hot = replace(params, temperature=0.6, top_k=8, min_p=0.05)
    q_t = mixture([softmax(r, 0.6) for r in rows], w)
    expected_t = truncate(softmax(reference(0.6 * np.log(q_t), window, r=1.4, f=0.5, p=0.25, bias=bias), 0.6),
                          8, 1.0, 0.05)
    probs_t, raw_t = ce_distribution(rows, w, hot, want_raw=True, history=history)
    np.testing.assert_allclose(probs_t, expected_t, rtol=1e-10)
    np.testing.assert_allclose(raw_t, expected, rtol=1e-10)
    # greedy: the argmax of the shaped untransformed mixture
    greedy, _ = ce_distribution(rows, w, replace(params, temperature=0.0), history=history)
    assert int(np.argmax(greedy)) == int(np.argmax(expected)) and greedy.max() == 1.0


def test_ce_repeat_penalty_raises_a_repeated_tokens_probability_to_its_power():
    rng = np.random.default_rng(4)
    rows = [rng.normal(0, 2, 12), rng.normal(0, 2, 12)]
    q = mixture([softmax(r) for r in rows], [0.5, 0.5])
    probs, _ = ce_distribution(rows, [0.5, 0.5], SamplingParams(**FLAT, repeat_penalty=2.0), history=[4, 6, 4])
    expected = q.copy()
    expected[[4, 6]] **= 2
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-10)


# --------------------------------------------------------------------------- me, single: what each sampler counts


class Recording(NumpySampler):
    """A NumpySampler that records, at each draw, what it counts and what its member holds after the prompt."""

    def __init__(self, member: FakeMember, prompt_len: int, log: list, params: SamplingParams, seed: int,
                 allowed: np.ndarray | None = None) -> None:
        super().__init__(member.logits, params, seed, allowed)
        self._member, self._prompt_len, self._log = member, prompt_len, log

    def sample(self, constraint=None) -> int:
        window = list(self._params.penalty_window(self.history))
        held = list(self._params.penalty_window(list(self._member.cached[self._prompt_len:])))
        probs = self.distribution()
        token = super().sample(constraint)
        self._log.append((self._member.name, window, held, probs))
        return token


def recording(member: FakeMember, prompt_len: int, log: list) -> FakeMember:
    member.make_sampler = lambda params, seed: Recording(member, prompt_len, log, params, seed)  # type: ignore
    if isinstance(member, WordFake):
        member.make_word_start_sampler = lambda params, seed: Recording(  # type: ignore
            member, prompt_len, log, params, seed, member.word_start)
    return member


def run(members, prompts, params, **kw) -> tuple[list[TokenEvent], DoneEvent]:
    events = list(generate(members, [1.0] * len(members), prompts, params, **kw))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return [e for e in events if isinstance(e, TokenEvent)], done


@pytest.mark.parametrize("last_n", [-1, 3])
def test_in_me_mode_a_members_penalties_count_the_tokens_the_others_wrote(last_n):
    log: list = []
    prompts = [[1, 2, 3], [4, 5]]
    members = [recording(FakeMember("a", 11, scale=1.0), 3, log), recording(FakeMember("b", 12, scale=1.0), 2, log)]
    params = SamplingParams(**FLAT, max_tokens=40, seed=5, repeat_penalty=1.3, frequency_penalty=0.4,
                            presence_penalty=0.3, repeat_last_n=last_n, logprobs=True)
    tokens, _ = run(members, prompts, params)
    assert len(tokens) == 40 and {e.member for e in tokens} == {"a", "b"}
    switches = sum(x.member != y.member for x, y in itertools.pairwise(tokens))
    assert switches >= 10
    generated = [e.id for e in tokens]
    for i, (name, window, held, probs) in enumerate(log):
        expected = generated[:i] if last_n < 0 else generated[max(0, i - last_n):i]
        # what it counts is the shared output, every token once, whoever wrote it
        assert window == held == expected, (i, name)
        member = members[0] if name == "a" else members[1]
        row = member._table[generated[i - 1] if i else prompts[members.index(member)][-1]]
        shaped = reference(row, expected, r=1.3, f=0.4, p=0.3)
        np.testing.assert_allclose(probs, softmax(shaped), rtol=1e-10)
        # the logprob reported is the shaped one (temperature 1, no truncation)
        assert tokens[i].logprob == pytest.approx(float(log_softmax(shaped)[generated[i]]), abs=1e-12)


def test_single_mode_penalises_as_a_plain_model():
    log: list = []
    member = recording(FakeMember("a", 13, scale=1.0), 2, log)
    params = SamplingParams(**FLAT, max_tokens=20, seed=1, presence_penalty=1.5, repeat_last_n=-1)
    tokens, _ = run([member, FakeMember("b", 14)], [[1, 2], [1, 2]], params, mode="single")
    assert [e.member for e in tokens] == ["a"] * 20
    assert [w for _, w, _, _ in log] == [[e.id for e in tokens[:i]] for i in range(20)]


def test_ce_mode_penalises_the_mixture_over_the_generated_tokens():
    a, b = FakeMember("a", 21, scale=1.0), FakeMember("b", 22, scale=1.0)
    params = SamplingParams(**FLAT, max_tokens=12, seed=3, repeat_penalty=1.6, frequency_penalty=0.5,
                            repeat_last_n=4, logprobs=True)
    tokens, _ = run([a, b], [[1], [1]], params, mode="ce")
    generated = [e.id for e in tokens]
    for i, e in enumerate(tokens):
        last = generated[i - 1] if i else 1
        q = mixture([softmax(a._table[last]), softmax(b._table[last])], [0.5, 0.5])
        shaped = softmax(reference(np.log(q), generated[max(0, i - 4):i], r=1.6, f=0.5))
        assert e.logprob == pytest.approx(float(np.log(shaped[e.id])), abs=1e-10)


def test_penalties_change_what_is_generated_and_zero_turns_them_off():
    def text(**kw):
        params = SamplingParams(temperature=0.0, max_tokens=30, seed=0, **kw)
        return [e.id for e in run([FakeMember("a", 31, scale=1.0)], [[1]], params)[0]]

    plain = text()
    assert len(set(plain)) < 6  # greedy on a fake falls into a loop
    assert len(set(text(presence_penalty=2.0, repeat_penalty=3.0, repeat_last_n=-1))) > len(set(plain))
    assert text(presence_penalty=2.0, repeat_penalty=3.0, repeat_last_n=0) == plain


# --------------------------------------------------------------------------- word granularity


def test_at_word_granularity_each_member_counts_its_own_tokens_of_the_text():
    """A member's penalties count its own tokenization of the text: the tokens it wrote and its
    tokens of the words others wrote, never a boundary token it sampled that was dropped."""
    log: list = []
    words = [b" bad", b" cab", b" dead", b"ab", b"ed"]
    a = recording(WordFake("a", 41, words, boundary_bias=1.0, eog_bias=-6.0), 2, log)
    b = recording(WordFake("b", 42, [b" be", b" deed", b"eb"], boundary_bias=1.0, eog_bias=-6.0), 3, log)
    params = SamplingParams(**FLAT, max_tokens=60, seed=7, repeat_penalty=1.5, presence_penalty=0.5,
                            repeat_last_n=-1)
    tokens, done = run([a, b], [[0, 1], [2, 3, 4]], params, granularity="word")
    assert done.stats.words >= 6 and {e.member for e in tokens} == {"a", "b"}
    text = "".join(e.text for e in tokens) + done.text
    assert len(log) > len(tokens)  # some boundary tokens were sampled and dropped
    for name, window, held, _ in log:
        assert window == held, name  # exactly the tokens its cache holds after its prompt
    # and those are its tokens of the text: the last draw of each member saw a prefix of the output
    for m in (a, b):
        last = [w for n, w, _, _ in log if n == m.name][-1]
        assert text.encode().startswith(b"".join(m.pieces[t] for t in last))
