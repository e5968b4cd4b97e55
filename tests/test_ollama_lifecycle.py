"""How long ensembles stay loaded (Ollama's ``keep_alive``), what ``/api/ps`` says about them, the
``NAME:latest`` names of ``/api/tags`` and the model-management routes (``/api/pull``...): the engine
on fake members, the routes on tiny models, the resident memory an unload gives back on the real
default model, and the official ``ollama`` client and langchain-ollama against a live server."""

from __future__ import annotations

import asyncio
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import ollama
import pytest
from langchain_ollama import ChatOllama

from me_local.config import parse_config
from me_local.core import DoneEvent, SamplingParams
from me_local.engine import EmbedRequest, Engine, Request, collect
from me_local.server import ServerSettings, ServerState, create_app

from .fakes import FakeFactory
from .server_helpers import (
    LiveServer,
    ThrottledFactory,
    async_wait_until,
    engine_loader,
    ndjson_lines,
    wait_until,
    write_tiny_config,
)

HELLO = [{"role": "user", "content": "Hello there"}]

# --------------------------------------------------------------------------- the engine on fake members

CONFIG = """
ensembles:
  e:
    n_ctx: 64
    sampling: {max_tokens: 4}
    members:
      - {name: one, path: /nowhere/a.gguf}
"""


@pytest.fixture
def fake():
    factory = FakeFactory(n_ctx=None)
    engine = Engine(parse_config(CONFIG, Path("/nowhere/models.yaml")), factory)
    engine.load_all()
    yield engine, factory
    engine.close()


def run(engine: Engine, prompt: str = "hi", **kw):
    return collect(engine.generate(Request(ensemble="e", prompt=prompt, params=SamplingParams(seed=1, max_tokens=4),
                                           **kw)))


def test_unloading_waits_for_the_requests_in_flight_while_new_ones_load_it_anew(fake):
    engine, factory = fake
    old = engine.loaded["e"]
    factory.gate, factory.held = threading.Event(), {"held"}
    events: list = []
    run1 = engine.start(Request(ensemble="e", prompt="held", params=SamplingParams(seed=1, max_tokens=4)),
                        events.append)
    wait_until(lambda: "held" in factory.tokenized)  # admitted, being planned
    unload = threading.Thread(target=engine.unload, args=("e",))
    unload.start()
    wait_until(lambda: old.closing)
    assert unload.is_alive() and "e" not in engine.loaded and not old.members[0].closed
    _, done = run(engine, "other")  # a new request loads the ensemble anew and is served at once
    assert done.finish_reason == "length" and engine.loaded["e"] is not old
    factory.gate.set()
    assert run1.finished.wait(30) and isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "length"
    unload.join(30)
    assert not unload.is_alive() and old.members[0].closed and not engine.loaded["e"].members[0].closed


def test_keep_alive_zero_unloads_once_idle_and_the_next_request_loads_it_again(fake):
    engine, _ = fake
    old = engine.loaded["e"]
    _, done = run(engine, keep_alive=0)
    assert done.finish_reason == "length"
    wait_until(lambda: "e" not in engine.loaded)
    assert old.members[0].closed
    _, done = run(engine)  # no keep_alive: loaded again, and kept for ever
    loaded = engine.loaded["e"]
    assert done.finish_reason == "length" and loaded is not old
    assert loaded.keep_alive is None and loaded.deadline() is None and loaded.expires_in() is None


def test_a_keep_alive_counts_from_the_last_use_and_each_request_sets_its_own(fake):
    engine, _ = fake
    run(engine, keep_alive=300)
    loaded = engine.loaded["e"]
    assert 299 < loaded.expires_in() <= 300
    run(engine)  # a request without keep_alive: for ever again (Ollama's rule: each request gives its own)
    assert loaded.expires_in() is None
    with engine.hold("e") as held:  # tokenizing outside a request holds it too
        assert held is loaded
        run(engine, keep_alive=0.05)
        assert loaded.deadline() is None and "e" in engine.loaded
    wait_until(lambda: "e" not in engine.loaded)  # once the hold ends, its 50 ms run out
    assert loaded.members[0].closed


def test_unloading_waits_for_an_embedding_in_flight_and_closes_its_context(fake):
    """An embedding holds its ensemble as a request does: an unload meanwhile waits for it (closing the
    embedding context under it crashed the daemon), then frees the embedding context with the slots."""
    engine, factory = fake
    old = engine.loaded["e"]
    factory.embed_gate = threading.Event()
    results: list = []
    embedding = threading.Thread(target=lambda: results.append(engine.embed(EmbedRequest(ensemble="e", texts=["hi"]))))
    embedding.start()
    wait_until(lambda: bool(factory.embedders) and factory.embedders[0].embedding.is_set())
    [held] = factory.embedders
    unload = threading.Thread(target=engine.unload, args=("e",))
    unload.start()
    wait_until(lambda: old.closing)
    assert unload.is_alive() and not held.closed and "e" not in engine.loaded
    factory.embed_gate = None
    again = engine.embed(EmbedRequest(ensemble="e", texts=["hi"]))  # meanwhile: loaded anew, answered at once
    assert engine.loaded["e"] is not old and len(factory.embedders) == 2
    held.gate.set()
    embedding.join(30)
    unload.join(30)
    assert not unload.is_alive() and held.closed and not factory.embedders[1].closed
    np.testing.assert_array_equal(results[0].vectors, again.vectors)


def test_an_embeddings_keep_alive_is_honoured_as_a_requests(fake):
    engine, factory = fake
    engine.embed(EmbedRequest(ensemble="e", texts=["hi"], keep_alive=300))
    loaded = engine.loaded["e"]
    assert 299 < loaded.expires_in() <= 300
    engine.embed(EmbedRequest(ensemble="e", texts=["hi"], keep_alive=0))
    wait_until(lambda: factory.embedders[0].closed)  # the reaper closes it once out of the table
    assert loaded.members[0].closed and "e" not in engine.loaded
    result = engine.embed(EmbedRequest(ensemble="e", texts=["hi"]))  # loaded again, and kept for ever
    assert result.vectors.shape == (1, 8) and engine.loaded["e"].expires_in() is None


# --------------------------------------------------------------------------- the routes, tiny models


@pytest.fixture
def make_server(aiohttp_client, tmp_path, tiny_models):
    async def make(factory=None):
        config = write_tiny_config(tmp_path, tiny_models)
        state = ServerState(engine_loader(config, factory))
        client = await aiohttp_client(create_app(state))
        await state.wait_loaded()
        return client, state

    return make


async def ps(client) -> dict[str, dict]:
    return {m["name"]: m for m in (await (await client.get("/api/ps")).json())["models"]}


def expires(entry: dict) -> datetime:
    return datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))


async def test_ps_shows_when_keep_alive_unloads_and_keep_alive_zero_unloads_at_once(make_server):
    client, _ = await make_server()
    body = {"model": "solo", "prompt": "Hi", "raw": True, "stream": False, "options": {"num_predict": 2, "seed": 1}}
    listed = await ps(client)
    assert set(listed) == {"tiny:latest", "pair:latest", "solo:latest", "duo:latest", "short:latest"}
    assert expires(listed["solo:latest"]).year > 2300  # loaded at start, kept for ever
    assert (await client.post("/api/generate", json=dict(body, keep_alive="5m"))).status == 200
    at = expires((await ps(client))["solo:latest"])
    now = datetime.now(timezone.utc)
    assert now + timedelta(seconds=290) < at <= now + timedelta(seconds=300)
    assert (await client.post("/api/generate", json=dict(body, keep_alive=-1))).status == 200
    assert expires((await ps(client))["solo:latest"]).year > 2300
    unload = await (await client.post("/api/generate", json={"model": "solo", "keep_alive": 0})).json()
    assert unload["done_reason"] == "unload" and "solo:latest" not in await ps(client)
    tokens = await (await client.post("/tokenize", json={"model": "solo", "content": "Hi"})).json()
    assert tokens["tokens"] and "solo:latest" in await ps(client)  # its tokenizer loads it again
    await client.post("/api/generate", json={"model": "solo", "keep_alive": 0})
    out = await (await client.post("/api/generate", json=body)).json()  # and so does a request
    assert out["done"] is True and out["eval_count"] == 2 and "solo:latest" in await ps(client)
    load = await client.post("/api/chat", json={"model": "pair:latest", "messages": [], "keep_alive": "1h"})
    assert (await load.json())["done_reason"] == "load"
    assert timedelta(minutes=59) < expires((await ps(client))["pair:latest"]) - now <= timedelta(minutes=61)
    bad = await client.post("/api/chat", json={"model": "pair", "messages": HELLO, "keep_alive": "5 minutes"})
    assert bad.status == 400 and "`keep_alive` must be a duration such as" in (await bad.json())["error"]


async def test_a_request_with_keep_alive_zero_answers_then_unloads(make_server):
    client, _ = await make_server()
    body = {"model": "duo", "messages": HELLO, "stream": False, "keep_alive": 0, "options": {"num_predict": 3}}
    out = await (await client.post("/api/chat", json=body)).json()
    assert out["done"] is True and out["done_reason"] in ("length", "stop")
    await async_wait_until(lambda: _absent(client, "duo:latest"))


async def test_an_embedding_with_keep_alive_zero_answers_then_unloads_and_the_next_one_loads_it(make_server):
    client, state = await make_server()
    old = state.engine.loaded["duo"]
    body = {"model": "duo", "input": ["Hello there", "General Kenobi"], "keep_alive": 0}
    first = await (await client.post("/api/embed", json=body)).json()
    assert len(first["embeddings"]) == 2
    await async_wait_until(lambda: _absent(client, "duo:latest"))
    await async_wait_until(lambda: not old.embedders)  # its embedding contexts are closed with its slots
    assert old.closing
    again = await client.post("/api/embeddings", json={"model": "duo/one", "prompt": "Hello there", "keep_alive": "1h"})
    assert again.status == 200 and len((await again.json())["embedding"]) > 0
    assert "duo:latest" in await ps(client) and 3599 < state.engine.loaded["duo"].expires_in() <= 3600
    bad = await client.post("/api/embed", json=dict(body, keep_alive="soon"))
    assert bad.status == 400 and "`keep_alive` must be a duration such as" in (await bad.json())["error"]


async def test_ps_counts_the_embedding_contexts_in_the_size(make_server):
    client, state = await make_server()
    before = (await ps(client))["duo:latest"]["size"]
    assert (await client.post("/api/embed", json={"model": "duo", "input": "Hello there"})).status == 200
    loaded = state.engine.loaded["duo"]
    [embedder] = loaded.embedders.values()
    assert embedder.memory_bytes > 0 and embedder.memory_bytes == loaded.members[0].memory_bytes  # both: 256 f16 cells
    assert (await ps(client))["duo:latest"]["size"] == before + embedder.memory_bytes


async def test_show_leaves_an_unloaded_model_unloaded(make_server):
    """Continue and Open WebUI ask /api/show about every model: an ensemble that keep_alive unloaded is read
    for it and unloaded again (it was loaded for ever, its memory back for good), and says the same."""
    client, _ = await make_server()
    before = await (await client.post("/api/show", json={"model": "duo"})).json()
    await client.post("/api/generate", json={"model": "duo", "keep_alive": 0})
    assert "duo:latest" not in await ps(client)
    after = await (await client.post("/api/show", json={"model": "duo"})).json()
    assert after["capabilities"] == before["capabilities"] and after["template"] == before["template"]
    assert after["model_info"] == before["model_info"]
    await async_wait_until(lambda: _absent(client, "duo:latest"))
    shown = await (await client.post("/api/show", json={"model": "pair"})).json()  # a loaded one stays loaded
    assert shown["capabilities"][0] == "completion" and "pair:latest" in await ps(client)


async def _absent(client, name: str) -> bool:
    return name not in await ps(client)


async def test_unloading_waits_for_a_stream_in_flight(make_server):
    factory = ThrottledFactory()
    throttle = factory.throttle("solo", 0)
    throttle.allow(1)  # the prompt; then the stream waits for the next permit
    client, state = await make_server(factory)
    loaded = state.engine.loaded["solo"]
    body = {"model": "solo", "messages": HELLO, "options": {"num_predict": 4, "seed": 1}}
    stream = asyncio.ensure_future(client.post("/api/chat", json=body))
    await async_wait_until(lambda: throttle.waiting.is_set() and loaded.busy_slots == 1)
    unload = asyncio.ensure_future(client.post("/api/chat", json={"model": "solo", "messages": [], "keep_alive": 0}))
    await async_wait_until(lambda: loaded.closing)
    assert not unload.done()  # the stream (its headers sent with its first token) holds it
    throttle.open()
    lines = ndjson_lines(await (await stream).read())
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] >= 1  # it finished on the ensemble it began on
    assert (await (await unload).json())["done_reason"] == "unload"
    assert "solo:latest" not in await ps(client)
    assert loaded.members[0].memory_bytes == 0  # its contexts are closed
    factory.throttle("solo", 1).open()  # the next load's slot
    out = await (await client.post("/api/chat", json=dict(body, stream=False))).json()
    assert out["done"] is True


async def test_model_management_routes_say_models_come_from_models_yaml(make_server):
    client, state = await make_server()
    for name in ("tiny", "tiny:latest", "pair/one:latest"):
        resp = await client.post("/api/pull", json={"model": name, "stream": False})
        assert resp.status == 200 and await resp.json() == {"status": "success"}
    resp = await client.post("/api/pull", json={"model": "llama3.2"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error.startswith("me-local does not download models: 'llama3.2' is not one of its models (tiny:latest, ")
    assert f"put the GGUF file in an ensemble of {state.engine.config.path}" in error
    for body, fragment in (({}, "`model` is required: the name of a model in models.yaml (tiny:latest, "),
                           ({"model": 5}, "`model` must be a string, got number")):
        resp = await client.post("/api/pull", json=body)
        assert resp.status == 400 and (await resp.json())["error"].startswith(fragment), body
    for method, path in (("POST", "/api/push"), ("POST", "/api/create"), ("POST", "/api/copy"),
                         ("DELETE", "/api/delete")):
        resp = await client.request(method, path, json={"model": "tiny"})
        assert resp.status == 400, path
        assert "me-local's models come from models.yaml" in (await resp.json())["error"]


# --------------------------------------------------------------------------- resident memory, the real model

SMOLLM_CONFIG = """
ensembles:
  first:
    n_ctx: 512
    members:
      - {{name: smollm, path: {path}, n_threads: 1}}
  second:
    n_ctx: 512
    members:
      - {{name: smollm, path: {path}, n_threads: 1}}
"""


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.smollm
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
async def test_keep_alive_zero_frees_the_memory_and_the_next_request_works(aiohttp_client, tmp_path, smollm_path):
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(SMOLLM_CONFIG.format(path=smollm_path)))
    state = ServerState(engine_loader(path))
    client = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    store = state.engine._factory.store
    body = {"prompt": "Hello", "raw": True, "stream": False, "options": {"num_predict": 2, "seed": 1}}
    for name in ("first", "second"):
        assert (await client.post("/api/generate", json=dict(body, model=name))).status == 200
    assert len(store) == 1  # both ensembles share one load of the file
    before = resident_mib()
    out = await (await client.post("/api/generate", json={"model": "first", "keep_alive": 0})).json()
    assert out["done_reason"] == "unload"
    only_context = before - resident_mib()
    assert len(store) == 1 and only_context < 40  # the weights stay: the other ensemble uses them
    before = resident_mib()
    await client.post("/api/generate", json={"model": "second", "keep_alive": 0})
    freed = before - resident_mib()
    assert len(store) == 0 and freed > 80, freed  # 92 MiB of weights and an 11 MiB KV cache
    out = await (await client.post("/api/generate", json=dict(body, model="second"))).json()
    assert out["done"] is True and out["eval_count"] == 2 and out["response"]
    assert set(await ps(client)) == {"second:latest"}


# --------------------------------------------------------------------------- real clients

CLIENT_CONFIG = """
ensembles:
  default:
    n_ctx: 256
    sampling: {{max_tokens: 6}}
    members:
      - {{name: one, path: {a1}, n_threads: 1}}
      - {{name: two, path: {a2}, n_threads: 1}}
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("lifecycle") / "models.yaml"
    path.write_text(textwrap.dedent(CLIENT_CONFIG.format(**tiny_models)))
    server = LiveServer(ServerSettings(port=0), engine_loader(path)).start()
    yield server
    server.stop()


def test_langchain_ollama_validates_the_ensemble_by_name(live):
    for name in ("default:latest", "default"):
        chat = ChatOllama(model=name, base_url=live.url, validate_model_on_init=True, num_predict=4, seed=1)
        reply = chat.invoke("Hello there")
        assert isinstance(reply.content, str) and reply.response_metadata["done"] is True
    with pytest.raises(ValueError, match="Model `llama3` not found"):
        ChatOllama(model="llama3", base_url=live.url, validate_model_on_init=True)


def test_the_ollama_client_lists_ps_pulls_and_unloads(live):
    ol = ollama.Client(host=live.url)
    assert [m.model for m in ol.list().models] == ["default:latest", "default/one:latest", "default/two:latest"]
    [loaded] = ol.ps().models
    assert loaded.model == "default:latest" and loaded.size > 0 and loaded.size_vram == 0
    assert loaded.context_length == 256 and loaded.expires_at.year > 2300
    assert ol.pull("default").status == "success"
    with pytest.raises(ollama.ResponseError, match="me-local does not download models") as e:
        ol.pull("llama3")
    assert e.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match="me-local does not delete models"):
        ol.delete("default")
    reply = ol.generate(model="default", prompt="Hi", keep_alive=0, options={"num_predict": 2})
    assert reply.done
    wait_until(lambda: ol.ps().models == [])
    assert ol.chat(model="default:latest", messages=HELLO, keep_alive="10m").done  # loaded again
    [loaded] = ol.ps().models
    assert loaded.expires_at - datetime.now(timezone.utc) > timedelta(minutes=9)
