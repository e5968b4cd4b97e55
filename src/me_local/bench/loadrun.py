"""``me-local bench --server URL``: a load run against a daemon's OpenAI-compatible
streaming endpoint, ``POST /v1/chat/completions`` with ``"stream": true``.

C clients share N requests. Each reads the server-sent events (``data: {json}``
lines, ``data: [DONE]`` at the end) and records when the request was sent, when
each content delta arrived and how the stream ended. Reported: aggregate
tokens/s over the wall-clock span, time to first token and per-token latency
(the gap between consecutive content deltas) at p50/p95/p99, errors (HTTP
errors, error events, broken connections) and cancellations (a stream that
ended without ``[DONE]``, with finish reason ``cancelled``, or that the client
abandoned after ``--timeout``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..core.types import tokens_per_second
from ..server.wire import SSEDecoder
from .prompts import prompt_text
from .stats import Summary, percentile


@dataclass
class LoadSettings:
    url: str
    clients: int = 4
    requests: int = 16
    tokens: int = 128
    prompt_tokens: int = 100
    model: str | None = None
    api_key: str | None = None
    timeout: float = 300.0
    temperature: float | None = None
    seed: int | None = None
    """When set, request i asks for seed + i (reproducible runs, comparable with in-process ones)."""
    run: str = field(default_factory=lambda: f"{time.time_ns() // 1000 % 10**9:09d}")
    """Goes into every prompt, so a second load run does not hit the first one's cached prompts."""


@dataclass
class RequestResult:
    index: int
    status: int | None = None
    error: str | None = None
    cancelled: bool = False
    done: bool = False
    finish_reason: str | None = None
    start: float = 0.0
    end: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    """Times (absolute, perf_counter) of the content deltas."""
    usage_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.arrivals)

    @property
    def ttft_s(self) -> float | None:
        return self.arrivals[0] - self.start if self.arrivals else None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]




def request_body(settings: LoadSettings, index: int, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_text(index, settings.prompt_tokens, settings.run)}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": settings.tokens,
    }
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    if settings.seed is not None:
        body["seed"] = settings.seed + index
    return body


def _headers(settings: LoadSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


async def _stream_one(session: aiohttp.ClientSession, settings: LoadSettings, index: int, model: str,
                      clock: Callable[[], float]) -> RequestResult:
    res = RequestResult(index=index, start=clock())
    url = settings.url.rstrip("/") + "/v1/chat/completions"
    try:
        async with session.post(url, json=request_body(settings, index, model), headers=_headers(settings)) as resp:
            res.status = resp.status
            if resp.status != 200:
                text = (await resp.text())[:300]
                res.error = f"HTTP {resp.status}: {text}"
                return res
            decoder = SSEDecoder()
            async for raw in resp.content:
                data = decoder.feed(raw.decode("utf-8", "replace"))
                if data is None:
                    continue
                if data.strip() == "[DONE]":
                    res.done = True
                    break
                _handle_chunk(res, data, clock)
                if res.error:
                    return res
            tail = decoder.flush()
            if tail is not None and tail.strip() == "[DONE]":
                res.done = True
    except asyncio.CancelledError:
        raise
    except (aiohttp.ClientError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        res.end = clock()
    if res.error is None and (not res.done or res.finish_reason == "cancelled"):
        res.cancelled = True
    return res


def _handle_chunk(res: RequestResult, data: str, clock: Callable[[], float]) -> None:
    try:
        obj = json.loads(data)
    except ValueError:
        res.error = f"a stream event is not JSON: {data[:100]!r}"
        return
    if not isinstance(obj, dict):
        res.error = f"a stream event is not an object: {data[:100]!r}"
        return
    if "error" in obj:
        err = obj["error"]
        res.error = str(err.get("message", err) if isinstance(err, dict) else err)
        return
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        res.usage_tokens = usage["completion_tokens"]
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            res.arrivals.append(clock())
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]


async def _pick_model(session: aiohttp.ClientSession, settings: LoadSettings) -> str:
    """--ensemble, else the first model the server lists, else ``default``."""
    if settings.model:
        return settings.model
    try:
        async with session.get(settings.url.rstrip("/") + "/v1/models", headers=_headers(settings)) as resp:
            if resp.status == 200:
                data = await resp.json()
                models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
                ensembles = [m for m in models if isinstance(m, str) and "/" not in m]
                if ensembles:
                    return ensembles[0]
    except (aiohttp.ClientError, OSError, ValueError):
        pass
    return "default"


async def run_load(settings: LoadSettings, progress: Callable[[], None] | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run the load test and return its report (see :func:`summarize_load`)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=settings.clients)
    results: list[RequestResult] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = await _pick_model(session, settings)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(settings.requests):
            queue.put_nowait(i)

        async def client() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                task = asyncio.ensure_future(_stream_one(session, settings, i, model, clock))
                try:
                    res = await asyncio.wait_for(task, settings.timeout)
                except asyncio.TimeoutError:
                    res = RequestResult(index=i, cancelled=True, start=clock() - settings.timeout, end=clock())
                results.append(res)
                if progress is not None:
                    progress()

        t0 = clock()
        await asyncio.gather(*(client() for _ in range(settings.clients)))
        wall = clock() - t0
    return summarize_load(settings, model, results, wall)


def run_load_sync(settings: LoadSettings, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    return asyncio.run(run_load(settings, progress))


def _pcts(values: Sequence[float], scale: float = 1000.0) -> dict[str, float] | None:
    if not values:
        return None
    return {f"p{p}": round(percentile(values, p) * scale, 3) for p in (50, 95, 99)}


def summarize_load(
    settings: LoadSettings, model: str, results: Sequence[RequestResult], wall_s: float
) -> dict[str, Any]:
    results = sorted(results, key=lambda r: r.index)
    completed = [r for r in results if r.ok]
    errors = [r for r in results if r.error is not None]
    cancelled = [r for r in results if r.cancelled and r.error is None]
    tokens = sum(r.tokens for r in results if r.error is None)
    ttfts = [r.ttft_s for r in completed if r.ttft_s is not None]
    gaps = [g for r in completed for g in r.gaps_s]
    per_request = [
        tokens_per_second(len(r.arrivals), r.arrivals[-1] - r.arrivals[0])
        for r in completed
        if len(r.arrivals) >= 2 and r.arrivals[-1] > r.arrivals[0]
    ]
    return {
        "url": settings.url,
        "model": model,
        "clients": settings.clients,
        "requests": settings.requests,
        "max_tokens": settings.tokens,
        "prompt_words": max(1, settings.prompt_tokens * 3 // 4),
        "wall_s": round(wall_s, 3),
        "completed": len(completed),
        "errors": len(errors),
        "cancelled": len(cancelled),
        "first_error": errors[0].error if errors else None,
        "tokens": tokens,
        "aggregate_tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else 0.0,
        "per_request_tokens_per_s": Summary.of(per_request).to_dict(3) if per_request else None,
        "ttft_ms": _pcts(ttfts),
        "token_latency_ms": _pcts(gaps),
        "finish_reasons": {
            reason: sum(1 for r in completed if r.finish_reason == reason)
            for reason in sorted({str(r.finish_reason) for r in completed})
        },
    }


def format_load_report(report: dict[str, Any]) -> str:
    def pct(d: dict[str, float] | None) -> str:
        return "  ".join(f"{k} {v:.1f}" for k, v in d.items()) if d else "-"

    lines = [
        f"load run: {report['url']} model {report['model']}, {report['clients']} clients, "
        f"{report['requests']} requests of up to {report['max_tokens']} tokens",
        f"  completed {report['completed']}  errors {report['errors']}  cancelled {report['cancelled']}  "
        f"wall {report['wall_s']:.2f} s",
        f"  aggregate {report['aggregate_tokens_per_s']:.1f} tokens/s ({report['tokens']} tokens)",
        f"  time to first token ms: {pct(report['ttft_ms'])}",
        f"  per-token latency ms:   {pct(report['token_latency_ms'])}",
    ]
    if report.get("per_request_tokens_per_s"):
        lines.append(f"  per request tokens/s: median {report['per_request_tokens_per_s']['median']:.1f}")
    if report.get("first_error"):
        lines.append(f"  first error: {report['first_error']}")
    return "\n".join(lines)
