"""The embedding routes: OpenAI's ``POST /v1/embeddings``, Ollama's ``POST /api/embed`` and its
older ``POST /api/embeddings``.

Each reads its fields (:mod:`.fields`), makes an :class:`~me_local.engine.EmbedRequest` and runs
``Engine.embed`` on a thread of its own (:meth:`ServerState.run_job`: a client that leaves
cancels it). What a vector is (pooling, an ensemble's concatenation) is the engine's
(engine/embedding.py); what differs between the routes is normalisation (OpenAI and
``/api/embed``: unit length; ``/api/embeddings``: the raw pooled vector), what an input longer
than the context gets (OpenAI and ``/api/embeddings``: a 400; ``/api/embed``: cut, unless
``truncate: false``) and the answer's shape.
"""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
from aiohttp import web

from ..engine import EmbedRequest, EmbedResult, Engine
from . import fields, wire
from .errors import bad_request
from .ollama import keep_alive
from .params import ModelRef, opt_bool, opt_number, opt_object, opt_str, read_json, resolve_model
from .state import NOTE, STATE

MAX_INPUTS = 2048
"""The most inputs one request may embed (OpenAI's limit)."""


def _run(engine: Engine, cancel: Callable[[], bool], *, request: EmbedRequest) -> EmbedResult:
    return engine.embed(request, cancel)


async def _embed(request: web.Request, ref: ModelRef, req: EmbedRequest, shown: str) -> EmbedResult:
    note = request[NOTE]
    note.model = ref.name
    note.prompt = shown
    result = await request.app[STATE].run_job(functools.partial(_run, request=req), name="me-local-embed")
    note.prompt_tokens = result.prompt_tokens
    return result


# --------------------------------------------------------------------------- OpenAI


def openai_inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None, list[str]]:
    """OpenAI's ``input``: texts or token-id lists, and how errors name each."""
    def bad(what: str, why: str) -> NoReturn:
        raise bad_request(f"`{what}` {why}; send a string, a list of strings, a list of token ids or a list of "
                          "token-id lists", "input")

    if value is None:
        bad("input", "is required")
    if isinstance(value, str):
        if not value:
            bad("input", "is an empty string")
        return [value], None, ["input"]
    if not isinstance(value, list) or not value:
        bad("input", "is empty" if value == [] else "has the wrong type")
    if len(value) > MAX_INPUTS:
        raise bad_request(f"`input` has {len(value)} inputs; at most {MAX_INPUTS} are allowed per request", "input")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None, [list(value)], ["input"]
    labels = [f"input[{i}]" for i in range(len(value))]
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v:
                bad(f"input[{i}]", "is an empty string")
        return list(value), None, labels
    if all(isinstance(v, list) for v in value):
        for i, ids in enumerate(value):
            if not ids:
                bad(f"input[{i}]", "is an empty list")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                bad(f"input[{i}]", "is not a list of token ids (integers)")
        return None, [list(v) for v in value], labels
    bad("input", "mixes strings, token ids and lists")


async def openai_embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    fields.check(body, fields.OPENAI_EMBEDDINGS)
    ref = resolve_model(state.require_engine().config, body.get("model"))
    texts, tokens, labels = openai_inputs(body.get("input"))
    encoding = opt_str(body, "encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request(f"`encoding_format` must be \"float\" or \"base64\", got {encoding!r}", "encoding_format")
    dimensions = opt_number(body, "dimensions", 1, integer=True)
    req = EmbedRequest(ensemble=ref.ensemble.name, member=ref.member, texts=texts, tokens=tokens, normalize=True,
                       dimensions=dimensions, labels=labels,
                       overflow_fix="shorten it or split it (OpenAI's API refuses inputs longer than the context)")
    shown = "\n".join(texts) if texts is not None else str(tokens)
    result = await _embed(request, ref, req, shown)
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)}
            for i, v in enumerate(result.vectors)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    out = {"object": "list", "data": data, "model": ref.name, "usage": usage,
           "me_local": {"members": list(result.members), "dimensions": result.dimensions}}
    return web.json_response(out, dumps=wire.dumps)


def _encoded(v: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    values: list[float] = v.astype(np.float32).tolist()
    return values


# --------------------------------------------------------------------------- Ollama


def _ollama_options(body: dict[str, Any], ref: ModelRef) -> int | None:
    """``options``, checked; the context limit it sets (``num_ctx``), if any."""
    opts = opt_object(body, "options")
    fields.check(opts, fields.OLLAMA_EMBED_OPTIONS)
    n_ctx = opt_number(opts, "num_ctx", 1, integer=True, param="options.num_ctx")
    if n_ctx is not None and n_ctx > ref.ensemble.n_ctx:
        raise bad_request(f"`options.num_ctx` is {n_ctx} but {ref.ensemble.name!r} has a context of "
                          f"{ref.ensemble.n_ctx} tokens; send at most that, or raise `n_ctx` in models.yaml",
                          "options.num_ctx")
    return int(n_ctx) if n_ctx is not None else None


def _limit_name(num_ctx: int | None) -> str:
    return "`options.num_ctx`" if num_ctx is not None else "the ensemble's n_ctx"


async def ollama_embed(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    state = request.app[STATE]
    body = await read_json(request)
    fields.check(body, fields.OLLAMA_EMBED)
    ref = resolve_model(state.require_engine().config, body.get("model"))
    raw = body.get("input")
    if raw is None or isinstance(raw, str):
        texts = [raw] if raw else []
        labels = ["input"]
    elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        texts, labels = list(raw), [f"input[{i}]" for i in range(len(raw))]
    else:
        raise bad_request("`input` must be a string or a list of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise bad_request(f"`input` has {len(texts)} inputs; at most {MAX_INPUTS} are allowed per request", "input")
    truncate = opt_bool(body, "truncate", True)
    dimensions = opt_number(body, "dimensions", 1, integer=True)
    num_ctx = _ollama_options(body, ref)
    req = EmbedRequest(ensemble=ref.ensemble.name, member=ref.member, texts=texts, normalize=True, truncate=truncate,
                       limit=num_ctx, limit_name=_limit_name(num_ctx), dimensions=dimensions, labels=labels,
                       overflow_fix="shorten it, or send `truncate: true` (Ollama's default) to cut it",
                       keep_alive=keep_alive(body))
    result = await _embed(request, ref, req, "\n".join(texts))
    out = {
        "model": ref.name,
        "embeddings": [_encoded(v, "float") for v in result.vectors],
        "total_duration": int((time.perf_counter() - t0) * 1e9),
        "load_duration": int(result.load_seconds * 1e9),
        "prompt_eval_count": result.prompt_tokens,
        "me_local": {"members": list(result.members), "dimensions": result.dimensions,
                     "truncated": list(result.truncated)},
    }
    return web.json_response(out, dumps=wire.dumps)


async def ollama_embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    fields.check(body, fields.OLLAMA_EMBEDDINGS)
    ref = resolve_model(state.require_engine().config, body.get("model"))
    prompt = opt_str(body, "prompt") or ""
    num_ctx = _ollama_options(body, ref)
    req = EmbedRequest(ensemble=ref.ensemble.name, member=ref.member, texts=[prompt] if prompt else [],
                       normalize=False, limit=num_ctx, limit_name=_limit_name(num_ctx), param="prompt",
                       labels=["prompt"], overflow_fix="shorten it, or use /api/embed, which cuts it",
                       keep_alive=keep_alive(body))
    result = await _embed(request, ref, req, prompt)
    embedding = _encoded(result.vectors[0], "float") if prompt else []
    return web.json_response({"embedding": embedding}, dumps=wire.dumps)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", openai_embeddings)
    app.router.add_post("/api/embed", ollama_embed)
    app.router.add_post("/api/embeddings", ollama_embeddings)
