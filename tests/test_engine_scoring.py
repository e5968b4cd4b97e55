"""``Engine.score``: a text's likelihood under an ensemble through the engine, on tiny real models
(a1, a2 share a vocabulary; s1 has another) and, for the queue, on fake members. The
likelihood arithmetic itself is tested against fresh logits in test_likelihood_models.py;
here: the same numbers come back through the engine (contexts, weights, members, token ids),
what cannot be done is refused naming the field, and scoring waits its turn like a generation."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from me_local.backends.llama import ContextSettings, LlamaMember
from me_local.config import load_config
from me_local.core import Cancelled, DoneEvent, SamplingParams, TokenEvent
from me_local.core.likelihood import text_likelihood
from me_local.engine import Engine, QueueFullError, Request, ScoreRequest
from me_local.errors import ContextOverflowError, RequestError

from .conftest import fresh_logprobs
from .fakes import FakeFactory
from .server_helpers import wait_until

TEXT = " the quick brown fox.\n\nThe end of the day is near, said the fox."
CONTEXT = "Once upon a time"


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, tiny_models):
    m = tiny_models
    path = tmp_path_factory.mktemp("scoring") / "models.yaml"
    path.write_text(f"""
ensembles:
  pair:
    n_ctx: 256
    members:
      - {{name: one, path: {m['a1']}, weight: 3}}
      - {{name: two, path: {m['a2']}, weight: 1}}
  mixed:
    n_ctx: 256
    members:
      - {{name: bpe, path: {m['a1']}, weight: 0.4}}
      - {{name: spm, path: {m['s1']}, weight: 0.6}}
  short:
    n_ctx: 32
    members:
      - {{name: one, path: {m['a1']}}}
""")
    return path


@pytest.fixture(scope="module")
def engine(config_path):
    eng = Engine(load_config(config_path))
    yield eng
    eng.close()


def test_token_granularity_is_the_mixture_of_each_members_fresh_probabilities_at_the_ensembles_weights(
        engine, models):
    tl = engine.score(ScoreRequest(ensemble="pair", context=CONTEXT, text=TEXT, top_n=2))
    assert tl.granularity == "token" and tl.members == ("one", "two") and tl.end == "prefix"
    assert tl.weights == (0.75, 0.25)  # models.yaml's 3 : 1, normalised
    ctx = models["a1"].tokenize(CONTEXT, add_special=True)
    toks = models["a1"].tokenize_text(TEXT)
    assert tl.text == TEXT.encode()
    expect, alone = 0.0, [0.0, 0.0]
    for i, t in enumerate(toks):
        p1 = np.exp(fresh_logprobs(models["a1"], ctx + toks[:i]))
        p2 = np.exp(fresh_logprobs(models["a2"], ctx + toks[:i]))
        mix = 0.75 * p1 + 0.25 * p2
        expect += math.log(mix[t])
        alone[0] += math.log(p1[t])
        alone[1] += math.log(p2[t])
        assert [x for x, _ in tl.mixture_top[i]] == list(np.argsort(-mix)[:2])
    assert tl.logp(tl.weights) == pytest.approx(expect, abs=1e-3 * len(toks))
    assert tl.member_logp() == pytest.approx(alone, abs=1e-3 * len(toks))
    assert tl.unit_logp(tl.weights).shape == (len(toks),)


def test_weights_member_and_token_ids_give_the_same_numbers_as_the_text(engine, models):
    base = engine.score(ScoreRequest(ensemble="pair", context=CONTEXT, text=TEXT))
    heavy = engine.score(ScoreRequest(ensemble="pair", context=CONTEXT, text=TEXT, weights={"two": 3}))
    assert heavy.weights == (0.5, 0.5)
    assert heavy.logp(heavy.weights) == pytest.approx(base.logp([1, 1]), abs=1e-6)
    two = engine.score(ScoreRequest(ensemble="pair", context=CONTEXT, text=TEXT, member="two"))
    assert two.members == ("two",) and two.weights == (1.0,)
    assert two.logp(two.weights) == pytest.approx(base.member_logp()[1], abs=1e-6)
    ctx = models["a1"].tokenize(CONTEXT, add_special=True)
    toks = models["a1"].tokenize_text(TEXT)
    ids = engine.score(ScoreRequest(ensemble="pair", context=ctx, text=toks))
    assert ids.logp(ids.weights) == pytest.approx(base.logp(base.weights), abs=1e-6)
    assert ids.text == TEXT.encode()

    # an empty context is the BOS alone, or the EOS for a model that adds no BOS (a1, like SmolLM2)
    assert not models["a1"].add_bos and models["s1"].add_bos
    empty = engine.score(ScoreRequest(ensemble="pair", text=TEXT))
    eos = engine.score(ScoreRequest(ensemble="pair", context=[models["a1"].eos], text=TEXT))
    assert empty.logp(empty.weights) == pytest.approx(eos.logp(eos.weights), abs=1e-6)
    assert empty.logp(empty.weights) != pytest.approx(base.logp(base.weights), abs=1e-3)
    s1 = models["s1"]
    spm = engine.score(ScoreRequest(ensemble="mixed", member="spm", text=TEXT))
    bos = engine.score(ScoreRequest(ensemble="mixed", member="spm", context=[s1.bos], text=TEXT))
    assert spm.logp([1.0]) == pytest.approx(bos.logp([1.0]), abs=1e-6)


def test_word_granularity_across_vocabularies_equals_the_core_on_the_members_own_contexts(engine, models):
    tl = engine.score(ScoreRequest(ensemble="mixed", context=CONTEXT, text=TEXT, end="word"))
    assert tl.granularity == "word" and tl.members == ("bpe", "spm") and tl.weights == (0.4, 0.6)
    a = LlamaMember("bpe", models["a1"], ContextSettings(n_ctx=256))
    s = LlamaMember("spm", models["s1"], ContextSettings(n_ctx=256))
    try:
        ref = text_likelihood([a, s], [a.raw_prompt(CONTEXT), s.raw_prompt(CONTEXT)], TEXT, granularity="word",
                              end="word")
    finally:
        a.close()
        s.close()
    assert np.array_equal(tl.spans, ref.spans) and list(tl.units.lattices) == list(ref.units.lattices)
    # the engine's contexts are batched differently (its n_batch): batching noise, ~1e-4 nats a unit here
    tol = 1e-3 * tl.units.n_units
    assert tl.logp(tl.weights) == pytest.approx(ref.logp([0.4, 0.6]), abs=tol)
    assert tl.member_logp() == pytest.approx(ref.member_logp(), abs=tol)
    # one member of a mixed ensemble may be scored alone, at token granularity or with token ids
    alone = engine.score(ScoreRequest(ensemble="mixed", member="spm", context=CONTEXT, text=TEXT,
                                      granularity="token"))
    assert alone.granularity == "token" and alone.members == ("spm",)
    ids = engine.score(ScoreRequest(ensemble="mixed", member="spm", context=models["s1"].tokenize(CONTEXT,
                                    add_special=True), text=models["s1"].tokenize_text(TEXT), granularity="token"))
    assert ids.logp([1.0]) == pytest.approx(alone.logp([1.0]), abs=1e-6)


def test_word_granularity_over_token_ids_of_one_vocabulary_equals_it_over_the_text(engine, models):
    text = engine.score(ScoreRequest(ensemble="pair", context=CONTEXT, text=TEXT, granularity="word"))
    ids = engine.score(ScoreRequest(ensemble="pair", context=CONTEXT, text=models["a1"].tokenize_text(TEXT),
                                    granularity="word"))
    assert text.granularity == ids.granularity == "word"
    assert np.array_equal(text.spans, ids.spans) and ids.text == TEXT.encode()
    assert ids.logp(ids.weights) == pytest.approx(text.logp(text.weights), abs=1e-6)


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"ensemble": "mixed", "text": [1, 2]}, "text",
     r"text as token ids needs members that share a vocabulary \(members 'bpe' .* and 'spm' .* do not share"),
    ({"ensemble": "mixed", "context": [1], "text": "x"}, "context", "context as token ids needs members that share"),
    ({"ensemble": "mixed", "granularity": "token"}, "granularity",
     "granularity token needs members that share a vocabulary .*; use granularity word, or score one member"),
    ({"ensemble": "pair", "granularity": "letter"}, "granularity", "unknown granularity 'letter'; choose one of"),
    ({"ensemble": "pair", "end": "eof"}, "end", "unknown end 'eof'; choose one of prefix, word, eog"),
    ({"ensemble": "pair", "top_n": 21}, "top_n", "top_n must be an integer from 0 to 20, not 21"),
    ({"ensemble": "pair", "top_n": -1}, "top_n", "top_n must be an integer from 0 to 20, not -1"),
    ({"ensemble": "pair", "member": "three"}, "member", "ensemble 'pair' has no member 'three'; choose one of"),
    ({"ensemble": "pair", "member": "one", "weights": {"one": 1}}, "member", "give weights or member, not both"),
    ({"ensemble": "pair", "weights": {"one": -1}}, "weights", "weight"),
    ({"ensemble": "pair", "text": [1, 99999]}, "text", r"text\[1\] is token id 99999, outside the vocabulary"),
    ({"ensemble": "pair", "context": [True], "text": "x"}, "context", r"context\[0\] must be a token id"),
    ({"ensemble": "short", "context": "a " * 20, "text": "b " * 20}, "text",
     r"the context and text are \d+ \+ \d+ tokens but member 'one' has a context of 32 tokens; score shorter"),
])
def test_what_cannot_be_done_is_refused_naming_the_field(engine, fields, param, message):
    with pytest.raises(RequestError, match=message) as info:
        engine.score(ScoreRequest(**fields))
    assert info.value.param == param
    if param == "text" and "context of 32" in message:
        assert isinstance(info.value, ContextOverflowError)
    for ens in engine.loaded.values():  # refused before it took a slot; its place is given back
        assert ens.waiting == 0 and ens.busy_slots == 0


# -------------------------------------------------------------------------------- the queue


@pytest.fixture
def fake_engine(write_config):
    cfg = write_config("""
        ensembles:
          q:
            parallel: 1
            max_queue: 4
            members: [{name: a, path: a.gguf}, {name: b, path: b.gguf}]
        """)
    engine = Engine(load_config(cfg), FakeFactory())
    yield engine, engine.ensemble("q")
    engine.close()


def hold_slot(engine):
    holder = engine.generate(Request(ensemble="q", prompt="hold", params=SamplingParams(seed=1, max_tokens=50)))
    assert isinstance(next(holder), TokenEvent)
    return holder


class Scorer(threading.Thread):
    def __init__(self, engine, text, order, **kw):
        super().__init__(daemon=True)
        self.engine, self.text, self.order, self.kw = engine, text, order, kw
        self.flag = threading.Event()
        self.result = None
        self.error = None
        self.start()

    def run(self):
        try:
            self.result = self.engine.score(ScoreRequest(ensemble="q", context="ctx", text=self.text),
                                            cancel=self.flag.is_set, **self.kw)
            self.order.append(self.text)
        except BaseException as exc:
            self.error = exc


def test_scoring_waits_in_line_with_generations_first_come_first_served(fake_engine):
    engine, ens = fake_engine
    holder = hold_slot(engine)
    order = []
    first = Scorer(engine, "first", order)
    wait_until(lambda: ens.waiting == 1)
    gen_done = []

    def generation():
        events = list(engine.generate(Request(ensemble="q", prompt="gen", params=SamplingParams(seed=1, max_tokens=2))))
        assert isinstance(events[-1], DoneEvent)
        order.append("gen")
        gen_done.append(True)

    g = threading.Thread(target=generation, daemon=True)
    g.start()
    wait_until(lambda: ens.waiting == 2)
    second = Scorer(engine, "second", order)
    wait_until(lambda: ens.waiting == 3)
    assert not order and ens.busy_slots == 1  # all wait for the held slot
    holder.close()
    for t in (first, g, second):
        t.join(30)
        assert not t.is_alive()
    assert first.error is None and second.error is None
    assert order == ["first", "gen", "second"]
    assert first.result.members == ("a", "b") and first.result.scores[0].n == len(b"first")
    assert ens.waiting == 0 and ens.busy_slots == 0


def test_scoring_cancelled_while_queued_leaves_the_line_and_a_timeout_is_queue_full(fake_engine):
    engine, ens = fake_engine
    holder = hold_slot(engine)
    order = []
    cancelled = Scorer(engine, "cancelled", order)
    wait_until(lambda: ens.waiting == 1)
    cancelled.flag.set()
    cancelled.join(30)
    assert isinstance(cancelled.error, Cancelled) and ens.waiting == 0
    timed = Scorer(engine, "timed", order, queue_timeout=0.2)
    timed.join(30)
    assert isinstance(timed.error, QueueFullError) and "stayed busy" in str(timed.error)
    assert ens.waiting == 0
    holder.close()
    assert engine.score(ScoreRequest(ensemble="q", context="c", text="after")).scores[1].n == 5
    assert not order


def test_scoring_cancelled_mid_text_raises_and_frees_the_slot(fake_engine):
    engine, ens = fake_engine
    polls = []

    def cancel():  # fires once scoring has begun (the first poll comes from a scoring chunk)
        polls.append(1)
        return len(polls) > 1

    with pytest.raises(Cancelled):
        engine.score(ScoreRequest(ensemble="q", context="c", text="a long text to score" * 2), cancel=cancel)
    assert ens.busy_slots == 0 and ens.waiting == 0
    slot_member = ens.members[0]
    assert len(slot_member.cached) < len(b"c") + 40  # it stopped partway


def test_an_empty_context_needs_a_bos_or_an_eos(fake_engine):
    engine, _ = fake_engine
    with pytest.raises(RequestError, match="the model of member 'a' has neither a BOS nor an EOS token to begin an "
                                           "empty context with; give a context") as info:
        engine.score(ScoreRequest(ensemble="q", text="x"))
    assert info.value.param == "context"
