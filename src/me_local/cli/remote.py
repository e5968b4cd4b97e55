"""``me-local chat --url``: chat through a running ``me-local serve`` over its OpenAI API.

:class:`Remote` is a chat backend like :class:`~.chat.InProcess`: it streams with
``logprobs`` on, so every token arrives with its id and member and the events match
what the engine yields in-process; the final figures come from ``usage.me_local``.
HTTP runs on aiohttp, on an event loop of its own in a daemon thread (the chat's
input loop is synchronous); events reach the chat through a queue, and cancelling
(Ctrl+C) cancels the request's task, which closes the connection, which makes the
daemon cancel the generation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from .. import settings as S
from ..core import DoneEvent, Event, GenerationStats, MemberStats, TokenEvent
from ..errors import MeLocalError, RequestError
from ..server.wire import SSEDecoder

T = TypeVar("T")

LOAD_WAIT_S = 600.0
"""How long ``load`` waits for a daemon that is still loading its models."""


class _LoopThread:
    """An asyncio loop running in a daemon thread, for a synchronous caller."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="me-local-chat-http", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def _reason(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", None)
    return getattr(os_error, "strerror", None) or getattr(exc, "strerror", None) or exc.__class__.__name__


class Remote:
    """A chat backend on a daemon's OpenAI API. Call :meth:`close` when done."""

    def __init__(self, url: str, ensemble: str | None = None, api_key: str | None = None,
                 timeout: float = 10.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError(f"--url {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:11435")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._base = self.url + parts.path.rstrip("/")
        self.ensemble = ensemble
        self.api_key = api_key
        self.timeout = timeout
        self._info: dict[str, Any] | None = None
        self._io: _LoopThread | None = None

    # -- HTTP ----------------------------------------------------------------------
    @property
    def io(self) -> _LoopThread:
        if self._io is None:
            self._io = _LoopThread()
        return self._io

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def session(self) -> aiohttp.ClientSession:
        """A session for one request (made on the I/O loop): nothing stays open between requests,
        so a Remote that is dropped without :meth:`close` leaks no connection."""
        return aiohttp.ClientSession(headers=self._headers())

    def unreachable(self, exc: BaseException) -> MeLocalError:
        return MeLocalError(f"cannot reach me-local at {self.url} ({_reason(exc)}); start it with `me-local serve`")

    def failure(self, status: int, reason: str | None, raw: bytes) -> MeLocalError:
        """The error a non-200 answer means, in the daemon's own words where it gave some."""
        try:
            err = json.loads(raw)["error"]
            message = err["message"] if isinstance(err, dict) else str(err)
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip() or (reason or str(status))
        if status == 401:
            return MeLocalError(f"me-local at {self.url} needs an API key: pass --api-key or set ME_LOCAL_API_KEY")
        if 400 <= status < 500:
            return RequestError(message)
        return MeLocalError(f"me-local at {self.url} answered {status}: {message}")

    async def _get(self, path: str) -> tuple[int, str | None, bytes]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session() as session, session.get(self._base + path, timeout=timeout) as resp:
                return resp.status, resp.reason, await resp.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise self.unreachable(exc) from None

    def _get_json(self, path: str) -> Any:
        status, reason, raw = self.io.run(self._get(path))
        if status != 200:
            raise self.failure(status, reason, raw)
        return json.loads(raw)

    def close(self) -> None:
        """Stop the I/O thread (idempotent)."""
        io, self._io = self._io, None
        if io is not None:
            io.close()

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
        deadline = time.monotonic() + LOAD_WAIT_S
        while True:
            status, _, raw = self.io.run(self._get("/health"))
            if status == 200:
                self._model()
                return
            try:
                state = json.loads(raw).get("status")
            except (ValueError, AttributeError):
                state = None
            if state != "loading" or time.monotonic() > deadline:
                raise MeLocalError(f"me-local at {self.url} is not ready (status {state or status})")
            time.sleep(0.5)  # the daemon says it is loading: ask again shortly

    def stream(self, messages: list[dict[str, str]], settings: dict[str, Any], stop: list[Any]) -> RemoteEvents:
        self._model()
        body: dict[str, Any] = {
            "model": self.ensemble,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
        }
        ext: dict[str, Any] = {}
        for key, setting in S.CHAT_SETTINGS.items():
            if settings.get(key) is None or setting.openai is None:
                continue
            where, _, field = setting.openai.rpartition(".")
            if where == "ensemble":
                ext[field] = settings[key]
            else:
                body[field] = settings[key]
        if ext:
            body["ensemble"] = ext
        events = RemoteEvents(self, body)
        stop.append(events.cancel)
        return events


class _Done:
    """The stream ended with ``data: [DONE]``."""


_DONE = _Done()


class RemoteEvents:
    """The core's events from a daemon's SSE stream.

    The request goes out on the first ``next()`` (the daemon answers once the first token
    exists). Its chunks are read on the I/O loop and handed over through a queue; ``cancel``
    (Ctrl+C) cancels that task, which closes the connection, and the next ``next()`` is the
    ``DoneEvent("cancelled")``."""

    def __init__(self, remote: Remote, body: dict[str, Any]) -> None:
        self._remote = remote
        self._body = body
        self._chunks: queue.Queue[dict[str, Any] | _Done | BaseException] = queue.Queue()
        self._task: concurrent.futures.Future[None] | None = None
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
        self._cancelled = True
        task = self._task
        if task is not None:
            self._remote.io.loop.call_soon_threadsafe(task.cancel)
        self._chunks.put(_DONE)  # wake a reader waiting for the next chunk

    async def _read(self) -> None:
        put = self._chunks.put
        remote = self._remote
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=remote.timeout)
        url = remote._base + "/v1/chat/completions"
        try:
            async with remote.session() as session, session.post(url, json=self._body, timeout=timeout) as resp:
                if resp.status != 200:
                    put(remote.failure(resp.status, resp.reason, await resp.read()))
                    return
                decoder = SSEDecoder()
                async for raw in resp.content:
                    data = decoder.feed(raw.decode("utf-8", "replace"))
                    if data is None:
                        continue
                    if data == "[DONE]":
                        put(_DONE)
                        return
                    put(json.loads(data))
                put(MeLocalError("me-local ended the answer without finishing it"))
        except (aiohttp.ClientConnectorError, asyncio.TimeoutError) as exc:
            put(remote.unreachable(exc))
        except (aiohttp.ClientError, OSError, ValueError):
            put(MeLocalError("the connection to me-local was lost during the answer"))

    def _end(self, finish: str) -> DoneEvent:
        self._done = True
        return DoneEvent(finish, _stats_from(self._stats), "".join(self._flush))

    def __next__(self) -> Event:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._done:
                raise StopIteration
            if self._cancelled:
                return self._end("cancelled")
            if self._task is None:
                self._task = self._remote.io.submit(self._read())
            chunk = self._chunks.get()
            if self._cancelled:
                continue
            if isinstance(chunk, BaseException):
                self._done = True
                raise chunk
            if isinstance(chunk, _Done):
                return self._end(self._finish)
            if "error" in chunk:
                self._done = True
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


def _stats_from(d: dict[str, Any] | None) -> GenerationStats:
    if not d:
        return GenerationStats(mode="?", seed=0)
    members = [MemberStats(**{k: m.get(k, 0) for k in ("name", "selected", "catchup_tokens", "prompt_tokens",
                                                        "cached_prompt_tokens")},
                           generated_tokens=m.get("generated_tokens")) for m in d.get("members", [])]
    return GenerationStats(mode=d.get("mode", "?"), seed=d.get("seed", 0), prompt_tokens=d.get("prompt_tokens", 0),
                           cached_prompt_tokens=d.get("cached_prompt_tokens", 0),
                           generated_tokens=d.get("generated_tokens", 0), ttft_s=d.get("ttft_s"),
                           total_s=d.get("total_s", 0.0), prompt_eval_s=d.get("prompt_eval_s", 0.0), members=members,
                           granularity=d.get("granularity"), words=d.get("words"))
