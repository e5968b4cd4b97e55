"""Pure parts of the server, checked against fixed expected output: the wire
formats (SSE and NDJSON framing, chunk shapes), Prometheus text, the access
checks (Host, Origin, API key, bind) and request-field parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from me_local.config import parse_config
from me_local.core import DoneEvent, GenerationStats, MemberStats, TokenEvent
from me_local.engine import QueueFullError
from me_local.errors import ConfigError, ContextOverflowError, ModelLoadError, RequestError, UsageError
from me_local.server import metrics as prom
from me_local.server import wire
from me_local.server.errors import ApiError, from_exception
from me_local.server.params import ensemble_extension, opt_number, resolve_model, stop_strings
from me_local.server.security import check_bind, host_allowed, key_matches, make_policy, origin_allowed

from .server_helpers import parse_metrics


def stats() -> GenerationStats:
    return GenerationStats(mode="me", seed=7, prompt_tokens=12, cached_prompt_tokens=4, generated_tokens=3,
                           ttft_s=0.5, total_s=1.5, prompt_eval_s=0.5,
                           members=[MemberStats("a", 2, 1, 8, 4), MemberStats("b", 1, 2, 8, 4)])


PIECES = {5: b"Hi", 6: b" there", 7: b"\xc3", 8: "é".encode()}


def tb(token: int) -> bytes:
    return PIECES[token]


# --------------------------------------------------------------------------- framing


def test_sse_and_ndjson_framing_is_exact():
    assert wire.sse({"a": "é", "b": [1, None]}) == 'data: {"a":"é","b":[1,null]}\n\n'.encode()
    assert wire.SSE_DONE == b"data: [DONE]\n\n"
    assert wire.ndjson({"done": False, "x": "\n"}) == b'{"done":false,"x":"\\n"}\n'
    with pytest.raises(ValueError):
        wire.dumps({"x": float("nan")})  # never emit invalid JSON


def test_chat_chunks_have_openai_shape():
    first = wire.chat_chunk("chatcmpl-1", 100, "tiny", {"role": "assistant", "content": ""}, include_usage=True)
    assert wire.sse(first) == (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":100,"model":"tiny","choices":'
        b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
        b'"usage":null}\n\n'
    )
    last = wire.chat_chunk("chatcmpl-1", 100, "tiny", {}, finish_reason="length")
    assert last == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 100, "model": "tiny",
                    "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}


def test_usage_carries_cached_tokens_and_the_engine_figures():
    usage = wire.openai_usage(stats(), "stop")
    assert usage["prompt_tokens"] == 12 and usage["completion_tokens"] == 3 and usage["total_tokens"] == 15
    assert usage["prompt_tokens_details"] == {"cached_tokens": 4}
    ext = usage["me_local"]
    assert ext["finish_reason"] == "stop" and ext["mode"] == "me" and ext["seed"] == 7
    assert ext["tokens_per_s"] == 2.0 and ext["ttft_s"] == 0.5
    assert ext["members"][1] == {"name": "b", "selected": 1, "catchup_tokens": 2, "prompt_tokens": 8,
                                 "cached_prompt_tokens": 4}
    chunk = wire.usage_chunk("c", 1, "m", "chat.completion.chunk", usage)
    assert chunk["choices"] == [] and chunk["usage"] is usage


def test_finish_reasons_map_to_openai_values():
    assert [wire.openai_finish_reason(r) for r in ("stop", "length", "cancelled")] == ["stop", "length", "stop"]


def test_chat_logprob_entry_carries_id_member_and_bytes():
    ev = TokenEvent(0, 7, "", "a", -0.25, [(7, -0.25), (8, -1.5)], b"\xc3")
    assert wire.chat_logprob(ev, tb) == {
        "token": "\ufffd", "logprob": -0.25, "bytes": [195], "id": 7, "member": "a",
        "top_logprobs": [
            {"token": "\ufffd", "logprob": -0.25, "bytes": [195], "id": 7},
            {"token": "é", "logprob": -1.5, "bytes": [195, 169], "id": 8},
        ],
    }
    never = TokenEvent(0, 5, "Hi", "a", float("-inf"), [(5, float("nan"))], b"Hi")
    assert wire.chat_logprob(never, tb)["logprob"] == -9999.0
    assert wire.chat_logprob(never, tb)["top_logprobs"][0]["logprob"] == -9999.0
    ce = TokenEvent(1, 5, "Hi", None, -0.1, None, b"Hi")
    assert wire.chat_logprob(ce, tb)["member"] is None and wire.chat_logprob(ce, tb)["top_logprobs"] == []


def test_completion_logprobs_are_parallel_lists_with_offsets():
    evs = [TokenEvent(0, 5, "Hi", "a", -0.5, [(5, -0.5), (6, -2.0)], b"Hi"),
           TokenEvent(1, 6, " there", "b", -0.75, [(6, -0.75)], b" there")]
    assert wire.completion_logprobs(evs, tb, 10, True) == {
        "tokens": ["Hi", " there"], "token_logprobs": [-0.5, -0.75],
        "top_logprobs": [{"Hi": -0.5, " there": -2.0}, {" there": -0.75}],
        "text_offset": [10, 12], "token_ids": [5, 6], "members": ["a", "b"],
    }
    assert wire.completion_logprobs(evs, tb, 0, False)["top_logprobs"] is None


def test_full_answers_have_openai_shape():
    done = DoneEvent("length", stats(), "")
    chat = wire.chat_completion("chatcmpl-9", 5, "tiny", "Hi there", done, None)
    assert chat["object"] == "chat.completion" and chat["created"] == 5
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                                "logprobs": None, "finish_reason": "length"}]
    text = wire.text_completion("cmpl-9", 5, "tiny", "Hi", DoneEvent("cancelled", stats()), {"tokens": []})
    assert text["choices"][0] == {"text": "Hi", "index": 0, "logprobs": {"tokens": []}, "finish_reason": "stop"}
    assert text["usage"]["me_local"]["finish_reason"] == "cancelled"


def test_ollama_objects_and_durations_in_nanoseconds():
    part = wire.ollama_part("chat", "tiny", "2024-01-01T00:00:00Z", "Hi")
    assert wire.ndjson(part) == (b'{"model":"tiny","created_at":"2024-01-01T00:00:00Z",'
                                 b'"message":{"role":"assistant","content":"Hi"},"done":false}\n')
    final = wire.ollama_final("generate", "tiny", "T", DoneEvent("stop", stats()), "all")
    assert final == {"model": "tiny", "created_at": "T", "response": "all", "done": True, "done_reason": "stop",
                     "total_duration": 1_500_000_000, "load_duration": 0, "prompt_eval_count": 12,
                     "prompt_eval_duration": 500_000_000, "eval_count": 3, "eval_duration": 1_000_000_000}
    assert wire.ollama_load_reply("chat", "tiny", "T") == {
        "model": "tiny", "created_at": "T", "message": {"role": "assistant", "content": ""}, "done": True,
        "done_reason": "load"}
    lp = wire.ollama_logprob(TokenEvent(0, 8, "é", "b", -1.0, [(8, -1.0)], "é".encode()), tb)
    assert lp == {"token": "é", "logprob": -1.0, "id": 8, "member": "b",
                  "top_logprobs": [{"token": "é", "logprob": -1.0, "id": 8}]}


def test_error_shapes():
    assert wire.openai_error("bad", "invalid_request_error", "invalid_value", "temperature") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}
    assert wire.ollama_error("bad") == {"error": "bad"}


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (QueueFullError("busy"), 503, "queue_full"),
        (ContextOverflowError("too long"), 400, "context_length_exceeded"),
        (RequestError("bad", param="x"), 400, "invalid_request"),
        (ConfigError("no ensemble"), 404, "model_not_found"),
        (ModelLoadError("no memory"), 503, "model_unavailable"),
        (RuntimeError("bug"), 500, "internal_error"),
    ],
)
def test_engine_errors_translate_to_statuses(exc, status, code):
    err = from_exception(exc, retry_after=3)
    assert (err.status, err.code) == (status, code)
    if status == 503:
        assert err.headers == {"Retry-After": "3"}
    if isinstance(exc, RuntimeError):
        assert "bug" not in err.message  # internals stay in the log


# --------------------------------------------------------------------------- metrics


def test_metrics_text_format_is_exact():
    m = prom.Metrics()
    m.requests.inc(endpoint="/v1/chat/completions", method="POST", status="200")
    m.record_generation("tiny", "cancelled", stats(), "client_disconnect")
    m.token_latency.observe(0.004, ensemble="tiny")
    text = m.render([prom.gauge("me_local_busy_slots", "Busy.", [((("ensemble", 'a"b\\'),), 2)])])
    lines = text.splitlines()
    assert "# TYPE me_local_requests_total counter" in lines
    assert 'me_local_requests_total{endpoint="/v1/chat/completions",method="POST",status="200"} 1' in lines
    assert 'me_local_cancellations_total{ensemble="tiny",reason="client_disconnect"} 1' in lines
    assert 'me_local_member_selections_total{ensemble="tiny",member="a"} 2' in lines
    assert 'me_local_member_catchup_tokens_total{ensemble="tiny",member="b"} 2' in lines
    assert 'me_local_tokens_generated_total{ensemble="tiny"} 3' in lines
    assert 'me_local_busy_slots{ensemble="a\\"b\\\\"} 2' in lines
    ttft = [line for line in lines if line.startswith("me_local_time_to_first_token_seconds")]
    assert 'me_local_time_to_first_token_seconds_bucket{ensemble="tiny",le="0.25"} 0' in ttft
    assert 'me_local_time_to_first_token_seconds_bucket{ensemble="tiny",le="0.5"} 1' in ttft
    assert 'me_local_time_to_first_token_seconds_bucket{ensemble="tiny",le="+Inf"} 1' in ttft
    assert 'me_local_time_to_first_token_seconds_sum{ensemble="tiny"} 0.5' in ttft
    assert 'me_local_time_to_first_token_seconds_count{ensemble="tiny"} 1' in ttft
    assert 'me_local_token_latency_seconds_bucket{ensemble="tiny",le="0.0025"} 0' in lines
    assert 'me_local_token_latency_seconds_bucket{ensemble="tiny",le="0.005"} 1' in lines
    assert text.endswith("\n")
    samples = parse_metrics(text)  # every line parses
    assert len(samples) == sum(1 for line in lines if not line.startswith("#"))


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize(
    ("host", "bind", "extra", "ok"),
    [
        ("127.0.0.1:11435", "127.0.0.1", (), True),
        ("localhost:11435", "127.0.0.1", (), True),
        ("LOCALHOST", "127.0.0.1", (), True),
        ("app.localhost:80", "127.0.0.1", (), True),
        ("[::1]:11435", "127.0.0.1", (), True),
        ("127.8.9.10", "127.0.0.1", (), True),
        ("evil.example:11435", "127.0.0.1", (), False),  # DNS rebinding
        ("localhost.evil.example", "127.0.0.1", (), False),
        ("192.168.1.5:11435", "127.0.0.1", (), False),
        ("", "127.0.0.1", (), False),
        ("mybox.lan:11435", "127.0.0.1", ("mybox.lan",), True),
        ("anything", "127.0.0.1", ("*",), True),
        ("192.168.1.5:11435", "192.168.1.5", (), True),
        ("192.168.1.5:11435", "0.0.0.0", (), True),
        ("mybox.lan", "0.0.0.0", (), False),
        ("[fe80::1]:1", "::", (), True),
    ],
)
def test_host_check(host, bind, extra, ok):
    assert host_allowed(host, make_policy(api_key=None, allow_hosts=extra, bind_host=bind)) is ok


def test_origin_check_normalizes_and_allows_listed_origins_only():
    policy = make_policy(api_key=None, allow_origins=["http://localhost:3000/"])
    assert origin_allowed("http://localhost:3000", policy)
    assert origin_allowed("HTTP://LOCALHOST:3000", policy)
    assert not origin_allowed("http://localhost:3001", policy)
    assert not origin_allowed("null", policy)
    assert origin_allowed("https://x.example", make_policy(api_key=None, allow_origins=["*"]))


def test_api_key_matching():
    assert key_matches("Bearer s3cret", "s3cret")
    assert key_matches("bearer s3cret ", "s3cret")
    assert not key_matches("Bearer s3cre", "s3cret")
    assert not key_matches("Basic s3cret", "s3cret")
    assert not key_matches(None, "s3cret")
    assert not key_matches("Bearer ünïcode", "s3cret")


def test_binding_beyond_loopback_needs_a_key_or_insecure():
    check_bind("127.0.0.1", None, False)
    check_bind("localhost", None, False)
    check_bind("0.0.0.0", "key", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(UsageError, match="--api-key"):
        check_bind("0.0.0.0", None, False)
    with pytest.raises(UsageError, match="without an API key"):
        check_bind("192.168.1.5", "", False)


# --------------------------------------------------------------------------- request fields


CONFIG = parse_config(json.dumps({"ensembles": {
    "main": {"members": [{"name": "a", "path": "a.gguf"}, {"name": "b", "path": "b.gguf", "weight": 3}]},
    "other": {"members": [{"name": "c", "path": "c.gguf"}]},
}}), Path("/nowhere/models.yaml"))


def test_model_names_resolve_to_ensembles_and_members():
    assert resolve_model(CONFIG, "main").member is None
    assert resolve_model(CONFIG, None).ensemble.name == "main"
    ref = resolve_model(CONFIG, "main/b")
    assert (ref.ensemble.name, ref.member) == ("main", "b")
    assert resolve_model(CONFIG, "other:latest").ensemble.name == "other"  # Ollama's tag, on every route
    assert resolve_model(CONFIG, "main/b:latest").member == "b"
    with pytest.raises(ApiError) as e:
        resolve_model(CONFIG, "other:v2")
    assert e.value.status == 404 and "main, main/a, main/b, other, other/c" in e.value.message
    for bad in ("main/c", "nope", "main/"):
        with pytest.raises(ApiError) as e:
            resolve_model(CONFIG, bad)
        assert (e.value.status, e.value.code) == (404, "model_not_found")
    with pytest.raises(ApiError) as e:
        resolve_model(CONFIG, 3)
    assert e.value.status == 400


def test_ensemble_extension_is_checked_against_the_ensemble():
    main = resolve_model(CONFIG, "main")
    choice = ensemble_extension({"ensemble": {"mode": "ce", "weights": {"a": 2}}}, main)
    assert (choice.mode, choice.weights, choice.member) == ("ce", {"a": 2.0}, None)
    single = ensemble_extension({}, resolve_model(CONFIG, "main/a"))
    assert (single.mode, single.member) == ("single", "a")
    for ext, param in [({"mode": "xx"}, "ensemble.mode"), ({"member": "zz"}, "ensemble.member"),
                       ({"weights": {"zz": 1}}, "ensemble.weights"), ({"weights": {"a": -1}}, "ensemble.weights.a"),
                       ({"weights": {"a": None}}, "ensemble.weights.a"),
                       ({"weights": {"a": 0, "b": 0}}, "ensemble.weights"), ({"weights": []}, "ensemble.weights"),
                       ({"speed": 1}, "ensemble")]:
        with pytest.raises(ApiError) as e:
            ensemble_extension({"ensemble": ext}, main)
        assert (e.value.status, e.value.param) == (400, param), ext
    with pytest.raises(ApiError):
        ensemble_extension({"ensemble": {"mode": "me"}}, resolve_model(CONFIG, "main/a"))


def test_numbers_are_typed_and_bounded():
    assert opt_number({"t": 0.5}, "t", 0, 1) == 0.5
    assert opt_number({"n": 3.0}, "n", 1, integer=True) == 3
    assert opt_number({}, "t", 0, 1) is None
    for body in ({"t": True}, {"t": "1"}, {"t": 1.5}, {"t": -1}, {"t": 10**400}, {"t": [1]}):
        with pytest.raises(ApiError):
            opt_number(body, "t", 0, 10, integer=True)
    assert stop_strings(["a", "", "b"]) == ("a", "b")
    assert stop_strings("x") == ("x",)
    with pytest.raises(ApiError):
        stop_strings([1])
    with pytest.raises(ApiError):
        stop_strings(["x"] * 17)


def test_messages_are_checked_once_on_their_way_to_the_engine(monkeypatch):
    """Both APIs hand the engine checked Messages; the engine checks plain lists once per
    request (not once per member prompt) and takes Messages as they are."""
    from me_local.core import SamplingParams
    from me_local.engine import Engine, Messages, Request, collect, normalize_messages
    from me_local.engine import engine as engine_module
    from me_local.server import ollama, openai

    from .fakes import FakeFactory

    config = parse_config(json.dumps({"ensembles": {"main": {"members": [
        {"name": "a", "path": "a.gguf", "system": "A."}, {"name": "b", "path": "b.gguf", "system": "B."},
        {"name": "c", "path": "c.gguf"}]}}}), Path("/nowhere/models.yaml"))
    engine = Engine(config, FakeFactory())
    raw = [{"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": " brief."}]},
           {"role": "user", "content": "Hi"}]
    checked = normalize_messages(raw)
    assert isinstance(checked, Messages) and normalize_messages(checked) is checked
    assert checked == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for request in (openai.parse_chat({"model": "main", "messages": raw}, engine).request,
                    ollama.parse_chat({"model": "main", "messages": raw}, engine)[1],
                    ollama.parse_generate({"model": "main", "prompt": "Hi", "system": "Be brief."}, engine)[1]):
        assert isinstance(request.messages, Messages)
        assert request.messages[-1] == {"role": "user", "content": "Hi"}

    calls = []
    monkeypatch.setattr(engine_module, "normalize_messages",
                        lambda m: calls.append(isinstance(m, Messages)) or normalize_messages(m))
    params = SamplingParams(max_tokens=2, seed=1)
    collect(engine.generate(Request("main", messages=raw, params=params)))
    collect(engine.generate(Request("main", messages=checked, params=params)))
    assert calls == [False, True]  # once per request, though three members render their own prompts
    engine.close()
