"""Structured output at the HTTP layer, on fake members: OpenAI's ``response_format``, llama-server's
``grammar`` and ``json_schema``, Ollama's ``format`` reach the engine as the grammar they ask for
(the fakes run a stand-in automaton for it, so the answer shows that it was applied); what they
cannot be is a 400 naming the field (or the schema keyword's path); an answer cut before its
grammar is complete says so. Real models and real clients: test_structured_clients.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from me_local.grammar import JSON_OBJECT_GBNF, schema_grammar
from me_local.server import ServerState, create_app
from me_local.server.security import make_policy
from me_local.server.wire import INCOMPLETE_NOTE

from .fakes import FAKE_GRAMMARS, Dfa
from .server_helpers import FAKE_MODELS, fake_engine_loader, ndjson_lines, sse_json, write_tiny_config

HELLO = [{"role": "user", "content": "Hello there"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
TWO_ONES = Dfa(0, {0: {b"<": 1}, 1: {b"1": 2}, 2: {b">": 3}, 3: {b"<": 4}, 4: {b"1": 5}, 5: {b">": 6}}, {6})
"""The fake pieces ``<1><1>`` and nothing else: complete after two tokens."""
EVEN = FAKE_GRAMMARS["even"]


@pytest.fixture
def grammars(monkeypatch):
    """GBNF texts the fake members run as a stand-in automaton (they cannot spell JSON)."""
    def register(gbnf: str, dfa: Dfa) -> None:
        monkeypatch.setitem(FAKE_GRAMMARS, gbnf, dfa)
    return register


@pytest.fixture
def planned(monkeypatch):
    """The grammar of each request the engine plans, in order."""
    from me_local.engine import Engine

    seen: list[Any] = []
    plan = Engine._plan

    def spy(self, loaded, request):
        seen.append(request.grammar)
        return plan(self, loaded, request)

    monkeypatch.setattr(Engine, "_plan", spy)
    return seen


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    state = ServerState(fake_engine_loader(write_tiny_config(tmp_path, FAKE_MODELS)), make_policy(api_key=None))
    c = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    c.state = state
    return c


def constraints(client: Any, ensemble: str = "solo") -> list[Any]:
    """The constraints the fake members of ``ensemble`` were given, in order."""
    members = client.state.engine.ensemble(ensemble).members
    return [c for m in members for c in getattr(m, "constraints", [])]


def pieces(text: str) -> list[str]:
    assert text.startswith("<") and text.endswith(">"), text
    return text[1:-1].split("><")


async def post(client: Any, path: str, body: dict[str, Any]) -> Any:
    resp = await client.post(path, json=body)
    text = await resp.text()
    assert resp.status == 200, text
    return json.loads(text) if not body.get("stream", path.startswith("/api/")) else text


async def error(client: Any, path: str, body: dict[str, Any]) -> tuple[str, str | None]:
    resp = await client.post(path, json=body)
    text = await resp.text()
    assert resp.status == 400, text
    err = json.loads(text)["error"]
    return (err, None) if path.startswith("/api/") else (err["message"], err["param"])


# --------------------------------------------------------------------------- each field reaches the engine


@pytest.mark.parametrize("path, field, value, gbnf, param", [
    (CHAT, "response_format", {"type": "json_object"}, JSON_OBJECT_GBNF, "response_format"),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True,
                                                                      "description": "a digit"}},
     schema_grammar(SCHEMA, param="x"), "response_format"),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "any"}}, JSON_OBJECT_GBNF,
     "response_format"),
    (COMP, "response_format", {"type": "json_object", "schema": SCHEMA}, schema_grammar(SCHEMA, param="x"),
     "response_format"),
    (CHAT, "json_schema", SCHEMA, schema_grammar(SCHEMA, param="x"), "json_schema"),
    (COMP, "json_schema", SCHEMA, schema_grammar(SCHEMA, param="x"), "json_schema"),
    (COMP, "grammar", "root ::= [a-z]+", "root ::= [a-z]+", "grammar"),
    (CHAT, "grammar", "root ::= [a-z]+", "root ::= [a-z]+", "grammar"),
])
async def test_openai_fields_constrain_the_answer(client, grammars, planned, path, field, value, gbnf, param):
    grammars(gbnf, EVEN)
    body = {"model": "solo", "max_tokens": 6, "seed": 1, field: value,
            **({"messages": HELLO} if path == CHAT else {"prompt": "Hi"})}
    answer = await post(client, path, body)
    choice = answer["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    assert all(int(p) % 2 == 0 for p in pieces(text)) and len(pieces(text)) == 6  # only what the grammar allows
    assert [(g.gbnf, g.param) for g in planned] == [(gbnf, param)]
    assert constraints(client) and all(c.closed for c in constraints(client))
    assert answer["usage"]["me_local"]["grammar"] == "complete" and choice["finish_reason"] == "length"
    # without the field: odd pieces too
    del body[field]
    answer = await post(client, path, body)
    choice = answer["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    assert any(int(p) % 2 for p in pieces(text)) and "grammar" not in answer["usage"]["me_local"]


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("value, gbnf", [("json", JSON_OBJECT_GBNF), (SCHEMA, schema_grammar(SCHEMA, param="x"))])
async def test_ollama_format_constrains_the_answer(client, grammars, route, value, gbnf):
    grammars(gbnf, EVEN)
    body = {"model": "solo", "format": value, "stream": False, "options": {"num_predict": 5, "seed": 2},
            **({"messages": HELLO} if route == "/api/chat" else {"prompt": "Hi"})}
    answer = await post(client, route, body)
    text = answer["message"]["content"] if route == "/api/chat" else answer["response"]
    assert all(int(p) % 2 == 0 for p in pieces(text)) and len(pieces(text)) == 5
    assert answer["done_reason"] == "length" and answer["me_local"] == {"grammar": "complete"}
    assert constraints(client) and all(c.closed for c in constraints(client))


async def test_the_schema_grammar_is_the_converters(client, grammars, planned):
    """What reaches the engine is schema_grammar's text for the schema, under the field's name."""
    grammars(schema_grammar(SCHEMA, param="x"), EVEN)
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    await post(client, CHAT, {"model": "solo", "messages": HELLO, "max_tokens": 2, "response_format": fmt})
    await post(client, "/api/chat", {"model": "solo", "messages": HELLO, "format": SCHEMA, "stream": False,
                                     "options": {"num_predict": 2}})
    assert [(g.gbnf, g.param, g.triggers) for g in planned] == [
        (schema_grammar(SCHEMA, param="x"), "response_format", ()), (schema_grammar(SCHEMA, param="x"), "format", ())]


async def test_text_and_empty_values_ask_for_no_grammar(client):
    for field, value in [("response_format", {"type": "text"}), ("response_format", None),
                         ("response_format", {}), ("grammar", ""),
                         ("grammar", None), ("json_schema", None)]:
        await post(client, CHAT, {"model": "solo", "messages": HELLO, "max_tokens": 2, field: value})
    for value in ("", None):
        await post(client, "/api/chat", {"model": "solo", "messages": HELLO, "format": value, "stream": False,
                                         "options": {"num_predict": 2}})
    assert constraints(client) == []


# --------------------------------------------------------------------------- an answer cut before its end


async def test_an_answer_cut_by_the_token_limit_says_its_json_is_incomplete(client, grammars):
    grammars(JSON_OBJECT_GBNF, TWO_ONES)
    body = {"model": "solo", "messages": HELLO, "max_tokens": 1, "response_format": {"type": "json_object"}}
    answer = await post(client, CHAT, body)
    assert answer["choices"][0]["message"]["content"] == "<1>"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["me_local"]["grammar"] == "incomplete"
    assert answer["usage"]["me_local"]["note"] == INCOMPLETE_NOTE
    # streamed, the usage chunk says it
    frames = sse_json((await post(client, CHAT, {**body, "stream": True,
                                                 "stream_options": {"include_usage": True}})).encode())
    assert [f["choices"][0]["finish_reason"] for f in frames if f["choices"]][-1] == "length"
    assert frames[-1]["usage"]["me_local"]["grammar"] == "incomplete"
    # with room, the grammar completes and the answer ends there ("stop": nothing else may follow)
    answer = await post(client, CHAT, {**body, "max_tokens": 10})
    assert answer["choices"][0]["message"]["content"] == "<1><1>"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["me_local"]["grammar"] == "complete" and "note" not in answer["usage"]["me_local"]


async def test_ollama_says_an_answer_cut_by_num_predict_is_incomplete(client, grammars):
    grammars(JSON_OBJECT_GBNF, TWO_ONES)
    body = {"model": "solo", "messages": HELLO, "format": "json", "options": {"num_predict": 1}}
    lines = ndjson_lines((await post(client, "/api/chat", body)).encode())
    final = lines[-1]
    assert final["done"] and final["done_reason"] == "length"
    assert final["me_local"] == {"grammar": "incomplete", "note": INCOMPLETE_NOTE}
    assert "me_local" not in lines[0]


async def test_a_batch_of_prompts_says_how_each_grammar_ended(client, grammars):
    grammars("root ::= x", TWO_ONES)
    answer = await post(client, COMP, {"model": "solo", "prompt": ["a", "b"], "max_tokens": 1, "grammar": "root ::= x"})
    assert [c["me_local"]["grammar"] for c in answer["choices"]] == ["incomplete", "incomplete"]


# --------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("body, param, says", [
    ({"grammar": "root ::= x", "json_schema": SCHEMA}, "grammar",
     'Either "json_schema" or "grammar" can be specified, but not both'),
    ({"response_format": {"type": "json_object"}, "grammar": "root ::= x"}, "grammar",
     "`response_format` and `grammar` both constrain the answer; send one of them"),
    ({"response_format": {"type": "json_object"}, "json_schema": SCHEMA}, "json_schema", "both constrain"),
    ({"grammar": 3}, "grammar", "`grammar` must be a string of GBNF"),
    # llama.cpp reads a grammar as a C string: it would stop at the NUL and follow only what came before
    ({"grammar": 'root ::= "a"\n\x00b ::= "b"'}, "grammar",
     "`grammar` holds a NUL character (at character 14), where llama.cpp would stop reading it; write it "
     "as \\x00 inside a literal or a class"),
    ({"json_schema": "yes"}, "json_schema", "`json_schema` must be a JSON Schema (an object), got string"),
    ({"response_format": "json"}, "response_format", '`response_format` must be an object such as {"type"'),
    ({"response_format": {"type": "xml"}}, "response_format.type",
     '`response_format.type` must be one of text, json_object, json_schema, got "xml"'),
    ({"response_format": {"schema": SCHEMA}}, "response_format.type", "got missing"),
    ({"response_format": {"type": "text", "schema": {}}}, "response_format.schema",
     "`response_format.schema` is not a field of `response_format` with type text; remove it"),
    ({"response_format": {"type": "json_schema", "schema": SCHEMA}}, "response_format.schema",
     "the schema goes in `response_format.json_schema.schema`"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "`response_format.json_schema` must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "stric": True}}},
     "response_format.json_schema.stric", "is not a field of `response_format.json_schema`"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": 1}}}, "response_format.json_schema.name",
     "must be a string"),
    ({"response_format": {"type": "json_schema", "json_schema": {"strict": "yes"}}},
     "response_format.json_schema.strict", "must be true or false"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"age": {"type": "integer", "multipleOf": 5}}}}}},
     "response_format.json_schema.schema.properties.age.multipleOf",
     "`response_format.json_schema.schema.properties.age.multipleOf` is not supported by constrained decoding: "
     "a grammar cannot check divisibility; remove it, or list the values in `enum`"),
    ({"response_format": {"type": "json_object", "schema": {"type": "string", "format": "email"}}},
     "response_format.schema.format", "is not a format constrained decoding supports"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema.uniqueItems", "a list rather than a set"),
])
async def test_openai_refusals_name_the_field(client, body, param, says):
    for path, base in ((CHAT, {"messages": HELLO}), (COMP, {"prompt": "Hi"})):
        message, got = await error(client, path, {"model": "solo", "max_tokens": 2, **base, **body})
        assert got == param and says in message, message


@pytest.mark.parametrize("value, says", [
    ("xml", 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'),
    (3, 'invalid format: "3"; expected "json" or a valid JSON Schema object'),
    (["json"], 'invalid format: "[\\"json\\"]"; expected "json" or a valid JSON Schema object'),
    ({"type": "object", "properties": {"a": {"not": {}}}}, "`format.properties.a.not` is not supported by "
     "constrained decoding: a grammar cannot exclude a schema"),
])
async def test_ollama_refuses_a_format_it_cannot_follow(client, value, says):
    for route, base in (("/api/chat", {"messages": HELLO}), ("/api/generate", {"prompt": "Hi"}),
                        ("/api/chat", {"messages": []})):  # loading the model checks it too
        message, _ = await error(client, route, {"model": "solo", "format": value, "stream": False, **base})
        assert message == says or says in message, message


async def test_grammar_the_engine_cannot_use_is_a_400_before_anything_streams(client):
    message, param = await error(client, CHAT, {"model": "solo", "messages": HELLO, "grammar": "root ::= (",
                                                "stream": True})
    assert param == "grammar" and "grammar" in message
