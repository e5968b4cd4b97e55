"""The tokenizer routes (llama-server's and vLLM's dialects) and, pinned exactly, the requests
lm-evaluation-harness 0.4.13's ``local-completions`` model sends with ``tokenizer_backend=remote``
(lm_eval/utils.py ``RemoteTokenizer`` and ``check_remote_tokenizer_support``;
lm_eval/models/openai_completions.py ``_create_payload`` and ``parse_logprobs``), with the answers
it reads from them. scripts/lm_eval_check.py runs lm-eval itself against a live server."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import pytest

from me_local.engine import ScoreRequest, llama_member_factory
from me_local.server import ServerState, create_app

from .server_helpers import async_wait_until, engine_loader, loaded_client


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, tiny_models):
    m = tiny_models
    path = tmp_path_factory.mktemp("tokens") / "models.yaml"
    path.write_text(f"""
ensembles:
  pair:
    n_ctx: 256
    members:
      - {{name: one, path: {m['a1']}, weight: 1, n_threads: 1}}
      - {{name: two, path: {m['a2']}, weight: 1, n_threads: 1}}
  mixed:
    n_ctx: 128
    members:
      - {{name: bpe, path: {m['a1']}, n_threads: 1}}
      - {{name: spm, path: {m['s1']}, n_threads: 1}}
""")
    return path


@pytest.fixture
async def server(aiohttp_client, config_path):
    return await loaded_client(aiohttp_client, config_path)


async def ok(resp):
    data = await resp.json()
    assert resp.status == 200, data
    return data


async def bad(resp, param, fragment):
    data = await resp.json()
    assert resp.status == 400, data
    assert data["error"]["param"] == param and fragment in data["error"]["message"], data


async def test_llama_server_dialect(server, tiny_models):
    client, state = server
    a1 = state.engine.ensemble("pair").members[0].model
    data = await ok(await client.post("/tokenize", json={"content": "Hello world"}))
    assert data["tokens"] == a1.tokenize("Hello world", add_special=False)
    pieces = await ok(await client.post("/tokenize", json={"content": "Hello world", "with_pieces": True}))
    assert [t["id"] for t in pieces["tokens"]] == data["tokens"]
    assert "".join(t["piece"] for t in pieces["tokens"]) == "Hello world"
    # a piece that is not valid UTF-8 on its own comes as its bytes (llama-server's rule)
    split = await ok(await client.post("/tokenize", json={"content": "\u00e1\u00e9\u4e2d", "with_pieces": True}))
    raw = b"".join(bytes(t["piece"]) if isinstance(t["piece"], list) else t["piece"].encode()
                   for t in split["tokens"])
    assert raw == "\u00e1\u00e9\u4e2d".encode() and any(isinstance(t["piece"], list) for t in split["tokens"])
    # control-token text is parsed (parse_special defaults to true), or kept as text
    assert a1.eos_text == "<|endoftext|>"
    special = await ok(await client.post("/tokenize", json={"content": "<|endoftext|>"}))
    assert special["tokens"] == [a1.eos]
    plain = await ok(await client.post("/tokenize", json={"content": "<|endoftext|>", "parse_special": False}))
    assert len(plain["tokens"]) > 1
    back = await ok(await client.post("/detokenize", json={"tokens": data["tokens"] + [a1.eos]}))
    assert back == {"content": "Hello world<|endoftext|>", "prompt": "Hello world<|endoftext|>"}
    # a member of an ensemble with two vocabularies; s1 adds a BOS when asked
    spm = state.engine.ensemble("mixed").members[1].model
    with_bos = await ok(await client.post("/tokenize", json={"model": "mixed/spm", "content": "Hi",
                                                             "add_special": True}))
    assert with_bos["tokens"][0] == spm.bos and with_bos["tokens"][1:] == spm.tokenize("Hi", add_special=False)
    assert with_bos["max_model_len"] == 128 and with_bos["count"] == len(with_bos["tokens"])


async def test_what_the_tokenizer_routes_refuse(server):
    client, _ = server
    await bad(await client.post("/tokenize", json={"model": "mixed", "content": "x"}), "model",
              "ensemble 'mixed' has no single tokenizer: members 'bpe'")
    await bad(await client.post("/tokenize", json={"content": "x", "prompt": "y"}), "content", "once")
    await bad(await client.post("/tokenize", json={"text": "x"}), "text", "`text` is not a field of /tokenize")
    await bad(await client.post("/tokenize", json={"content": 5}), "content", "must be a string")
    await bad(await client.post("/tokenize", json={"content": "x", "with_pieces": "yes"}), "with_pieces",
              "true or false")
    await bad(await client.post("/detokenize", json={"tokens": [1, 10**9]}), "tokens", "`tokens[1]` is 1000000000")
    await bad(await client.post("/detokenize", json={"tokens": "1 2"}), "tokens", "list of token ids")
    await bad(await client.get("/tokenizer_info?model=mixed"), "model", "no single tokenizer")
    await bad(await client.get("/tokenizer_info?name=pair"), "name", "not a parameter")
    resp = await client.post("/tokenize", json={"model": "nope", "content": "x"})
    assert resp.status == 404


# ------------------------------------------------------------------ lm-evaluation-harness, exactly


async def test_lm_eval_remote_tokenizer_probe_and_calls(server):
    """check_remote_tokenizer_support: GET /tokenizer_info must be a JSON object with "eos_token", and
    POST /tokenize {"prompt": "test", "add_special_tokens": false} must answer a list "tokens".
    RemoteTokenizer: eos/bos ids are encode(eos_token)[0] / encode(bos_token)[0]; decode reads "prompt"."""
    client, state = server
    a1 = state.engine.ensemble("pair").members[0].model
    info = await ok(await client.get("/tokenizer_info"))  # base_url minus /v1/completions, + /tokenizer_info
    assert isinstance(info, dict) and "eos_token" in info
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None  # a1 adds no BOS: lm-eval uses the EOS
    assert info["pad_token"] is None and "im_start" in info["chat_template"]
    probe = await ok(await client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}))
    assert isinstance(probe["tokens"], list) and probe["tokens"] == a1.tokenize("test", add_special=False)
    eos = await ok(await client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}))
    assert eos["tokens"][0] == a1.eos
    text = "Question: what is 2+2?\nAnswer: 4"
    ids = (await ok(await client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})))["tokens"]
    decoded = await ok(await client.post("/detokenize", json={"tokens": ids}))
    assert decoded["prompt"] == text
    # a model that adds a BOS reports it, and lm-eval begins texts with it
    spm = await ok(await client.get("/tokenizer_info?model=mixed/spm"))
    assert spm["bos_token"] == state.engine.ensemble("mixed").members[1].model.bos_text and spm["add_bos_token"]


def lm_eval_payload(prompt):
    """local-completions' loglikelihood request (openai_completions.py, ``generate=False``)."""
    return {"model": "pair", "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}


def lm_eval_read(out, ctxlens):
    """What parse_logprobs takes from the answer: per choice in ``index`` order, the sum of
    token_logprobs[ctxlen:-1] (the last entry is the generated token) and whether each of those
    tokens equals the best of its top_logprobs."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return res


async def test_lm_eval_loglikelihood_and_rolling_requests_give_the_engines_likelihoods(server):
    client, state = server
    tok = await client.post("/tokenize", json={"prompt": "The capital of France is", "add_special_tokens": False})
    context = (await tok.json())["tokens"]
    choices = [" Paris", " Rome", " a city in Europe"]
    pairs = []
    for c in choices:  # lm-eval's _encode_pair: the continuation's tokens come from the whole text
        whole = await client.post("/tokenize", json={"prompt": "The capital of France is" + c,
                                                     "add_special_tokens": False})
        pairs.append((context, (await whole.json())["tokens"][len(context):]))
    # batch_size 1: one prompt of token ids per request
    single = []
    for ctx, cont in pairs:
        out = await ok(await client.post("/v1/completions", json=lm_eval_payload(ctx + cont)))
        (choice,) = out["choices"]
        assert len(choice["logprobs"]["token_logprobs"]) == len(ctx) + len(cont) + 1
        single.append(lm_eval_read(out, [len(ctx)])[0])
    # batch_size 3: the prompts in one request, read by index
    out = await ok(await client.post("/v1/completions", json=lm_eval_payload([c + k for c, k in pairs])))
    assert lm_eval_read(out, [len(c) for c, _ in pairs]) == single
    for (ctx, cont), (logp, _greedy) in zip(pairs, single):
        tl = state.engine.score(ScoreRequest(ensemble="pair", context=ctx, text=cont))
        assert logp == pytest.approx(tl.logp(tl.weights), abs=1e-6)
    # rolling loglikelihood (perplexity): the prefix token (no BOS: the EOS), then the whole text
    info = await ok(await client.get("/tokenizer_info"))
    prefix = (await ok(await client.post("/tokenize", json={"prompt": info["eos_token"],
                                                            "add_special_tokens": False})))["tokens"][0]
    doc = "The quick brown fox jumps over the lazy dog. It was not amused."
    doc_ids = (await ok(await client.post("/tokenize", json={"prompt": doc, "add_special_tokens": False})))["tokens"]
    out = await ok(await client.post("/v1/completions", json=lm_eval_payload([prefix] + doc_ids)))
    (rolling, _), = lm_eval_read(out, [1])
    tl = state.engine.score(ScoreRequest(ensemble="pair", context="", text=doc))  # me-local eval's reading
    assert rolling == pytest.approx(tl.logp(tl.weights), abs=1e-6)
    assert math.isfinite(rolling) and rolling < 0


async def test_a_model_scoped_path_serves_lm_eval_a_model_other_than_the_default(server):
    """lm-eval's remote tokenizer names no model: it calls BASE/tokenizer_info and BASE/tokenize,
    BASE being its completions URL less /v1/completions. Under /models/NAME/ every route is NAME's."""
    client, state = server
    spm = state.engine.ensemble("mixed").members[1].model
    base = "/models/mixed/spm"
    info = await ok(await client.get(base + "/tokenizer_info"))
    assert info["model"] == "mixed/spm" and info["bos_token"] == spm.bos_text
    ids = (await ok(await client.post(base + "/tokenize", json={"prompt": "Hello there",
                                                                "add_special_tokens": False})))["tokens"]
    assert ids == spm.tokenize("Hello there", add_special=False)
    assert (await ok(await client.post(base + "/detokenize", json={"tokens": ids})))["prompt"] == "Hello there"
    out = await ok(await client.post(base + "/v1/completions", json={**lm_eval_payload([spm.bos] + ids),
                                                                     "model": "mixed/spm"}))
    tl = state.engine.score(ScoreRequest(ensemble="mixed", member="spm", context="", text="Hello there"))
    assert lm_eval_read(out, [1])[0][0] == pytest.approx(tl.logp([1.0]), abs=1e-6)
    assert out["model"] == "mixed/spm"
    await bad(await client.post(base + "/v1/completions", json=lm_eval_payload(ids)), "model",
              "`model` is 'pair' but this path is for model 'mixed/spm'")
    await bad(await client.post("/models/mixed/tokenize", json={"prompt": "x"}), "model", "no single tokenizer")
    assert (await client.post("/models/nope/tokenize", json={"prompt": "x"})).status == 404


class GatedLoads:
    """llama.cpp's member factory, whose loads wait for ``gate`` while it is set."""

    def __init__(self) -> None:
        self.inner = llama_member_factory()
        self.gate: threading.Event | None = None
        self.loading = threading.Event()

    def __call__(self, mc: Any, ens: Any) -> Any:
        if self.gate is not None:
            self.loading.set()
            assert self.gate.wait(60), "the test never let the load go on"
        return self.inner(mc, ens)


async def test_tokenizer_info_loads_an_unloaded_ensemble_off_the_loop(aiohttp_client, config_path):
    """After a keep_alive unload, /tokenizer_info loaded the ensemble on the event loop: every other
    request and stream stalled for the load."""
    factory = GatedLoads()
    state = ServerState(engine_loader(config_path, factory))
    client = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    assert (await client.post("/api/generate", json={"model": "pair", "keep_alive": 0})).status == 200
    factory.gate = threading.Event()
    info = asyncio.ensure_future(client.get("/tokenizer_info?model=pair"))
    await async_wait_until(factory.loading.is_set)
    assert (await client.get("/health")).status == 200 and not info.done()  # the loop answers meanwhile
    factory.gate.set()
    data = await ok(await info)
    assert data["model"] == "pair" and data["vocab_size"] > 0 and "pair" in state.engine.loaded
    assert (await client.post("/api/generate", json={"model": "pair", "keep_alive": 0})).status == 200
    factory.loading.clear()
    factory.gate = threading.Event()
    text = asyncio.ensure_future(client.post("/detokenize", json={"model": "pair", "tokens": [1, 2]}))
    await async_wait_until(factory.loading.is_set)
    assert (await client.get("/health")).status == 200 and not text.done()
    factory.gate.set()
    assert isinstance((await ok(await text))["content"], str)
    assert (await client.post("/api/generate", json={"model": "pair", "keep_alive": 0})).status == 200
    factory.loading.clear()
    factory.gate = threading.Event()
    echo = asyncio.ensure_future(client.post("/v1/completions", json={  # lm-eval's loglikelihood request
        "model": "pair", "prompt": [[1, 2, 3]], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}))
    await async_wait_until(factory.loading.is_set)
    assert (await client.get("/health")).status == 200 and not echo.done()
    factory.gate.set()
    assert len((await ok(await echo))["choices"]) == 1
