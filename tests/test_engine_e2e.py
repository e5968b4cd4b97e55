"""The engine on real GGUF models through llama-cpp-python (tiny fabricated
ones; SmolLM2 where marked)."""

from __future__ import annotations

import numpy as np
import pytest

from me_local.backends.llama import DEFAULT_CHAT_TEMPLATE, ContextSettings, LlamaMember, LoadedModel, ModelStore
from me_local.config import load_config
from me_local.core import DoneEvent, SamplingParams, TokenEvent
from me_local.core.sampling import log_softmax, mixture, softmax
from me_local.engine import Engine, Request, collect, llama_member_factory
from me_local.errors import ConfigError, ContextOverflowError, RequestError, VocabMismatchError

from .test_core import chi2_critical, chi_square

T1 = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture
def engine(tiny_config):
    eng = Engine(load_config(tiny_config))
    yield eng
    eng.close()


def run(engine, **kw):
    events = list(engine.generate(Request(**kw)))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return tokens, done


def fresh_logits(path, tokens, n_ctx=256):
    model = LoadedModel(path)
    member = LlamaMember("fresh", model, ContextSettings(n_ctx=n_ctx))
    member.evaluate(tokens)
    out = np.array(member.logits(), copy=True)
    member.close()
    model.close()
    return out


def test_catch_up_is_exact_against_a_from_scratch_evaluation(engine, tiny_models):
    params = SamplingParams(seed=3, max_tokens=30, **T1)
    tokens, done = run(engine, ensemble="tiny", prompt="Hello world, the", params=params)
    assert len(tokens) == 30
    ens = engine.ensemble("tiny")
    generated = [t.id for t in tokens]
    paths = [tiny_models["a1"], tiny_models["a2"], tiny_models["a3"]]
    for member, path in zip(ens.members, paths):
        prompt = member.raw_prompt("Hello world, the")
        seq = prompt + generated
        st = next(s for s in done.stats.members if s.name == member.name)
        # the member holds exactly the sequence up to its last selection ...
        assert list(member.cached) == seq[: len(member.cached)]
        if st.selected:
            last = max(t.index for t in tokens if t.member == member.name)
            assert len(member.cached) == len(prompt) + last
        # ... and after catching up on the rest in one batch its logits match a from-scratch run
        member.evaluate(seq[len(member.cached):])
        caught_up = log_softmax(member.logits())
        scratch = log_softmax(fresh_logits(path, seq))
        assert np.max(np.abs(caught_up - scratch)) < 1e-2  # f32 tiny models: batching noise is far below this
        # a lost token shows up as errors of whole nats
        wrong = log_softmax(fresh_logits(path, seq[:-1]))
        assert np.max(np.abs(caught_up - wrong)) > 1.0


def test_me_samples_the_mixture_on_real_models(engine, tiny_models):
    ens = engine.ensemble("pair")
    prompt = "Hello world"
    rows = []
    for member in ens.members:
        member.truncate(0)
        member.evaluate(member.raw_prompt(prompt))
        rows.append(softmax(member.logits()))
    mix = mixture(rows, [0.5, 0.5])
    counts = np.zeros(len(mix))
    for seed in range(2500):
        tokens, _ = run(engine, ensemble="pair", prompt=prompt, params=SamplingParams(seed=seed, max_tokens=1, **T1))
        counts[tokens[0].id] += 1
    stat, dof = chi_square(counts, mix)
    assert stat < chi2_critical(dof), (stat, dof)
    for row in rows:
        s, d = chi_square(counts, row)
        assert s > chi2_critical(d)


def test_modes_seeds_and_weights(engine):
    p = SamplingParams(seed=11, max_tokens=20, **T1)
    a, done_a = run(engine, ensemble="tiny", prompt="the", params=p)
    b, _ = run(engine, ensemble="tiny", prompt="the", params=p)
    assert [(t.id, t.member) for t in a] == [(t.id, t.member) for t in b]
    c, _ = run(engine, ensemble="tiny", prompt="the", params=SamplingParams(seed=12, max_tokens=20, **T1))
    assert [t.id for t in a] != [t.id for t in c]
    assert {t.member for t in a} <= {"one", "two", "three"} and len({t.member for t in a}) > 1
    assert sum(m.selected for m in done_a.stats.members) == 20

    ce, done_ce = run(engine, ensemble="tiny", prompt="the", params=p, mode="ce")
    assert {t.member for t in ce} == {None}
    assert [m.selected for m in done_ce.stats.members] == [20, 20, 20]

    single, done_s = run(engine, ensemble="tiny", prompt="the", params=p, member="two")
    assert {t.member for t in single} == {"two"}
    assert [m.selected for m in done_s.stats.members] == [0, 20, 0]

    weighted, _ = run(engine, ensemble="tiny", prompt="the", params=p, weights={"one": 1, "two": 0, "three": 0})
    assert {t.member for t in weighted} == {"one"}

    with pytest.raises(RequestError, match="has no member 'nope'"):
        run(engine, ensemble="tiny", prompt="the", params=p, member="nope")
    with pytest.raises(RequestError, match="all weights are zero"):
        run(engine, ensemble="tiny", prompt="the", params=p, weights={"one": 0, "two": 0, "three": 0})


def test_greedy_is_deterministic_and_stop_strings_spanning_tokens_are_cut(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, seed=1)
    tokens, _ = run(engine, ensemble="short", prompt="Hello", params=SamplingParams(temperature=0.0, max_tokens=12))
    text = "".join(t.text for t in tokens)
    pieces = [t.piece.decode("utf-8", "replace") for t in tokens]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 1 and len(pieces[i]) >= 1)
    start = sum(len(p) for p in pieces[:i]) - 1
    stop = text[start : start + 2]
    tokens2, done2 = run(engine, ensemble="short", prompt="Hello",
                         params=SamplingParams(temperature=0.0, max_tokens=12, stop=(stop,)))
    out = "".join(t.text for t in tokens2) + done2.text
    assert out == text[: text.find(stop)]
    assert stop not in out
    assert done2.finish_reason == "stop"
    del greedy


def test_streamed_text_equals_the_whole_decode_and_never_splits_a_character(engine):
    for seed in range(8):
        params = SamplingParams(seed=seed, max_tokens=40, **T1)
        tokens, done = run(engine, ensemble="tiny", prompt="é€ the", params=params)
        whole = b"".join(t.piece for t in tokens).decode("utf-8", "replace")
        assert "".join(t.text for t in tokens) + done.text == whole
        for t in tokens:
            t.text.encode("utf-8")  # every emitted piece is valid text on its own


def test_a_full_context_ends_with_length_and_a_long_prompt_is_refused(engine):
    tokens, done = run(engine, ensemble="short", prompt="Hello", params=SamplingParams(seed=1, max_tokens=500))
    assert done.finish_reason == "length"
    n_prompt = done.stats.prompt_tokens
    assert n_prompt + len(tokens) == 32 + 1
    with pytest.raises(ContextOverflowError, match="shorten the prompt or raise n_ctx"):
        run(engine, ensemble="short", prompt="Hello world " * 40, params=SamplingParams(max_tokens=5))


def test_members_naming_one_file_share_one_model(write_config, tiny_models):
    cfg = write_config(f"""
        ensembles:
          twins:
            n_ctx: 64
            members:
              - {{name: x, path: {tiny_models['a1']}}}
              - {{name: y, path: {tiny_models['a1']}}}
              - {{name: z, path: {tiny_models['a2']}}}
        """)
    store = ModelStore()
    eng = Engine(load_config(cfg), llama_member_factory(store))
    ens = eng.ensemble("twins")
    x, y, z = ens.members
    assert x.model is y.model and x.model is not z.model
    assert len(store) == 2
    assert x._ctx != y._ctx  # one context each
    eng.close()
    assert len(store) == 0


def test_vocabulary_mismatch_names_both_members(write_config, tiny_models):
    cfg = write_config(f"""
        ensembles:
          mixed:
            granularity: token
            members:
              - {{name: alpha, path: {tiny_models['a1']}}}
              - {{name: beta, path: {tiny_models['b1']}}}
        """)
    with pytest.raises(VocabMismatchError) as err:
        Engine(load_config(cfg)).ensemble("mixed")
    msg = str(err.value)
    assert "'alpha'" in msg and "'beta'" in msg and "do not share a vocabulary" in msg
    assert "ensembles.mixed.granularity" in msg  # the key to change: word mixes these members


def test_each_member_uses_its_own_system_prompt_and_template(write_config, tiny_models):
    cfg = write_config(f"""
        ensembles:
          prompts:
            members:
              - {{name: terse, path: {tiny_models['a1']}, system: "Be terse."}}
              - {{name: plain, path: {tiny_models['a4_nochat']}}}
        """)
    eng = Engine(load_config(cfg))
    terse, plain = eng.ensemble("prompts").members
    msgs = [{"role": "user", "content": "Hi"}]
    assert terse.model.detokenize(terse.chat_prompt(msgs)).startswith("system\nBe terse.")
    assert terse.model.chat_template is not None
    assert plain.model.chat_template is None  # falls back to the documented default (ChatML)
    rendered = plain.model.format_chat(msgs)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert DEFAULT_CHAT_TEMPLATE.startswith("{% for message in messages %}")
    eng.close()


def test_a_new_turn_evaluates_only_its_new_tokens(engine):
    msgs = [{"role": "user", "content": "Hello world"}]
    first = Request(ensemble="pair", messages=msgs, params=SamplingParams(seed=2, max_tokens=8, **T1))
    text, done1 = collect(engine.generate(first))
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "and the"}]
    second = Request(ensemble="pair", messages=msgs, params=SamplingParams(seed=3, max_tokens=4, **T1))
    _, done2 = collect(engine.generate(second))
    assert done2.stats.cached_prompt_tokens >= done1.stats.prompt_tokens - 1
    for m in done2.stats.members:
        if m.selected:
            assert m.prompt_tokens < done2.stats.prompt_tokens - done1.stats.prompt_tokens + 10


@pytest.mark.smollm
def test_default_model_catch_up_matches_from_scratch_within_batching_noise(smollm_path, write_config):
    cfg = write_config(f"""
        ensembles:
          default:
            n_ctx: 512
            members:
              - {{name: a, path: {smollm_path}, system: "Answer briefly."}}
              - {{name: b, path: {smollm_path}, system: "Answer with an example."}}
        """)
    eng = Engine(load_config(cfg))
    msgs = [{"role": "user", "content": "Name three colours."}]
    tokens, _ = run(eng, messages=msgs, params=SamplingParams(seed=5, max_tokens=24, **T1))
    generated = [t.id for t in tokens]
    for member in eng.ensemble().members:
        seq = member.chat_prompt(msgs) + generated
        member.evaluate(seq[len(member.cached):])
        caught_up = log_softmax(member.logits())
        scratch = log_softmax(fresh_logits(smollm_path, seq, n_ctx=512))
        # llama.cpp's batching noise on this model: median ~0.05 nats, up to ~0.25 (DESIGN.md)
        probs = np.exp(scratch)
        top = np.argsort(-probs)[:50]
        assert np.median(np.abs(caught_up[top] - scratch[top])) < 0.3
        wrong = log_softmax(fresh_logits(smollm_path, seq + [generated[-1]], n_ctx=512))
        assert np.median(np.abs(caught_up[top] - wrong[top])) > np.median(np.abs(caught_up[top] - scratch[top]))
    eng.close()


def test_a_request_cancelled_while_queued_leaves_the_queue(engine):
    import threading

    busy = engine.generate(Request(ensemble="short", prompt="Hello", params=SamplingParams(seed=1, max_tokens=5)))
    next(busy)  # holds the only slot
    ens = engine.ensemble("short")
    flag = threading.Event()
    result = {}

    def queued():
        events = list(engine.generate(Request(ensemble="short", prompt="Hi", params=SamplingParams(max_tokens=5)),
                                      cancel=flag.is_set))
        result["events"] = events

    t = threading.Thread(target=queued)
    t.start()
    for _ in range(200):
        if ens.waiting == 1:
            break
        threading.Event().wait(0.01)
    assert ens.waiting == 1
    flag.set()
    t.join(timeout=5)
    assert not t.is_alive()
    assert [type(e).__name__ for e in result["events"]] == ["DoneEvent"]
    assert result["events"][0].finish_reason == "cancelled"
    assert ens.waiting == 0
    busy.close()  # frees the slot
    assert ens.busy_slots == 0


def test_a_quantized_kv_cache_needs_a_head_size_it_can_pack(write_config, tiny_models):
    cfg = write_config(f"""
        ensembles:
          q8:
            n_ctx: 64
            kv_cache_type: q8_0
            members: [{{name: a, path: {tiny_models['a1']}}}]
        """)
    with pytest.raises(ConfigError, match=r"kv_cache_type: .*multiple of 32.*has 16; set kv_cache_type: f16"):
        Engine(load_config(cfg)).ensemble("q8")


@pytest.mark.smollm
def test_a_quantized_kv_cache_is_configurable_and_close_to_f16(write_config, smollm_path):
    cfg = write_config(f"""
        ensembles:
          f16:
            n_ctx: 256
            members: [{{name: a, path: {smollm_path}}}]
          q8:
            n_ctx: 256
            kv_cache_type: q8_0
            members: [{{name: a, path: {smollm_path}}}]
        """)
    config = load_config(cfg)
    assert config.get("q8").kv_cache_type == "q8_0" and config.get("f16").kv_cache_type == "f16"
    eng = Engine(config)
    rows = {}
    for name in ("f16", "q8"):
        member = eng.ensemble(name).members[0]
        member.evaluate(member.raw_prompt("The quick brown fox jumps over the lazy dog. " * 8))
        rows[name] = log_softmax(member.logits())
    top = np.argsort(-rows["f16"])[:20]
    diff = np.abs(rows["f16"][top] - rows["q8"][top])
    assert 0 < diff.max() < 0.5  # really quantized, still the same model
    eng.close()


def test_same_tokens_but_another_eos_is_a_clear_mismatch_and_frees_what_it_loaded(write_config, tiny_models, tmp_path):
    import sys

    maker = sys.modules["make_tiny_models"]  # loaded by the tiny_models fixture
    instruct = maker.build_tiny_model(tmp_path / "tiny-a-instruct.gguf", 5, eos_token="<|im_end|>")
    cfg = write_config(f"""
        ensembles:
          mix:
            granularity: token
            members:
              - {{name: base, path: {tiny_models['a1']}}}
              - {{name: chat, path: {instruct}}}
        """)
    store = ModelStore()
    engine = Engine(load_config(cfg), llama_member_factory(store))
    for _ in range(2):  # as a daemon's repeated reloads would
        with pytest.raises(VocabMismatchError, match=r"'base'.*'chat'.*BOS/EOS ids 524/524 vs 524/526"):
            engine.ensemble("mix")
    assert len(store) == 0  # the failed load released its contexts and weights


@pytest.mark.smollm
def test_the_shipped_default_ensemble_decodes_multi_token_batches(monkeypatch, tmp_path):
    """The AMX crash case (llama.cpp#20824): every llama_decode of 2+ tokens on the real default model,
    loaded with the shipped settings: the prompt in one batch, and catch-ups of several tokens in me mode."""
    from me_local.config import packaged_config_path

    monkeypatch.chdir(tmp_path)
    eng = Engine(load_config(str(packaged_config_path())))
    try:
        msgs = [{"role": "user", "content": "Write two sentences about the sea."}]
        tokens, done = run(eng, messages=msgs, params=SamplingParams(seed=2, max_tokens=40, **T1))
        assert done.finish_reason in ("stop", "length") and len(tokens) >= 8
        text = "".join(t.text for t in tokens)
        assert sum(c.isalpha() for c in text) >= 10, text
        stats = {m.name: m for m in done.stats.members}
        assert all(m.prompt_tokens > 10 for m in stats.values())  # each prompt went in as one batch
        assert sum(m.catchup_tokens for m in stats.values()) >= 2  # and members caught up on what they missed
    finally:
        eng.close()
