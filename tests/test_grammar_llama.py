"""Grammars on real GGUF models through llama.cpp's grammar sampler (docs/grammar.md): tiny
fabricated models for the backend's constraint and sampler and the engine in every mode;
SmolLM2 (and Gemma 3 beside it, at word granularity) for JSON."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from me_local.backends.llama import ContextSettings, LlamaMember, context, grammar
from me_local.config import load_config
from me_local.core import DoneEvent, GrammarSpec, SamplingParams, TokenEvent
from me_local.core.sampling import softmax, truncate
from me_local.core.types import GrammarRejected, NoTokenAllowed
from me_local.engine import Engine, Request, collect
from me_local.errors import RequestError

from .test_core import chi2_critical, chi_square

T1 = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
LIST = r'''root ::= "[" ( word ( ", " word )* )? "]"
word ::= [a-z]{1,12}'''
LIST_RE = re.compile(r"\[([a-z]{1,12}(, [a-z]{1,12})*)?\]")
JSON_PERSON = r'''root ::= "{" ws "\"name\"" ws ":" ws string ws "," ws "\"age\"" ws ":" ws int ws "}"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ["\\/bnrt] ){0,40} "\""
int ::= "-"? [0-9]{1,6}
ws ::= [ ]?'''


def spec(gbnf: str, param: str = "grammar") -> GrammarSpec:
    return GrammarSpec(gbnf, param=param)


def token_of(model, piece: bytes) -> int:
    return model.pieces.index(piece)


# ------------------------------------------------------------------ the constraint


@pytest.mark.parametrize(("gbnf", "reason"), [
    ("root ::= ( ", "expecting ')' at the end of the grammar"),
    ("root ::= bar", "undefined rule 'bar'"),
    ('root ::= "\\q"', "unknown escape '\\q' at character 11"),
    ('root ::= "a"{100000000}', "more than 2000 repetitions at character 13"),
    ('root ::= "a', "unterminated string literal starting at character 10"),
    ("root ::= [a-", "unterminated character class starting at character 10"),
    ('root = "a"', "expecting '::=' at character 6 ('= \"a\"')"),
    ('root ::= "a" )', "expecting a newline or the end at character 14 (')')"),
    ('root ::= * "a"', "nothing before '*' to repeat at character 10"),
    ('root ::= "\\x4"', "expecting 2 hex digits after '\\x' at character 11"),
    ('x ::= "a"', "does not contain a 'root' symbol"),
    ('root ::= root "a"', "left recursion"),
])
def test_gbnf_llama_cpp_cannot_use_is_a_request_error_naming_the_field(models, gbnf, reason):
    """llama.cpp prints its parser's reason (and the grammar) on stderr and logs only
    \"failed to parse grammar\": me-local finds the reason itself, where the text goes wrong."""
    with pytest.raises(RequestError) as e:
        models["a1"].make_grammar(spec(gbnf, "response_format"), "one")
    assert reason in e.value.message
    assert e.value.param == "response_format"
    assert "the grammar in response_format is not valid GBNF" in e.value.message


@pytest.mark.parametrize("gbnf", [
    LIST, JSON_PERSON, 'root ::= "a"  # a comment\n\n# another\nb ::= "b"', "root ::= [^\\]\\x00-\\x1f]+",
    'root ::= ( "a" | "b" ){2,} x?\nx ::= .* "\\u00e9\\U0001F600"', 'root ::= "a"{0,3} "b"{2}',
])
def test_the_reason_finder_finds_nothing_wrong_in_grammars_llama_cpp_reads(models, gbnf):
    from me_local.grammar.gbnf import gbnf_syntax_error

    models["a1"].make_grammar(spec(gbnf), "one").close()  # llama.cpp reads it
    assert gbnf_syntax_error(gbnf) is None


def test_what_the_grammar_rejects_is_refused_instead_of_aborting_the_process(models):
    m = models["a1"]
    g = m.make_grammar(spec('root ::= "abc"'), "one")
    try:
        with pytest.raises(GrammarRejected):  # llama.cpp would abort (SIGABRT) on this accept
            g.accept(token_of(m, b"x"))
        with pytest.raises(GrammarRejected):  # end of generation before the grammar is complete: GGML_ABORT
            g.accept(m.eos)
        with pytest.raises(GrammarRejected):  # bytes: refused whole, the state unchanged
            g.accept_bytes(b"abx")
        assert not g.complete()
        g.accept_bytes(b"ab")
        g.accept(token_of(m, b"c"))
        assert g.complete() and g.only_end()
        with pytest.raises(GrammarRejected):  # never accept an end token, even complete
            g.accept(m.eos)
    finally:
        g.close()
    g.close()  # idempotent


def test_control_tokens_are_never_allowed_under_a_grammar(models):
    m = models["a1"]
    im_start = m.n_vocab - 2
    assert m.pieces[im_start] == b"" and m.grammar_banned[im_start]
    g = m.make_grammar(spec("root ::= [<|>a-z_]*"), "one")  # the grammar would take "<|im_start|>" as text
    try:
        assert not g.allowed(np.array([im_start]))[0] and not g.mask()[im_start]
        assert g.allowed(np.array([token_of(m, b"a")]))[0]
        assert g.complete() and not g.only_end()
    finally:
        g.close()


@pytest.mark.parametrize("key", ["a1", "s1"])
def test_a_vocabulary_spells_any_text_for_its_grammar(models, key):
    m = models[key]
    for data in ("hello wörld €, the end\n\n".encode(), "a€".encode()[:3], "\t\u4e2d".encode()):
        tokens = m.spell(data)
        assert tokens is not None and b"".join(m.pieces[t] for t in tokens) == data


@pytest.mark.parametrize("key", ["a1", "s1"])
def test_the_mask_from_the_first_bytes_is_the_mask_of_the_whole_vocabulary(models, key, monkeypatch):
    m = models[key]
    monkeypatch.setattr(grammar, "SPLIT", 8)  # split the crowded first bytes of a tiny vocabulary too
    monkeypatch.setattr(m, "_grammar_index", None)
    index = m.grammar_index
    assert index.second
    if key == "a1":  # a vocabulary without a token for the byte '"' (as SmolLM2 lacks a few): its tokens stay in
        index.probe[ord('"')] = -1
        index.has_probe = index.probe >= 0
        index.probes = index.probe[index.has_probe]
        index.second.pop(ord('"'), None)
    text = '{"name": "Zoë Ünal", "age": 36, "bio": "née 中文 \\"q\\"", "age": 7}'.encode()
    tokens = m.spell(text)
    assert tokens is not None
    g = m.make_grammar(spec(JSON_PERSON.replace("{0,40}", "*") + '\nrest ::= ""'), "one")
    forced = 0
    try:
        for t in [*tokens[:40], None]:
            fast, everything = g.mask(), g.mask_everything()
            assert np.array_equal(fast, everything), np.flatnonzero(fast != everything)
            forced += everything.sum() < 10
            if t is None or not g.allowed(np.array([t]))[0]:
                break
            g.accept(t)
    finally:
        g.close()
    assert forced >= 5


# ------------------------------------------------------------------ the native sampler


class Counting:
    """A constraint that counts the whole-vocabulary masks asked of it."""

    def __init__(self, inner):
        self.inner = inner
        self.masks = 0

    def allowed(self, ids):
        return self.inner.allowed(ids)

    def mask(self):
        self.masks += 1
        return self.inner.mask()


@pytest.mark.parametrize(("params", "masks"), [
    (SamplingParams(**T1), "some"),
    (SamplingParams(**{**T1, "top_k": 5}), "none"),
    (SamplingParams(**{**T1, "top_k": 5, "top_p": 0.9, "min_p": 0.05}), "none"),
    (SamplingParams(**{**T1, "top_p": 0.9}), "all"),
    (SamplingParams(temperature=0), "none"),
], ids=["untruncated", "top-k", "top-k-p-min", "top-p", "greedy"])
def test_the_native_sampler_draws_from_the_restricted_distribution(models, params, masks):
    m = models["a1"]
    member = LlamaMember("one", m, ContextSettings(n_ctx=128))
    # the first piece must match [a-m][a-z ]*: reckoned here from the pieces, not by llama.cpp
    ok = np.array([bool(re.fullmatch(rb"[a-m][a-z ]*", p)) for p in m.pieces])
    g = m.make_grammar(spec("root ::= [a-m] [a-z ]*"), "one")
    try:
        member.evaluate(m.tokenize("Hello world, the", add_special=False))
        logits = np.array(member.logits(), copy=True)
        sampler = member.make_sampler(params, 7)
        c = Counting(g)
        n = 1 if params.greedy else 3000
        counts = np.zeros(m.n_vocab)
        for _ in range(n):
            counts[sampler.sample(c)] += 1
    finally:
        g.close()
        member.close()
    restricted = np.where(ok, softmax(logits), 0.0)
    restricted /= restricted.sum()
    assert softmax(logits)[ok].sum() < 0.9, "the grammar must refuse much of the mass"
    if params.greedy:
        assert counts[int(np.argmax(restricted))] == 1
    else:
        stat, dof = chi_square(counts, truncate(restricted, params.top_k, params.top_p, params.min_p))
        assert stat < chi2_critical(dof), (stat, dof)
    assert {"none": c.masks == 0, "all": c.masks == n, "some": 0 < c.masks < n}[masks], c.masks


def test_the_native_sampler_falls_back_to_the_whole_mask_when_few_candidates_are_allowed(models, monkeypatch):
    monkeypatch.setattr(context, "CANDIDATES", 4)
    m = models["a1"]
    member = LlamaMember("one", m, ContextSettings(n_ctx=128))
    g = m.make_grammar(spec('root ::= "zq" [a-z]*'), "one")
    try:
        member.evaluate(m.tokenize("Hello world, the", add_special=False))
        c = Counting(g)
        token = member.make_sampler(SamplingParams(**{**T1, "top_k": 2}), 7).sample(c)
        assert m.pieces[token].startswith(b"z") and c.masks == 1
    finally:
        g.close()
        member.close()


class NoneAllowed:
    def __init__(self, n):
        self.n = n

    def allowed(self, ids):
        return np.zeros(len(ids), dtype=bool)

    def mask(self):
        return np.zeros(self.n, dtype=bool)


@pytest.mark.parametrize("params", [SamplingParams(**T1), SamplingParams(), SamplingParams(temperature=0)])
def test_a_constraint_that_allows_nothing_stops_the_draw_cleanly(models, params):
    m = models["a1"]
    member = LlamaMember("one", m, ContextSettings(n_ctx=128))
    try:
        member.evaluate(m.tokenize("Hello", add_special=False))
        with pytest.raises(NoTokenAllowed):  # not llama.cpp's assert in its dist sampler
            member.make_sampler(params, 7).sample(NoneAllowed(m.n_vocab))
    finally:
        member.close()


# ------------------------------------------------------------------ through the engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models):
    m = tiny_models
    cfg = tmp_path_factory.mktemp("grammar") / "models.yaml"
    cfg.write_text(f"""
ensembles:
  pair:
    n_ctx: 512
    members: [{{name: one, path: {m['a1']}}}, {{name: two, path: {m['a2']}}}]
  mixed:
    n_ctx: 512
    members: [{{name: bpe, path: {m['a1']}}}, {{name: spm, path: {m['s1']}}}]
""")
    eng = Engine(load_config(cfg))
    yield eng
    eng.close()


@pytest.mark.parametrize(("ensemble", "mode"), [("pair", "me"), ("pair", "ce"), ("pair", "single"), ("mixed", "me")])
def test_every_mode_writes_inside_the_grammar(engine, ensemble, mode):
    complete = 0
    for seed in range(6):
        events = list(engine.generate(Request(ensemble=ensemble, prompt="Hello world, the", mode=mode,
                                              params=SamplingParams(seed=seed, max_tokens=40), grammar=spec(LIST))))
        done = events[-1]
        assert isinstance(done, DoneEvent)
        text = "".join(e.text for e in events if isinstance(e, TokenEvent)) + done.text
        if done.grammar == "complete":
            assert LIST_RE.fullmatch(text), text
            assert done.finish_reason == "stop"
            complete += 1
        else:
            assert (done.grammar, done.finish_reason) == ("incomplete", "length")
            g = engine.ensemble(ensemble).members[0].make_constraint(spec(LIST))
            g.accept_bytes(text.encode())  # a prefix of the grammar's language
            g.close()
        if ensemble == "mixed" and mode == "me":
            assert done.stats.granularity == "word"
    assert complete >= 3


@pytest.mark.parametrize(("ensemble", "mode"), [("pair", "me"), ("mixed", "me")])
def test_a_lazy_grammar_constrains_from_its_trigger_on(engine, ensemble, mode):
    outcomes = set()
    for seed in range(8):
        text, done = collect(engine.generate(Request(
            ensemble=ensemble, prompt="Hello world, the", mode=mode, params=SamplingParams(seed=seed, max_tokens=40),
            grammar=GrammarSpec('root ::= "e" [a-z]{1,5} "!"', param="tools", triggers=("e",)))))
        outcomes.add(done.grammar)
        if done.grammar == "complete":  # free text, then from an "e" on the grammar's text, then the end
            assert re.search(r"e[a-z]{1,5}!\Z", text), text
            assert done.finish_reason == "stop"
        elif done.grammar == "incomplete":
            assert re.search(r"e[a-z]{0,5}\Z", text), text
        else:  # every "e" went on, in its own token, with text the grammar refuses
            assert done.grammar == "untriggered" and not re.search(r"e\Z", text), text
    assert "complete" in outcomes


def test_word_granularity_refuses_token_literals(engine):
    with pytest.raises(RequestError, match=r"names tokens \(<\|im_end\|>\)") as e:
        engine.plan_request(Request(ensemble="mixed", prompt="x", grammar=spec('root ::= "a" <|im_end|>', "grammar")))
    assert e.value.param == "grammar"
    engine.plan_request(Request(ensemble="pair", prompt="x", grammar=spec('root ::= "a" <|im_end|>')))


@pytest.mark.smollm
def test_smollm_writes_json_a_grammar_allows(write_config, smollm_path):
    cfg = write_config(f"""
        ensembles:
          smol:
            n_ctx: 1024
            members: [{{name: a, path: {smollm_path}}}, {{name: b, path: {smollm_path}, system: Be brief.}}]
        """)
    eng = Engine(load_config(cfg))
    try:
        messages = [{"role": "user", "content": "Describe a person as a JSON object with a name and an age."}]
        for seed in (1, 2):
            text, done = collect(eng.generate(Request(ensemble="smol", messages=messages, grammar=spec(JSON_PERSON),
                                                      params=SamplingParams(seed=seed, max_tokens=80))))
            obj = json.loads(text)
            assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
            assert (done.finish_reason, done.grammar) == ("stop", "complete")
        with pytest.raises(RequestError, match="not valid GBNF") as e:  # before any event, and no crash
            next(eng.generate(Request(ensemble="smol", messages=messages, grammar=spec("root ::= {", "format"))))
        assert e.value.param == "format"
        # SmolLM2 has no token for the byte 0x04: nothing is allowed, a clean error
        with pytest.raises(RequestError, match="allows no token of member 'a' after 0 bytes"):
            collect(eng.generate(Request(ensemble="smol", messages=messages, grammar=spec(r'root ::= "\x04"'),
                                         mode="single", member="a")))
    finally:
        eng.close()


@pytest.mark.smollm
def test_smollm_and_gemma_write_json_word_by_word_inside_the_grammar(write_config, smollm_path, gemma_path):
    cfg = write_config(f"""
        ensembles:
          two:
            n_ctx: 1024
            members: [{{name: smol, path: {smollm_path}}}, {{name: gemma, path: {gemma_path}}}]
        """)
    eng = Engine(load_config(cfg))
    try:
        messages = [{"role": "user", "content": "Describe a person as a JSON object with a name and an age."}]
        writers = set()
        for seed in (1, 2):
            events = list(eng.generate(Request(ensemble="two", messages=messages, grammar=spec(JSON_PERSON),
                                               params=SamplingParams(seed=seed, max_tokens=80))))
            done = events[-1]
            assert done.stats.granularity == "word"
            text = "".join(e.text for e in events if isinstance(e, TokenEvent)) + done.text
            writers |= {e.member for e in events if isinstance(e, TokenEvent)}
            obj = json.loads(text)
            assert set(obj) == {"name", "age"}
            assert (done.finish_reason, done.grammar) == ("stop", "complete")
        assert writers == {"smol", "gemma"}
    finally:
        eng.close()
