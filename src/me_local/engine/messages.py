"""Chat messages as requests give them, checked and normalised for the members' templates.

A normalised message is ``{role, content}`` with text content, and:

* an assistant's calls, ``tool_calls``: ``[{"id", "type": "function", "function": {"name",
  "arguments": OBJECT}}]`` (object arguments, as chat templates that do ``arguments | tojson``
  want them; each API's routes turn their own shape into this one);
* a tool result's ``tool_call_id`` (when given) and ``name``: the function it answers, given
  (Ollama's ``tool_name``) or found from the call it answers (by id, else by position among
  the calls of the assistant message before it).
"""

from __future__ import annotations

from typing import Any

from ..errors import RequestError

ROLES = ("system", "user", "assistant", "tool", "developer")


class Messages(list[dict[str, Any]]):
    """Chat messages :func:`normalize_messages` has checked (see the module). The servers hand
    these to the engine, which does not check them again."""


def normalize_messages(messages: object) -> Messages:
    """Validate chat messages; content may be a string or OpenAI-style text parts."""
    if isinstance(messages, Messages):
        return messages
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with `role` and `content`", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", param="messages"
            )
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise RequestError(
                        f"messages[{i}].content: only text parts are supported", param="messages"
                    )
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise RequestError(f"messages[{i}].tool_calls: only an assistant message makes calls",
                                   param=f"messages[{i}].tool_calls")
            msg["tool_calls"] = [_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            value = m.get(key)
            if value is None or value == "":
                continue
            if role != "tool":
                raise RequestError(f"messages[{i}].{key}: only a tool message answers a call",
                                   param=f"messages[{i}].{key}")
            if not isinstance(value, str):
                raise RequestError(f"messages[{i}].{key} must be a string", param=f"messages[{i}].{key}")
            msg[key] = value
        out.append(msg)
    _name_results(out)
    return Messages(out)


def _call(c: Any, where: str) -> dict[str, Any]:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestError(f"{where} must be {{\"function\": {{\"name\", \"arguments\"}}}}", param=where)
    args = fn.get("arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError(f"{where}.function.arguments must be an object", param=f"{where}.function.arguments")
    call_id = c.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise RequestError(f"{where}.id must be a string", param=f"{where}.id")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call_id:
        out = {"id": call_id, **out}
    return out


def _name_results(messages: list[dict[str, Any]]) -> None:
    """Give each tool result without a name the name of the call it answers."""
    by_id: dict[str, str] = {}
    last: list[dict[str, Any]] = []
    position = 0
    for m in messages:
        if m["role"] == "assistant":
            last = m.get("tool_calls") or []
            position = 0
            for c in last:
                if "id" in c:
                    by_id[c["id"]] = c["function"]["name"]
        elif m["role"] == "tool":
            if "name" not in m:
                name = by_id.get(m.get("tool_call_id", ""))
                if name is None and position < len(last):
                    name = last[position]["function"]["name"]
                if name is not None:
                    m["name"] = name
            position += 1
        else:
            last, position = [], 0
