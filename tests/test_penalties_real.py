"""Penalties and logit bias on real GGUF models: llama.cpp's penalties and logit-bias samplers
(NativeSampler) against the core's numpy reference, the tokens other members wrote counted
natively in ``me`` mode, the penalised token's probability dropping on SmolLM2, and the ensemble
refusals (tiny fabricated models; SmolLM2 where marked)."""

from __future__ import annotations

import numpy as np
import pytest

from me_local.backends.llama import ContextSettings, LlamaMember
from me_local.config import load_config
from me_local.core import DoneEvent, SamplingParams, TokenEvent
from me_local.core.sampling import penalize
from me_local.engine import Engine, Request
from me_local.errors import ConfigError, RequestError, VocabMismatchError

STRONG = dict(repeat_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0)


@pytest.fixture
def member(models):
    m = LlamaMember("a", models["a1"], ContextSettings(n_ctx=256, n_threads=1))
    m.evaluate(m.raw_prompt("Hello world, the"))
    yield m
    m.close()


def reference_argmax(logits, window, params):
    return int(np.argmax(penalize(logits, window, params)))


def test_the_native_sampler_counts_what_it_samples_and_observes_and_forgets(member):
    logits = np.array(member.logits(), copy=True)
    params = SamplingParams(temperature=0.0, repeat_last_n=4, **STRONG)
    top = [int(t) for t in np.argsort(-logits)[:6]]
    sampler = member.make_sampler(params, seed=0)
    assert sampler.sample() == top[0]  # nothing counted yet: the model's own argmax
    sampler.observe(top[1:4])  # with its own draw, the window is top[0..3]
    window = top[:4]
    got = sampler.sample()
    assert got == reference_argmax(logits, window, params) and got not in window
    window = [*window[1:], got]  # the ring: the oldest leaves, its own draw enters
    assert sampler.sample() == reference_argmax(logits, window, params)
    sampler.forget()
    assert sampler.sample() == top[0]
    sampler.close()


def test_the_native_window_minus_one_is_the_whole_context(member):
    logits = np.array(member.logits(), copy=True)
    top = int(np.argmax(logits))
    others = [int(t) for t in np.argsort(-logits)[50:150]]  # 100 tokens after the model's favourite
    for last_n, penalised in ((64, False), (-1, True)):
        params = SamplingParams(temperature=0.0, repeat_last_n=last_n, presence_penalty=2.0, repeat_penalty=100.0)
        sampler = member.make_sampler(params, seed=0)
        sampler.observe([top, *others])
        assert (sampler.sample() != top) == penalised, last_n
        sampler.close()


def test_the_native_logit_bias_forces_and_bans(member):
    logits = np.array(member.logits(), copy=True)
    order = [int(t) for t in np.argsort(-logits)]
    forced = member.make_sampler(SamplingParams(logit_bias=((order[-1], 100.0),)), seed=1)
    assert {forced.sample() for _ in range(20)} == {order[-1]}
    banned = member.make_sampler(SamplingParams(temperature=0.0, logit_bias=((order[0], -100.0),)), seed=1)
    assert banned.sample() == order[1]
    forced.close()
    banned.close()


# --------------------------------------------------------------------------- through the engine


@pytest.fixture
def engine(tiny_config):
    eng = Engine(load_config(tiny_config))
    yield eng
    eng.close()


def run(engine, **kw):
    events = list(engine.generate(Request(**kw)))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return [e for e in events if isinstance(e, TokenEvent)], done


@pytest.mark.parametrize("last_n", [-1, 5])
def test_in_me_mode_each_native_sampler_counts_the_others_tokens(engine, last_n):
    """Greedy with strong penalties: at every step the token llama.cpp's chain picked is the argmax of
    the numpy reference over the whole output's window (the logprobs are the reference's). A member
    whose sampler missed the tokens others wrote, or counted one twice, would pick otherwise."""
    params = SamplingParams(temperature=0.0, max_tokens=60, seed=4, repeat_last_n=last_n, logprobs=True,
                            top_logprobs=1, **STRONG)
    tokens, _ = run(engine, ensemble="tiny", prompt="Hello world, the", params=params)
    assert len(tokens) == 60 and len({e.member for e in tokens}) == 3
    assert [e.id for e in tokens] == [e.top_logprobs[0][0] for e in tokens]
    plain, _ = run(engine, ensemble="tiny", prompt="Hello world, the",
                   params=SamplingParams(temperature=0.0, max_tokens=60, seed=4))
    assert [e.id for e in plain] != [e.id for e in tokens]
    assert len({e.id for e in tokens}) > len({e.id for e in plain})  # fewer repeats


def test_single_and_ce_modes_penalise_on_real_models(engine):
    for mode in ("single", "ce"):
        params = SamplingParams(temperature=0.0, max_tokens=40, seed=1, repeat_last_n=-1, logprobs=True,
                                top_logprobs=1, **STRONG)
        tokens, _ = run(engine, ensemble="pair", prompt="Hello world, the", params=params, mode=mode)
        assert [e.id for e in tokens] == [e.top_logprobs[0][0] for e in tokens], mode


def test_a_logit_bias_is_checked_against_the_vocabulary_and_the_granularity(write_config, tiny_models):
    m = tiny_models
    config = load_config(write_config(f"""
        ensembles:
          mixed:
            n_ctx: 128
            members:
              - {{name: bpe, path: {m['a1']}, n_threads: 1}}
              - {{name: spm, path: {m['s1']}, n_threads: 1}}
        """))
    engine = Engine(config)
    try:
        n_vocab = engine.ensemble("mixed").members[0].n_vocab
        bias = SamplingParams(max_tokens=3, temperature=0.0, logit_bias=((7, 100.0),))
        with pytest.raises(RequestError, match="logit_bias names token ids, which mean different tokens to these "
                                               "members") as err:
            run(engine, ensemble="mixed", prompt="Hi", params=bias)
        assert err.value.param == "logit_bias"
        tokens, _ = run(engine, ensemble="mixed", prompt="Hi", params=bias, member="bpe")  # one member: its ids
        assert [e.id for e in tokens] == [7, 7, 7]
        with pytest.raises(RequestError, match=f"names token {n_vocab}, which is not in the vocabulary"):
            run(engine, ensemble="mixed", prompt="Hi", member="bpe",
                params=SamplingParams(logit_bias=((n_vocab, 1.0),)))
    finally:
        engine.close()


def test_models_yaml_penalties_and_logit_bias(write_config, tiny_models):
    m = tiny_models
    path = write_config(f"""
        ensembles:
          biased:
            n_ctx: 128
            sampling: {{temperature: 0, max_tokens: 4, logit_bias: {{9: 100}}, repeat_penalty: 1.2,
                        repeat_last_n: -1}}
            members:
              - {{name: one, path: {m['a1']}, n_threads: 1}}
        """)
    config = load_config(path)
    s = config.get("biased").sampling
    assert (s.logit_bias, s.repeat_penalty, s.repeat_last_n) == (((9, 100.0),), 1.2, -1)
    engine = Engine(config)
    try:
        tokens, _ = run(engine, ensemble="biased", prompt="Hi", params=SamplingParams(
            **{k: getattr(s, k) for k in ("temperature", "max_tokens", "logit_bias")}))
        assert [e.id for e in tokens] == [9] * 4
    finally:
        engine.close()
    bad = write_config(f"""
        ensembles:
          mixed:
            sampling: {{logit_bias: {{9: 100}}}}
            members:
              - {{name: bpe, path: {m['a1']}, n_threads: 1}}
              - {{name: other, path: {m['b1']}, n_threads: 1}}
          big:
            sampling: {{logit_bias: {{999999: 1}}}}
            members:
              - {{name: bpe, path: {m['a1']}, n_threads: 1}}
        """, "bad.yaml")
    engine = Engine(load_config(bad))
    try:
        with pytest.raises(VocabMismatchError, match="logit_bias names token ids, which mean different tokens") \
                as err:
            engine.ensemble("mixed")
        assert "ensembles.mixed.sampling.logit_bias" in str(err.value)
        with pytest.raises(ConfigError, match=r"ensembles\.big\.sampling\.logit_bias.*names token 999999"):
            engine.ensemble("big")
    finally:
        engine.close()


@pytest.mark.parametrize(("sampling", "fragment"), [
    ("{repeat_penalty: 0}", "sampling.repeat_penalty: must be between 0.01 and 100, got 0"),
    ("{repeat_last_n: -2}", "sampling.repeat_last_n: must be at least -1, got -2"),
    ("{frequency_penalty: 3}", "sampling.frequency_penalty: must be between -2 and 2, got 3"),
    ("{logit_bias: [1, 2]}", "sampling.logit_bias: must be a mapping of token ids to biases"),
    ("{logit_bias: {the: 1}}", "sampling.logit_bias: 'the' is not a token id"),
    ("{logit_bias: {5: 200}}", "sampling.logit_bias: the bias of token 5 must be between -100 and 100, got 200"),
])
def test_models_yaml_refuses_bad_penalties(write_config, sampling, fragment):
    path = write_config(f"""
        ensembles:
          e:
            sampling: {sampling}
            members:
              - {{name: one, path: a.gguf}}
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.smollm
def test_on_smollm2_the_penalised_tokens_probability_drops_as_specified(write_config, smollm_path):
    """Two single-member ensembles of SmolLM2 (one copy of the weights, a context each, so both runs
    evaluate the same batches). After "1 1 1 ... 1" the model writes " ", "1", " "...: at the third
    token both earlier ones are penalised by d = presence + frequency, so the logprob of each is the
    unpenalised one less d, renormalised: lp' = lp - d - log(1 - P + P e^-d), P their total probability."""
    config = load_config(write_config(f"""
        ensembles:
          plain: {{n_ctx: 256, members: [{{name: m, path: {smollm_path}}}]}}
          penalised: {{n_ctx: 256, members: [{{name: m, path: {smollm_path}}}]}}
        """))
    engine = Engine(config)
    prompt = "1 1 1 1 1 1 1 1 1"
    try:
        base = SamplingParams(temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=20)
        plain, _ = run(engine, ensemble="plain", prompt=prompt, params=base)
        pen = SamplingParams(temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=20, presence_penalty=1.5,
                             frequency_penalty=0.5)
        penalised, _ = run(engine, ensemble="penalised", prompt=prompt, params=pen)
    finally:
        engine.close()
    space, one = plain[0].id, plain[1].id
    assert [e.text for e in plain] == [" ", "1", " "]  # unpenalised, the model repeats itself
    assert [e.id for e in penalised[:2]] == [space, one]
    assert penalised[0].logprob == plain[0].logprob  # nothing counted yet
    lp = dict(plain[2].top_logprobs)
    lp_pen = dict(penalised[2].top_logprobs)
    if space not in lp_pen:
        lp_pen[space] = penalised[2].logprob if penalised[2].id == space else -np.inf
    d = 2.0
    total = np.exp(lp[space]) + np.exp(lp[one])
    expected = lp[space] - d - np.log(1 - total + total * np.exp(-d))
    assert lp_pen[space] == pytest.approx(expected, abs=1e-4)
    assert np.exp(lp_pen[space]) < np.exp(lp[space]) - 0.3  # it drops, clearly
    # a token the window does not hold gains as much as the renormalisation gives back
    other = next(t for t in lp if t not in (space, one) and t in lp_pen)
    assert lp_pen[other] - lp[other] == pytest.approx(-np.log(1 - total + total * np.exp(-d)), abs=1e-4)
