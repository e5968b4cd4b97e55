"""Word-level ME through a real server on a loopback port, with the official ``openai`` and
``ollama`` clients: tiny members of different vocabularies (a byte-level BPE and a
SentencePiece-style one)."""

from __future__ import annotations

import textwrap

import httpx
import ollama
import openai
import pytest

from me_local.server import ServerSettings

from .server_helpers import LiveServer, engine_loader

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("words") / "models.yaml"
    path.write_text(textwrap.dedent(f"""
        ensembles:
          mixed:
            n_ctx: 512
            members:
              - {{name: bpe, path: {tiny_models['a1']}, weight: 0.5}}
              - {{name: spm, path: {tiny_models['s1']}, weight: 0.5}}
        """))
    server = LiveServer(ServerSettings(port=0), engine_loader(path)).start()
    yield server
    server.stop()


def test_openai_chat_streams_words_from_both_families_with_attribution(oa):
    kw = dict(model="mixed", messages=HELLO, max_tokens=40, seed=5, temperature=1.0, logprobs=True, top_logprobs=2)
    full = oa.chat.completions.create(**kw)
    text = full.choices[0].message.content
    content = full.choices[0].logprobs.content
    assert text and len(content) == 40
    assert {c.model_extra["member"] for c in content} == {"bpe", "spm"}
    assert "".join(c.token for c in content) == text
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)
    ext = full.usage.model_extra["me_local"]
    assert ext["granularity"] == "word" and ext["words"] >= 2
    assert {m["name"]: m["generated_tokens"] for m in ext["members"]} == {
        name: sum(1 for c in content if c.model_extra["member"] == name) for name in ("bpe", "spm")}
    chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    streamed = [lp.model_extra["member"] for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.content]
    assert streamed == [c.model_extra["member"] for c in content]
    assert oa.models.retrieve("mixed").model_extra["me_local"]["granularity"] == "word"


def test_openai_refuses_ce_and_token_granularity_across_vocabularies(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="mixed", messages=HELLO, max_tokens=3, extra_body={"ensemble": {"mode": "ce"}})
    assert "mode ce needs members that share a vocabulary" in e.value.message and "use mode me" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="mixed", messages=HELLO, max_tokens=3,
                                   extra_body={"ensemble": {"granularity": "token"}})
    assert "granularity token needs members that share a vocabulary" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="mixed", messages=HELLO, max_tokens=3,
                                   extra_body={"ensemble": {"granularity": "sentence"}})
    assert "`ensemble.granularity` must be one of token, word" in e.value.message
    # one member of it runs alone, in its own vocabulary
    one = oa.completions.create(model="mixed/spm", prompt="Hello", max_tokens=5, seed=1)
    assert one.usage.completion_tokens == 5


def test_openai_completions_stop_string_across_members(oa):
    for seed in range(3):
        out = oa.completions.create(model="mixed", prompt="Hello world", max_tokens=60, seed=seed, stop=[" the"],
                                    temperature=1.0)
        assert " the" not in out.choices[0].text


def test_ollama_chat_and_generate_word_by_word(live):
    ol = ollama.Client(host=live.url)
    info = ol.show("mixed").modelinfo
    assert info["me-local.granularity"] == "word" and info["me-local.shared_vocabulary"] is False
    assert "vocabularies differ" in info["me-local.granularity_reason"]
    opts = {"num_predict": 30, "seed": 3, "temperature": 1.0}
    one = ol.chat(model="mixed", messages=HELLO, options=opts)
    assert one.done and one.eval_count == 30
    parts = list(ol.chat(model="mixed:latest", messages=HELLO, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == one.message.content
    gen = ol.generate(model="mixed", prompt="The quick brown fox", raw=True, options=opts, logprobs=True)
    assert gen.logprobs is not None and "".join(lp.token for lp in gen.logprobs) == gen.response
    # the client keeps only Ollama's own fields; the member of each token is me-local's extension
    body = httpx.post(live.url + "/api/generate", json={"model": "mixed", "prompt": "The quick brown fox", "raw": True,
                                                        "stream": False, "options": opts, "logprobs": True}).json()
    assert body["response"] == gen.response
    assert {lp["member"] for lp in body["logprobs"]} == {"bpe", "spm"}


def test_ensemble_extension_edges(live, oa):
    # a member model has no granularity to choose
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="mixed/spm", prompt="Hi", max_tokens=2,
                              extra_body={"ensemble": {"granularity": "word"}})
    assert "ensemble.granularity" in e.value.message
    # granularity belongs to mode me only
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="mixed", prompt="Hi", max_tokens=2,
                              extra_body={"ensemble": {"mode": "single", "granularity": "word"}})
    assert "granularity is what mode me draws a member for" in e.value.message
    # naming a member runs it alone: a token-id prompt in its own vocabulary is fine, and echo scores that member
    body = {"model": "mixed", "prompt": [281, 278], "echo": True, "logprobs": 0, "max_tokens": 0,
            "ensemble": {"member": "spm"}}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"] == [" Hello", " world"]
    # with echo, the limit in force is max_completion_tokens when both are given
    r = httpx.post(live.url + "/v1/completions", timeout=60, json={
        "model": "mixed", "prompt": "Hello", "echo": True, "logprobs": 0, "max_tokens": 0,
        "max_completion_tokens": 3, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
