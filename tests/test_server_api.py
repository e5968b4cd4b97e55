"""Both APIs end to end on a real app (aiohttp's test server on a free loopback
port) with real tiny GGUF models: exact frames, texts, usage and logprobs. Tests
that generate nothing (health, model lists) run on fake members instead."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from me_local.core import DoneEvent, SamplingParams, TokenEvent
from me_local.engine import Request
from me_local.errors import ModelLoadError
from me_local.server import ServerState, create_app

from .server_helpers import (
    async_wait_until,
    engine_loader,
    fake_engine_loader,
    metric,
    ndjson_lines,
    parse_metrics,
    sse_json,
    write_tiny_config,
)

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def config(tmp_path, tiny_models):
    return write_tiny_config(tmp_path, tiny_models)


@pytest.fixture
def make_server(aiohttp_client, config):
    async def make(loader=None, policy=None, wait=True, state=None):
        state = state or ServerState(loader or engine_loader(config), policy)
        client = await aiohttp_client(create_app(state))
        if wait:
            await state.wait_loaded()
        return client, state

    return make


@pytest.fixture
async def server(make_server):
    return await make_server()


@pytest.fixture
async def fake_server(make_server, config):
    """The same ensembles on fake members: for tests that generate nothing."""
    return await make_server(loader=fake_engine_loader(config))


async def post(client, path, body):
    resp = await client.post(path, json=body)
    return resp.status, await resp.read()


def prompt_len(state, ensemble, messages=None, prompt=None):
    member = state.engine.ensemble(ensemble).members[0]
    return len(member.chat_prompt(messages) if messages is not None else member.raw_prompt(prompt))


# --------------------------------------------------------------------------- health and model lists


async def test_health_root_and_version(fake_server):
    client, _ = fake_server
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["ensembles"]["pair"] == {"slots": 2, "busy_slots": 0, "queued": 0}
    resp = await client.get("/")
    assert (resp.status, await resp.text()) == (200, "me-local is running")
    assert (await (await client.get("/api/version")).json())["me_local"] == "0.1.0"


async def test_health_is_503_while_loading_and_requests_wait_for_nothing(make_server, config):
    gate = threading.Event()
    load = fake_engine_loader(config)

    def slow_load():
        gate.wait(30)
        return load()

    client, state = await make_server(loader=slow_load, wait=False)
    resp = await client.get("/health")
    assert (resp.status, await resp.json()) == (503, {"status": "loading"})
    resp = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO})
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "loading"
    resp = await client.post("/api/chat", json={"model": "tiny", "messages": HELLO})
    assert resp.status == 503 and "loading" in (await resp.json())["error"]
    gate.set()
    await state.wait_loaded()
    assert (await client.get("/health")).status == 200


async def test_a_failed_load_is_reported_by_health(make_server):
    def broken():
        raise ModelLoadError("llama.cpp could not load 'x.gguf'")

    client, _ = await make_server(loader=broken)
    resp = await client.get("/health")
    assert resp.status == 503
    assert await resp.json() == {"status": "failed", "error": "llama.cpp could not load 'x.gguf'"}
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 503 and "x.gguf" in (await resp.json())["error"]["message"]


async def test_models_lists_ensembles_and_members(fake_server):
    client, _ = fake_server
    body = await (await client.get("/v1/models")).json()
    ids = [m["id"] for m in body["data"]]
    assert ids == ["tiny", "tiny/one", "tiny/two", "tiny/three", "pair", "pair/one", "pair/two", "solo", "solo/one",
                   "duo", "duo/one", "short", "short/one"]
    pair = body["data"][4]
    assert pair["object"] == "model" and pair["owned_by"] == "me-local"
    assert pair["me_local"]["members"] == [{"name": "one", "weight": 0.5}, {"name": "two", "weight": 0.5}]
    assert pair["me_local"]["parallel"] == 2 and body["data"][0]["me_local"]["default"] is True
    one = await (await client.get("/v1/models/pair/one")).json()
    assert one["id"] == "pair/one" and one["me_local"]["kind"] == "member"
    assert (await client.get("/v1/models/pair/zz")).status == 404


async def test_ollama_tags_show_ps(fake_server, tiny_models):
    client, _ = fake_server
    tags = await (await client.get("/api/tags")).json()
    names = [m["name"] for m in tags["models"]]
    assert names[:4] == ["tiny", "tiny/one", "tiny/two", "tiny/three"]
    tiny = tags["models"][0]
    sizes = sum(tiny_models[k].stat().st_size for k in ("a1", "a2", "a3"))
    assert tiny["size"] == sizes and tiny["model"] == "tiny" and len(tiny["digest"]) == 64
    assert tiny["details"]["format"] == "gguf"
    show = await (await client.post("/api/show", json={"model": "pair:latest"})).json()
    assert show["model_info"]["me-local.context_length"] == 256
    assert show["model_info"]["me-local.members"] == ["one", "two"]
    assert "temperature 0.8" in show["parameters"] and "num_predict 16" in show["parameters"]
    ps = await (await client.get("/api/ps")).json()
    assert {m["name"] for m in ps["models"]} == set(names)
    assert next(m for m in ps["models"] if m["name"] == "short")["context_length"] == 32


# --------------------------------------------------------------------------- OpenAI chat


async def test_chat_stream_frames_usage_and_same_text_as_non_streaming(server):
    client, state = server
    body = {"model": "pair", "messages": HELLO, "max_tokens": 6, "seed": 11, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = sse_json(await resp.read())
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert len({e["created"] for e in events}) == 1
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "pair" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *middle, finish, usage_chunk = events[1:]
    assert all(e["choices"][0]["finish_reason"] is None and e["usage"] is None for e in middle)
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    n_prompt = prompt_len(state, "pair", HELLO)
    assert usage["prompt_tokens"] == n_prompt and usage["completion_tokens"] == 6
    assert usage["total_tokens"] == n_prompt + 6
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    ext = usage["me_local"]
    assert ext["mode"] == "me" and ext["seed"] == 11 and ext["finish_reason"] == "length"
    assert sum(m["selected"] for m in ext["members"]) == 6
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in middle)

    resp = await client.post("/v1/chat/completions", json=dict(body, stream=False))
    full = await resp.json()
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    assert full["choices"][0]["message"] == {"role": "assistant", "content": streamed}
    assert full["choices"][0]["finish_reason"] == "length"
    # the same conversation again: its prompt comes from the slot's cache
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    # the seed fixes the member schedule too
    assert [m["selected"] for m in full["usage"]["me_local"]["members"]] == [m["selected"] for m in ext["members"]]


async def test_next_chat_turn_evaluates_only_its_new_tokens(server):
    client, state = server
    body = {"model": "duo", "messages": HELLO, "max_tokens": 5, "seed": 3}
    first = await (await client.post("/v1/chat/completions", json=body)).json()
    answer = first["choices"][0]["message"]["content"]
    turn2 = [*HELLO, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = await (await client.post("/v1/chat/completions", json=dict(body, messages=turn2))).json()
    n1, n2 = prompt_len(state, "duo", HELLO), prompt_len(state, "duo", turn2)
    assert second["usage"]["prompt_tokens"] == n2
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert n1 <= cached < n2
    member = second["usage"]["me_local"]["members"][0]
    assert member["prompt_tokens"] == n2 - cached  # only the new tokens were evaluated


async def test_chat_logprobs_match_the_engine_and_carry_id_and_member(server):
    client, state = server
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 8, "seed": 5, "temperature": 0.9, "top_k": 0,
            "top_p": 1.0, "min_p": 0.0, "logprobs": True, "top_logprobs": 3}
    full = await (await client.post("/v1/chat/completions", json=body)).json()
    content = full["choices"][0]["logprobs"]["content"]
    assert len(content) == full["usage"]["completion_tokens"] == 8
    engine = state.engine
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, max_tokens=8, seed=5, logprobs=True,
                            top_logprobs=3)
    events = await asyncio.to_thread(lambda: list(engine.generate(Request("tiny", messages=HELLO, params=params))))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [c["id"] for c in content] == [t.id for t in tokens]
    assert [c["member"] for c in content] == [t.member for t in tokens]
    assert {c["member"] for c in content} <= {"one", "two", "three"}
    member0 = engine.ensemble("tiny").members[0]
    for c, t in zip(content, tokens):
        assert c["logprob"] == pytest.approx(t.logprob, abs=1e-3)
        assert bytes(c["bytes"]) == member0.token_bytes(c["id"]) == t.piece
        assert len(c["top_logprobs"]) == 3
        tops = [x["logprob"] for x in c["top_logprobs"]]
        assert tops == sorted(tops, reverse=True) and c["logprob"] <= tops[0] + 1e-9
        assert all(bytes(x["bytes"]) == member0.token_bytes(x["id"]) for x in c["top_logprobs"])
    assert full["choices"][0]["message"]["content"] == "".join(t.text for t in tokens) + events[-1].text


async def test_ensemble_extension_and_member_models(server):
    client, _ = server
    base = {"messages": HELLO, "max_tokens": 6, "seed": 2, "logprobs": True}

    async def members(body):
        full = await (await client.post("/v1/chat/completions", json=dict(base, **body))).json()
        return [c["member"] for c in full["choices"][0]["logprobs"]["content"]], full["usage"]["me_local"]

    who, ext = await members({"model": "tiny", "ensemble": {"mode": "single", "member": "two"}})
    assert who == ["two"] * 6 and ext["mode"] == "single"
    who, ext = await members({"model": "tiny", "ensemble": {"weights": {"one": 0, "three": 0}}})
    assert who == ["two"] * 6 and ext["mode"] == "me"
    who, _ = await members({"model": "tiny/three"})
    assert who == ["three"] * 6
    who, ext = await members({"model": "tiny", "ensemble": {"mode": "ce"}})
    assert who == [None] * 6 and ext["mode"] == "ce"
    assert [m["selected"] for m in ext["members"]] == [6, 6, 6]


async def test_stop_strings_end_the_answer_without_being_sent(server):
    client, _ = server
    body = {"model": "pair", "messages": HELLO, "max_tokens": 12, "seed": 11}
    text = (await (await client.post("/v1/chat/completions", json=body)).json())["choices"][0]["message"]["content"]
    stop = text[4:6]
    assert stop and stop not in text[:4]
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json=dict(body, stop=[stop], stream=stream))
        if stream:
            events = sse_json(await resp.read())
            got = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            reason = events[-1]["choices"][0]["finish_reason"]
        else:
            full = await resp.json()
            got, reason = full["choices"][0]["message"]["content"], full["choices"][0]["finish_reason"]
        assert (got, reason) == (text[:4], "stop")


# --------------------------------------------------------------------------- OpenAI completions


async def test_completions_stream_and_logprobs(server):
    client, state = server
    body = {"model": "pair/one", "prompt": "Hello world, the", "max_tokens": 5, "seed": 4, "logprobs": 2}
    full = await (await client.post("/v1/completions", json=body)).json()
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")
    choice = full["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_ids"]) == len(lp["token_logprobs"]) == 5
    assert lp["members"] == ["one"] * 5
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0
    assert full["usage"]["prompt_tokens"] == prompt_len(state, "pair", prompt="Hello world, the")
    assert full["usage"]["me_local"]["mode"] == "single"

    resp = await client.post("/v1/completions", json=dict(body, stream=True))
    events = sse_json(await resp.read())
    assert all(e["object"] == "text_completion" for e in events)
    assert len({e["id"] for e in events}) == 1
    token_chunks = [e for e in events if e["choices"][0]["logprobs"]]
    assert [e["choices"][0]["logprobs"]["token_ids"][0] for e in token_chunks] == lp["token_ids"]
    assert [e["choices"][0]["logprobs"]["text_offset"][0] for e in token_chunks] == lp["text_offset"]
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    assert events[-1]["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
    assert "usage" not in events[-1]  # no include_usage: no usage field at all


# --------------------------------------------------------------------------- Ollama


async def test_ollama_chat_stream_and_non_stream(server):
    client, state = server
    body = {"model": "pair:latest", "messages": HELLO, "options": {"num_predict": 7, "seed": 9, "temperature": 0.7}}
    resp = await client.post("/api/chat", json=body)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/x-ndjson"
    lines = ndjson_lines(await resp.read())
    *parts, final = lines
    assert all(p["done"] is False and p["model"] == "pair:latest" and p["message"]["role"] == "assistant"
               for p in parts)
    assert final["done"] is True and final["done_reason"] == "length" and final["message"]["content"] == ""
    assert final["eval_count"] == 7 and final["prompt_eval_count"] == prompt_len(state, "pair", HELLO)
    assert final["total_duration"] >= final["eval_duration"] > 0 and isinstance(final["total_duration"], int)
    assert final["created_at"].endswith("Z")
    streamed = "".join(p["message"]["content"] for p in parts)
    one = await (await client.post("/api/chat", json=dict(body, stream=False))).json()
    assert one["message"] == {"role": "assistant", "content": streamed} and one["done"] is True
    # the same request through the OpenAI route gives the same text
    oa = {"model": "pair", "messages": HELLO, "max_tokens": 7, "seed": 9, "temperature": 0.7}
    full = await (await client.post("/v1/chat/completions", json=oa)).json()
    assert full["choices"][0]["message"]["content"] == streamed


async def test_ollama_generate_raw_templated_and_load(server):
    client, state = server
    body = {"model": "solo", "prompt": "Hello world", "stream": False, "options": {"num_predict": 4, "seed": 1}}
    templated = await (await client.post("/api/generate", json=body)).json()
    raw = await (await client.post("/api/generate", json=dict(body, raw=True))).json()
    assert templated["prompt_eval_count"] == prompt_len(state, "solo", [{"role": "user", "content": "Hello world"}])
    assert raw["prompt_eval_count"] == prompt_len(state, "solo", prompt="Hello world")
    assert raw["eval_count"] == 4 and raw["done_reason"] == "length"
    with_system = await (await client.post("/api/generate", json=dict(body, system="Be brief."))).json()
    assert with_system["prompt_eval_count"] > templated["prompt_eval_count"]
    load = await (await client.post("/api/generate", json={"model": "solo"})).json()
    assert load["done"] is True and load["done_reason"] == "load" and load["response"] == ""
    unload = await (await client.post("/api/chat", json={"model": "solo", "messages": [], "keep_alive": 0})).json()
    assert unload["done_reason"] == "unload"


async def test_ollama_logprobs_and_unlimited_num_predict(server):
    client, _ = server
    body = {"model": "short", "prompt": "Hi", "raw": True, "stream": False, "logprobs": True, "top_logprobs": 2,
            "options": {"num_predict": -1, "seed": 1}}
    out = await (await client.post("/api/generate", json=body)).json()
    assert out["done_reason"] == "length"  # ran until the 32-token context was full
    assert out["prompt_eval_count"] + out["eval_count"] == 32 + 1  # the last token is never evaluated
    assert len(out["logprobs"]) == out["eval_count"]
    assert all(e["member"] == "one" and len(e["top_logprobs"]) == 2 for e in out["logprobs"])


# --------------------------------------------------------------------------- metrics


async def test_metrics_count_requests_tokens_and_members(server):
    client, _ = server
    usage = []
    for seed in (1, 2):
        full = await (await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": HELLO, "max_tokens": 5, "seed": seed})).json()
        usage.append(full["usage"])
    assert (await client.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO})).status == 404
    resp = await client.get("/metrics")
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse_metrics(await resp.text())
    assert metric(samples, "me_local_requests_total", endpoint="/v1/chat/completions", method="POST",
                  status="200") == 2
    assert metric(samples, "me_local_requests_total", endpoint="/v1/chat/completions", method="POST",
                  status="404") == 1
    assert metric(samples, "me_local_tokens_generated_total", ensemble="tiny") == 10
    for i, name in enumerate(("one", "two", "three")):
        assert metric(samples, "me_local_member_selections_total", ensemble="tiny", member=name) == sum(
            u["me_local"]["members"][i]["selected"] for u in usage)
        assert metric(samples, "me_local_member_catchup_tokens_total", ensemble="tiny", member=name) == sum(
            u["me_local"]["members"][i]["catchup_tokens"] for u in usage)
    assert metric(samples, "me_local_time_to_first_token_seconds_count", ensemble="tiny") == 2
    assert metric(samples, "me_local_token_latency_seconds_count", ensemble="tiny") == 8
    assert metric(samples, "me_local_busy_slots", ensemble="tiny") == 0
    assert metric(samples, "me_local_slots", ensemble="pair") == 2
    assert metric(samples, "me_local_ready") == 1


def test_done_event_text_is_flushed_into_the_answer():
    # the flush is part of every answer: covered on real models above; here the frames' rule itself
    from me_local.server.openai import ChatFrames

    class C:
        model, include_usage, logprobs, tools = "m", False, False, None

    frames = ChatFrames(C(), "id", 1, lambda t: b"")  # type: ignore[arg-type]
    from me_local.core import GenerationStats

    out = list(frames.done(DoneEvent("length", GenerationStats("me", 1), "held")))
    assert out[0] == b'data: {"id":"id","object":"chat.completion.chunk","created":1,"model":"m","choices":' \
                     b'[{"index":0,"delta":{"content":"held"},"logprobs":null,"finish_reason":null}]}\n\n'
    assert b'"finish_reason":"length"' in out[1] and len(out) == 2


# --------------------------------------------------------------------------- access log


async def test_access_log_has_tokens_and_model_but_no_prompt_by_default(make_server, caplog):
    client, _ = await make_server()
    caplog.set_level(logging.INFO, logger="me_local.access")
    body = {"model": "pair", "messages": [{"role": "user", "content": "secret plans"}], "max_tokens": 3, "seed": 1}
    full = await (await client.post("/v1/chat/completions", json=body)).json()
    resp = await client.post("/api/generate", json={"model": "solo", "prompt": "secret plans", "stream": True,
                                                    "options": {"num_predict": 2}})
    await resp.read()

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "me_local.access"]

    await async_wait_until(lambda: len(lines()) == 2)  # a stream's line is written as its handler returns
    lines = lines()
    n = full["usage"]["prompt_tokens"]
    assert any(line.startswith(f"POST /v1/chat/completions 200 tokens={n}+3 ") and "model=pair" in line
               for line in lines), lines
    assert any(line.startswith("POST /api/generate 200 tokens=") and "+2 " in line and "model=solo" in line
               for line in lines), lines
    assert not any("secret" in line for line in lines)


async def test_access_log_shows_prompts_only_when_asked(make_server, caplog, config):
    from me_local.logs import AccessLog

    state = ServerState(engine_loader(config), access=AccessLog(log_prompts=True))
    caplog.set_level(logging.INFO, logger="me_local.access")
    client, _ = await make_server(loader=None, state=state)
    body = {"model": "pair", "messages": [{"role": "user", "content": "secret plans"}], "max_tokens": 2}
    assert (await client.post("/v1/chat/completions", json=body)).status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "me_local.access"]
    assert any('prompt="user: secret plans"' in line for line in lines), lines
