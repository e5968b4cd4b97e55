"""`me-local chat`: an interactive chat that streams each answer.

The session speaks to a backend that yields the core's events: in-process
(an Engine) or a running daemon (``--url``). Ctrl+C stops the current answer
(the partial answer stays in the conversation); /bye or Ctrl+D exits.
"""

from __future__ import annotations

import math
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import settings as S
from ..config import parse_weights
from ..core import DoneEvent, Event
from ..errors import MeLocalError, RequestError
from .report import format_stats

if TYPE_CHECKING:
    from ..engine import Engine

SAMPLING = [name for name, s in S.CHAT_SETTINGS.items() if s.group == "sampling"]
"""The /set names that are sampling parameters (the others choose the mode, member and weights)."""

HELP = f"""Commands:
  /set {'|'.join(S.CHAT_SETTINGS)} VALUE
                     change a setting for the next answers (seed none: random again;
                     logit_bias ID=BIAS,ID=BIAS, or none)
  /stats             figures of the last answer and each member's share
  /clear             forget the conversation
  /help              this text
  /bye               exit (Ctrl+D too)
Multi-line input: a line with \"\"\" starts it, another ends it.
Ctrl+C stops the current answer."""


class InProcess:
    """Chat on an Engine in this process; generation runs on a worker thread."""

    def __init__(self, engine: Engine, ensemble: str) -> None:
        self.engine = engine
        self.ensemble = ensemble

    def describe(self) -> str:
        cfg = self.engine.config.get(self.ensemble)
        parts = ", ".join(f"{m.name} {w:.2f}" for m, w in zip(cfg.members, cfg.normalized_weights()))
        return f"ensemble {cfg.name} (mode {cfg.mode}: {parts})"

    def member_names(self) -> list[str]:
        return self.engine.config.get(self.ensemble).member_names

    def load(self) -> None:
        self.engine.ensemble(self.ensemble)

    def stream(self, messages: list[dict[str, str]], settings: dict[str, Any], stop: Any) -> Iterator[Event]:
        from ..engine import Request, sampling_params

        cfg = self.engine.config.get(self.ensemble)
        sampling = {k: settings.get(k) for k in SAMPLING}
        request = Request(
            ensemble=cfg.name,
            messages=messages,
            params=sampling_params(cfg.sampling, **sampling),
            mode=settings.get("mode"),
            weights=settings.get("weights"),
            member=settings.get("member"),
            granularity=settings.get("granularity"),
        )
        q: queue.Queue[Event | BaseException] = queue.Queue()
        run = self.engine.start(request, q.put)
        stop.append(run.cancel)
        return EventQueue(q)


class EventQueue:
    """Iterates events a worker thread puts on a queue, until the DoneEvent.

    Unlike a generator, it survives a KeyboardInterrupt raised while waiting,
    so the caller can cancel the run and keep reading to its DoneEvent."""

    def __init__(self, q: queue.Queue[Event | BaseException]) -> None:
        self._q = q
        self._done = False

    def __iter__(self) -> EventQueue:
        return self

    def __next__(self) -> Event:
        if self._done:
            raise StopIteration
        item = self._q.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, DoneEvent):
            self._done = True
        return item


def _history_file() -> Path:
    base = os.environ.get("ME_LOCAL_HOME")
    root = Path(base) if base else Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser() / "me-local"
    return root / "chat_history"


class ChatSession:
    def __init__(self, backend: Any, settings: dict[str, Any], *, out: Any = None) -> None:
        self.backend = backend
        self.settings = {k: v for k, v in settings.items() if v is not None}
        self.messages: list[dict[str, str]] = []
        self.last: DoneEvent | None = None
        self.interactive = sys.stdin.isatty()

    # -- input -----------------------------------------------------------------
    def _setup_history(self) -> None:
        if not self.interactive:
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline
            return
        path = _history_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                readline.read_history_file(str(path))
        except OSError:
            return
        import atexit

        readline.set_history_length(1000)
        atexit.register(lambda: _save_history(readline, path))

    def _read(self) -> str | None:
        """One user input (None at end of input); multi-line between \"\"\" lines."""
        line = input(">>> ")
        if line.strip().startswith('"""'):
            first = line.strip()[3:]
            lines = [first] if first else []
            while True:
                more = input("... ")
                if more.rstrip().endswith('"""'):
                    tail = more.rstrip()[:-3]
                    if tail:
                        lines.append(tail)
                    break
                lines.append(more)
            return "\n".join(lines)
        return line

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        self._setup_history()
        click.echo(f"me-local chat on {self.backend.describe()}. /help for commands, /bye to exit.")
        self.backend.load()
        while True:
            try:
                text = self._read()
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                click.echo("^C (/bye to exit)")
                continue
            if text is None:
                return
            stripped = text.strip()
            if not stripped:
                continue
            if stripped.startswith("/"):
                if not self.command(stripped):
                    return
                continue
            self.answer(text)

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name == "/clear":
            self.messages.clear()
            click.echo("Conversation cleared.")
        elif name == "/help" or name == "/?":
            click.echo(HELP)
        elif name == "/stats":
            if self.last is None:
                click.echo("No answer yet.")
            else:
                click.echo(format_stats(self.last.stats, self.last.finish_reason))
        elif name == "/set":
            key, _, value = arg.partition(" ")
            try:
                self.set(key, value.strip())
            except MeLocalError as exc:
                click.echo(f"error: {exc}")
        else:
            click.echo(f"Unknown command {name}; /help lists them.")
        return True

    def set(self, key: str, value: str) -> None:
        def number(lo: float | None, hi: float | None, cast: Any = float) -> Any:
            try:
                v = cast(value)
            except ValueError:
                raise RequestError(f"{key} needs a number, got {value!r}") from None
            if not math.isfinite(v):
                raise RequestError(f"{key} needs a finite number, got {value!r}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise RequestError(f"{key} must be between {lo} and {hi if hi is not None else 'any'}, got {v}")
            return v

        if not value:
            raise RequestError(f"usage: /set {key or 'NAME'} VALUE")
        setting = S.CHAT_SETTINGS.get(key)
        if setting is None:
            raise RequestError(f"cannot set {key!r}; settable: {', '.join(S.CHAT_SETTINGS)}")
        if setting is S.SEED and value.lower() in ("none", "random", "off"):
            self.settings.pop(key, None)
        elif setting is S.LOGIT_BIAS:
            if value.lower() in ("none", "off"):
                self.settings.pop(key, None)
            else:
                try:
                    self.settings[key] = S.parse_logit_bias(value)
                except ValueError as exc:
                    raise RequestError(f"{key}: {exc}") from None
        elif setting is S.WEIGHT:
            weights = parse_weights(value)
            names = self.backend.member_names()
            for n in weights:
                if n not in names:
                    raise RequestError(f"no member {n!r}; members are: {', '.join(names)}")
            if sum(weights.get(n, 0) for n in weights) <= 0 and all(n in weights for n in names):
                raise RequestError("all weights are zero; give at least one member a positive weight")
            self.settings[key] = weights
        elif setting is S.MEMBER:
            if value not in self.backend.member_names():
                raise RequestError(f"no member {value!r}; members are: {', '.join(self.backend.member_names())}")
            self.settings[key] = value
        elif setting.choices:
            if value not in setting.choices:
                raise RequestError(f"{key} must be one of {', '.join(setting.choices)}, got {value!r}")
            self.settings[key] = value
        else:
            self.settings[key] = number(setting.lo, setting.hi, setting.type)
        click.echo(f"Set {key} to {value}.")

    def answer(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        cancel: list[Any] = []
        ctrl_c = _CtrlC(cancel)
        try:
            with ctrl_c:
                events = self.backend.stream(self.messages, self.settings, cancel)
                ctrl_c.armed()
                self._print(events, parts, ctrl_c)
        except Exception as exc:  # the session and its conversation survive any failed answer
            self.messages.pop()
            click.echo(f"\nerror: {exc}")
            return
        if ctrl_c.hit:
            click.echo(" [stopped]", nl=False)
        click.echo()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        if ctrl_c.done is not None:
            self.last = ctrl_c.done

    @staticmethod
    def _print(events: Iterator[Event], parts: list[str], ctrl_c: _CtrlC) -> None:
        """Print the answer as it streams, to its DoneEvent (also after Ctrl+C: the worker confirms it stopped)."""
        try:
            for ev in events:
                parts.append(ev.text)
                click.echo(ev.text, nl=False)
                sys.stdout.flush()
                if isinstance(ev, DoneEvent):
                    ctrl_c.done = ev
        except KeyboardInterrupt:  # raised by the events themselves (no handler in this thread): cancel, drain
            ctrl_c.cancel()
            while True:  # more Ctrl+C only waits
                try:
                    for ev in events:
                        if isinstance(ev, DoneEvent):
                            ctrl_c.done = ev
                    break
                except KeyboardInterrupt:
                    continue


class _CtrlC:
    """While an answer streams, Ctrl+C cancels it rather than raising KeyboardInterrupt.

    A KeyboardInterrupt can land anywhere in the main thread, including inside ``queue.get``
    between taking and releasing the queue's lock, which would then never be released
    (the chat hangs, the worker runs on). So in the main thread a SIGINT handler only
    records the press and calls the cancel functions (setting a flag, closing a socket);
    the answer loop then reads on to the worker's ``DoneEvent("cancelled")``.
    """

    def __init__(self, cancel: list[Any]) -> None:
        self._cancel = cancel
        self.hit = False
        self.done: DoneEvent | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.cancel()

    def cancel(self) -> None:
        self.hit = True
        for c in list(self._cancel):
            c()

    def armed(self) -> None:
        """The cancel functions are registered: a press that came before them takes effect now."""
        if self.hit:
            self.cancel()


def _save_history(readline: Any, path: Path) -> None:
    try:
        readline.write_history_file(str(path))
    except OSError:
        pass
