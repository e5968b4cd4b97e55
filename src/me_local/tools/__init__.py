"""Tool calling, the parts that are plain text and JSON (the standard library only): what a
request asks (:class:`ToolSpec`), the format an ensemble's members write calls in
(:mod:`.formats`), the messages their templates render (:mod:`.prompt`) and the calls read
back out of an answer (:mod:`.parse`).

    types.py     Tool, ToolSpec, ToolCall, new_call_id
    formats.py   detect (a template's format), common (an ensemble's)
    prompt.py    prepare: tools and tool history into the messages a template renders
    parse.py     ToolParser (streaming) and parse: content and calls out of an answer
"""

from .formats import common, detect
from .parse import CallArguments, CallEnd, CallStart, Content, Event, ToolParser, parse
from .prompt import ToolPrompt, prepare, uses_tools
from .types import Choice, Format, Tool, ToolCall, ToolSpec, new_call_id

__all__ = [
    "CallArguments",
    "CallEnd",
    "CallStart",
    "Choice",
    "Content",
    "Event",
    "Format",
    "Tool",
    "ToolCall",
    "ToolParser",
    "ToolPrompt",
    "ToolSpec",
    "common",
    "detect",
    "new_call_id",
    "parse",
    "prepare",
    "uses_tools",
]
