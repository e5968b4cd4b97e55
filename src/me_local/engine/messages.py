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

from collections.abc import Callable, Sequence
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
            ids = [c["id"] for c in msg["tool_calls"] if "id" in c]
            for j, call_id in enumerate(ids):
                if call_id in ids[:j]:
                    raise RequestError(f"messages[{i}].tool_calls: two calls have the id {call_id!r}, so a result "
                                       "could not say which it answers; give each call its own id",
                                       param=f"messages[{i}].tool_calls")
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
    """Give each tool result without a name the name of the call it answers. A result must follow
    an assistant message with calls (other results between them), and an id it gives must be one
    of those calls' ids when they have ids: OpenAI refuses the others, and a template would render
    a result of no call (or of whichever call stood at its position)."""
    by_id: dict[str, str] = {}
    last: list[dict[str, Any]] = []
    position = 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            last = m.get("tool_calls") or []
            position = 0
            for c in last:
                if "id" in c:
                    by_id[c["id"]] = c["function"]["name"]
        elif m["role"] == "tool":
            if not last:
                raise RequestError(
                    f"`messages[{i}]` is a tool result, but no assistant message with `tool_calls` comes right "
                    "before it (a tool message answers one of those calls); send the assistant's message with its "
                    "`tool_calls` first, or send the result as a user message", param=f"messages[{i}].role")
            ids = [c["id"] for c in last if "id" in c]
            call_id = m.get("tool_call_id")
            if call_id is not None and ids and call_id not in ids:
                raise RequestError(
                    f"`messages[{i}].tool_call_id` is {call_id!r}, which none of the calls before it has "
                    f"({', '.join(ids)}); send the id of the call it answers", param=f"messages[{i}].tool_call_id")
            if "name" not in m:
                name = by_id.get(m.get("tool_call_id", ""))
                if name is None and position < len(last):
                    name = last[position]["function"]["name"]
                if name is not None:
                    m["name"] = name
            position += 1
        else:
            last, position = [], 0


def fit_messages(messages: Messages, render: Callable[[Messages], Sequence[int]], budget: int
                 ) -> tuple[list[int], int]:
    """The prompt ``render`` makes of ``messages``, made to fit ``budget`` tokens by leaving out
    the oldest turns, as Ollama truncates a conversation: system messages and the latest
    message always stay; a turn (a user message and the replies after it) goes whole, the
    oldest first, as few as will do. Returns the prompt and how many messages were left out;
    when even the fewest messages left (the system messages and the latest one) do not fit
    ``budget``, that shortest prompt (the caller checks it against the context)."""
    full = list(render(messages))
    if len(full) <= budget:
        return full, 0
    rest = [j for j, m in enumerate(messages) if m["role"] != "system"]
    # a cut at c leaves out rest[:c]: before a user message, or all but the latest message
    cuts = [c for c in range(1, len(rest)) if messages[rest[c]]["role"] == "user" or c == len(rest) - 1]
    if not cuts:
        return full, 0

    def prompt(k: int) -> list[int]:
        gone = set(rest[:cuts[k]])
        return list(render(Messages(m for j, m in enumerate(messages) if j not in gone)))

    tried: dict[int, list[int]] = {}
    lo, hi, best = 0, len(cuts) - 1, len(cuts) - 1
    while lo <= hi:  # the prompt shortens as more is left out: the fewest cuts that fit
        mid = (lo + hi) // 2
        tried[mid] = prompt(mid)
        if len(tried[mid]) <= budget:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    return (tried[best] if best in tried else prompt(best)), cuts[best]
