"""Bad input and access control: each case gets its status and the API's own
error shape, and the server keeps serving. The engine's members are fakes
(tests/fakes.py, through the engine's factory seam), so each case takes milliseconds."""

from __future__ import annotations

import json

import pytest

from me_local.server import ServerState, create_app
from me_local.server.security import make_policy

from .server_helpers import FAKE_MODELS, fake_engine_loader, write_tiny_config

HELLO = [{"role": "user", "content": "Hello there"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


@pytest.fixture
def config(tmp_path):
    return write_tiny_config(tmp_path, FAKE_MODELS)


@pytest.fixture
def make_server(aiohttp_client, config):
    """The app on fake members: these tests are about the HTTP layer, not the models."""

    async def make(**policy):
        state = ServerState(fake_engine_loader(config), make_policy(api_key=policy.pop("api_key", None), **policy))
        client = await aiohttp_client(create_app(state))
        await state.wait_loaded()
        return client, state

    return make


def chat(**kw):
    return {"model": "tiny", "messages": HELLO, "max_tokens": 2, **kw}


LONG = "word " * 80

# (path, body: dict or raw bytes, status, param or None, code or None, message fragment)
OPENAI_CASES = [
    (CHAT, b"{not json", 400, None, "invalid_json", "not valid JSON"),
    (CHAT, b"", 400, None, "invalid_json", "empty"),
    (CHAT, b"[1, 2]", 400, None, "invalid_json", "must be a JSON object"),
    (CHAT, b'{"model": "tiny", "temperature": NaN}', 400, None, "invalid_json", "NaN"),
    (CHAT, b"\xff\xfe", 400, None, "invalid_json", "not valid JSON"),
    (CHAT, chat(model="nope"), 404, "model", "model_not_found", "model 'nope' not found"),
    (CHAT, chat(model="tiny/zz"), 404, "model", "model_not_found", "not found"),
    (CHAT, chat(model=7), 400, "model", "invalid_value", "must be a string"),
    (CHAT, {"model": "tiny"}, 400, "messages", "invalid_request", "non-empty list"),
    (CHAT, chat(messages=[]), 400, "messages", "invalid_request", "non-empty list"),
    (CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages", "invalid_request", "role"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages", "invalid_request", "string"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages", "invalid_request", "only text parts"),
    (CHAT, chat(temperature="hot"), 400, "temperature", "invalid_value", "must be a number"),
    (CHAT, chat(temperature=-1), 400, "temperature", "invalid_value", "between 0 and 100"),
    (CHAT, chat(top_p=1.5), 400, "top_p", "invalid_value", "between 0 and 1"),
    (CHAT, chat(min_p=-0.1), 400, "min_p", "invalid_value", "between"),
    (CHAT, chat(top_k=-1), 400, "top_k", "invalid_value", "between"),
    (CHAT, chat(top_k=2.5), 400, "top_k", "invalid_value", "integer"),
    (CHAT, chat(max_tokens=-5), 400, "max_tokens", "invalid_value", "at least 1"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", "invalid_value", "at least 1"),
    (CHAT, chat(max_completion_tokens="many"), 400, "max_completion_tokens", "invalid_value", "integer"),
    (CHAT, chat(seed=-1), 400, "seed", "invalid_value", "between"),
    (CHAT, chat(seed=2**64), 400, "seed", "invalid_value", "between"),
    (CHAT, chat(n=2), 400, "n", "invalid_value", "between 1 and 1"),
    (CHAT, chat(stop=[1]), 400, "stop", "invalid_value", "list of strings"),
    (CHAT, chat(stop=["x"] * 20), 400, "stop", "invalid_value", "at most 16"),
    (CHAT, chat(stream="yes"), 400, "stream", "invalid_value", "true or false"),
    (CHAT, chat(stream=True, stream_options=[]), 400, "stream_options", "invalid_value", "object"),
    (CHAT, chat(logprobs="yes"), 400, "logprobs", "invalid_value", "true or false"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs", "invalid_value", "logprobs: true"),
    (CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", "invalid_value", "between 0 and 20"),
    (CHAT, chat(ensemble="me"), 400, "ensemble", "invalid_value", "object"),
    (CHAT, chat(ensemble={"mode": "best"}), 400, "ensemble.mode", "invalid_value", "me, ce, single"),
    (CHAT, chat(ensemble={"member": "zz"}), 400, "ensemble.member", "member_not_found", "no member 'zz'"),
    (CHAT, chat(ensemble={"weights": {"zz": 1}}), 400, "ensemble.weights", "member_not_found", "no member"),
    (CHAT, chat(ensemble={"weights": {"one": 0, "two": 0, "three": 0}}), 400, "ensemble.weights",
     "invalid_value", "all weights are zero"),
    (CHAT, chat(model="tiny/one", ensemble={"mode": "ce"}), 400, "ensemble", "invalid_value", "single member"),
    (CHAT, chat(model="short", messages=[{"role": "user", "content": LONG}]), 400, "prompt",
     "context_length_exceeded", "context of 32 tokens"),
    (COMP, {"model": "tiny", "prompt": 5}, 400, "prompt", "invalid_value", "must be a string"),
    (COMP, {"model": "tiny", "prompt": [1.5]}, 400, "prompt", "invalid_value", "`prompt[0]` is 1.5: `prompt` must"),
    (COMP, {"model": "tiny", "prompt": ["a", 3]}, 400, "prompt", "invalid_value", "not a mix"),
    (COMP, {"model": "tiny", "prompt": ""}, 400, "prompt", "invalid_request", "empty"),
    (COMP, {"model": "tiny", "prompt": "x", "echo": True, "stream": True}, 400, "stream", "invalid_value",
     "not supported with `echo`"),
    (COMP, {"model": "tiny", "prompt": [5, 100000]}, 400, "prompt", "invalid_value", "not a token id"),
    (COMP, {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix", "invalid_request",
     "fill-in-the-middle needs models with FIM tokens, and members 'one' (one.gguf: no FIM prefix/suffix/middle "
     "token), 'two' (two.gguf: no FIM prefix/suffix/middle token), 'three' (three.gguf: no FIM prefix/suffix/"
     "middle token) lack them"),
    (COMP, {"model": "tiny", "prompt": [1, 2], "suffix": "y"}, 400, "prompt", "invalid_value",
     "`suffix` needs the prompt as text"),
    (COMP, {"model": "tiny", "prompt": "x", "suffix": "y", "echo": True}, 400, "echo", "invalid_value",
     "`echo` does not apply with `suffix`"),
    (COMP, {"model": "tiny", "prompt": "x", "logprobs": True}, 400, "logprobs", "invalid_value", "integer"),
    (COMP, {"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs", "invalid_value", "between"),
    (COMP, {"model": "short", "prompt": LONG}, 400, "prompt", "context_length_exceeded", "shorten the prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code", "fragment"), OPENAI_CASES)
async def test_openai_bad_input(make_server, path, body, status, param, code, fragment):
    client, _ = await make_server()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    assert resp.status == status
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert fragment in err["message"]
    assert (await client.get("/health")).status == 200


def ochat(**kw):
    return {"model": "tiny", "messages": HELLO, "options": {"num_predict": 2}, **kw}


OLLAMA_CASES = [
    ("/api/chat", b"nope", 400, "not valid JSON"),
    ("/api/chat", ochat(model="llama3"), 404, "model 'llama3' not found"),
    ("/api/chat", ochat(messages="hi"), 400, "non-empty list"),
    ("/api/chat", ochat(messages=[{"role": "user", "content": "x", "images": ["aGk="]}]), 400, "images"),
    ("/api/chat", ochat(options="fast"), 400, "`options` must be an object"),
    ("/api/chat", ochat(options={"num_predict": 0}), 400, "num_predict"),
    ("/api/chat", ochat(options={"num_predict": -3}), 400, "num_predict"),
    ("/api/chat", ochat(options={"temperature": "x"}), 400, "options.temperature"),
    ("/api/chat", ochat(options={"stop": {"a": 1}}), 400, "options.stop"),
    ("/api/chat", ochat(options={"top_k": 1e300}), 400, "options.top_k"),
    ("/api/chat", ochat(stream="no"), 400, "stream"),
    ("/api/chat", ochat(model="short", messages=[{"role": "user", "content": LONG}]), 400, "context of 32"),
    ("/api/generate", {"model": "tiny", "prompt": 5}, 400, "`prompt` must be a string"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": "tiny/two", "prompt": "x", "suffix": "y"}, 400,
     "member 'two' (two.gguf: no FIM prefix/suffix/middle token) lacks them"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y", "system": "Be brief."}, 400,
     "`system` has no place in a fill-in-the-middle prompt"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "system": 3}, 400, "system"),
    ("/api/show", {}, 400, "`model` is required"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
]


@pytest.mark.parametrize(("path", "body", "status", "fragment"), OLLAMA_CASES)
async def test_ollama_bad_input(make_server, path, body, status, fragment):
    client, _ = await make_server()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(path, data=data)
    assert resp.status == status
    err = await resp.json()
    assert set(err) == {"error"} and isinstance(err["error"], str)
    assert fragment in err["error"]
    assert (await client.get("/health")).status == 200


async def test_unknown_routes_and_methods_use_each_api_shape(make_server):
    client, _ = await make_server()
    resp = await client.get("/v1/nothing")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/api/nothing")
    assert resp.status == 404 and "GET /api/nothing" in (await resp.json())["error"]
    resp = await client.get(CHAT)
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]
    resp = await client.delete("/api/tags")
    assert resp.status == 405 and isinstance((await resp.json())["error"], str)


async def test_body_size_limit(make_server):
    client, _ = await make_server(max_body_bytes=4096)
    big = chat(messages=[{"role": "user", "content": "x" * 5000}])
    resp = await client.post(CHAT, json=big)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"

    async def chunked():
        yield json.dumps(big).encode()

    resp = await client.post("/api/chat", data=chunked())  # no Content-Length: caught while reading
    assert resp.status == 413 and "too large" in (await resp.json())["error"]
    assert (await client.post(CHAT, json=chat())).status == 200


# --------------------------------------------------------------------------- access control


async def test_api_key_is_required_everywhere_but_health(make_server):
    client, _ = await make_server(api_key="s3cret")
    assert (await client.get("/health")).status == 200
    resp = await client.post(CHAT, json=chat())
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await resp.json())["error"]["code"] == "invalid_api_key"
    resp = await client.post(CHAT, json=chat(), headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    resp = await client.post("/api/chat", json=ochat(stream=False))
    assert resp.status == 401 and "API key" in (await resp.json())["error"]
    for path in ("/metrics", "/v1/models", "/api/tags", "/"):
        assert (await client.get(path)).status == 401, path
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post(CHAT, json=chat(), headers=ok)).status == 200
    assert (await client.post("/api/chat", json=ochat(stream=False), headers=ok)).status == 200
    assert (await client.get("/metrics", headers=ok)).status == 200


async def test_host_check_stops_dns_rebinding(make_server):
    client, _ = await make_server(allow_hosts=["mybox.lan"])
    resp = await client.post(CHAT, json=chat(), headers={"Host": "evil.example:11435"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "host_not_allowed"
    resp = await client.get("/api/tags", headers={"Host": "evil.example"})
    assert resp.status == 403 and "not allowed" in (await resp.json())["error"]
    for host in ("localhost:11435", "127.0.0.1", "[::1]:1", "mybox.lan:80"):
        assert (await client.get("/v1/models", headers={"Host": host})).status == 200, host


async def test_origin_check_and_cors(make_server):
    client, _ = await make_server(allow_origins=["http://localhost:3000"])
    # no Origin (SDKs, editors, curl): allowed, and no CORS headers are sent
    resp = await client.get("/v1/models")
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.post(CHAT, json=chat(), headers={"Origin": "https://evil.example"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.options(CHAT, headers={"Origin": "https://evil.example",
                                               "Access-Control-Request-Method": "POST"})
    assert resp.status == 403
    resp = await client.options(CHAT, headers={"Origin": "http://localhost:3000",
                                               "Access-Control-Request-Method": "POST"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    resp = await client.post(CHAT, json=chat(), headers={"Origin": "http://localhost:3000"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


async def test_no_origin_is_allowed_by_default(make_server):
    client, _ = await make_server()
    resp = await client.post("/api/chat", json=ochat(stream=False), headers={"Origin": "http://localhost:3000"})
    assert resp.status == 403
    assert (await client.post("/api/chat", json=ochat(stream=False))).status == 200


# --------------------------------------------------------------------------- text that is not Unicode

# (path, body with a lone surrogate, the field named). JSON's \ud800 escape and the raw UTF-8 bytes of a
# surrogate (ED A0 80, which json.loads accepts) both decode to a str that cannot be encoded again.
SURROGATES = [
    (COMP, b'{"model": "tiny", "prompt": "abc \\ud800", "max_tokens": 2}', "prompt", "\\ud800"),
    (COMP, b'{"model": "tiny", "prompt": "abc \xed\xa0\x80", "max_tokens": 2}', "prompt", "\\ud800"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udfff there"}], "max_tokens": 2}',
     "messages[0].content", "\\udfff"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages[0].content[0].text", "\\udc00"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["ok", "\\ud83d"]}',
     "stop[1]", "\\ud83d"),
    ("/api/generate", b'{"model": "tiny", "prompt": "abc \\ud800", "options": {"num_predict": 2}}', "prompt",
     "\\ud800"),
    ("/api/chat", b'{"model": "tiny", "messages": [{"role": "system", "content": "x"}, '
                  b'{"role": "user", "content": "\\ud800"}]}', "messages[1].content", "\\ud800"),
    ("/api/chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "options": {"\\ud800": 1}}',
     "options", "\\ud800"),
]


@pytest.mark.parametrize(("path", "raw", "field", "escape"), SURROGATES)
async def test_a_lone_surrogate_is_a_400_naming_the_field(make_server, path, raw, field, escape):
    client, _ = await make_server()
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    if path.startswith("/api/"):
        assert set(body) == {"error"}
        message = body["error"]
    else:
        err = body["error"]
        assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_value", field)
        message = err["message"]
    assert f"`{field}`" in message and f"lone UTF-16 surrogate ({escape})" in message
    assert message.endswith("; send valid Unicode")
    ok = ochat() if path == "/api/chat" else chat()
    resp = await client.post(path if path in (CHAT, "/api/chat") else CHAT, json=ok)
    assert resp.status == 200  # the server still answers


async def test_a_valid_surrogate_pair_is_one_character(make_server):
    client, _ = await make_server()
    resp = await client.post(COMP, data=b'{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}',
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
