"""Tool calling on both APIs: the request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``
read into a :class:`~me_local.tools.ToolSpec`, each API's tool history turned into the engine's
messages (:mod:`me_local.engine.messages`), and the calls read out of an answer
(:class:`~me_local.tools.ToolParser`) written in each API's shape.

OpenAI's ``arguments`` are JSON text (in requests and answers); Ollama's are objects. A call
me-local reads from an answer keeps the model's text of its arguments: OpenAI gets it as it is
(streamed in fragments that concatenate to it), Ollama gets it parsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from ..tools import (
    CallArguments,
    CallEnd,
    CallStart,
    Content,
    Format,
    Tool,
    ToolCall,
    ToolParser,
    ToolSpec,
)
from ..tools import Event as ParseEvent
from ..tools.types import EMPTY_PARAMETERS
from .errors import ApiError, bad_request
from .fields import absent

Api = Literal["openai", "ollama"]

NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
"""A function name me-local takes (OpenAI's rule, with ``.`` and ``:`` as some Ollama clients use)."""

_TOOL_KEYS = {"type", "function"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


def _type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(v), type(v).__name__)


def _unknown(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise bad_request(f"`{where}.{key}` is not a field of a tool; remove it", f"{where}.{key}",
                              code="unknown_parameter")


def read_tools(value: Any, api: Api) -> list[Tool]:
    """A request's ``tools``: function tools, each named once, whose parameters are an object schema."""
    if absent(value):
        return []
    if not isinstance(value, list):
        raise bad_request(f"`tools` must be a list of tools, got {_type(value)}", "tools")
    out: list[Tool] = []
    for i, t in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise bad_request(f"`{where}` must be an object, got {_type(t)}", where)
        kind = t.get("type", "function")
        if kind != "function":
            raise bad_request(f"`{where}.type` is {kind!r}: only function tools are supported (send "
                              '{"type": "function", "function": {"name", "description", "parameters"}})',
                              f"{where}.type", code="unsupported_parameter")
        if api == "openai":
            _unknown(t, _TOOL_KEYS, where)
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"`{where}.function` must be an object with `name` and `parameters`",
                              f"{where}.function")
        if api == "openai":
            _unknown(fn, _FUNCTION_KEYS, f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad_request(f"`{where}.function.name` must be 1 to 64 letters, digits, `_`, `-`, `.` or `:`, "
                              f"got {name!r}", f"{where}.function.name")
        if any(x.name == name for x in out):
            raise bad_request(f"`{where}.function.name`: two tools are named {name!r}; name each tool once",
                              f"{where}.function.name")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(f"`{where}.function.description` must be a string", f"{where}.function.description")
        params = fn.get("parameters")
        if params is None:
            params = dict(EMPTY_PARAMETERS)
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise bad_request(f"`{where}.function.parameters` must be a JSON Schema of an object "
                              '({"type": "object", "properties": {...}})', f"{where}.function.parameters")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request(f"`{where}.function.strict` must be true or false", f"{where}.function.strict")
        out.append(Tool(name, params, description, position=i))
    return out


def openai_spec(body: dict[str, Any]) -> ToolSpec | None:
    """OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``; None when the request
    has no tools and no choice."""
    tools = read_tools(body.get("tools"), "openai")
    choice_value = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("`parallel_tool_calls` must be true or false", "parallel_tool_calls")
    if not tools:
        if choice_value in (None, "none", "auto"):
            return None
        raise bad_request("`tool_choice` asks for a call but the request has no `tools`; send them, or drop "
                          "`tool_choice`", "tool_choice")
    choice: Any = "auto"
    if isinstance(choice_value, str):
        if choice_value not in ("auto", "none", "required"):
            raise bad_request(f"`tool_choice` must be auto, none, required or a function, got {choice_value!r}",
                              "tool_choice")
        choice = choice_value
    elif isinstance(choice_value, dict):
        tools, choice = _choice_object(choice_value, tools)
    elif choice_value is not None:
        raise bad_request(f"`tool_choice` must be a string or an object, got {_type(choice_value)}", "tool_choice")
    return ToolSpec(tuple(tools), choice, parallel if parallel is not None else True)


def _choice_object(value: dict[str, Any], tools: list[Tool]) -> tuple[list[Tool], str]:
    kind = value.get("type")
    if kind == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        return [_named(tools, name, "tool_choice.function.name")], "required"
    if kind == "allowed_tools":
        allowed = value.get("allowed_tools")
        if not isinstance(allowed, dict):
            raise bad_request("`tool_choice.allowed_tools` must be an object with `mode` and `tools`",
                              "tool_choice.allowed_tools")
        mode = allowed.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise bad_request(f"`tool_choice.allowed_tools.mode` must be auto or required, got {mode!r}",
                              "tool_choice.allowed_tools.mode")
        listed = allowed.get("tools")
        if not isinstance(listed, list) or not listed:
            raise bad_request("`tool_choice.allowed_tools.tools` must list the tools the model may call",
                              "tool_choice.allowed_tools.tools")
        chosen = []
        for j, item in enumerate(listed):
            where = f"tool_choice.allowed_tools.tools[{j}]"
            fn = item.get("function") if isinstance(item, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else (item.get("name") if isinstance(item, dict) else None)
            chosen.append(_named(tools, name, where))
        return chosen, mode
    raise bad_request(f"`tool_choice.type` must be function or allowed_tools, got {kind!r} (custom tools are not "
                      "supported)", "tool_choice.type", code="unsupported_parameter")


def _named(tools: list[Tool], name: Any, where: str) -> Tool:
    for t in tools:
        if t.name == name:
            return t
    raise bad_request(f"`{where}` is {name!r}, which is not one of the request's tools "
                      f"({', '.join(t.name for t in tools)})", where)


def ollama_spec(body: dict[str, Any]) -> ToolSpec | None:
    """Ollama's ``tools`` (the model decides whether to call; several calls may be made)."""
    tools = read_tools(body.get("tools"), "ollama")
    return ToolSpec(tuple(tools)) if tools else None


# --------------------------------------------------------------------------- messages

_CALL_KEYS = {"openai": {"id", "type", "function", "index"}, "ollama": {"id", "type", "function"}}
_CALL_FUNCTION_KEYS = {"openai": {"name", "arguments"}, "ollama": {"name", "arguments", "index"}}


def engine_messages(raw: Any, api: Api) -> Any:
    """A request's ``messages`` with each API's tool fields in the engine's shape (an assistant's
    ``tool_calls`` with object arguments; a tool result's ``tool_call_id`` and ``name``); the
    rest as it came, for :func:`me_local.engine.normalize_messages` to check."""
    if not isinstance(raw, list):
        return raw
    out: list[Any] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            out.append(m)
            continue
        msg = {"role": m.get("role"), "content": m.get("content")}
        calls = m.get("tool_calls")
        if not absent(calls):
            if not isinstance(calls, list):
                raise bad_request(f"`messages[{i}].tool_calls` must be a list of calls", f"messages[{i}].tool_calls")
            msg["tool_calls"] = [_call(c, f"messages[{i}].tool_calls[{j}]", api) for j, c in enumerate(calls)]
        keys = {"tool_call_id": "tool_call_id"} if api == "openai" else {"tool_call_id": "tool_call_id",
                                                                        "tool_name": "name"}
        for key, name in keys.items():
            value = m.get(key)
            if absent(value):
                continue
            if not isinstance(value, str):
                raise bad_request(f"`messages[{i}].{key}` must be a string", f"messages[{i}].{key}")
            msg[name] = value
        out.append(msg)
    return out


def _call(c: Any, where: str, api: Api) -> dict[str, Any]:
    if not isinstance(c, dict):
        raise bad_request(f"`{where}` must be an object", where)
    for key in c:
        if key not in _CALL_KEYS[api]:
            raise bad_request(f"`{where}.{key}` is not a field of a tool call; remove it", f"{where}.{key}",
                              code="unknown_parameter")
    if c.get("type", "function") != "function":
        raise bad_request(f"`{where}.type` must be function", f"{where}.type")
    fn = c.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad_request(f"`{where}.function` must be an object with the function's `name` and `arguments`",
                          f"{where}.function")
    for key in fn:
        if key not in _CALL_FUNCTION_KEYS[api]:
            raise bad_request(f"`{where}.function.{key}` is not a field of a tool call; remove it",
                              f"{where}.function.{key}", code="unknown_parameter")
    args: Any = fn.get("arguments")
    where_args = f"{where}.function.arguments"
    if isinstance(args, str):  # OpenAI's JSON text (some Ollama clients send it so too)
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            raise bad_request(f"`{where_args}` is not valid JSON ({exc}); send the arguments object as JSON text",
                              where_args) from None
    elif api == "openai" and args is not None:
        raise bad_request(f"`{where_args}` must be a string of JSON, got {_type(args)}", where_args)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise bad_request(f"`{where_args}` must be a JSON object, got {_type(args)}", where_args)
    call_id = c.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise bad_request(f"`{where}.id` must be a string", f"{where}.id")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call_id:
        out["id"] = call_id
    return out


# --------------------------------------------------------------------------- answers


@dataclass
class ToolUse:
    """A request whose answer is read for calls: the format and the tools' names."""

    spec: ToolSpec
    format: Format

    def parser(self) -> ToolParser:
        return ToolParser(self.format, self.spec.names)


def unsupported(model: str, problem: str) -> ApiError:
    """Ollama's refusal of tools (``"<model> does not support tools"``), with the reason."""
    return bad_request(f"{model} does not support tools; {problem}", "tools", code="unsupported_parameter")


def openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def ollama_call(call: ToolCall) -> dict[str, Any] | None:
    """Ollama's shape of a call; None when its arguments are not a whole object (cut short)."""
    args = call.parsed_arguments()
    if args is None:
        return None
    return {"id": call.id, "function": {"index": call.index, "name": call.name, "arguments": args}}


def finish_reason(reason: str, calls: list[ToolCall]) -> str:
    """OpenAI's finish reason: ``tool_calls`` when the answer ended after its calls."""
    return "tool_calls" if calls and reason == "stop" else reason


def openai_deltas(events: list[ParseEvent]) -> list[dict[str, Any]]:
    """Parser events as OpenAI's chunk deltas: content, then per call a first delta with its
    index, id, type and name (and empty arguments), then its argument fragments."""
    out: list[dict[str, Any]] = []
    for ev in events:
        if isinstance(ev, Content):
            out.append({"content": ev.text})
        elif isinstance(ev, CallStart):
            out.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                        "function": {"name": ev.name, "arguments": ""}}]})
        elif isinstance(ev, CallArguments):
            out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
    return out


def ollama_ready(events: list[ParseEvent], parser: ToolParser) -> tuple[str, list[dict[str, Any]]]:
    """Parser events as Ollama streams them: the content, and each call whose arguments just closed
    (Ollama sends a call whole)."""
    text = "".join(ev.text for ev in events if isinstance(ev, Content))
    calls = []
    for ev in events:
        if isinstance(ev, CallEnd):
            c = ollama_call(parser.calls[ev.index])
            if c is not None:
                calls.append(c)
    return text, calls
