"""Word-level ME on real GGUF models with different vocabularies through llama-cpp-python:
tiny fabricated ones (a byte-level BPE and a SentencePiece-style vocabulary)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from me_local.config import load_config
from me_local.core import DoneEvent, SamplingParams, TokenEvent
from me_local.engine import Engine, Request
from me_local.errors import RequestError, VocabMismatchError

from .test_engine_e2e import fresh_logits

T1 = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture
def mixed_config(write_config, tiny_models):
    m = tiny_models
    return write_config(f"""
        ensembles:
          mixed:
            n_ctx: 512
            members:
              - {{name: bpe, path: {m['a1']}, weight: 0.5}}
              - {{name: spm, path: {m['s1']}, weight: 0.5}}
          same:
            n_ctx: 256
            granularity: word
            members:
              - {{name: one, path: {m['a1']}}}
              - {{name: two, path: {m['a2']}}}
        """)


@pytest.fixture
def engine(mixed_config):
    eng = Engine(load_config(mixed_config))
    yield eng
    eng.close()


def run(engine, **kw):
    events = list(engine.generate(Request(**kw)))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return [e for e in events if isinstance(e, TokenEvent)], done


def test_members_with_different_vocabularies_write_one_text_word_by_word(engine, tiny_models):
    loaded = engine.ensemble("mixed")
    assert not loaded.vocabulary.shared and loaded.vocabulary.granularity == "word"
    prompt = "Hello world, the"
    tokens, done = run(engine, ensemble="mixed", prompt=prompt, params=SamplingParams(seed=4, max_tokens=60, **T1))
    text = "".join(t.text for t in tokens) + done.text
    assert len(tokens) == 60 and done.finish_reason == "length"
    assert {t.member for t in tokens} == {"bpe", "spm"}
    assert done.stats.granularity == "word" and done.stats.words and done.stats.words >= 4
    by_name = {s.name: s for s in done.stats.members}
    for name in ("bpe", "spm"):
        assert by_name[name].generated_tokens == sum(1 for t in tokens if t.member == name)
        assert by_name[name].selected > 0
    # whoever wrote it, every token's id is in its writer's vocabulary: its bytes are its piece
    members = {m.name: m for m in loaded.members}
    for t in tokens:
        assert members[t.member].token_bytes(t.id) == t.piece
    assert "".join(t.piece.decode("utf-8", "replace") for t in tokens) == text

    # each member's cache: its prompt, then the text as far as it has seen it; what others wrote
    # is there as its own tokenization of that text, and its logits are a from-scratch evaluation's
    paths = {"bpe": tiny_models["a1"], "spm": tiny_models["s1"]}
    for m in loaded.members:
        p = m.raw_prompt(prompt)
        cache = list(m.cached)
        assert cache[: len(p)] == p
        # (random weights write bytes that are not UTF-8: members see them as U+FFFD, as users do)
        seen = b"".join(m.token_bytes(t) for t in cache[len(p):]).decode("utf-8", "replace")
        assert text.startswith(seen) and len(seen) > 0
        expected = fresh_logits(paths[m.name], cache, n_ctx=512)
        got = np.asarray(m.logits())
        assert np.median(np.abs(expected - got)) < 0.05 and np.abs(expected - got).max() < 0.5


def test_catch_up_tokenizes_what_others_wrote_as_the_member_would(engine):
    """A member drawn after others evaluates their words as its own tokenizer splits them."""
    loaded = engine.ensemble("mixed")
    tokens, _ = run(engine, ensemble="mixed", prompt="The quick brown fox",
                       params=SamplingParams(seed=8, max_tokens=80, **T1))
    members = {m.name: m for m in loaded.members}
    runs: list[tuple[str, str]] = []
    for t in tokens:
        if runs and runs[-1][0] == t.member:
            runs[-1] = (t.member, runs[-1][1] + t.text)
        else:
            runs.append((t.member or "", t.text))
    assert len(runs) >= 4
    checked = 0
    for m in loaded.members:
        p = m.raw_prompt("The quick brown fox")
        cache = list(m.cached[len(p):])
        ends = np.cumsum([len(m.token_bytes(t)) for t in cache])
        pos = 0
        for writer, seg in runs:
            end = pos + len(seg.encode())
            if writer != m.name and ends.size and end <= ends[-1] and (pos == 0 or pos in ends) and end in ends:
                i0 = 0 if pos == 0 else int(np.searchsorted(ends, pos)) + 1
                i1 = int(np.searchsorted(ends, end)) + 1
                assert cache[i0:i1] == members[m.name].tokenize_text(seg), (m.name, seg)
                checked += 1
            pos = end
    assert checked >= 2


def test_chat_runs_each_member_on_its_own_template(engine):
    tokens, done = run(engine, ensemble="mixed", messages=[{"role": "user", "content": "Say hello"}],
                       params=SamplingParams(seed=1, max_tokens=30, **T1))
    assert tokens and done.stats.granularity == "word"
    bpe, spm = engine.ensemble("mixed").members
    msgs = [{"role": "user", "content": "Say hello"}]
    assert spm.chat_prompt(msgs) == spm.model.tokenize(
        "<start_of_turn>user\nSay hello<end_of_turn>\n<start_of_turn>model\n", add_special=True)
    assert bpe.chat_prompt(msgs) == bpe.model.tokenize(
        "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n", add_special=True)


def test_granularity_and_mode_are_checked_against_the_vocabularies(engine, write_config, tiny_models):
    with pytest.raises(RequestError, match="granularity token needs members that share a vocabulary"):
        run(engine, ensemble="mixed", prompt="Hi", granularity="token", params=SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match=r"mode ce needs members that share a vocabulary.*use mode me"):
        run(engine, ensemble="mixed", prompt="Hi", mode="ce", params=SamplingParams(max_tokens=2))
    # single mode runs one member: any vocabulary will do
    tokens, done = run(engine, ensemble="mixed", prompt="Hi", member="spm", params=SamplingParams(max_tokens=3))
    assert done.stats.granularity is None and {t.member for t in tokens} == {"spm"}
    # a same-vocabulary ensemble may run word by word too, by config or per request
    tokens, done = run(engine, ensemble="same", prompt="Hello", params=SamplingParams(seed=2, max_tokens=20))
    assert done.stats.granularity == "word"
    tokens, done = run(engine, ensemble="same", prompt="Hello", granularity="token",
                       params=SamplingParams(seed=2, max_tokens=20))
    assert done.stats.granularity is None and len(tokens) == 20
    for mode in ("ce", "single"):  # granularity is what `me` draws for: asking it of another mode is refused
        with pytest.raises(RequestError, match="granularity is what mode me draws a member for"):
            run(engine, ensemble="same", prompt="Hello", mode=mode, granularity="word",
                params=SamplingParams(max_tokens=2))
    for bad, key in (("granularity: token", "granularity"), ("mode: ce", "mode")):
        cfg = write_config(f"""
            ensembles:
              mixed:
                {bad}
                members:
                  - {{name: bpe, path: {tiny_models['a1']}}}
                  - {{name: spm, path: {tiny_models['s1']}}}
            """, name=f"bad-{key}.yaml")
        with pytest.raises(VocabMismatchError) as err:
            Engine(load_config(cfg)).ensemble("mixed")
        assert f"ensembles.mixed.{key}" in str(err.value) and "do not share a vocabulary" in str(err.value)


def test_stop_strings_and_logprobs_at_word_granularity(engine):
    for seed in range(4):
        tokens, done = run(engine, ensemble="mixed", prompt="Hello world",
                           params=SamplingParams(seed=seed, max_tokens=60, stop=(" the",), logprobs=True,
                                                 top_logprobs=2, **T1))
        text = "".join(t.text for t in tokens) + done.text
        assert " the" not in text
        members = {m.name: m for m in engine.ensemble("mixed").members}
        for t in tokens:
            assert t.logprob is not None and t.logprob <= 0
            assert t.top_pieces == [members[t.member].token_bytes(i) for i, _ in t.top_logprobs]


def test_word_granularity_is_cancellable_mid_word(engine):
    seen = []

    def cancel() -> bool:
        return len(seen) >= 5

    events = []
    for ev in engine.generate(Request(ensemble="mixed", prompt="Hello", params=SamplingParams(seed=1, max_tokens=200)),
                              cancel=cancel):
        events.append(ev)
        seen.append(ev)
    assert events[-1].finish_reason == "cancelled"
    assert len(events) <= 8


# --------------------------------------------------------------------------- the CLI


def test_generate_json_and_models_at_word_granularity(mixed_config, tiny_models):
    from me_local.backends.llama import ContextSettings, LlamaMember, LoadedModel
    from me_local.core.sampling import log_softmax

    from .test_cli import T1, invoke

    result = invoke(["generate", "--config", str(mixed_config), "-e", "mixed", "--raw", "--json", "-n", "30",
                     "--seed", "3", *T1, "Hello world"])
    assert result.exit_code == 0, result.output
    *tokens, final = [json.loads(line) for line in result.stdout.splitlines()]
    assert final["stats"]["granularity"] == "word" and len(tokens) == 30
    assert {t["member"] for t in tokens} == {"bpe", "spm"}
    # each logprob is its writer's: the tokens of the first run (before anyone else wrote) are
    # exactly the first member's own sequence, recomputed here from scratch
    models = {"bpe": LoadedModel(tiny_models["a1"]), "spm": LoadedModel(tiny_models["s1"])}
    first = tokens[0]["member"]
    run = [t for t in tokens[: next((i for i, t in enumerate(tokens) if t["member"] != first), len(tokens))]]
    m = models[first]
    prompt = m.tokenize("Hello world", add_special=True)
    for i, t in enumerate(run):
        ctx = LlamaMember("check", m, ContextSettings(n_ctx=256))
        ctx.evaluate(prompt + [x["id"] for x in run[:i]])
        assert t["logprob"] == pytest.approx(float(log_softmax(ctx.logits())[t["id"]]), abs=1e-3)
        ctx.close()
    shown = invoke(["generate", "--config", str(mixed_config), "-e", "mixed", "--raw", "--show-members", "--stats",
                    "-n", "20", "--seed", "3", "Hello"])
    assert shown.exit_code == 0
    assert "granularity word" in shown.stderr and "wrote" in shown.stderr
    assert invoke(["generate", "--config", str(mixed_config), "-e", "mixed", "--granularity", "token",
                   "hi"]).exit_code == 2
    listing = invoke(["models", "--config", str(mixed_config)])
    assert listing.exit_code == 0
    assert "granularity word: members 'bpe' and 'spm' do not share a vocabulary" in listing.stdout
    assert "granularity word: models.yaml" in listing.stdout  # the same-vocabulary ensemble set to word


def test_chat_sets_granularity(mixed_config):
    from .test_cli import invoke

    session = "/set granularity token\nHi\n/set granularity word\nHi\n/stats\n/bye\n"
    out = invoke(["chat", "--config", str(mixed_config), "-e", "same", "-n", "6", "--seed", "1"],
                 input=session).stdout
    assert "Set granularity to token." in out and "Set granularity to word." in out
    assert "granularity word" in out


def test_two_slots_run_word_level_requests_side_by_side(write_config, tiny_models):
    cfg = write_config(f"""
        ensembles:
          mixed:
            n_ctx: 256
            parallel: 2
            members:
              - {{name: bpe, path: {tiny_models['a1']}}}
              - {{name: spm, path: {tiny_models['s1']}}}
        """, name="slots.yaml")
    import queue

    from me_local.engine import collect

    engine = Engine(load_config(cfg))
    try:
        reqs = [Request(ensemble="mixed", prompt=p, params=SamplingParams(seed=s, max_tokens=40, **T1))
                for p, s in (("Hello world", 1), ("The quick brown fox", 2))]
        alone = [collect(engine.generate(r))[0] for r in reqs]
        queues: list[queue.Queue] = [queue.Queue(), queue.Queue()]
        runs = [engine.start(r, q.put) for r, q in zip(reqs, queues)]
        texts = []
        for q in queues:
            parts = []
            while True:
                ev = q.get(timeout=60)
                assert not isinstance(ev, BaseException)
                parts.append(ev.text)
                if isinstance(ev, DoneEvent):
                    break
            texts.append("".join(parts))
        for r in runs:
            assert r.finished.wait(60)
        assert texts == alone
        assert len(engine.ensemble("mixed")._slots) == 2
    finally:
        engine.close()
