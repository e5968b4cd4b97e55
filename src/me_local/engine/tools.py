"""Tool calling in an ensemble: the one format its members write calls in, whether they can
carry tools at all, and each member's prompt with the tools (:mod:`me_local.tools`).

An ensemble's format is its members' when their chat templates agree (``hermes`` or
``llama3``), else ``generic`` for every member (:func:`me_local.tools.common`). An ensemble
can carry tools when each member's template renders a short conversation with a call and its
result in that format (a probe, once per set of members): the generic format needs only plain
system, user and assistant messages, so a template fails the probe only when it refuses even
those (a template without a system role, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import RequestError
from ..tools import Format, Tool, ToolSpec, common, detect, prepare
from .messages import normalize_messages

if TYPE_CHECKING:
    from ..backends.types import MemberContext

PROBE_SPEC = ToolSpec((Tool("lookup", {"type": "object", "properties": {"query": {"type": "string"}}},
                            "Look something up."),))
PROBE_MESSAGES = normalize_messages([
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": {"query": "France"}}}]},
    {"role": "tool", "content": "Paris", "tool_call_id": "call_1"},
])
"""A conversation with a call and its result: what a member's template must render to carry tools."""


def member_format(member: MemberContext) -> Format:
    """The format ``member``'s chat template writes calls in."""
    return detect(member.model.template(member.chat_template).text)


class ToolPlanner:
    """One ensemble's tool formats and probes, per set of active members (cached: the templates
    do not change while it is loaded)."""

    def __init__(self, members: Sequence[MemberContext]) -> None:
        self._members = members
        self._formats: dict[tuple[int, ...], Format] = {}
        self._problems: dict[tuple[int, ...], str | None] = {}

    def format(self, active: Sequence[int]) -> Format:
        key = tuple(active)
        fmt = self._formats.get(key)
        if fmt is None:
            fmt = self._formats[key] = common(member_format(self._members[i]) for i in active)
        return fmt

    def problem(self, active: Sequence[int]) -> str | None:
        """Why the members ``active`` cannot carry tools (None: they can)."""
        key = tuple(active)
        if key not in self._problems:
            self._problems[key] = self._probe(active)
        return self._problems[key]

    def _probe(self, active: Sequence[int]) -> str | None:
        prompt = prepare(PROBE_MESSAGES, PROBE_SPEC, self.format(active))
        for i in active:
            member = self._members[i]
            try:
                member.chat_prompt(prompt.messages, tools=prompt.tools, labels=prompt.labels)
            except RequestError as exc:
                return f"the chat template of member {member.name!r} cannot render tool calls ({exc})"
        return None
