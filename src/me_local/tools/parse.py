"""Tool calls read out of a model's answer, as it streams.

One reader (:class:`ToolParser`) serves both the streamed and the whole answer: the whole answer
is the same reader fed everything at once, so a stream's pieces always add up to the answer
given without streaming. It is fed the answer's text piece by piece and returns events:
:class:`Content` (text for the user), :class:`CallStart` (a call's id and name, once its name is
written), :class:`CallArguments` (the next characters of its arguments, exactly as the model
writes them: the fragments concatenate to the call's ``arguments``) and :class:`CallEnd`
(its arguments object is closed).

Formats (:mod:`.formats`):

* ``hermes``: text, then ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` one or
  more times (text after the calls is kept as content);
* ``llama3``: text, then the bare object ``{"name": ..., "parameters": {...}}`` (``arguments``
  and a leading ``"type": "function"`` are read too);
* ``generic``: one JSON object, ``{"tool_call": CALL}``, ``{"tool_calls": [CALL, ...]}`` or
  ``{"response": "..."}``, whose string streams as content as it is decoded. Any other answer
  is content as written.

A call counts only when it names one of the request's tools; anything that does not read as a
call is content, as written. Arguments are streamed as they come when the call names its
function first (as the templates and the grammar write it); otherwise the call is read whole
and its arguments given at once. Whitespace around calls is formatting, not content: content
holds back trailing whitespace and drops it when calls follow (an answer without calls keeps
its text exactly).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .types import Format, ToolCall, new_call_id


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    index: int


Event = Content | CallStart | CallArguments | CallEnd

TRIGGERS: dict[Format, tuple[str, ...]] = {
    "hermes": ("<tool_call>",),
    "llama3": ('{"name"', '{"type"'),
    "generic": (),
}
"""The text that opens a call (in an answer that may begin with text)."""

HERMES_CLOSE = "</tool_call>"

# a call object up to its arguments' colon, the function named first (a JSON string)
_HEAD = re.compile(
    r'\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.)*")\s*,\s*'
    r'"(?:arguments|parameters)"\s*:')
_GENERIC_HEAD = re.compile(r'\{\s*"(tool_calls|tool_call|response)"\s*:')
_GENERIC_KEYS = ('{"tool_calls":', '{"tool_call":', '{"response":')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WS = " \t\n\r"

T = TypeVar("T")
_Read = Generator[None, None, T]


class JsonScan:
    """Where a JSON object, array or string that is arriving character by character ends
    (depth and strings only; it does not check the JSON)."""

    __slots__ = ("depth", "done", "escape", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def feed(self, text: str) -> None:
        for c in text:
            if self.done:
                return
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    self.done = self.depth == 0
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                self.done = self.depth <= 0


def member_span(text: str, key: str) -> tuple[int, int] | None:
    """Where the value of ``key`` is in the JSON object ``text`` (valid JSON), or None."""
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if text[i : i + 1] != "{":
        return None
    i = _skip(text, i + 1)
    if text[i : i + 1] == "}":
        return None
    while True:
        name, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _skip(text, _skip(text, i) + 1)  # past the colon
        _, end = decoder.raw_decode(text, i)
        if name == key:
            return i, end
        i = _skip(text, end)
        if text[i] != ",":
            return None
        i = _skip(text, i + 1)


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class ToolParser:
    """Reads an answer in ``fmt`` for calls of the functions ``names`` (see the module)."""

    def __init__(self, fmt: Format, names: Iterable[str], *, new_id: Callable[[], str] = new_call_id) -> None:
        self.fmt = fmt
        self.names = frozenset(names)
        self.calls: list[ToolCall] = []
        self._new_id = new_id
        self._content: list[str] = []
        self._ws = ""
        self._events: list[Event] = []
        self._pending: deque[str] = deque()
        self._ended = False
        self._machine = self._run()
        next(self._machine)

    # -- driving ------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        """Read the next piece of the answer; the events it completes."""
        if self._ended:
            raise RuntimeError("the answer has ended")
        self._pending.extend(text)
        self._resume()
        return self._take()

    def finish(self) -> list[Event]:
        """The answer has ended: the events of what was held back."""
        if not self._ended:
            self._ended = True
            self._resume()
            if not self.calls and self._ws:  # an answer without calls keeps its text exactly
                self._emit(Content(self._ws))
                self._content.append(self._ws)
            self._ws = ""
        return self._take()

    @property
    def content(self) -> str:
        """The content read so far."""
        return "".join(self._content)

    def _resume(self) -> None:
        try:
            next(self._machine)
        except StopIteration:
            pass

    def _take(self) -> list[Event]:
        out: list[Event] = []
        for ev in self._events:
            last = out[-1] if out else None
            if isinstance(ev, Content) and isinstance(last, Content):
                out[-1] = Content(last.text + ev.text)
            elif isinstance(ev, CallArguments) and isinstance(last, CallArguments) and last.index == ev.index:
                out[-1] = CallArguments(ev.index, last.text + ev.text)
            else:
                out.append(ev)
        self._events = []
        return out

    # -- reading ------------------------------------------------------------------
    def _next(self) -> _Read[str | None]:
        """The next character (None: the answer has ended)."""
        while not self._pending:
            if self._ended:
                return None
            yield
        return self._pending.popleft()

    def _unread(self, text: str) -> None:
        self._pending.extendleft(reversed(text))

    def _skip_ws(self) -> _Read[tuple[str, str | None]]:
        """Whitespace skipped, and the character after it (None: the end)."""
        skipped = ""
        while True:
            c = yield from self._next()
            if c is None or c not in _WS:
                return skipped, c
            skipped += c

    def _literal(self, text: str) -> _Read[bool]:
        """Read ``text`` if it comes next; otherwise read nothing."""
        got = ""
        for want in text:
            c = yield from self._next()
            if c != want:
                self._unread(got + (c or ""))
                return False
            got += c
        return True

    def _until(self, literals: tuple[str, ...]) -> _Read[str | None]:
        """Content up to the first of ``literals``: the literal (read), or None at the end. A
        possible beginning of one is held back until it is one or is not."""
        held = ""
        while True:
            c = yield from self._next()
            if c is None:
                self._text(held)
                return None
            held += c
            if held in literals:
                return held
            if not any(t.startswith(held) for t in literals):
                self._text(held[0])
                self._unread(held[1:])
                held = ""

    def _rest(self) -> _Read[None]:
        """Everything left is content."""
        while True:
            c = yield from self._next()
            if c is None:
                return
            self._text(c)

    # -- output -------------------------------------------------------------------
    def _emit(self, ev: Event) -> None:
        self._events.append(ev)

    def _text(self, text: str) -> None:
        """Content, trailing whitespace held back (see the module)."""
        for i, c in enumerate(text):
            if c in _WS:
                self._ws += c
                continue
            out, self._ws = self._ws + text[i], ""
            self._emit(Content(out))
            self._content.append(out)

    def _start(self, name: str) -> ToolCall:
        self._ws = ""  # whitespace before a call is formatting
        call = ToolCall(len(self.calls), self._new_id(), name)
        self.calls.append(call)
        self._emit(CallStart(call.index, call.id, name))
        return call

    def _arguments(self, call: ToolCall, text: str) -> None:
        if text:
            call.arguments += text
            self._emit(CallArguments(call.index, text))

    def _end(self, call: ToolCall) -> None:
        call.complete = _is_object(call.arguments)
        self._emit(CallEnd(call.index))

    # -- formats ------------------------------------------------------------------
    def _run(self) -> _Read[None]:
        if self.fmt == "generic":
            yield from self._generic()
        else:
            yield from self._tagged()
        yield from self._rest()

    def _tagged(self) -> _Read[None]:
        """hermes and llama3: text, and calls where their opening text is."""
        while True:
            trigger = yield from self._until(TRIGGERS[self.fmt])
            if trigger is None:
                return
            if self.fmt == "llama3":
                called, raw = yield from self._call(trigger)
                if not called:
                    self._text(raw)
                continue
            skipped, c = yield from self._skip_ws()
            if c != "{":
                self._text(trigger + skipped)
                self._unread(c or "")
                continue
            called, raw = yield from self._call("{")
            if not called:
                self._text(trigger + skipped + raw)
                continue
            skipped, c = yield from self._skip_ws()
            self._unread(skipped + (c or ""))
            if c == "<":
                closed = yield from self._literal(skipped + HERMES_CLOSE)
                if not closed:
                    continue
            # text after the closing tag (or without one) is read as before

    def _call(self, opening: str) -> _Read[tuple[bool, str]]:
        """A call object, from its ``opening`` text (read already): whether it was a call of one
        of the tools (its events are out), and the text read."""
        buf, scan = opening, JsonScan()
        scan.feed(opening)
        while not scan.done:
            m = _HEAD.match(buf)
            if m is not None and m.end() == len(buf):
                try:
                    name = json.loads(m.group(1))
                except ValueError:
                    name = None
                if name in self.names:
                    return (yield from self._streamed_call(name, buf, scan))
            c = yield from self._next()
            if c is None:
                return False, buf
            buf += c
            scan.feed(c)
        return self._whole_call(buf), buf

    def _streamed_call(self, name: str, buf: str, scan: JsonScan) -> _Read[tuple[bool, str]]:
        """The call named ``name``, from its arguments on: streamed as they are written."""
        call = self._start(name)
        skipped, c = yield from self._skip_ws()
        buf += skipped + (c or "")
        scan.feed(skipped + (c or ""))
        if c is None:
            return True, buf
        if c != "{":  # not an object written out (a string holding one?): read the call whole
            while not scan.done:
                c = yield from self._next()
                if c is None:
                    return True, buf
                buf += c
                scan.feed(c)
            args = self._arguments_of(buf)
            if args is not None:
                self._arguments(call, args)
                self._end(call)
            return True, buf
        args_scan = JsonScan()
        args_scan.feed(c)
        self._arguments(call, c)
        while not args_scan.done:
            c = yield from self._next()
            if c is None:
                return True, buf
            buf += c
            scan.feed(c)
            args_scan.feed(c)
            self._arguments(call, c)
        self._end(call)
        while not scan.done:  # the rest of the call object (its closing brace, keys after the arguments)
            c = yield from self._next()
            if c is None:
                break
            buf += c
            scan.feed(c)
        return True, buf

    def _arguments_of(self, text: str) -> str | None:
        """The arguments' JSON text of the call object ``text``, or None when it is not one."""
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        for key in ("arguments", "parameters"):
            if key in obj:
                value = obj[key]
                if isinstance(value, dict):
                    span = member_span(text, key)
                    return text[span[0] : span[1]] if span is not None else None
                if isinstance(value, str) and _is_object(value):  # arguments as a JSON string
                    return value.strip()
                return None
        return "{}"

    def _whole_call(self, text: str) -> bool:
        """The call object ``text``, read whole: whether it is a call of one of the tools."""
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return False
        args = self._arguments_of(text)
        if args is None:
            return False
        call = self._start(obj["name"])
        self._arguments(call, args)
        self._end(call)
        return True

    def _generic(self) -> _Read[None]:
        """One JSON object: a call, several, or the response (see the module)."""
        lead, c = yield from self._skip_ws()
        if c != "{":
            self._text(lead)
            self._unread(c or "")
            return
        buf = "{"
        while True:
            m = _GENERIC_HEAD.match(buf)
            if m is not None and m.end() == len(buf):
                key = m.group(1)
                break
            compact = re.sub(r"\s+", "", buf)
            if not any(k.startswith(compact) for k in _GENERIC_KEYS):
                yield from self._generic_whole(lead + buf)
                return
            c = yield from self._next()
            if c is None:
                self._text(lead + buf)
                return
            buf += c
        skipped, c = yield from self._skip_ws()
        buf += skipped
        if key == "response" and c == '"':
            yield from self._decode_string()
        elif key == "tool_call" and c == "{":
            called, raw = yield from self._call("{")
            if not called:
                self._text(lead + buf + raw)
                return
        elif key == "tool_calls" and c == "[":
            done = yield from self._call_list()
            if not done:
                return
        else:
            self._unread(c or "")
            yield from self._generic_whole(lead + buf)
            return
        skipped, c = yield from self._skip_ws()
        if c != "}":  # not the object's end: what follows is read as content
            self._unread(skipped + (c or ""))

    def _call_list(self) -> _Read[bool]:
        """``[CALL, ...]`` after its ``[``: whether it closed."""
        while True:
            skipped, c = yield from self._skip_ws()
            if c == "]":
                return True
            if c != "{":
                self._unread(skipped + (c or ""))
                return False
            called, raw = yield from self._call("{")
            if not called:
                self._text(raw)
                return False
            skipped, c = yield from self._skip_ws()
            if c == "]":
                return True
            if c != ",":
                self._unread(skipped + (c or ""))
                return False

    def _generic_whole(self, opening: str) -> _Read[None]:
        """A generic answer that is not written in the expected order: read whole, then taken
        apart (content as written when it is none of the three forms)."""
        scan = JsonScan()
        scan.feed(opening)
        buf = opening
        while not scan.done:
            c = yield from self._next()
            if c is None:
                self._text(buf)
                return
            buf += c
            scan.feed(c)
        try:
            obj = json.loads(buf)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("name") in self.names and self._whole_call(buf):
            return  # a call written bare
        if isinstance(obj, dict) and len(obj) == 1:
            key, value = next(iter(obj.items()))
            span = member_span(buf, key)
            raw = buf[span[0] : span[1]] if span is not None else ""
            if key == "response":
                self._text(value if isinstance(value, str) else raw)
                return
            if key == "tool_call" and self._whole_call(raw):
                return
            if key == "tool_calls" and isinstance(value, list) and value and self._whole_calls(raw, value):
                return
        self._text(buf)

    def _whole_calls(self, raw: str, items: list[Any]) -> bool:
        texts = []
        decoder = json.JSONDecoder()
        i = _skip(raw, 1)
        for _ in items:
            _, end = decoder.raw_decode(raw, i)
            texts.append(raw[i:end])
            i = _skip(raw, _skip(raw, end) + 1)
        named = [t for t in texts if self._names_a_tool(t)]
        if len(named) != len(texts):
            return False
        for t in texts:
            self._whole_call(t)
        return True

    def _names_a_tool(self, text: str) -> bool:
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        return isinstance(obj, dict) and obj.get("name") in self.names and self._arguments_of(text) is not None

    def _decode_string(self) -> _Read[None]:
        """A JSON string's characters as content, decoded as they come (after its opening quote)."""
        while True:
            c = yield from self._next()
            if c is None or c == '"':
                return
            if c != "\\":
                self._text(c)
                continue
            e = yield from self._next()
            if e is None:
                return
            if e in _ESCAPES:
                self._text(_ESCAPES[e])
            elif e == "u":
                code = yield from self._hex4()
                if code is None:
                    return
                if 0xD800 <= code < 0xDC00:  # a surrogate pair's first half
                    low = None
                    if (yield from self._literal("\\u")):
                        low = yield from self._hex4()
                    if low is not None and 0xDC00 <= low < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    else:
                        code = 0xFFFD
                elif 0xDC00 <= code < 0xE000:
                    code = 0xFFFD
                self._text(chr(code))
            else:
                self._text("\\" + e)

    def _hex4(self) -> _Read[int | None]:
        digits = ""
        for _ in range(4):
            c = yield from self._next()
            if c is None:
                return None
            digits += c
        try:
            return int(digits, 16)
        except ValueError:
            return 0xFFFD


def parse(fmt: Format, names: Iterable[str], text: str, *,
          new_id: Callable[[], str] = new_call_id) -> tuple[str, list[ToolCall]]:
    """A whole answer's content and calls."""
    parser = ToolParser(fmt, names, new_id=new_id)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
