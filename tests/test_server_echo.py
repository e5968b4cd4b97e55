"""``POST /v1/completions`` with ``echo`` (the prompt's log-probabilities under the ensemble, in the
legacy shape), token-id prompts and batched prompts, on a real app with tiny real models (a1, a2
share a vocabulary; s1 has another). The values are checked against each member's fresh logits."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from me_local.engine import ScoreRequest
from me_local.server import ServerState, create_app

from .conftest import fresh_logprobs as fresh
from .fakes import EngineMember, FakeFactory
from .server_helpers import Throttle, ThrottledFactory, async_wait_until, engine_loader, loaded_client

PROMPT = "The quick brown fox jumps over the lazy dog.\n\nThe end"
COMP = "/v1/completions"


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, tiny_models):
    m = tiny_models
    path = tmp_path_factory.mktemp("echo") / "models.yaml"
    path.write_text(f"""
ensembles:
  pair:
    n_ctx: 256
    members:
      - {{name: one, path: {m['a1']}, weight: 3, n_threads: 1}}
      - {{name: two, path: {m['a2']}, weight: 1, n_threads: 1}}
  mixed:
    n_ctx: 256
    members:
      - {{name: bpe, path: {m['a1']}, weight: 0.4, n_threads: 1}}
      - {{name: spm, path: {m['s1']}, weight: 0.6, n_threads: 1}}
  short:
    n_ctx: 32
    members:
      - {{name: one, path: {m['a1']}, n_threads: 1}}
""")
    return path


@pytest.fixture
async def server(aiohttp_client, config_path):
    return await loaded_client(aiohttp_client, config_path)


async def complete(client, **body):
    resp = await client.post(COMP, json=body)
    data = await resp.json()
    assert resp.status == 200, data
    return data


async def refused(client, body, param, fragment):
    resp = await client.post(COMP, json=body)
    data = await resp.json()
    assert resp.status == 400, data
    assert data["error"]["param"] == param, data
    assert fragment in data["error"]["message"], data["error"]["message"]


async def test_echo_returns_each_prompt_tokens_mixture_logprob_and_the_exact_mixture_top_n(server, models):
    client, _ = server
    data = await complete(client, model="pair", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    (choice,) = data["choices"]
    assert choice["text"] == PROMPT and choice["index"] == 0 and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    ids = models["a1"].tokenize(PROMPT, add_special=True)  # a1 adds no BOS: the first token has no value
    assert lp["token_ids"] == ids and lp["members"] == [None] * len(ids)
    assert "".join(lp["tokens"]) == PROMPT
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        mix = 0.75 * np.exp(fresh(models["a1"], ids[:i])) + 0.25 * np.exp(fresh(models["a2"], ids[:i]))
        assert lp["token_logprobs"][i] == pytest.approx(math.log(mix[ids[i]]), abs=1e-3)
        top = lp["top_logprobs"][i]
        best = [int(t) for t in np.argsort(-mix)[:2]]
        expect = {}
        for t in best:  # keyed by text, as OpenAI's legacy shape is: two byte tokens may both read "\ufffd"
            expect.setdefault(models["a1"].pieces[t].decode("utf-8", "replace"), math.log(mix[t]))
        assert list(top) == list(expect)
        assert list(top.values()) == pytest.approx(list(expect.values()), abs=1e-3)
        if ids[i] in best:  # the same number in both lists: lm-eval's "greedy" test compares them exactly
            assert top[lp["tokens"][i]] == lp["token_logprobs"][i]
    assert data["usage"]["prompt_tokens"] == len(ids) and data["usage"]["completion_tokens"] == 0


async def test_max_tokens_1_adds_one_generated_token_after_the_echo_as_lm_eval_asks(server):
    client, _ = server
    alone = (await complete(client, model="pair", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0))["choices"][0]
    data = await complete(client, model="pair", prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, temperature=0,
                          seed=1)
    choice = data["choices"][0]
    lp, first = choice["logprobs"], alone["logprobs"]
    n = len(first["tokens"])
    assert len(lp["tokens"]) == n + 1 and choice["text"] == PROMPT + lp["tokens"][-1]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset", "token_ids"):
        assert lp[key][:n] == first[key], key
    assert lp["text_offset"][n] == len(PROMPT) and lp["members"][n] in ("one", "two")
    assert isinstance(lp["token_logprobs"][n], float) and len(lp["top_logprobs"][n]) == 1
    assert choice["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 1


async def test_token_id_prompts_and_batches_give_the_same_entries_as_text(server, models):
    client, _ = server
    ids = models["a1"].tokenize(PROMPT, add_special=True)
    text = (await complete(client, model="pair", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0))["choices"][0]
    by_ids = (await complete(client, model="pair", prompt=ids, echo=True, logprobs=1, max_tokens=0))["choices"][0]
    assert by_ids == text
    other = "Once upon a time"
    batch = await complete(client, model="pair", prompt=[PROMPT, other], echo=True, logprobs=1, max_tokens=0)
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["choices"][0] == text
    single = (await complete(client, model="pair", prompt=other, echo=True, logprobs=1, max_tokens=0))["choices"][0]
    assert batch["choices"][1] == dict(single, index=1)
    id_batch = await complete(client, model="pair", echo=True, logprobs=1, max_tokens=0,
                              prompt=[ids, models["a1"].tokenize(other, add_special=True)])
    assert id_batch["choices"] == batch["choices"]
    assert batch["usage"]["prompt_tokens"] == len(ids) + len(models["a1"].tokenize(other, add_special=True))


async def test_token_id_and_batched_prompts_generate_as_text_prompts_do(server, models):
    client, _ = server
    ids = models["a1"].tokenize("Once upon a time", add_special=True)
    common = dict(model="pair", max_tokens=6, temperature=0, seed=3)
    text = await complete(client, prompt="Once upon a time", **common)
    by_ids = await complete(client, prompt=ids, **common)
    assert by_ids["choices"][0]["text"] == text["choices"][0]["text"] != ""
    batch = await complete(client, prompt=["Once upon a time", "Hello"], **common)
    hello = await complete(client, prompt="Hello", **common)
    assert [c["text"] for c in batch["choices"]] == [text["choices"][0]["text"], hello["choices"][0]["text"]]
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["usage"]["completion_tokens"] == 12
    # echo without logprobs: the prompt, then the completion
    echoed = await complete(client, prompt=ids, echo=True, **common)
    assert echoed["choices"][0]["text"] == "Once upon a time" + text["choices"][0]["text"]
    assert echoed["choices"][0]["logprobs"] is None


async def test_a_member_model_echoes_its_own_logprobs(server, models):
    client, _ = server
    data = await complete(client, model="pair/two", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    lp = data["choices"][0]["logprobs"]
    ids = lp["token_ids"]
    for i in (1, len(ids) // 2, len(ids) - 1):
        assert lp["token_logprobs"][i] == pytest.approx(float(fresh(models["a2"], ids[:i])[ids[i]]), abs=1e-3)


async def test_word_granularity_echoes_one_entry_per_word_summing_to_the_prompts_likelihood(server):
    client, state = server
    data = await complete(client, model="mixed", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    lp = data["choices"][0]["logprobs"]
    assert lp["tokens"][:4] == ["The", " quick", " brown", " fox"] and "".join(lp["tokens"]) == PROMPT
    assert "\n\nThe" in lp["tokens"]  # a lattice unit: one entry
    assert lp["top_logprobs"] == [None] * len(lp["tokens"]) and lp["token_ids"] == [None] * len(lp["tokens"])
    assert all(isinstance(v, float) for v in lp["token_logprobs"])  # each word after the start of the text
    tl = await asyncio.to_thread(state.engine.score, ScoreRequest(ensemble="mixed", text=PROMPT))
    assert sum(lp["token_logprobs"]) == pytest.approx(tl.logp(tl.weights), abs=1e-6)
    assert lp["text_offset"][1] == 3


async def test_what_echo_cannot_do_is_refused_naming_the_field(server, models):
    client, _ = server
    ids = models["a1"].tokenize(PROMPT, add_special=True)
    await refused(client, {"model": "mixed", "prompt": [1, 2, 3], "max_tokens": 2}, "prompt",
                  "a prompt of token ids needs members that share one vocabulary")
    await refused(client, {"model": "pair", "prompt": [1, 99999], "echo": True, "max_tokens": 0}, "prompt",
                  "`prompt[1]` is 99999, not a token id of the vocabulary")
    await refused(client, {"model": "pair", "prompt": [[1], [2, -1]], "max_tokens": 1}, "prompt", "`prompt[1][1]`")
    await refused(client, {"model": "pair", "prompt": ["a", [1]]}, "prompt", "not a mix")
    await refused(client, {"model": "pair", "prompt": []}, "prompt", "empty list")
    await refused(client, {"model": "pair", "prompt": ["a", []]}, "prompt", "`prompt[1]` is an empty list")
    await refused(client, {"model": "pair", "prompt": "x", "echo": True, "stream": True}, "stream",
                  "`stream` is not supported with `echo`")
    await refused(client, {"model": "pair", "prompt": ["x", "y"], "stream": True}, "stream", "several prompts")
    await refused(client, {"model": "pair", "prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1")
    await refused(client, {"model": "pair", "prompt": "x", "echo": "yes"}, "echo", "true or false")
    await refused(client, {"model": "pair/one", "prompt": "x", "echo": True, "logprobs": 1,
                           "ensemble": {"weights": {"two": 2}}}, "ensemble.weights", "no effect")
    await refused(client, {"model": "mixed", "prompt": "x", "echo": True, "logprobs": 1,
                           "ensemble": {"granularity": "token"}}, "ensemble.granularity",
                  "granularity token needs members that share a vocabulary")
    await refused(client, {"model": "short", "prompt": "word " * 40, "echo": True, "logprobs": 1,
                           "max_tokens": 0}, "prompt", "member 'one' has a context of 32 tokens")
    assert len(ids) > 1


async def test_an_echo_waiting_for_a_slot_leaves_the_line_when_its_client_goes(aiohttp_client, config_path):
    factory = ThrottledFactory({("short", 0): Throttle()})
    state = ServerState(engine_loader(config_path, factory))
    client = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    held = factory.throttle("short")  # closed: the slot's evaluations wait for permits
    gen = asyncio.ensure_future(client.post(COMP, json={"model": "short", "prompt": "Hi", "max_tokens": 2}))
    await async_wait_until(lambda: held.waiting.is_set())  # the generation holds the only slot
    echo = asyncio.ensure_future(client.post(COMP, json={"model": "short", "prompt": "Hi there", "echo": True,
                                                         "logprobs": 1, "max_tokens": 0}))
    ens = state.engine.ensemble("short")
    await async_wait_until(lambda: ens.waiting == 1 and len(state.jobs) == 1)
    echo.cancel()  # the client goes away
    await async_wait_until(lambda: ens.waiting == 0 and not state.jobs)
    held.open()
    resp = await gen
    assert resp.status == 200 and ens.busy_slots == 0


class EndingFactory(FakeFactory):
    """Fake members whose every next token is the end of generation (id 3)."""

    def __call__(self, mc, ens):
        return EngineMember(mc.name, self, n_ctx=256, eog=3, script=[3])


async def test_a_generation_ended_by_the_model_lists_its_end_token_after_the_echo(aiohttp_client, write_config):
    """lm-eval drops the last entry of an echo with max_tokens 1: it must be there even when the
    model's next token ends the generation (it was missing, and a one-token answer then read 0)."""
    cfg = write_config("""
        ensembles:
          q:
            members: [{name: a, path: a.gguf}, {name: b, path: b.gguf}]
        """)
    state = ServerState(engine_loader(cfg, EndingFactory()))
    client = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    alone = (await complete(client, model="q", prompt="ab", echo=True, logprobs=1, max_tokens=0))["choices"][0]
    data = await complete(client, model="q", prompt="ab", echo=True, logprobs=1, max_tokens=1)
    choice = data["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "ab" and choice["finish_reason"] == "stop"
    assert lp["tokens"] == alone["logprobs"]["tokens"] + ["<3>"] and lp["token_ids"][-1] == 3
    assert lp["token_logprobs"][:-1] == alone["logprobs"]["token_logprobs"]
    assert lp["token_logprobs"][-1] == pytest.approx(0.0, abs=1e-6) and lp["text_offset"][-1] == 2
    assert lp["members"][-1] in ("a", "b") and data["usage"]["completion_tokens"] == 0
    # the prompt's own entries are what lm-eval sums: [ctxlen:-1]
    assert sum(lp["token_logprobs"][1:-1]) == sum(alone["logprobs"]["token_logprobs"][1:])
    # without echo, the end token is not an entry (as before)
    plain = await complete(client, model="q", prompt="ab", logprobs=1, max_tokens=1)
    assert plain["choices"][0]["logprobs"]["tokens"] == [] and plain["choices"][0]["text"] == ""
