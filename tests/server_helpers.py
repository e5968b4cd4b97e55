"""Helpers for the server tests: configs of tiny models, an engine of fake members
(for tests of the HTTP layer that need no real model), an engine whose members
can be held back at will (to make concurrency deterministic), a real server
running in a background thread, and parsers for SSE, NDJSON and Prometheus text."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from me_local.config import load_config
from me_local.engine import Engine, llama_member_factory
from me_local.server import Server, ServerSettings, ServerState, create_app

from .fakes import FakeFactory

# n_threads: 1 keeps tiny models fast on a loaded 2-core machine (ggml's thread
# pool spins; two threads fighting other processes is a thousand times slower).
TINY_CONFIG = """
ensembles:
  tiny:
    mode: me
    n_ctx: 256
    sampling: {{max_tokens: 16}}
    members:
      - {{name: one, path: {a1}, weight: 1, n_threads: 1}}
      - {{name: two, path: {a2}, weight: 1, n_threads: 1}}
      - {{name: three, path: {a3}, weight: 1, n_threads: 1}}
  pair:
    n_ctx: 256
    parallel: 2
    max_queue: {max_queue}
    sampling: {{max_tokens: 16}}
    members:
      - {{name: one, path: {a1}, weight: 0.5, n_threads: 1}}
      - {{name: two, path: {a2}, weight: 0.5, n_threads: 1}}
  solo:
    n_ctx: 1024
    n_batch: 8
    members:
      - {{name: one, path: {a1}, n_threads: 1}}
  duo:
    n_ctx: 256
    parallel: 2
    members:
      - {{name: one, path: {a1}, n_threads: 1}}
  short:
    n_ctx: 32
    members:
      - {{name: one, path: {a1}, n_threads: 1}}
"""


FAKE_MODELS = {name: Path(f"/nowhere/{name}.gguf") for name in ("a1", "a2", "a3")}
"""Model paths for a config served by fake members (never opened)."""


def write_tiny_config(directory: Path, models: dict[str, Path], *, max_queue: int = 16) -> Path:
    path = directory / "models.yaml"
    path.write_text(textwrap.dedent(TINY_CONFIG.format(max_queue=max_queue, **{k: str(v) for k, v in models.items()})))
    return path


def fake_engine_loader(config: Path, *, fim: bool = False) -> Callable[[], Engine]:
    """An engine whose members are fakes (tests/fakes.py) with each ensemble's n_ctx: the HTTP
    layer's parsing, framing and errors without llama.cpp, in milliseconds. ``fim``: the fakes have
    fill-in-the-middle tokens."""
    return engine_loader(config, FakeFactory(n_ctx=None, fim=fim))


# --------------------------------------------------------------------------- held-back members


class Throttle:
    """Permits for evaluate() calls: a member evaluates (one prompt chunk run or
    one catch-up, i.e. one token step) only when the test has granted a permit."""

    def __init__(self, permits: int = 0) -> None:
        self._sem = threading.Semaphore(permits)
        self._open = threading.Event()
        self.waiting = threading.Event()
        """Set while a worker waits for a permit."""
        self.chunk_gate: threading.Event | None = None
        self.at_chunk_boundary = threading.Event()

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._sem.release()

    def open(self) -> None:
        self._open.set()
        self.allow(10_000)
        if self.chunk_gate is not None:
            self.chunk_gate.set()

    def wait(self) -> None:
        if self._open.is_set():
            return
        self.waiting.set()
        self._sem.acquire(timeout=60)  # never hang a test run for good
        self.waiting.clear()


class ThrottledMember:
    """A real llama.cpp member whose evaluate() waits for the throttle's permit."""

    def __init__(self, inner: Any, throttle: Throttle, log: list[list[int]] | None = None) -> None:
        self._inner = inner
        self._throttle = throttle
        self._log = log
        self.evaluations = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def evaluate(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None) -> None:
        self._throttle.wait()
        self.evaluations += 1
        if self._log is not None:
            self._log.append(list(tokens))
        gate = self._throttle.chunk_gate
        if gate is not None and cancel is not None:
            inner_cancel = cancel

            def cancel_at_boundary() -> bool:
                self._throttle.at_chunk_boundary.set()
                gate.wait(60)
                return inner_cancel()

            cancel = cancel_at_boundary
        self._inner.evaluate(tokens, cancel)


class ThrottledFactory:
    """Members of slot s of ensemble e are held back by ``throttles[(e, s)]``; a slot's throttle is
    created closed (no permits) unless the test made it first. ``evaluated`` lists the tokens of
    every evaluate() call, in the order they were let through."""

    def __init__(self, throttles: dict[tuple[str, int], Throttle] | None = None) -> None:
        self.throttles = throttles or {}
        self.members: dict[tuple[str, int], list[ThrottledMember]] = {}
        self.evaluated: list[list[int]] = []
        self._base = llama_member_factory()
        self._count: dict[str, int] = {}

    def __call__(self, mc: Any, ens: Any) -> ThrottledMember:
        n = self._count.get(ens.name, 0)
        self._count[ens.name] = n + 1
        slot = n // len(ens.members)
        throttle = self.throttles.setdefault((ens.name, slot), Throttle())
        member = ThrottledMember(self._base(mc, ens), throttle, self.evaluated)
        self.members.setdefault((ens.name, slot), []).append(member)
        return member

    def throttle(self, ensemble: str, slot: int = 0) -> Throttle:
        return self.throttles.setdefault((ensemble, slot), Throttle())

    def embedder(self, mc: Any, ens: Any) -> Any:
        """Embedding contexts are never held back: they are apart from the slots."""
        return self._base.embedder(mc, ens)

    def open_all(self) -> None:
        for t in self.throttles.values():
            t.open()


def engine_loader(config: Path, factory: Any = None) -> Callable[[], Engine]:
    def load() -> Engine:
        engine = Engine(load_config(config), factory=factory)
        engine.load_all()
        return engine

    return load


# --------------------------------------------------------------------------- a live server in a thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A real ``Server`` listening on a free loopback port, run by a background thread's event loop."""

    def __init__(self, settings: ServerSettings, loader: Callable[[], Engine]) -> None:
        self.server = Server(settings, loader)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="live-server", daemon=True)

    def _run(self) -> None:
        self.server.on_ready.append(lambda s: self.ready.set())
        try:
            asyncio.run(self.server.serve(handle_signals=False))
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    def start(self) -> LiveServer:
        self.thread.start()
        if not self.ready.wait(60):
            raise RuntimeError("the live server did not become ready in 60 s")
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        self.server.request_shutdown()
        self.thread.join(60)

    @property
    def url(self) -> str:
        return self.server.url


# --------------------------------------------------------------------------- parsing


def sse_frames(body: bytes) -> list[bytes]:
    """Split an SSE body into its events, checking the framing exactly."""
    assert body.endswith(b"\n\n"), body[-50:]
    frames = body[:-2].split(b"\n\n")
    for f in frames:
        assert f.startswith(b"data: ") and b"\n" not in f, f
    return [f[len(b"data: "):] for f in frames]


def sse_json(body: bytes) -> list[Any]:
    """The JSON events of an SSE body, checking it ends with exactly one ``data: [DONE]``."""
    frames = sse_frames(body)
    assert frames[-1] == b"[DONE]" and frames.count(b"[DONE]") == 1
    return [json.loads(f) for f in frames[:-1]]


def ndjson_lines(body: bytes) -> list[Any]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body[:-1].split(b"\n")]


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format -> {(name, labels): value}; checks each line's syntax."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad metrics line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


async def loaded_client(aiohttp_client: Any, config: Path) -> tuple[Any, ServerState]:
    """An aiohttp test client on the app over ``config``'s real models, once they are loaded."""
    state = ServerState(engine_loader(config))
    client = await aiohttp_client(create_app(state))
    await state.wait_loaded()
    return client, state
