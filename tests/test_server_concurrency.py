"""Slots, the queue, cancellation and shutdown, made deterministic by members
that evaluate only when the test grants a permit (see server_helpers.Throttle)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from me_local.server import ServerSettings, ServerState, create_app
from me_local.server import state as app_module

from .server_helpers import (
    LiveServer,
    ThrottledFactory,
    async_wait_until,
    engine_loader,
    metric,
    parse_metrics,
    sse_json,
    wait_until,
    write_tiny_config,
)

HELLO = [{"role": "user", "content": "Hello there"}]
CHAT = "/v1/chat/completions"


@pytest.fixture
def make_server(aiohttp_client, tmp_path, tiny_models):
    async def make(factory=None, max_queue=16):
        config = write_tiny_config(tmp_path, tiny_models, max_queue=max_queue)
        state = ServerState(engine_loader(config, factory))
        client = await aiohttp_client(create_app(state))
        await state.wait_loaded()
        return client, state

    return make


async def metrics(client):
    return parse_metrics(await (await client.get("/metrics")).text())


def stream_body(model, content, max_tokens, seed, **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, **kw}


async def test_eight_concurrent_streams_on_two_slots(make_server):
    client, state = await make_server()

    async def one(i):
        resp = await client.post(CHAT, json=stream_body("pair", f"Question number {i}", 12, 100 + i))
        assert resp.status == 200
        return sse_json(await resp.read())

    results = await asyncio.gather(*(one(i) for i in range(8)))
    ens = state.engine.ensemble("pair")
    assert len(ens._slots) == 2 and ens.busy_slots == 0 and ens.waiting == 0
    for i, events in enumerate(results):
        chunks = [e for e in events if e["choices"] and e["choices"][0]["logprobs"]]
        usage = events[-1]["usage"]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert usage["completion_tokens"] == len(chunks) == 12
        messages = [{"role": "user", "content": f"Question number {i}"}]
        assert usage["prompt_tokens"] == len(ens.members[0].chat_prompt(messages))
        # the same request alone, after the rush, gives the same text (the seed fixes it)
        alone = await client.post(CHAT, json={"model": "pair", "messages": messages, "max_tokens": 12,
                                              "seed": 100 + i})
        assert (await alone.json())["choices"][0]["message"]["content"] == text
    samples = await metrics(client)
    assert metric(samples, "me_local_tokens_generated_total", ensemble="pair") == 16 * 12


async def test_requests_on_different_slots_progress_independently(make_server):
    factory = ThrottledFactory()
    client, state = await make_server(factory)
    throttles = [factory.throttle("duo", 0), factory.throttle("duo", 1)]
    task_a = asyncio.ensure_future(client.post(CHAT, json=stream_body("duo", "First question", 5, 1)))
    await async_wait_until(lambda: any(t.waiting.is_set() for t in throttles))
    hold_a = next(t for t in throttles if t.waiting.is_set())
    other = next(t for t in throttles if t is not hold_a)
    hold_a.allow(2)  # A gets two tokens, then waits for a permit that does not come yet
    resp_a = await task_a
    got = 0
    while got < 2:
        got += b'"logprobs":{"content"' in await resp_a.content.readuntil(b"\n\n")
    (stream_a,) = state.streams
    # B takes the other slot and runs to its end while A is still held
    other.open()
    resp_b = await client.post(CHAT, json=stream_body("duo", "Second question", 5, 2))
    assert sse_json(await resp_b.read())[-1]["usage"]["completion_tokens"] == 5
    assert not stream_a.ended and hold_a.waiting.is_set()
    hold_a.open()
    rest = sse_json(b"data: {}\n\n" + await resp_a.read())
    assert rest[-1]["usage"]["completion_tokens"] == 5


async def test_queue_overflow_gets_503_with_retry_after(make_server):
    factory = ThrottledFactory()
    client, state = await make_server(factory, max_queue=1)
    ens = state.engine.ensemble("pair")
    tasks = [asyncio.ensure_future(client.post(CHAT, json=stream_body("pair", f"q{i}", 3, i))) for i in range(3)]
    await async_wait_until(lambda: ens.busy_slots == 2 and ens.waiting == 1)
    resp = await client.post(CHAT, json=stream_body("pair", "one too many", 3, 9))
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    err = (await resp.json())["error"]
    assert err["code"] == "queue_full" and "busy" in err["message"]
    resp = await client.post("/api/chat", json={"model": "pair", "messages": HELLO})
    assert resp.status == 503 and "busy" in (await resp.json())["error"]
    factory.open_all()
    for t in tasks:
        resp = await t
        assert resp.status == 200
        assert sse_json(await resp.read())[-1]["usage"]["completion_tokens"] == 3
    samples = await metrics(client)
    assert metric(samples, "me_local_requests_total", endpoint=CHAT, method="POST", status="503") == 1


async def test_queued_requests_start_in_arrival_order(make_server):
    factory = ThrottledFactory()
    client, state = await make_server(factory)
    ens = state.engine.ensemble("solo")
    throttle = factory.throttle("solo", 0)

    def chat(content):
        return client.post(CHAT, json={"model": "solo", "messages": [{"role": "user", "content": content}],
                                       "max_tokens": 1, "seed": 1})

    holder = asyncio.ensure_future(chat("Hold the slot"))
    await async_wait_until(throttle.waiting.is_set)  # the holder is in its slot, held at its prompt
    words = ["Walrus", "Zebra", "Ibex", "Quokka", "Narwhal"]
    tasks = []
    for n, word in enumerate(words, 1):
        tasks.append(asyncio.ensure_future(chat(word)))
        await async_wait_until(lambda n=n: ens.waiting == n)  # in line before the next one arrives
    throttle.open()
    assert [(await t).status for t in [holder, *tasks]] == [200] * 6
    # the order in which their prompts reached the model
    texts = [ens.members[0].model.detokenize(tokens) for tokens in factory.evaluated]
    first = [next(i for i, text in enumerate(texts) if word in text) for word in words]
    assert first == sorted(first)
    assert ens.waiting == 0 and ens.busy_slots == 0


async def test_a_request_ended_by_shutdown_before_its_first_token_is_503_with_retry_after(make_server):
    factory = ThrottledFactory()
    throttle = factory.throttle("solo", 0)
    client, state = await make_server(factory)
    for path in (CHAT, "/api/chat"):
        body = stream_body("solo", "Hi", 4, 1) if path == CHAT else {
            "model": "solo", "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 4, "seed": 1}}
        task = asyncio.ensure_future(client.post(path, json=body))
        await async_wait_until(lambda: throttle.waiting.is_set() and len(state.streams) == 1)
        stopping = asyncio.ensure_future(state.stop_streams("shutdown"))
        await async_wait_until(lambda: state.status == "stopping")  # the stream is cancelled now
        throttle.allow(1)  # the prompt chunk in progress ends, then the cancellation is seen
        resp = await task
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        body = await resp.json()
        message = body["error"] if path == "/api/chat" else body["error"]["message"]
        assert message == "me-local is shutting down"
        await stopping
        state.status = "ready"  # serve the second API's request


async def test_health_and_metrics_answer_while_every_slot_is_busy(make_server):
    factory = ThrottledFactory()
    client, _ = await make_server(factory)
    tasks = [asyncio.ensure_future(client.post(CHAT, json=stream_body("pair", f"q{i}", 3, i))) for i in range(2)]
    await async_wait_until(lambda: all(factory.throttle("pair", s).waiting.is_set() for s in (0, 1)))
    resp = await client.get("/health")
    assert resp.status == 200
    assert (await resp.json())["ensembles"]["pair"] == {"slots": 2, "busy_slots": 2, "queued": 0}
    samples = await metrics(client)
    assert metric(samples, "me_local_busy_slots", ensemble="pair") == 2
    assert metric(samples, "me_local_streams_in_flight") == 2
    factory.open_all()
    assert [(await t).status for t in tasks] == [200, 200]


async def test_disconnected_stream_stops_within_a_token_and_frees_its_slot(make_server):
    factory = ThrottledFactory()
    client, state = await make_server(factory)
    throttle = factory.throttle("solo", 0)
    throttle.allow(3)  # the prompt, then two catch-ups: three tokens
    resp = await client.post(CHAT, json=stream_body("solo", "Tell me a long story", 500, 1))
    assert resp.status == 200
    got = 0
    while got < 3:
        frame = await resp.content.readuntil(b"\n\n")
        if b'"logprobs":{"content"' in frame:
            got += 1
    (stream,) = state.streams
    await async_wait_until(throttle.waiting.is_set)  # the worker waits to take its fourth step
    resp.close()  # the client goes away
    await async_wait_until(lambda: stream.cancel_reason == "client_disconnect")
    throttle.open()
    await stream.wait(30)
    assert stream.done is not None and stream.done.finish_reason == "cancelled"
    assert stream.done.stats.generated_tokens == 4  # the step under way finishes, no more
    samples = await metrics(client)
    assert metric(samples, "me_local_cancellations_total", ensemble="solo", reason="client_disconnect") == 1
    assert metric(samples, "me_local_generations_total", ensemble="solo", finish_reason="cancelled") == 1
    assert metric(samples, "me_local_busy_slots", ensemble="solo") == 0
    # the slot is free: the next request runs now, not after 500 tokens
    resp = await client.post(CHAT, json={"model": "solo", "messages": HELLO, "max_tokens": 3})
    assert resp.status == 200 and (await resp.json())["choices"][0]["finish_reason"] == "length"


async def test_prompt_processing_stops_at_a_chunk_boundary(make_server):
    factory = ThrottledFactory()
    client, state = await make_server(factory)
    throttle = factory.throttle("solo", 0)
    throttle.chunk_gate = threading.Event()
    throttle.open()
    throttle.chunk_gate.clear()
    prompt = "the quick brown fox jumps over the lazy dog " * 8
    n_prompt = len(state.engine.ensemble("solo").members[0].raw_prompt(prompt))
    assert n_prompt > 3 * 8  # several chunks of n_batch 8
    task = asyncio.ensure_future(client.post("/v1/completions", json={"model": "solo", "prompt": prompt}))
    await asyncio.to_thread(throttle.at_chunk_boundary.wait, 30)
    (stream,) = state.streams
    task.cancel()  # the client hangs up during prompt processing
    await async_wait_until(lambda: stream.cancel_reason == "client_disconnect")
    throttle.chunk_gate.set()
    await stream.wait(30)
    assert stream.done is not None and stream.done.finish_reason == "cancelled"
    assert stream.done.stats.generated_tokens == 0
    member = factory.members[("solo", 0)][0]
    assert len(member.cached) == 8  # one chunk evaluated, the rest never started
    samples = await metrics(client)
    assert metric(samples, "me_local_cancellations_total", ensemble="solo", reason="client_disconnect") == 1


# --------------------------------------------------------------------------- shutdown (a real listening server)


def test_shutdown_ends_streams_in_flight_with_a_final_chunk(tmp_path, tiny_models):
    config = write_tiny_config(tmp_path, tiny_models)
    factory = ThrottledFactory()
    throttle = factory.throttle("solo", 0)
    live = LiveServer(ServerSettings(port=0), engine_loader(config, factory)).start()
    throttle.allow(2)
    frames: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        with httpx.Client(timeout=30) as http, http.stream(
                "POST", live.url + CHAT, json=stream_body("solo", "Go on", 500, 1)) as resp:
            assert resp.status_code == 200
            buf = b""
            for chunk in resp.iter_bytes():
                buf += chunk
            frames.append(buf)
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: throttle.waiting.is_set() and len(live.server.state.streams) == 1)
    (stream,) = live.server.state.streams
    live.server.request_shutdown()
    wait_until(lambda: stream.cancel_reason == "shutdown")
    throttle.open()
    assert done.wait(30)
    reader.join()
    live.thread.join(30)
    assert not live.thread.is_alive()
    events = sse_json(frames[0])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    usage = events[-1]["usage"]
    assert usage["me_local"]["finish_reason"] == "cancelled"
    assert usage["completion_tokens"] == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(live.url + "/health", timeout=5)
    assert json.loads(json.dumps(usage))  # a complete, valid final frame


# --------------------------------------------------------------------------- reload (the engine swap behind SIGHUP)


def test_reload_swaps_the_engine_and_in_flight_requests_finish_on_the_old_one(tmp_path, tiny_models, monkeypatch):
    config = write_tiny_config(tmp_path, tiny_models)
    factory = ThrottledFactory()
    throttle = factory.throttle("solo", 0)
    live = LiveServer(ServerSettings(port=0), engine_loader(config, factory)).start()
    server = live.server
    try:
        assert server.loop is not None
        old = server.state.engine
        assert old is not None
        trims: list[bool] = []  # each heap trim: was the old engine closed by then?
        monkeypatch.setattr(app_module, "trim_heap", lambda: trims.append(not old.loaded))
        throttle.allow(2)
        result: dict[str, object] = {}

        def read() -> None:
            with httpx.Client(timeout=30) as http:
                r = http.post(live.url + CHAT, json=stream_body("solo", "Go on", 6, 1))
                result["events"] = sse_json(r.content)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: throttle.waiting.is_set())

        def reload() -> bool:
            return asyncio.run_coroutine_threadsafe(server.reload(), server.loop).result(60)  # type: ignore[arg-type]

        # a broken config: the old engine keeps serving
        config.write_text("ensembles: {broken: {members: []}}\n")
        assert reload() is False
        assert server.state.engine is old
        # a good new config: new requests see it at once
        config.write_text(f"ensembles:\n  fresh:\n    n_ctx: 64\n    members:\n"
                          f"      - {{name: one, path: {tiny_models['a2']}, n_threads: 1}}\n")
        factory.throttle("fresh", 0).open()
        assert reload() is True
        assert server.state.engine is not old
        ids = [m["id"] for m in httpx.get(live.url + "/v1/models", timeout=10).json()["data"]]
        assert ids == ["fresh", "fresh/one"]
        assert httpx.post(live.url + CHAT, json={"model": "solo", "messages": HELLO}, timeout=10).status_code == 404
        ok = httpx.post(live.url + CHAT, json={"model": "fresh", "messages": HELLO, "max_tokens": 2}, timeout=10)
        assert ok.status_code == 200
        # the request that started before the reload finishes on the old engine, which then closes
        assert old is not None and old.loaded  # still open: its request is in flight
        throttle.open()
        reader.join(30)
        events = result["events"]
        assert isinstance(events, list) and events[-1]["usage"]["completion_tokens"] == 6
        wait_until(lambda: not old.loaded)
        wait_until(lambda: trims == [True])  # the heap is trimmed once the old engine's memory is freed
    finally:
        factory.open_all()
        live.stop()


def test_remote_chat_backend_streams_core_events_and_cancels_on_the_server(tmp_path, tiny_models):
    from me_local.cli.remote import Remote
    from me_local.core import DoneEvent, TokenEvent

    config = write_tiny_config(tmp_path, tiny_models)
    factory = ThrottledFactory()
    throttle = factory.throttle("solo", 0)
    live = LiveServer(ServerSettings(port=0), engine_loader(config, factory)).start()
    try:
        remote = Remote(live.url, ensemble="solo")
        remote.load()
        assert remote.member_names() == ["one"]
        assert remote.describe() == f"ensemble solo (mode me: one 1.00) at {live.url}"
        throttle.allow(3)
        stop: list = []
        events = remote.stream(HELLO, {"max_tokens": 500, "seed": 1}, stop)
        first = [next(events) for _ in range(3)]
        assert all(isinstance(e, TokenEvent) and e.member == "one" for e in first)
        assert [e.index for e in first] == [0, 1, 2]
        ens = live.server.state.engine.ensemble("solo")
        assert [e.piece for e in first] == [ens.members[0].token_bytes(e.id) for e in first]
        wait_until(throttle.waiting.is_set)  # the server's worker waits to take its fourth step
        stop[0]()  # what Ctrl+C does in the chat
        rest = list(events)
        assert len(rest) == 1 and isinstance(rest[0], DoneEvent) and rest[0].finish_reason == "cancelled"
        (stream,) = live.server.state.streams
        wait_until(lambda: stream.cancel_reason == "client_disconnect")
        throttle.open()
        wait_until(lambda: stream.finished.is_set())
        assert stream.done is not None and stream.done.stats.generated_tokens == 4
    finally:
        factory.open_all()
        live.stop()
