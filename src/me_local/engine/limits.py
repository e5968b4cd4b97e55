"""llama-server's code-completion limits on the generated text (``/infill``'s ``n_indent`` and
``t_max_predict_ms``), applied to a generation's events.

* ``n_indent``: every line after the first (the first continues the cursor's line) must be indented
  by at least that many spaces or tabs. At the first character of a line that is neither, with less
  indentation, the generation stops and the output ends before that character (its indentation
  stays, as llama-server leaves it). A line that ends before any other character counts too (its
  newline is that character).
* ``t_max_predict_ms``: once a token's text holds a newline, the generation stops after that token if
  more than that many milliseconds have passed since the first token (the answer then ends at a line
  boundary, so an editor can show whole lines).

Either limit ends the generation as a token limit does (``finish_reason`` ``length``, llama-server's
``stop_type`` ``limit``): the engine's cancel flag stops the loop before the next token, so nothing is
generated past the cut.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from ..core import DoneEvent, Event, TokenEvent

INDENT = " \t"


@dataclass(frozen=True)
class LineLimits:
    n_indent: int = 0
    """0: none."""
    t_max_predict_ms: float = 0.0
    """0: none."""

    @property
    def active(self) -> bool:
        return self.n_indent > 0 or self.t_max_predict_ms > 0


class LimitCheck:
    """The limits over the text a generation releases, piece by piece."""

    def __init__(self, limits: LineLimits, clock: Callable[[], float] = time.perf_counter) -> None:
        self.limits = limits
        self.clock = clock
        self.t0: float | None = None
        self.in_line = False
        """A newline has been seen: the current line's indentation is checked."""
        self.indent = 0
        self.checked = False
        """The current line's first other character has been seen."""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``text`` to keep; :attr:`stopped` says whether the generation ends after it."""
        if self.t0 is None:
            self.t0 = self.clock()
        n_indent = self.limits.n_indent
        if n_indent > 0:
            for i, ch in enumerate(text):
                if self.in_line and not self.checked:
                    if ch in INDENT:
                        self.indent += 1
                    else:
                        self.checked = True
                        if self.indent < n_indent:
                            self.stopped = True
                            return text[:i]
                if ch == "\n":
                    self.in_line, self.indent, self.checked = True, 0, False
        t_max = self.limits.t_max_predict_ms
        if t_max > 0 and "\n" in text and (self.clock() - self.t0) * 1000.0 > t_max:
            self.stopped = True
        return text


def apply_limits(events: Iterator[Event], limits: LineLimits, stop: threading.Event,
                 clock: Callable[[], float] = time.perf_counter) -> Iterator[Event]:
    """``events`` with the limits applied: the token event that reaches one keeps only its text up to the
    cut, ``stop`` is set (the generation's cancel flag: the loop ends before the next token), and the
    done event says ``length``."""
    check = LimitCheck(limits, clock)
    for ev in events:
        if isinstance(ev, TokenEvent):
            if check.stopped:  # not expected: the loop checks the flag before every token
                continue
            text = check.feed(ev.text)
            if check.stopped:
                stop.set()
            yield ev if text == ev.text else replace(ev, text=text)
        elif check.stopped:
            yield DoneEvent("length", ev.stats)
        elif not ev.text:
            yield ev
        else:  # held-back text flushed at the end
            text = check.feed(ev.text)
            yield replace(ev, text=text, finish_reason="length", end=None) if check.stopped else replace(ev, text=text)
