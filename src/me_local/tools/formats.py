"""Which format a chat template's model writes tool calls in, read from the template's source
(as llama.cpp does), and one format for an ensemble.

* ``hermes`` (Hermes 2 Pro, Qwen 2.5 and most ChatML tool models): the template mentions
  ``<tool_call>``; a call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, after
  any text. The template receives ``tools`` and renders calls and results itself.
* ``llama3`` (Llama 3.1 and later): the template has an ``ipython`` turn; a call is the bare
  object ``{"name": ..., "parameters": {...}}``. The template receives ``tools`` too.
* ``generic``: any other template, with or without tool support of its own (SmolLM2, Gemma 3,
  ChatML, plain). me-local tells the model about the tools in a system message and rewrites
  calls and results in the history as JSON text; the answer is one JSON object,
  ``{"tool_call": {"name": ..., "arguments": {...}}}`` (``{"tool_calls": [...]}`` when
  several calls may be made) or ``{"response": "..."}``, forced by a grammar.
"""

from __future__ import annotations

from collections.abc import Iterable

from .types import Format

HERMES_MARK = "<tool_call>"
LLAMA3_MARK = "<|start_header_id|>ipython<|end_header_id|>"


def detect(template: str) -> Format:
    """The format a model whose chat template is ``template`` writes calls in."""
    if HERMES_MARK in template:
        return "hermes"
    if LLAMA3_MARK in template:
        return "llama3"
    return "generic"


def common(formats: Iterable[Format]) -> Format:
    """One format for members that write one text together: theirs when they agree, else
    ``generic`` (each member then gets the generic prompt, whatever its template can do)."""
    found = set(formats)
    return found.pop() if len(found) == 1 else "generic"


def template_receives_tools(fmt: Format) -> bool:
    """Whether the members' templates render the tools and the calls themselves (``generic``:
    me-local writes them into the messages as text)."""
    return fmt != "generic"
