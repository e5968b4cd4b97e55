"""Real clients against a real server on a free loopback port: the official
``openai`` SDK, the official ``ollama`` client, ``me-local chat --url``, and
hypothesis fuzzing request bodies (no 500, the server stays healthy)."""

from __future__ import annotations

import os

import httpx
import ollama
import openai
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from me_local.cli import cli
from me_local.server import ServerSettings

from .server_helpers import LiveServer, engine_loader, write_tiny_config

KEY = "k3y-for-tests"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_models):
    config = write_tiny_config(tmp_path_factory.mktemp("live"), tiny_models)
    server = LiveServer(ServerSettings(port=0, api_key=KEY), engine_loader(config)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_key():
    """The oa and ol clients (conftest) send this key: the server wants one."""
    return KEY


# --------------------------------------------------------------------------- openai SDK


def test_openai_models_list(oa):
    ids = [m.id for m in oa.models.list()]
    assert ids[:4] == ["tiny", "tiny/one", "tiny/two", "tiny/three"] and "pair/two" in ids
    assert oa.models.retrieve("pair").model_extra["me_local"]["parallel"] == 2


def test_openai_routes_take_the_names_api_tags_lists(oa):
    kw = dict(messages=HELLO, max_tokens=4, seed=3)
    tagged = oa.chat.completions.create(model="pair:latest", **kw)
    assert tagged.model == "pair:latest"
    plain = oa.chat.completions.create(model="pair", **kw)
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    assert oa.completions.create(model="pair/two:latest", prompt="Hi", max_tokens=2).choices[0].text


def test_openai_chat_streaming_equals_non_streaming(oa):
    kw = dict(model="pair", messages=HELLO, max_tokens=8, seed=21, temperature=0.9)
    full = oa.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.total_tokens == full.usage.prompt_tokens + 8
    assert full.usage.model_extra["me_local"]["seed"] == 21
    chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens - 1
    assert len({c.id for c in chunks}) == 1


def test_openai_chat_logprobs(oa):
    full = oa.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, seed=2, logprobs=True,
                                      top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.model_extra["member"] in ("one", "two", "three") and isinstance(c.model_extra["id"], int)
               for c in content)
    assert "".join(c.token for c in content) == full.choices[0].message.content


def test_openai_completions(oa):
    kw = dict(model="pair/two", prompt="Hello world, the", max_tokens=6, seed=3, logprobs=1)
    full = oa.completions.create(**kw)
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == 6 and lp.model_extra["members"] == ["two"] * 6
    streamed = "".join(c.choices[0].text for c in oa.completions.create(**kw, stream=True))
    assert streamed == full.choices[0].text


def test_openai_errors(oa, live):
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="tiny", messages=HELLO, temperature=-3)
    assert e.value.body["param"] == "temperature"
    with openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --------------------------------------------------------------------------- ollama client


def test_ollama_list_show_ps(ol):
    names = [m.model for m in ol.list().models]
    assert names[:4] == ["tiny:latest", "tiny/one:latest", "tiny/two:latest", "tiny/three:latest"]
    assert ol.show("pair").modelinfo["me-local.context_length"] == 2048  # the tiny models' trained context
    assert {m.model for m in ol.ps().models} == {n for n in names if "/" not in n}  # the ensembles loaded


def test_ollama_chat_and_generate(ol):
    opts = {"num_predict": 6, "seed": 8, "temperature": 0.8}
    one = ol.chat(model="pair", messages=HELLO, options=opts)
    assert one.done and one.done_reason == "length" and one.eval_count == 6
    parts = list(ol.chat(model="pair", messages=HELLO, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == one.message.content
    assert parts[-1].done and parts[-1].prompt_eval_count == one.prompt_eval_count
    gen = ol.generate(model="tiny:latest", prompt="Hello world", raw=True, options=opts)
    streamed = "".join(p.response for p in ol.generate(model="tiny", prompt="Hello world", raw=True, options=opts,
                                                        stream=True))
    assert gen.response == streamed and gen.eval_count == 6


def test_ollama_errors(ol):
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model="llama3", messages=HELLO)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ol.generate(model="tiny", prompt="x", options={"temperature": -1})
    assert e.value.status_code == 400


# --------------------------------------------------------------------------- me-local chat --url


def test_chat_through_a_running_daemon(live, oa):
    session = "Hello world\n/stats\n/set member two\nAgain\n/bye\n"
    args = ["chat", "--url", live.url, "--api-key", KEY, "-e", "pair", "-n", "8", "--seed", "3", "--temperature", "0"]
    result = CliRunner().invoke(cli, args, input=session, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"me-local chat on ensemble pair (mode me: one 0.50, two 0.50) at {live.url}" in out
    expected = oa.chat.completions.create(model="pair", messages=[{"role": "user", "content": "Hello world"}],
                                          max_tokens=8, seed=3, temperature=0).choices[0].message.content
    assert expected in out
    assert "generated 8 tokens" in out and "mode me  seed 3  finish length" in out
    assert "Set member to two." in out


def test_chat_url_errors_say_how_to_fix_them(live):
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", "--url", "http://127.0.0.1:9"], input="/bye\n")
    assert result.exit_code != 0
    assert "cannot reach me-local at http://127.0.0.1:9" in result.stderr and "me-local serve" in result.stderr
    result = runner.invoke(cli, ["chat", "--url", live.url, "--api-key", "nope"], input="/bye\n")
    assert result.exit_code != 0 and "needs an API key" in result.stderr
    result = runner.invoke(cli, ["chat", "--url", live.url, "--api-key", KEY, "-e", "zz"], input="/bye\n")
    assert result.exit_code != 0 and "no ensemble 'zz'" in result.stderr


# --------------------------------------------------------------------------- fuzzing


ints = st.integers(min_value=-(2**70), max_value=2**70)
scalars = st.none() | st.booleans() | ints | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                       max_size=3), max_leaves=8)
small = st.integers(min_value=-3, max_value=8)
params = st.just({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}}) | anything
function = st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "a b", ""]) | anything},
                                 optional={"parameters": params, "description": st.text(max_size=8) | anything})
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "custom"]) | anything,
                              "function": function | anything}) | anything
call = st.fixed_dictionaries({"function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g"]) | anything},
    optional={"arguments": st.sampled_from(['{"a": "x"}', "{oops", "[]"]) | st.just({"a": 1}) | anything})},
    optional={"id": st.text(max_size=6) | anything, "type": st.just("function") | anything}) | anything
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "robot"]) | anything},
    optional={"content": st.text(max_size=40) | anything,
              "images": anything,
              "tool_calls": st.lists(call, max_size=2) | anything,
              "tool_call_id": st.text(max_size=6) | anything,
              "tool_name": st.sampled_from(["f", "g"]) | anything},
)
FIELDS = {
    "model": st.sampled_from(["tiny", "pair", "pair/one", "short", "solo:latest", "nope", ""]) | anything,
    "messages": st.lists(message, max_size=3) | anything,
    "prompt": st.text(max_size=60) | anything,
    "max_tokens": small | anything.filter(lambda v: not isinstance(v, int)),
    "temperature": st.floats(-1, 3) | anything,
    "top_p": st.floats(-0.5, 1.5) | anything,
    "top_k": small | anything,
    "min_p": st.floats(-0.5, 1.5) | anything,
    "seed": ints | anything,
    "stop": st.lists(st.text(max_size=3), max_size=3) | anything,
    "stream": st.booleans() | anything,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | anything}),
    "logprobs": st.booleans() | small | anything,
    "top_logprobs": small | anything,
    "n": small,
    "ensemble": st.fixed_dictionaries({}, optional={
        "mode": st.sampled_from(["me", "ce", "single", "x"]) | anything,
        "member": st.sampled_from(["one", "two", "zz"]) | anything,
        "weights": st.dictionaries(st.sampled_from(["one", "two", "three", "zz"]), st.floats(-1, 2) | anything),
    }) | anything,
    "options": st.fixed_dictionaries({}, optional={
        "num_predict": small | anything.filter(lambda v: not isinstance(v, int)),
        "temperature": st.floats(-1, 3) | anything, "seed": ints, "top_k": small | anything,
        "stop": anything, "num_ctx": anything,
    }) | anything,
    "raw": st.booleans() | anything,
    "system": st.text(max_size=10) | anything,
    "keep_alive": anything,
    "input": st.text(max_size=20) | st.lists(st.text(max_size=8) | st.lists(small, max_size=4) | small, max_size=3)
    | anything,
    "encoding_format": st.sampled_from(["float", "base64", "x"]) | anything,
    "dimensions": small | anything,
    "truncate": st.booleans() | anything,
    "tools": st.lists(tool, max_size=2) | anything,
    "tool_choice": st.sampled_from(["auto", "none", "required", "sometimes"]) | st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "allowed_tools", "custom"]) | anything,
         "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "zz"]) | anything})}) | anything,
    "parallel_tool_calls": st.booleans() | anything,
}
VALID = {
    "/v1/chat/completions": {"model": "tiny", "messages": HELLO, "max_tokens": 3},
    "/v1/completions": {"model": "pair", "prompt": "Hi", "max_tokens": 3},
    "/api/chat": {"model": "tiny", "messages": HELLO, "options": {"num_predict": 3}},
    "/api/generate": {"model": "tiny", "prompt": "Hi", "options": {"num_predict": 3}},
    "/api/show": {"model": "tiny"},
    "/v1/embeddings": {"model": "pair", "input": "Hi"},
    "/api/embed": {"model": "pair", "input": ["Hi"]},
    "/api/embeddings": {"model": "tiny", "prompt": "Hi"},
}
random_bodies = st.fixed_dictionaries({}, optional=FIELDS)
mutations = st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))


@st.composite
def requests(draw):
    path = draw(st.sampled_from(sorted(VALID)))
    kind = draw(st.sampled_from(["random", "mutated", "bytes"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=40))
    if kind == "random":
        return path, draw(random_bodies)
    return path, {**VALID[path], **draw(mutations)}


FUZZ_EXAMPLES = int(os.environ.get("ME_LOCAL_FUZZ_EXAMPLES", "300"))  # raise it for a longer hunt


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests())
def test_fuzzed_bodies_never_get_a_500(live, req):
    path, body = req
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        if isinstance(body, bytes):
            resp = http.post(live.url + path, content=body, headers=headers)
        else:
            resp = http.post(live.url + path, json=body, headers=headers)
    event(f"{path} {resp.status_code}")
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err, str) if path.startswith("/api/") else set(err) == {"message", "type", "param", "code"}
    else:
        assert b'"error"' not in resp.content  # no failure in the middle of a stream either


def test_the_server_is_healthy_after_the_fuzzing(live):
    resp = httpx.get(live.url + "/health", timeout=10)
    assert resp.status_code == 200
    assert all(e["busy_slots"] == 0 and e["queued"] == 0 for e in resp.json()["ensembles"].values())
