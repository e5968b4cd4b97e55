"""What a request asks of tool calling, and what comes back: plain data, the standard library only."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

Choice = Literal["auto", "none", "required"]
"""``auto``: the model answers or calls; ``none``: it answers (the tools are not shown to it);
``required``: it calls (a named function is ``required`` with that one tool)."""

Format = Literal["hermes", "llama3", "generic"]
"""How an ensemble's members write a call (:mod:`.formats`)."""

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
"""A function's parameters when it declares none."""


@dataclass(frozen=True)
class Tool:
    """One function the model may call. ``parameters`` is its JSON Schema (an object schema)."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None
    position: int = field(default=0, compare=False)
    """Its index in the request's ``tools`` (to name it in errors)."""

    def openai(self) -> dict[str, Any]:
        """As OpenAI's ``tools`` list holds it, which is what chat templates receive (as llama.cpp
        and Ollama pass them)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}

    def function(self) -> dict[str, Any]:
        """The function object alone (name, description, parameters)."""
        out: dict[str, Any] = self.openai()["function"]
        return out


@dataclass(frozen=True)
class ToolSpec:
    """The tools of one request and what the model may do with them. A named function
    (OpenAI's ``tool_choice: {"type": "function", ...}``) arrives as ``required`` with
    ``tools`` narrowed to that function."""

    tools: tuple[Tool, ...]
    choice: Choice = "auto"
    parallel: bool = True
    """Whether an answer may hold several calls (OpenAI's ``parallel_tool_calls``; Ollama: always)."""

    @property
    def active(self) -> bool:
        """The model is shown the tools and its answer is read for calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)


_ID_CHARS = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An id for a call the model made (OpenAI's shape: ``call_`` and 24 letters and digits)."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass
class ToolCall:
    """A call read from the model's answer. ``arguments`` is the JSON text of the arguments
    object exactly as the model wrote it (OpenAI's ``arguments`` string; streamed fragments
    concatenate to it)."""

    index: int
    id: str
    name: str
    arguments: str = ""
    complete: bool = False
    """The arguments are a whole JSON object (False: the answer was cut inside the call)."""

    def parsed_arguments(self) -> dict[str, Any] | None:
        """The arguments as an object (Ollama's shape), or None when they are not one."""
        if not self.complete:
            return None
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
