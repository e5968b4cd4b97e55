"""Wire formats: pure functions from engine events to the exact bytes and JSON
objects each API sends. No I/O, no aiohttp; the tests compare their output with
fixed expected frames.

OpenAI streams are Server-Sent Events (``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``);
Ollama streams are newline-delimited JSON (one object per line).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from ..core import DoneEvent, GenerationStats, TokenEvent

TokenBytes = Callable[[int], bytes]
"""The bytes of a token id (for top-logprob alternatives)."""

SSE_DONE = b"data: [DONE]\n\n"
SSE_CONTENT_TYPE = "text/event-stream"
NDJSON_CONTENT_TYPE = "application/x-ndjson"


# --------------------------------------------------------------------------- framing


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 kept as is (non-ASCII text is not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(obj: Any) -> bytes:
    """One Server-Sent Event carrying a JSON object."""
    return b"data: " + dumps(obj).encode("utf-8") + b"\n\n"


def ndjson(obj: Any) -> bytes:
    """One line of newline-delimited JSON."""
    return dumps(obj).encode("utf-8") + b"\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_unix() -> int:
    return int(time.time())


def rfc3339(when: datetime | float | None = None) -> str:
    """Ollama's timestamps (``created_at``, ``modified_at``, ``expires_at``): UTC with a Z suffix.
    ``when``: a datetime, a Unix time, or None for now."""
    if when is None:
        when = datetime.now(timezone.utc)
    elif not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, timezone.utc)
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def now_rfc3339() -> str:
    """Ollama's ``created_at``: now, UTC with a Z suffix."""
    return rfc3339()


def token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def logprob_value(lp: float | None) -> float | None:
    """A log-probability JSON can carry: -inf or NaN become -9999.0 (OpenAI's "never")."""
    if lp is None:
        return None
    return lp if math.isfinite(lp) else -9999.0


# --------------------------------------------------------------------------- errors


def openai_error(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def ollama_error(message: str) -> dict[str, Any]:
    return {"error": message}


# --------------------------------------------------------------------------- OpenAI


def openai_finish_reason(reason: str) -> str:
    """OpenAI's values are stop and length; a generation ended by the server
    (shutdown, cancellation) reports ``stop`` there and ``cancelled`` in the
    ``usage.me_local.finish_reason`` extension."""
    return "length" if reason == "length" else "stop"


def openai_usage(stats: GenerationStats, finish_reason: str) -> dict[str, Any]:
    """``usage`` as OpenAI gives it, plus the engine's figures under ``me_local``."""
    ext = stats.to_dict()
    ext["finish_reason"] = finish_reason
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
        "me_local": ext,
    }


def top_alternatives(ev: TokenEvent, token_bytes: TokenBytes) -> list[tuple[int, float, bytes]]:
    """``ev``'s top logprobs as (id, logprob, bytes): the bytes in the vocabulary of the member
    that wrote it (word-level ME mixes vocabularies), else from ``token_bytes``."""
    tops = ev.top_logprobs or []
    pieces = ev.top_pieces if ev.top_pieces is not None else [token_bytes(tid) for tid, _ in tops]
    return [(tid, lp, b) for (tid, lp), b in zip(tops, pieces)]


def chat_logprob(ev: TokenEvent, token_bytes: TokenBytes) -> dict[str, Any]:
    """One ``logprobs.content`` entry; ``id`` and ``member`` are me-local's extension."""
    entry: dict[str, Any] = {
        "token": token_text(ev.piece),
        "logprob": logprob_value(ev.logprob),
        "bytes": list(ev.piece),
        "top_logprobs": [],
        "id": ev.id,
        "member": ev.member,
    }
    for tid, lp, b in top_alternatives(ev, token_bytes):
        entry["top_logprobs"].append({"token": token_text(b), "logprob": logprob_value(lp), "bytes": list(b),
                                      "id": tid})
    return entry


def completion_logprobs(
    events: Sequence[TokenEvent], token_bytes: TokenBytes, offset: int, with_top: bool
) -> dict[str, Any]:
    """Legacy completions ``logprobs`` for these tokens, whose text starts at
    ``offset`` characters into the output; ``token_ids`` and ``members`` are extensions."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [] if with_top else None,
        "text_offset": [],
        "token_ids": [],
        "members": [],
    }
    for ev in events:
        out["tokens"].append(token_text(ev.piece))
        out["token_logprobs"].append(logprob_value(ev.logprob))
        if with_top:
            tops: dict[str, float | None] = {}
            for _, lp, b in top_alternatives(ev, token_bytes):
                tops.setdefault(token_text(b), logprob_value(lp))
            out["top_logprobs"].append(tops)
        out["text_offset"].append(offset)
        out["token_ids"].append(ev.id)
        out["members"].append(ev.member)
        offset += len(ev.text)
    return out


def chat_chunk(
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason,
            }
        ],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(id: str, created: int, model: str, object: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage}


def completion_chunk(
    id: str,
    created: int,
    model: str,
    text: str,
    *,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def chat_completion(
    id: str,
    created: int,
    model: str,
    text: str,
    done: DoneEvent,
    logprobs: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": openai_finish_reason(done.finish_reason),
            }
        ],
        "usage": openai_usage(done.stats, done.finish_reason),
    }


def text_completion(
    id: str, created: int, model: str, text: str, done: DoneEvent, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": openai_finish_reason(done.finish_reason)}
        ],
        "usage": openai_usage(done.stats, done.finish_reason),
    }


def openai_model(id: str, created: int, extension: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "object": "model", "created": created, "owned_by": "me-local", "me_local": extension}


# --------------------------------------------------------------------------- Ollama


def _ns(seconds: float | None) -> int:
    return max(0, round((seconds or 0.0) * 1e9))


def ollama_durations(stats: GenerationStats) -> dict[str, int]:
    """The ``*_count`` and ``*_duration`` (nanoseconds) fields of a final object."""
    eval_s = stats.total_s - (stats.ttft_s or 0.0) if stats.ttft_s is not None else 0.0
    return {
        "total_duration": _ns(stats.total_s),
        "load_duration": 0,
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": _ns(stats.prompt_eval_s),
        "eval_count": stats.generated_tokens,
        "eval_duration": _ns(eval_s),
    }


def ollama_logprob(ev: TokenEvent, token_bytes: TokenBytes) -> dict[str, Any]:
    """Ollama's logprob entry, plus ``id`` and ``member`` (me-local's extension)."""
    entry: dict[str, Any] = {"token": token_text(ev.piece), "logprob": logprob_value(ev.logprob), "id": ev.id,
                             "member": ev.member}
    if ev.top_logprobs is not None:
        entry["top_logprobs"] = [
            {"token": token_text(b), "logprob": logprob_value(lp), "id": tid}
            for tid, lp, b in top_alternatives(ev, token_bytes)
        ]
    return entry


def ollama_part(
    kind: str, model: str, created_at: str, text: str, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A streamed piece of an answer: ``kind`` is ``chat`` or ``generate``."""
    obj: dict[str, Any] = {"model": model, "created_at": created_at}
    if kind == "chat":
        obj["message"] = {"role": "assistant", "content": text}
    else:
        obj["response"] = text
    obj["done"] = False
    if logprobs is not None:
        obj["logprobs"] = logprobs
    return obj


def ollama_final(
    kind: str,
    model: str,
    created_at: str,
    done: DoneEvent,
    text: str = "",
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The last object of an answer (or the only one when not streaming). When the request asked for a
    context size, or messages were left out to fit one, the engine's figures follow under ``me_local``
    (as OpenAI's ``usage.me_local``): each member's ``n_ctx`` and ``dropped_messages``."""
    obj = ollama_part(kind, model, created_at, text, logprobs)
    obj["done"] = True
    obj["done_reason"] = done.finish_reason
    obj.update(ollama_durations(done.stats))
    stats = done.stats
    if stats.dropped_messages or any(m.n_ctx is not None for m in stats.members):
        obj["me_local"] = stats.to_dict()
    return obj


def ollama_load_reply(kind: str, model: str, created_at: str, reason: str = "load") -> dict[str, Any]:
    """The answer to an empty prompt / empty messages: the model is (already) loaded."""
    obj = ollama_part(kind, model, created_at, "")
    obj["done"] = True
    obj["done_reason"] = reason
    return obj


# --------------------------------------------------------------------------- reading SSE (clients)


class SSEDecoder:
    """Server-sent events from lines: returns each event's data when its blank line arrives
    (several ``data:`` lines in one event are joined with newlines, as the spec says)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed("")
