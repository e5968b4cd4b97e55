"""Tools and tool history into the messages a member's chat template renders.

Native formats (:mod:`.formats`): the messages go as they are (assistant ``tool_calls`` with
object arguments, as templates that do ``arguments | tojson`` expect; ``tool`` messages with
``tool_call_id`` and ``name``) and the template receives ``tools``.

``generic``: the template receives plain messages only (llama.cpp's generic handler and
minja's polyfills): a system message lists the tools and the answer's JSON form; an
assistant's calls become that JSON as its content; a tool result becomes a ``user`` message
``{"tool_response": {"tool": NAME, "content": ...}}``; consecutive messages of one role are
then merged (Gemma's template raises unless user and assistant alternate). Everything
me-local writes is message content, so the chat prompt keeps it text (never control tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .formats import template_receives_tools
from .types import Format, ToolSpec


@dataclass(frozen=True)
class ToolPrompt:
    """What a member's template renders: the messages, how errors name each of them, and the
    ``tools`` variable (None: the template is not given any)."""

    messages: list[dict[str, Any]]
    labels: list[str]
    tools: list[dict[str, Any]] | None


def uses_tools(messages: list[dict[str, Any]]) -> bool:
    """Whether a conversation holds calls or tool results (its history then needs a format)."""
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def prepare(messages: list[dict[str, Any]], spec: ToolSpec | None, fmt: Format) -> ToolPrompt:
    labels = [f"messages[{i}]" for i in range(len(messages))]
    active = spec is not None and spec.active
    if template_receives_tools(fmt):
        tools = [t.openai() for t in spec.tools] if spec is not None and active else None
        return ToolPrompt([dict(m) for m in messages], labels, tools)
    return _generic(messages, labels, spec if active else None)


def generic_instructions(spec: ToolSpec) -> str:
    """The system text of the generic format: the tools, and the JSON the answer must be (after
    llama.cpp's generic handler and minja's tool polyfill)."""
    tools = json.dumps([t.function() for t in spec.tools], ensure_ascii=False, indent=2)
    if spec.parallel:
        key, example = "tool_calls", '{"tool_calls": [{"name": "tool_name", "arguments": {"arg1": "some_value"}}]}'
    else:
        key, example = "tool_call", '{"tool_call": {"name": "tool_name", "arguments": {"arg1": "some_value"}}}'
    if spec.choice == "required":
        form = f"Respond in JSON format with `{key}` (a request to call tools)."
    else:
        form = (f"Respond in JSON format, either with `{key}` (a request to call tools) or with `response` (your "
                "reply to the user's request).")
    return (f"You can call any of the following tools to satisfy the user's requests:\n{tools}\n\n{form}\n"
            f"Example tool call syntax:\n\n{example}")


def call_json(calls: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """An assistant's calls as the generic format writes them."""
    items = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    if len(items) == 1 and not parallel:
        return {"tool_call": items[0]}
    return {"tool_calls": items}


def _generic(messages: list[dict[str, Any]], labels: list[str], spec: ToolSpec | None) -> ToolPrompt:
    parallel = spec.parallel if spec is not None else False
    out: list[tuple[dict[str, Any], str]] = []
    for m, label in zip(messages, labels):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            obj = call_json(m["tool_calls"], parallel)
            if content:
                obj["content"] = content
            out.append(({"role": "assistant", "content": json.dumps(obj, ensure_ascii=False)}, label))
        elif role == "tool":
            response: dict[str, Any] = {}
            if m.get("name"):
                response["tool"] = m["name"]
            response["content"] = content
            out.append(({"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)},
                        f"{label} (a tool result)"))
        else:
            out.append(({"role": role, "content": content}, label))
    if spec is not None:
        text = generic_instructions(spec)
        if out and out[0][0]["role"] == "system":
            first, label = out[0]
            out[0] = ({"role": "system", "content": f"{first['content']}\n\n{text}"}, f"{label} (with the tools)")
        else:
            out.insert(0, ({"role": "system", "content": text}, "the tools"))
    merged: list[tuple[dict[str, Any], str]] = []
    for m, label in out:
        if merged and merged[-1][0]["role"] == m["role"] and m["role"] != "system":
            prev, prev_label = merged[-1]
            merged[-1] = ({"role": m["role"], "content": f"{prev['content']}\n\n{m['content']}"},
                          f"{prev_label} + {label}")
        else:
            merged.append((m, label))
    return ToolPrompt([m for m, _ in merged], [label for _, label in merged], None)
