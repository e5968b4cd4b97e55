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


INCOMPLETE_NOTE = ("the answer ended before it was complete in the requested format (the JSON, or the text the "
                   "grammar describes, is cut off); raise the token limit (`max_tokens`, `num_predict`) or ask for "
                   "a shorter answer")


def grammar_extension(grammar: str | None) -> dict[str, Any]:
    """What an answer says about its grammar (:attr:`DoneEvent.grammar`; nothing without one):
    ``grammar`` is complete, incomplete or untriggered, and an incomplete one has a ``note``
    that the structured output is cut off."""
    if grammar is None:
        return {}
    ext: dict[str, Any] = {"grammar": grammar}
    if grammar == "incomplete":
        ext["note"] = INCOMPLETE_NOTE
    return ext


def openai_usage(stats: GenerationStats, finish_reason: str, grammar: str | None = None) -> dict[str, Any]:
    """``usage`` as OpenAI gives it, plus the engine's figures under ``me_local`` (and, for a
    request with a grammar, :func:`grammar_extension`)."""
    ext = stats.to_dict()
    ext["finish_reason"] = finish_reason
    ext.update(grammar_extension(grammar))
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
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole chat answer; with ``tool_calls`` (OpenAI's shape) the message carries them (its
    content null when it has none) and an answer that ended after them finishes with ``tool_calls``."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    reason = openai_finish_reason(done.finish_reason)
    if tool_calls:
        message["content"] = text or None
        message["tool_calls"] = tool_calls
        if reason == "stop":
            reason = "tool_calls"
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": reason,
            }
        ],
        "usage": openai_usage(done.stats, done.finish_reason, done.grammar),
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
        "usage": openai_usage(done.stats, done.finish_reason, done.grammar),
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
    kind: str, model: str, created_at: str, text: str, logprobs: list[dict[str, Any]] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A streamed piece of an answer: ``kind`` is ``chat`` or ``generate``; a chat message carries
    ``tool_calls`` when given any."""
    obj: dict[str, Any] = {"model": model, "created_at": created_at}
    if kind == "chat":
        obj["message"] = {"role": "assistant", "content": text}
        if tool_calls:
            obj["message"]["tool_calls"] = tool_calls
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
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The last object of an answer (or the only one when not streaming); with a grammar,
    me-local's ``me_local`` extension says whether the answer completed it."""
    obj = ollama_part(kind, model, created_at, text, logprobs, tool_calls)
    obj["done"] = True
    obj["done_reason"] = done.finish_reason
    obj.update(ollama_durations(done.stats))
    ext = grammar_extension(done.grammar)
    if ext:
        obj["me_local"] = ext
    return obj


def ollama_load_reply(kind: str, model: str, created_at: str, reason: str = "load") -> dict[str, Any]:
    """The answer to an empty prompt / empty messages: the model is (already) loaded."""
    obj = ollama_part(kind, model, created_at, "")
    obj["done"] = True
    obj["done_reason"] = reason
    return obj


# --------------------------------------------------------------------------- llama-server (/infill)


STOP_TYPES = {"eos": "eos", "word": "word", "length": "limit", "cancelled": "none"}
"""llama-server's ``stop_type`` for how a generation ended."""


def llama_stop_type(done: DoneEvent) -> str:
    """``eos`` (the model ended it), ``word`` (a stop string), ``limit`` (a token, time or indentation
    limit, or the context's end) or ``none`` (cancelled)."""
    if done.finish_reason == "stop":
        return "eos" if done.end is not None else "word"
    return STOP_TYPES.get(done.finish_reason, "none")


def llama_timings(stats: GenerationStats) -> dict[str, Any]:
    """llama-server's ``timings``: ``prompt_*`` for the prompt tokens evaluated (the cached ones are
    ``cache_n``), ``predicted_*`` for the generated ones, in milliseconds."""
    prompt_n = max(0, stats.prompt_tokens - stats.cached_prompt_tokens)
    prompt_ms = stats.prompt_eval_s * 1000.0
    predicted_ms = (stats.total_s - stats.ttft_s) * 1000.0 if stats.ttft_s is not None else 0.0
    n = stats.generated_tokens
    return {
        "cache_n": stats.cached_prompt_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / stats.prompt_eval_s if prompt_n and stats.prompt_eval_s > 0 else 0.0,
        "predicted_n": n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / n if n else 0.0,
        "predicted_per_second": n * 1000.0 / predicted_ms if n and predicted_ms > 0 else 0.0,
    }


def infill_partial(content: str, predicted: int, evaluated: int) -> dict[str, Any]:
    """A streamed piece of an ``/infill`` answer, as llama-server sends it."""
    return {"index": 0, "content": content, "tokens": [], "stop": False, "id_slot": -1,
            "tokens_predicted": predicted, "tokens_evaluated": evaluated}


def infill_final(model: str, content: str, done: DoneEvent, *, evaluated: int, settings: dict[str, Any],
                 truncated: bool, extension: dict[str, Any]) -> dict[str, Any]:
    """The final result of an ``/infill`` answer (streaming: its last event, with ``content`` empty)."""
    stats = done.stats
    ext = stats.to_dict()
    ext["finish_reason"] = done.finish_reason
    ext.update(extension)
    return {
        "index": 0, "content": content, "tokens": [], "id_slot": -1, "stop": True, "model": model,
        "tokens_predicted": stats.generated_tokens, "tokens_evaluated": evaluated,
        "generation_settings": settings, "has_new_line": "\n" in content, "truncated": truncated,
        "stop_type": llama_stop_type(done), "tokens_cached": evaluated + stats.generated_tokens,
        "timings": llama_timings(stats), "me_local": ext,
    }


def nested_fields(obj: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """llama-server's ``response_fields``: each path (``a/b`` for ``obj["a"]["b"]``) that exists, as a
    key of a flat object; the others are left out."""
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = obj
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


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
