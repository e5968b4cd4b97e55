"""The grammar of a tool call (llama.cpp's GBNF), from the functions' parameter schemas.

Each function's call is written the way its format's templates write it, with the arguments
constrained to the function's JSON Schema (:func:`me_local.grammar.schema_grammar`):

* ``hermes``: ``<tool_call>\\n{"name": "f", "arguments": ARGS}\\n</tool_call>``, several separated
  by a newline when ``parallel``; with ``tool_choice: auto`` the grammar is lazy, triggered by
  ``<tool_call>`` (the answer is free text until the model opens a call; then the call must be
  whole, and the answer ends after the calls);
* ``llama3``: ``{"name": "f", "parameters": ARGS}``; lazy on ``{"name"`` with ``auto``;
* ``generic``: the whole answer, ``{"tool_call": CALL}`` (``{"tool_calls": [CALL, ...]}`` when
  ``parallel``), or with ``auto`` also ``{"response": "..."}``.

``required`` (and a named function, which is ``required`` with that one function) constrains the
whole answer to calls. A schema the converter cannot express is a RequestError naming
``tools[i].function.parameters`` and the keyword's path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..grammar import gbnf_literal, schema_grammar
from .types import Format, ToolSpec


@dataclass(frozen=True)
class ToolGrammar:
    gbnf: str
    triggers: tuple[str, ...]
    """Empty: the whole answer is constrained; else lazy, from the first of these on."""


TRIGGERS: dict[Format, str] = {"hermes": "<tool_call>", "llama3": '{"name"'}
"""The text that opens a call in the formats that allow text before it (the lazy grammar's trigger)."""
GENERIC_CALL = '{"tool_call": '
GENERIC_CALLS = '{"tool_calls": ['
GENERIC_RESPONSE = '{"response": '


def tool_grammar(spec: ToolSpec, fmt: Format) -> ToolGrammar:
    """The grammar of ``spec``'s calls in ``fmt`` (see the module)."""
    key = "parameters" if fmt == "llama3" else "arguments"
    rules: list[str] = []
    calls = []
    for k, tool in enumerate(spec.tools):
        rules += schema_grammar(tool.parameters, param=f"tools[{tool.position}].function.parameters",
                                rule=f"args{k}").splitlines()
        head = gbnf_literal(f'{{"name": {json.dumps(tool.name)}, "{key}": ')
        rules.append(f"call{k} ::= {head} args{k} {gbnf_literal('}')}")
        calls.append(f"call{k}")
    rules.append(f"call ::= {' | '.join(calls)}")
    auto = spec.choice == "auto"
    triggers: tuple[str, ...] = ()
    if fmt == "hermes":
        rules.append(f"tool-call ::= {gbnf_literal('<tool_call>' + NL)} call {gbnf_literal(NL + '</tool_call>')}")
        root = f"tool-call ({gbnf_literal(NL)} tool-call)*" if spec.parallel else "tool-call"
        triggers = (TRIGGERS[fmt],) if auto else ()
    elif fmt == "llama3":
        root = "call"
        triggers = (TRIGGERS[fmt],) if auto else ()
    else:
        if spec.parallel:
            root = f"{gbnf_literal(GENERIC_CALLS)} call ({gbnf_literal(', ')} call)* {gbnf_literal(']}')}"
        else:
            root = f"{gbnf_literal(GENERIC_CALL)} call {gbnf_literal('}')}"
        if auto:
            rules += schema_grammar({"type": "string"}, param="tools", rule="response").splitlines()
            root = f"({root}) | {gbnf_literal(GENERIC_RESPONSE)} response {gbnf_literal('}')}"
    # the converter's shared json-* rules come once per schema, the same text each time: keep one
    lines = list(dict.fromkeys(line for line in rules if line.strip()))
    return ToolGrammar("\n".join([f"root ::= {root}", *lines]) + "\n", triggers)


NL = "\n"
