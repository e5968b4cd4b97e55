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

from .config import MODES, parse_weights
from .core import DoneEvent, Event, TokenEvent
from .errors import MeLocalError, RequestError
from .report import format_stats

if TYPE_CHECKING:
    from me_local.engine import Engine

HELP = """Commands:
  /set temperature|top_p|top_k|min_p|max_tokens|seed|mode|weights|member VALUE
                     change a setting for the next answers (seed none: random again)
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
        from .engine import Request, sampling_params

        cfg = self.engine.config.get(self.ensemble)
        sampling = {k: settings.get(k) for k in ("temperature", "top_k", "top_p", "min_p", "max_tokens", "seed")}
        request = Request(
            ensemble=cfg.name,
            messages=messages,
            params=sampling_params(cfg.sampling, **sampling),
            mode=settings.get("mode"),
            weights=settings.get("weights"),
            member=settings.get("member"),
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
        def number(lo: float, hi: float | None, cast: Any = float) -> Any:
            try:
                v = cast(value)
            except ValueError:
                raise RequestError(f"{key} needs a number, got {value!r}") from None
            if not math.isfinite(v):
                raise RequestError(f"{key} needs a finite number, got {value!r}")
            if v < lo or (hi is not None and v > hi):
                raise RequestError(f"{key} must be between {lo} and {hi if hi is not None else 'any'}, got {v}")
            return v

        if not value:
            raise RequestError(f"usage: /set {key or 'NAME'} VALUE")
        if key == "temperature":
            self.settings[key] = number(0, 100)
        elif key in ("top_p", "min_p"):
            self.settings[key] = number(0, 1)
        elif key == "top_k":
            self.settings[key] = number(0, None, int)
        elif key == "max_tokens":
            self.settings[key] = number(1, None, int)
        elif key == "seed":
            if value.lower() in ("none", "random", "off"):
                self.settings.pop("seed", None)
            else:
                self.settings[key] = number(0, None, int)
        elif key == "mode":
            if value not in MODES:
                raise RequestError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
            self.settings["mode"] = value
        elif key == "weights":
            weights = parse_weights(value)
            names = self.backend.member_names()
            for n in weights:
                if n not in names:
                    raise RequestError(f"no member {n!r}; members are: {', '.join(names)}")
            if sum(weights.get(n, 0) for n in weights) <= 0 and all(n in weights for n in names):
                raise RequestError("all weights are zero; give at least one member a positive weight")
            self.settings["weights"] = weights
        elif key == "member":
            if value not in self.backend.member_names():
                raise RequestError(f"no member {value!r}; members are: {', '.join(self.backend.member_names())}")
            self.settings["member"] = value
        else:
            raise RequestError(
                f"cannot set {key!r}; settable: temperature, top_p, top_k, min_p, max_tokens, seed, mode, "
                "weights, member"
            )
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


class Remote:
    """Chat through a running ``me-local serve`` (``chat --url``), over its OpenAI API.

    Streams with ``logprobs`` on, so every token arrives with its id and member
    and the events match what :class:`InProcess` yields; the final figures come
    from ``usage.me_local``. Uses only the standard library.
    """

    def __init__(self, url: str, ensemble: str | None = None, api_key: str | None = None,
                 timeout: float = 10.0) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError(f"--url {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:11435")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.ensemble = ensemble
        self.api_key = api_key
        self.timeout = timeout
        self._info: dict[str, Any] | None = None

    # -- HTTP ----------------------------------------------------------------------
    def _connect(self) -> Any:
        import http.client

        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def _send(self, method: str, path: str, body: Any = None, conn: Any = None) -> tuple[Any, Any]:
        import json

        conn = conn or self._connect()
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            reason = exc.strerror or exc.__class__.__name__
            raise MeLocalError(
                f"cannot reach me-local at {self.url} ({reason}); start it with `me-local serve`"
            ) from None
        return conn, resp

    def _fail(self, resp: Any) -> MeLocalError:
        import json

        raw = resp.read()
        try:
            err = json.loads(raw)["error"]
            message = err["message"] if isinstance(err, dict) else str(err)
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip() or resp.reason
        if resp.status == 401:
            return MeLocalError(f"me-local at {self.url} needs an API key: pass --api-key or set ME_LOCAL_API_KEY")
        if 400 <= resp.status < 500:
            return RequestError(message)
        return MeLocalError(f"me-local at {self.url} answered {resp.status}: {message}")

    def _get_json(self, path: str) -> Any:
        import json

        conn, resp = self._send("GET", path)
        try:
            if resp.status != 200:
                raise self._fail(resp)
            return json.loads(resp.read())
        finally:
            conn.close()

    # -- the backend interface -------------------------------------------------------
    def _model(self) -> dict[str, Any]:
        if self._info is None:
            models = [m for m in self._get_json("/v1/models").get("data", [])
                      if m.get("me_local", {}).get("kind") == "ensemble"]
            if self.ensemble is None:
                chosen = next((m for m in models if m["me_local"].get("default")), models[0] if models else None)
            else:
                chosen = next((m for m in models if m["id"] == self.ensemble), None)
            if chosen is None:
                names = ", ".join(m["id"] for m in models)
                raise RequestError(f"me-local at {self.url} has no ensemble {self.ensemble!r}; it serves: {names}")
            self._info = chosen
            self.ensemble = chosen["id"]
        return self._info

    def describe(self) -> str:
        info = self._model()["me_local"]
        parts = ", ".join(f"{m['name']} {m['weight']:.2f}" for m in info.get("members", []))
        return f"ensemble {self.ensemble} (mode {info.get('mode')}: {parts}) at {self.url}"

    def member_names(self) -> list[str]:
        return [m["name"] for m in self._model()["me_local"].get("members", [])]

    def load(self) -> None:
        """Wait while the daemon is still loading its models."""
        import json
        import time

        deadline = time.monotonic() + 600
        while True:
            conn, resp = self._send("GET", "/health")
            try:
                body = resp.read()
            finally:
                conn.close()
            if resp.status == 200:
                self._model()
                return
            try:
                status = json.loads(body).get("status")
            except (ValueError, AttributeError):
                status = None
            if status != "loading" or time.monotonic() > deadline:
                raise MeLocalError(f"me-local at {self.url} is not ready (status {status or resp.status})")
            time.sleep(0.5)

    def stream(self, messages: list[dict[str, str]], settings: dict[str, Any], stop: Any) -> Iterator[Event]:
        self._model()
        body: dict[str, Any] = {
            "model": self.ensemble,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
        }
        for key in ("temperature", "top_k", "top_p", "min_p", "max_tokens", "seed"):
            if settings.get(key) is not None:
                body[key] = settings[key]
        ext = {k: settings[k] for k in ("mode", "weights", "member") if settings.get(k) is not None}
        if ext:
            body["ensemble"] = ext
        events = RemoteEvents(self, body)
        stop.append(events.cancel)
        return events


class RemoteEvents:
    """The core's events from a daemon's SSE stream; survives a KeyboardInterrupt like EventQueue.

    The request goes out on the first ``next()`` (the daemon answers once the first token
    exists), so Ctrl+C while the prompt is processed lands where the chat handles it."""

    def __init__(self, remote: Remote, body: dict[str, Any]) -> None:
        self._remote = remote
        self._body = body
        self._conn = remote._connect()
        self._resp: Any = None
        self._index = 0
        self._flush: list[str] = []
        self._finish = "stop"
        self._stats: dict[str, Any] | None = None
        self._pending: list[Event] = []
        self._done = False
        self._cancelled = False

    def __iter__(self) -> RemoteEvents:
        return self

    def cancel(self) -> None:
        """Stop the answer: closing the connection makes the daemon cancel the generation."""
        import socket

        self._cancelled = True
        try:
            if self._conn.sock is not None:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()

    def _open(self) -> None:
        try:
            _, resp = self._remote._send("POST", "/v1/chat/completions", self._body, conn=self._conn)
        except MeLocalError:
            self._done = True
            raise
        if resp.status != 200:
            self._done = True
            try:
                raise self._remote._fail(resp)
            finally:
                self._conn.close()
        if self._conn.sock is not None:
            self._conn.sock.settimeout(None)  # tokens may be slow to come; Ctrl+C cancels
        self._resp = resp

    def _end(self, finish: str) -> DoneEvent:
        self._done = True
        self._conn.close()
        return DoneEvent(finish, _stats_from(self._stats), "".join(self._flush))

    def __next__(self) -> Event:
        import json

        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._done:
                raise StopIteration
            if self._cancelled:
                return self._end("cancelled")
            if self._resp is None:
                self._open()
                continue
            try:
                line = self._resp.readline()
            except (OSError, ValueError, AttributeError):  # closed under us (cancel) or connection lost
                if self._cancelled:
                    continue
                self._done = True
                raise MeLocalError("the connection to me-local was lost during the answer") from None
            if not line:
                if self._cancelled:
                    continue
                self._done = True
                raise MeLocalError("me-local ended the answer without finishing it")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return self._end(self._finish)
            chunk = json.loads(data)
            if "error" in chunk:
                self._done = True
                self._conn.close()
                raise MeLocalError(f"me-local: {chunk['error'].get('message', chunk['error'])}")
            if chunk.get("usage"):
                self._stats = chunk["usage"].get("me_local")
                if self._stats and self._stats.get("finish_reason"):
                    self._finish = self._stats["finish_reason"]
            for choice in chunk.get("choices", []):
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
        text = (choice.get("delta") or {}).get("content") or ""
        entries = ((choice.get("logprobs") or {}).get("content")) or []
        if not entries:
            if text:
                self._flush.append(text)  # text held back by the engine and flushed at the end
            return
        for i, e in enumerate(entries):
            self._pending.append(TokenEvent(self._index, e.get("id", -1), text if i == 0 else "", e.get("member"),
                                            e.get("logprob"), None, bytes(e.get("bytes") or b"")))
            self._index += 1


def _stats_from(d: dict[str, Any] | None) -> Any:
    from .core import GenerationStats, MemberStats

    if not d:
        return GenerationStats(mode="?", seed=0)
    members = [MemberStats(**{k: m.get(k, 0) for k in ("name", "selected", "catchup_tokens", "prompt_tokens",
                                                        "cached_prompt_tokens")}) for m in d.get("members", [])]
    return GenerationStats(mode=d.get("mode", "?"), seed=d.get("seed", 0), prompt_tokens=d.get("prompt_tokens", 0),
                           cached_prompt_tokens=d.get("cached_prompt_tokens", 0),
                           generated_tokens=d.get("generated_tokens", 0), ttft_s=d.get("ttft_s"),
                           total_s=d.get("total_s", 0.0), prompt_eval_s=d.get("prompt_eval_s", 0.0), members=members)
