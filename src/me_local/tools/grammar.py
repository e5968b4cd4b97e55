"""The grammar of a tool call (llama.cpp's GBNF), from the functions' parameter schemas.

Each function's call is written the way its format's templates write it, with the arguments
constrained to the function's JSON Schema (converted by ``me_local.grammar.schema_grammar``,
passed in as ``convert``):

* ``hermes``: ``<tool_call>\\n{"name": "f", "arguments": ARGS}\\n</tool_call>``, several separated
  by a newline when ``parallel``; with ``tool_choice: auto`` the grammar is lazy, triggered by
  ``<tool_call>`` (the answer is free text until the model opens a call; then the call must be
  whole, and the answer ends after the calls);
* ``llama3``: ``{"name": "f", "parameters": ARGS}``; lazy on ``{"name"`` with ``auto``;
* ``generic``: the whole answer, ``{"tool_call": CALL}`` (``{"tool_calls": [CALL, ...]}`` when
  ``parallel``), or with ``auto`` also ``{"response": "..."}``.

``required`` (and a named function, which is ``required`` with that one function) constrains the
whole answer to calls. Each schema's rules are renamed apart (``t0-``, ``t1-``...), so two
functions' rules never collide.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from .types import Format, ToolSpec


class Converter(Protocol):
    """``schema_grammar``: GBNF in which rule ``rule`` matches JSON text valid against ``schema``
    (a RequestError naming ``param`` and the keyword for what it cannot express)."""

    def __call__(self, schema: dict[str, Any], *, param: str, rule: str = "root") -> str: ...


@dataclass(frozen=True)
class ToolGrammar:
    gbnf: str
    triggers: tuple[str, ...]
    """Empty: the whole answer is constrained; else lazy, from the first of these on."""


TRIGGERS: dict[Format, str] = {"hermes": "<tool_call>", "llama3": '{"name"'}
NL = "\n"
GENERIC_CALL = '{"tool_call": '
GENERIC_CALLS = '{"tool_calls": ['
GENERIC_RESPONSE = '{"response": '

"""The text that opens a call in the formats that allow text before it (the lazy grammar's trigger)."""


def literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


_RULE = re.compile(r"^\s*([A-Za-z0-9-]+)\s*::=", re.MULTILINE)


def prefixed(gbnf: str, prefix: str) -> str:
    """``gbnf`` with every rule it defines renamed ``prefix + name`` (definitions and references;
    string literals, character classes, repetition counts and comments are left alone)."""
    names = set(_RULE.findall(gbnf))
    out: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        ch = gbnf[i]
        if ch in '"[':  # a literal or a character class, with backslash escapes
            close = '"' if ch == '"' else "]"
            j = i + 1
            while j < n and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i : j + 1])
            i = j + 1
        elif ch in "#{<":  # a comment, a repetition count, a token literal
            end = {"#": "\n", "{": "}", "<": ">"}[ch]
            j = gbnf.find(end, i)
            j = n if j < 0 else j + (0 if ch == "#" else 1)
            out.append(gbnf[i:j])
            i = j
        elif ch.isascii() and (ch.isalnum() or ch == "-"):
            j = i
            while j < n and gbnf[j].isascii() and (gbnf[j].isalnum() or gbnf[j] == "-"):
                j += 1
            word = gbnf[i:j]
            out.append(prefix + word if word in names else word)
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def tool_grammar(spec: ToolSpec, fmt: Format, convert: Converter) -> ToolGrammar:
    """The grammar of ``spec``'s calls in ``fmt`` (see the module)."""
    key = "parameters" if fmt == "llama3" else "arguments"
    rules: list[str] = []
    calls = []
    for k, tool in enumerate(spec.tools):
        schema = convert(tool.parameters, param=f"tools[{tool.position}].function.parameters", rule="root")
        rules.append(prefixed(schema, f"t{k}-").strip())
        head = literal(f'{{"name": {json.dumps(tool.name)}, "{key}": ')
        rules.append(f'call{k} ::= {head} t{k}-root "}}"')
        calls.append(f"call{k}")
    rules.append(f"call ::= {' | '.join(calls)}")
    auto = spec.choice == "auto"
    triggers: tuple[str, ...] = ()
    if fmt == "hermes":
        opening, closing = literal("<tool_call>\n"), literal("\n</tool_call>")
        rules.append(f"tool-call ::= {opening} call {closing}")
        root = f"tool-call ({literal(NL)} tool-call)*" if spec.parallel else "tool-call"
        triggers = (TRIGGERS[fmt],) if auto else ()
    elif fmt == "llama3":
        root = "call"
        triggers = (TRIGGERS[fmt],) if auto else ()
    else:
        if spec.parallel:
            root = f"{literal(GENERIC_CALLS)} call ({literal(', ')} call)* {literal(']}')}"
        else:
            root = f"{literal(GENERIC_CALL)} call {literal('}')}"
        if auto:
            rules.append(prefixed(convert({"type": "string"}, param="tools", rule="root"), "response-").strip())
            root = f"({root}) | {literal(GENERIC_RESPONSE)} response-root {literal('}')}"
    return ToolGrammar("\n".join([f"root ::= {root}", *rules]) + "\n", triggers)
