"""The field tables of server/fields.py, walked: every field of every route is sent, and the route
does what its row says (honoured or no effect: 200; refused: a 400 naming the field, unless the value
asks for nothing); a key in no table is a 400 naming it; docs/server.md shows the tables as they are.
The members are fakes (tests/fakes.py) with FIM tokens: this is about the HTTP layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from me_local.grammar import JSON_OBJECT_GBNF, schema_grammar
from me_local.server import ServerState, create_app
from me_local.server import fields as F
from me_local.server.security import make_policy

from .fakes import FAKE_GRAMMARS
from .server_helpers import FAKE_MODELS, fake_engine_loader, write_tiny_config

HELLO = [{"role": "user", "content": "Hello there"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "server.md"

TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
CALL = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]

# A value that uses each field (for refused fields: one that asks for what me-local does not do), and
# the fields it needs beside it.
OPENAI_COMMON = {
    "model": "tiny", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5, "top_p": 0.9,
    "top_k": 5, "min_p": 0.1, "seed": 3, "stop": ["zz"], "n": 1, "ensemble": {"mode": "ce"},
    "frequency_penalty": 0.5, "presence_penalty": -1, "logit_bias": {"7": 5}, "repeat_penalty": 1.3,
    "repeat_last_n": -1, "user": "someone",
    "grammar": "even", "json_schema": {"type": "object"}, "max_tokens": 3, "max_completion_tokens": 3,
}
EXAMPLES: dict[str, dict[str, Any]] = {
    F.OPENAI_CHAT.title: {
        **OPENAI_COMMON, "messages": HELLO, "logprobs": True, "top_logprobs": 2,
        "tools": TOOL, "tool_choice": "auto", "parallel_tool_calls": True, "functions": [TOOL[0]["function"]],
        "function_call": "auto", "response_format": {"type": "json_object"}, "audio": {"voice": "alloy",
        "format": "mp3"}, "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
        "web_search_options": {"search_context_size": "low"}, "reasoning_effort": "low", "verbosity": "low",
        "moderation": {"model": "x"}, "store": True, "metadata": {"k": "v"}, "safety_identifier": "h",
        "prompt_cache_key": "k", "prompt_cache_retention": "24h", "prompt_cache_options": {"x": 1},
        "service_tier": "flex",
    },
    F.OPENAI_COMPLETIONS.title: {
        **OPENAI_COMMON, "prompt": "Hi", "logprobs": 2, "echo": True, "best_of": 1, "suffix": "end",
        "response_format": {"type": "json_object"},
    },
    F.STREAM_OPTIONS.title: {"include_usage": True, "include_obfuscation": False},
    F.OPENAI_MESSAGE.title: {
        "role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann", "tool_calls": CALL,
        "tool_call_id": "c1", "function_call": {"name": "f", "arguments": "{}"}, "refusal": "no",
        "audio": {"id": "a1"},
    },
    F.OLLAMA_OPTIONS.title: {
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": -1, "num_predict": 3, "stop": "zz",
        "num_ctx": 128, "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repeat_last_n": 32, "penalize_newline": True, "logit_bias": {"7": -100}, "typical_p": 0.7, "tfs_z": 0.9,
        "mirostat": 2,
        "mirostat_tau": 5.0, "mirostat_eta": 0.1, "num_keep": 4, "num_batch": 64, "num_gpu": 0, "main_gpu": 0,
        "num_thread": 2, "use_mmap": True, "use_mlock": False, "numa": False, "low_vram": False,
        "f16_kv": True, "logits_all": False, "vocab_only": False, "embedding_only": False,
    },
    F.OLLAMA_MESSAGE.title: {
        "role": "user", "content": "Hi", "images": ["aGk="], "thinking": "hmm", "tool_calls": [
            {"function": {"name": "f", "arguments": {}}}], "tool_name": "f", "tool_call_id": "c1",
    },
}
OLLAMA_COMMON = {
    "model": "tiny:latest", "stream": False, "options": {"num_predict": 3}, "logprobs": True, "top_logprobs": 2,
    "ensemble": {"mode": "ce"}, "format": "json", "keep_alive": "5m", "think": True, "truncate": True,
    "shift": True, "_debug_render_only": True,
}
EXAMPLES[F.OLLAMA_CHAT.title] = {**OLLAMA_COMMON, "messages": HELLO, "tools": TOOL}
EXAMPLES[F.OLLAMA_GENERATE.title] = {
    **OLLAMA_COMMON, "prompt": "Hi", "system": "Be brief.", "raw": False, "suffix": "end", "images": ["aGk="],
    "template": "{{ .Prompt }}", "context": [1, 2, 3], "width": 512, "height": 512, "steps": 4,
}
EMBED_DIMS = 24  # the fake members' vectors (8 each) of the three members of `tiny`, concatenated
EXAMPLES[F.OPENAI_EMBEDDINGS.title] = {
    "input": ["Hi", "there"], "model": "tiny", "encoding_format": "base64", "dimensions": EMBED_DIMS, "user": "someone",
}
EXAMPLES[F.OLLAMA_EMBED.title] = {
    "model": "tiny:latest", "input": ["Hi", "there"], "truncate": False, "options": {"num_ctx": 64},
    "dimensions": EMBED_DIMS, "keep_alive": "5m",
}
EXAMPLES[F.OLLAMA_EMBEDDINGS.title] = {"model": "tiny:latest", "prompt": "Hi", "options": {"num_ctx": 64},
                                       "keep_alive": "5m"}
EXAMPLES[F.OLLAMA_EMBED_OPTIONS.title] = dict(EXAMPLES[F.OLLAMA_OPTIONS.title])
INFILL_BODY = {"input_prefix": "def f():\n", "input_suffix": "\n", "n_predict": 2}
EXAMPLES[F.INFILL.title] = {
    **INFILL_BODY, "input_extra": [{"filename": "a.py", "text": "x = 1\n"}], "prompt": "    ret",
    "max_tokens": 2, "t_max_predict_ms": 500, "n_indent": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
    "min_p": 0.1, "seed": 3, "stop": ["zz"], "samplers": ["temperature", "top_k", "top_p", "min_p"],
    "stream": True, "response_fields": ["content", "timings/predicted_n"], "model": "tiny",
    "ensemble": {"mode": "single"}, "cache_prompt": True, "t_max_prompt_ms": 500, "id_slot": 0, "n_probs": 2,
    "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repeat_last_n": 64,
    "typical_p": 0.7, "mirostat": 2, "dynatemp_range": 0.5, "xtc_probability": 0.5, "dry_multiplier": 0.8,
    "top_n_sigma": 1.0, "logit_bias": {"7": 5}, "grammar": "root ::= \"a\"", "json_schema": {"type": "object"},
    "ignore_eos": True, "lora": [{"id": 0, "scale": 0.5}], "timings_per_token": True, "return_tokens": True,
    "post_sampling_probs": True,
}
EXAMPLES[F.INFILL_EXTRA.title] = {"text": "x = 1\n", "filename": "a.py", "time": [1700000000, 1]}
NEEDS = {"top_logprobs": {"logprobs": True}}
TOOL_MESSAGE_FIELDS = {"tool_calls": 1, "tool_call_id": 2, "tool_name": 2}
"""The message fields that belong to an assistant's call (index 1) or to a tool result (index 2)."""


def messages_with(name: str, value: Any, api: str) -> list[dict[str, Any]]:
    """A conversation whose message ``TOOL_MESSAGE_FIELDS[name]`` (default 0) has field ``name``."""
    at = TOOL_MESSAGE_FIELDS.get(name, 0)
    if at == 0:
        return [{"role": "user", "content": "Hi", name: value}]
    calls = CALL if api == "openai" else [{"function": {"name": "f", "arguments": {}}}]
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": calls},
                    {"role": "tool", "content": "42"}]
    conversation[at] = {**conversation[at], name: value}
    return conversation[: at + 1] if at == 1 else conversation


def request_with(table: F.Table, name: str, value: Any) -> tuple[str, dict[str, Any]]:
    """A valid request of ``table``'s route whose field ``name`` is ``value`` (tools go to ``solo``, whose
    context holds the tools' system message in the fake members' byte tokens)."""
    if table is F.OPENAI_CHAT:
        return CHAT, {"model": "solo" if name == "tools" else "tiny", "messages": HELLO, "max_tokens": 2,
                      **NEEDS.get(name, {}), name: value}
    if table is F.OPENAI_COMPLETIONS:
        return COMP, {"model": "tiny", "prompt": "Hi", "max_tokens": 2, name: value}
    if table is F.STREAM_OPTIONS:
        return CHAT, {"model": "tiny", "messages": HELLO, "max_tokens": 2, "stream": True,
                      "stream_options": {name: value}}
    if table is F.OPENAI_MESSAGE:
        return CHAT, {"model": "tiny", "messages": messages_with(name, value, "openai"), "max_tokens": 2}
    if table is F.OLLAMA_CHAT:
        return "/api/chat", {"model": "solo" if name == "tools" else "tiny", "messages": HELLO, "stream": False,
                             "options": {"num_predict": 2},
                             **NEEDS.get(name, {}), name: value}
    if table is F.OLLAMA_GENERATE:
        return "/api/generate", {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": 2},
                                 **NEEDS.get(name, {}), name: value}
    if table is F.OLLAMA_OPTIONS:
        return "/api/chat", {"model": "tiny", "messages": HELLO, "stream": False,
                             "options": {"num_predict": 2, name: value}}
    if table is F.OPENAI_EMBEDDINGS:
        return "/v1/embeddings", {"model": "tiny", "input": "Hi", name: value}
    if table is F.OLLAMA_EMBED:
        return "/api/embed", {"model": "tiny", "input": "Hi", name: value}
    if table is F.OLLAMA_EMBEDDINGS:
        return "/api/embeddings", {"model": "tiny", "prompt": "Hi", name: value}
    if table is F.OLLAMA_EMBED_OPTIONS:
        return "/api/embed", {"model": "tiny", "input": "Hi", "options": {name: value}}
    if table is F.INFILL:
        return "/infill", {"model": "tiny", **INFILL_BODY, name: value}
    if table is F.INFILL_EXTRA:
        return "/infill", {"model": "tiny", **INFILL_BODY, "input_extra": [{"text": "x = 1\n", name: value}]}
    assert table is F.OLLAMA_MESSAGE
    return "/api/chat", {"model": "tiny", "messages": messages_with(name, value, "ollama"),
                         "stream": False, "options": {"num_predict": 2}}


def param_path(table: F.Table, name: str) -> str:
    if table.prefix == "messages[].":
        return f"messages[{TOOL_MESSAGE_FIELDS.get(name, 0)}].{name}"
    if table.prefix.endswith("[]."):
        return f"{table.prefix[:-3]}[0].{name}"
    return table.path(name)


ROWS = [(table, row) for table in F.TABLES for row in table.fields.values()]


@pytest.fixture(autouse=True)
def fakes_run_the_examples_grammars(monkeypatch):
    """The fake members cannot spell JSON: the grammars of the structured-output examples
    (``grammar: "even"`` is a fake grammar already) are the fakes' "even" automaton here."""
    for gbnf in (JSON_OBJECT_GBNF, schema_grammar({"type": "object"}, param="json_schema")):
        monkeypatch.setitem(FAKE_GRAMMARS, gbnf, FAKE_GRAMMARS["even"])


@pytest.fixture
def config(tmp_path):
    return write_tiny_config(tmp_path, FAKE_MODELS)


@pytest.fixture
async def client(aiohttp_client, config):
    state = ServerState(fake_engine_loader(config, fim=True), make_policy(api_key=None))
    c = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    return c


async def refusal(client: Any, path: str, body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """The 400's message, param and code (Ollama's shape has only the message)."""
    resp = await client.post(path, json=body)
    text = await resp.text()
    assert resp.status == 400, text
    err = (await resp.json())["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str)
        return err, None, None
    return err["message"], err["param"], err["code"]


def test_every_field_has_an_example():
    for table in F.TABLES:
        assert set(EXAMPLES[table.title]) == set(table.fields), table.title


@pytest.mark.parametrize(("table", "row"), ROWS, ids=[f"{t.where}:{r.name}" for t, r in ROWS])
async def test_each_field_does_what_its_row_says(client, table, row):
    path, body = request_with(table, row.name, EXAMPLES[table.title][row.name])
    where = param_path(table, row.name)
    if row.kind == "refused":
        message, param, code = await refusal(client, path, body)
        assert message.startswith(f"`{where}` ") and "; remove it" in message
        if not path.startswith("/api/"):
            assert (param, code) == (where, "unsupported_parameter")
        for neutral in (None, "", [], {}, False, *row.neutral_values):  # what clients send for "not asked for"
            path, body = request_with(table, row.name, neutral)
            resp = await client.post(path, json=body)
            assert resp.status == 200, (neutral, await resp.text())
    else:
        resp = await client.post(path, json=body)
        assert resp.status == 200, await resp.text()
        assert b'"error"' not in await resp.read()


@pytest.mark.parametrize("table", F.TABLES, ids=[t.where for t in F.TABLES])
async def test_a_key_in_no_table_is_a_400_naming_it(client, table):
    path, body = request_with(table, "frobnicate", 1)
    where = param_path(table, "frobnicate")
    message, param, code = await refusal(client, path, body)
    assert message == f"`{where}` is not {table.where}; remove it"
    if not path.startswith("/api/"):
        assert (param, code) == (where, "unknown_parameter")


@pytest.mark.parametrize(("path", "body", "fragment"), [
    (CHAT, {"model": "tiny", "messages": HELLO, "options": {"num_predict": 2}},
     "`options` is not a field of /v1/chat/completions; remove it"),
    (COMP, {"model": "tiny", "prompt": "Hi", "top_logprobs": 2},
     "`top_logprobs` is not a field of /v1/completions; completions take an integer `logprobs`"),
    ("/api/chat", {"model": "tiny", "messages": HELLO, "temperature": 0.2},
     "`temperature` is not a field of /api/chat; it is an option: put it in `options`"),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "max_tokens": 2},
     "`max_tokens` is not a field of /api/generate; Ollama's limit is `options.num_predict`"),
    ("/api/chat", {"model": "tiny", "messages": HELLO, "options": {"num_ctx": 65536}},
     "`options.num_ctx` is 65536 but ensemble 'tiny' allows contexts of at most 32768 tokens (`max_ctx` in "
     "models.yaml); send at most that, or raise `max_ctx`"),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "raw": True, "system": "Be brief."},
     "`system` does not apply with `raw: true`"),
    ("/api/chat", {"model": "tiny", "messages": HELLO, "top_logprobs": 2}, "`top_logprobs` needs `logprobs: true`"),
    ("/api/chat", {"model": "tiny", "messages": HELLO, "options": {"penalize_newline": False}},
     "`options.penalize_newline: false` (sparing newlines from the penalties) is not supported"),
    (CHAT, {"model": "tiny", "messages": HELLO, "logit_bias": {"the": 5}},
     "`logit_bias`: 'the' is not a token id (an integer >= 0); send token ids as strings of digits"),
    (CHAT, {"model": "tiny", "messages": HELLO, "logit_bias": {"5": 101}},
     "`logit_bias`: the bias of token 5 must be between -100 and 100, got 101"),
    (CHAT, {"model": "tiny", "messages": HELLO, "logit_bias": [[5, 1]]},
     "`logit_bias` must be an object of token ids to biases"),
    (CHAT, {"model": "tiny", "messages": HELLO, "logit_bias": {"999": 1}},
     "logit_bias names token 999, which is not in the vocabulary (0..11)"),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "options": {"logit_bias": {"5": "x"}}},
     "`options.logit_bias`: the bias of token 5 must be a number, got 'x'"),
    (COMP, {"model": "tiny", "prompt": "Hi", "repeat_penalty": 0},
     "`repeat_penalty` must be between 0.01 and 100, got 0"),
    (CHAT, {"model": "tiny", "messages": HELLO, "frequency_penalty": 2.5},
     "`frequency_penalty` must be between -2 and 2, got 2.5"),
    ("/api/chat", {"model": "tiny", "messages": HELLO, "options": {"repeat_last_n": -2}},
     "`options.repeat_last_n` must be between -1 and 2147483647, got -2"),
])
async def test_refusals_say_what_to_send_instead(client, path, body, fragment):
    message, _, _ = await refusal(client, path, body)
    assert fragment in message


async def test_what_the_ollama_clients_send_by_default_is_accepted(client):
    """ollama-python 0.6 sends ``tools: []`` on every chat; earlier versions sent ``""``, ``false`` and
    ``[]`` for the generate fields they were not given. Ollama's own neutral values pass too."""
    chat = {"model": "tiny", "messages": HELLO, "tools": [], "stream": False, "format": "", "think": False,
            "options": {"num_predict": 2, "repeat_penalty": 1.0, "mirostat": 0, "typical_p": 1, "tfs_z": 1.0}}
    assert (await client.post("/api/chat", json=chat)).status == 200
    gen = {"model": "tiny", "prompt": "Hi", "suffix": "", "system": "", "template": "", "context": [], "raw": False,
           "images": [], "format": "", "stream": False, "options": {"num_predict": 2}}
    assert (await client.post("/api/generate", json=gen)).status == 200


def test_docs_show_the_tables_as_they_are():
    assert F.render_docs().strip() in DOCS.read_text(encoding="utf-8"), (
        "docs/server.md's field tables differ from server/fields.py; run python scripts/fields_reference.py --write")
