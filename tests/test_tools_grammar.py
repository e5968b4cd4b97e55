"""The grammar of tool calls against the reader of answers: every text the grammar allows (drawn
at random with tests/gbnf_tools.py) reads back as calls of the request's functions whose arguments
validate against their schemas, or as the generic format's response; llama.cpp reads each grammar
and takes those texts; a lazy grammar's root begins with its trigger."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from me_local.errors import RequestError
from me_local.tools import Tool, ToolSpec, parse
from me_local.tools.grammar import tool_grammar

from .gbnf_tools import Gbnf, LlamaGrammarCheck

WEATHER = Tool("get_weather", {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "units": {"enum": ["C", "F"]}}, "required": ["city"], "additionalProperties": False})
NOTE = Tool("note", {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                              "maxItems": 3}}}, position=1)
EMPTY = Tool("ping", {"type": "object", "properties": {}}, position=2)
TOOLS = (WEATHER, NOTE, EMPTY)
SCHEMAS = {t.name: t.parameters for t in TOOLS}
CASES = [(fmt, choice, parallel) for fmt in ("hermes", "llama3", "generic") for choice in ("auto", "required")
         for parallel in (True, False)]


@pytest.fixture(scope="module")
def llama(tiny_models):
    check = LlamaGrammarCheck(tiny_models["a1"])
    yield check
    check.close()


@pytest.mark.parametrize(("fmt", "choice", "parallel"), CASES)
def test_every_text_the_grammar_allows_reads_back_as_valid_calls(llama, fmt, choice, parallel):
    g = tool_grammar(ToolSpec(TOOLS, choice, parallel), fmt)
    lazy = choice == "auto" and fmt != "generic"
    assert g.triggers == ({"hermes": ("<tool_call>",), "llama3": ('{"name"',)}[fmt] if lazy else ())
    assert llama.parses(g.gbnf)
    grammar = Gbnf(g.gbnf)
    rng = random.Random(f"{fmt}{choice}{parallel}")
    kinds = set()
    for n in range(60):
        text = grammar.sample(rng)
        assert not lazy or text.startswith(g.triggers[0])
        content, calls = parse(fmt, [t.name for t in TOOLS], text)
        if not calls:  # only the generic format's reply to the user
            assert fmt == "generic" and choice == "auto" and content == json.loads(text)["response"]
            kinds.add("response")
            continue
        assert content == "" and (parallel or len(calls) == 1), text
        for c in calls:
            assert c.complete and c.parsed_arguments() is not None, text
            jsonschema.validate(c.parsed_arguments(), SCHEMAS[c.name])
        kinds.add(len(calls) > 1)
        if n < 5:
            assert llama.run(g.gbnf, text) == "complete", text
    assert kinds >= ({True, False} if parallel and fmt != "llama3" else {False})
    if fmt == "generic" and choice == "auto":
        assert "response" in kinds


def test_the_calls_are_written_as_the_templates_write_them():
    g = Gbnf(tool_grammar(ToolSpec((EMPTY,), "required", False), "hermes").gbnf)
    assert g.matches('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    assert not g.matches('<tool_call>{"name": "ping", "arguments": {}}</tool_call>')
    llama3 = Gbnf(tool_grammar(ToolSpec((EMPTY,), "required", False), "llama3").gbnf)
    assert llama3.matches('{"name": "ping", "parameters": {}}')
    generic = Gbnf(tool_grammar(ToolSpec((EMPTY,), "auto", True), "generic").gbnf)
    assert generic.matches('{"tool_calls": [{"name": "ping", "arguments": {}}, {"name": "ping", "arguments": {}}]}')
    assert generic.matches('{"response": "Hello"}') and not generic.matches('{"tool_call": {"name": "ping"}}')


def test_a_schema_the_grammar_cannot_follow_is_refused_naming_it():
    odd = Tool("odd", {"type": "object", "properties": {"x": {"if": {"type": "string"}}}}, position=3)
    with pytest.raises(RequestError) as e:
        tool_grammar(ToolSpec((WEATHER, odd)), "hermes")
    assert e.value.param == "tools[3].function.parameters.properties.x.if"
