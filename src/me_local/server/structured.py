"""Structured output: the request fields that constrain an answer to JSON, a JSON Schema or a
grammar, read into the engine's :class:`~me_local.core.GrammarSpec`.

* OpenAI ``response_format``: ``{"type": "text"}`` (nothing), ``{"type": "json_object"}`` (any
  JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}``; llama-server's ``{"type": "json_object", "schema": {...}}`` too.
* llama-server's ``grammar`` (GBNF text) and ``json_schema`` (a schema), on both OpenAI routes.
* Ollama's ``format``: ``"json"`` or a schema.

At most one of them per request. A schema becomes GBNF here (:func:`me_local.grammar.schema_grammar`,
which refuses what it cannot enforce, naming the keyword's path); GBNF the engine cannot use is
refused when the engine plans the request, before anything streams.

When the answer ends before the grammar is complete (``max_tokens``, a stop string), the
answer says so beside the usual finish reason (:func:`me_local.server.wire.grammar_extension`).
"""

from __future__ import annotations

import json
from typing import Any

from ..core import GrammarSpec
from ..grammar import JSON_OBJECT_GBNF, schema_grammar
from ..grammar import json_type_name as _kind
from .errors import ApiError, bad_request

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_KEYS = {"text": ("type",), "json_object": ("type", "schema"), "json_schema": ("type", "json_schema")}
JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")


def _unknown(obj: dict[str, Any], allowed: tuple[str, ...], where: str, what: str, hint: str = "") -> None:
    for key in obj:
        if key not in allowed:
            path = f"{where}.{key}"
            raise ApiError(400, f"`{path}` is not a field of {what}; {hint or 'remove it'}", code="unknown_parameter",
                           param=path)


def schema_spec(schema: Any, param: str, spec_param: str | None = None) -> GrammarSpec:
    """The grammar of a JSON Schema sent as ``param`` (errors name paths under it)."""
    if not isinstance(schema, dict) and not isinstance(schema, bool):
        raise bad_request(f"`{param}` must be a JSON Schema (an object), got {_kind(schema)}", param)
    return GrammarSpec(schema_grammar(schema, param=param), param=spec_param or param)


def response_format(value: Any, param: str = "response_format") -> GrammarSpec | None:
    """OpenAI's ``response_format`` (None: free text; so is ``{}``, which asks for nothing)."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise bad_request(f'`{param}` must be an object such as {{"type": "json_object"}}, got {_kind(value)}', param)
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        shown = json.dumps(kind) if kind is not None else "missing"
        raise bad_request(f"`{param}.type` must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {shown}",
                          f"{param}.type")
    hint = ("the schema goes in `response_format.json_schema.schema`" if kind == "json_schema" else "")
    _unknown(value, _KEYS[kind], param, f"`{param}` with type {kind}", hint)
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        if schema is None:
            return GrammarSpec(JSON_OBJECT_GBNF, param=param)
        return schema_spec(schema, f"{param}.schema", param)
    inner = value.get("json_schema")
    where = f"{param}.json_schema"
    if not isinstance(inner, dict):
        raise bad_request(f'`{where}` must be an object such as {{"name": "answer", "schema": {{...}}}}, got '
                          f"{_kind(inner)}", where)
    _unknown(inner, JSON_SCHEMA_KEYS, where, f"`{where}`")
    for key in ("name", "description"):
        if inner.get(key) is not None and not isinstance(inner[key], str):
            raise bad_request(f"`{where}.{key}` must be a string, got {_kind(inner[key])}", f"{where}.{key}")
    if inner.get("strict") is not None and not isinstance(inner["strict"], bool):
        raise bad_request(f"`{where}.strict` must be true or false, got {_kind(inner['strict'])}", f"{where}.strict")
    schema = inner.get("schema")
    if schema is None:  # OpenAI's schema is optional: a JSON object, then
        return GrammarSpec(JSON_OBJECT_GBNF, param=param)
    return schema_spec(schema, f"{where}.schema", param)


def openai_grammar(body: dict[str, Any]) -> GrammarSpec | None:
    """The grammar an OpenAI request asks for: ``response_format``, or llama-server's ``grammar`` or
    ``json_schema`` (at most one of them)."""
    gbnf, schema = body.get("grammar"), body.get("json_schema")
    if gbnf is not None and schema is not None and gbnf != "":  # llama-server's words
        raise bad_request('Either "json_schema" or "grammar" can be specified, but not both', "grammar")
    if gbnf is not None and not isinstance(gbnf, str):
        raise bad_request(f"`grammar` must be a string of GBNF (llama.cpp's grammar format), got {_kind(gbnf)}",
                          "grammar")
    spec = response_format(body.get("response_format"))
    other = "grammar" if gbnf else "json_schema" if schema is not None else None
    if spec is not None and other is not None:
        raise bad_request(f"`response_format` and `{other}` both constrain the answer; send one of them", other)
    if gbnf:
        if "\x00" in gbnf:  # llama.cpp reads a C string: it would follow only the text before the NUL
            raise bad_request(f"`grammar` holds a NUL character (at character {gbnf.index(chr(0)) + 1}), where "
                              "llama.cpp would stop reading it; write it as \\x00 inside a literal or a class",
                              "grammar")
        return GrammarSpec(gbnf, param="grammar")
    if schema is not None:
        return schema_spec(schema, "json_schema")
    return spec


def ollama_format(value: Any) -> GrammarSpec | None:
    """Ollama's ``format``: ``"json"``, a JSON Schema, or nothing (null, ``""``)."""
    if value is None or value == "":
        return None
    if value == "json":
        return GrammarSpec(JSON_OBJECT_GBNF, param="format")
    if isinstance(value, dict):
        return schema_spec(value, "format")
    # Ollama's own words (it quotes the value's JSON text as Go's %q does)
    raise bad_request(f'invalid format: {json.dumps(json.dumps(value, ensure_ascii=False), ensure_ascii=False)}; '
                      'expected "json" or a valid JSON Schema object', "format")
