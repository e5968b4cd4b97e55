"""The Ollama-compatible routes, so editor plugins that speak Ollama work unchanged:
``GET /``, ``GET /api/version``, ``GET /api/tags``, ``POST /api/show``,
``GET /api/ps``, ``POST /api/chat``, ``POST /api/generate``.

Answers stream as NDJSON by default (``"stream": false`` gives one object).
``options`` maps temperature, top_p, top_k, min_p, seed, num_predict, stop,
num_ctx (up to the ensemble's n_ctx), the penalties (repeat_penalty, repeat_last_n,
presence_penalty, frequency_penalty) and me-local's logit_bias; what the other fields and options get is in
:mod:`.fields` (a 400 for any that would change the answer). Model names
may carry Ollama's ``:latest`` tag. The ``ensemble`` extension works here too.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__, chat_templates
from .. import settings as S
from ..backends.gguf_check import read_gguf_header
from ..config import EnsembleConfig, MemberConfig
from ..core import DoneEvent, TokenEvent
from ..engine import Engine, FimInput, Request
from ..errors import MeLocalError
from . import fields, tools, wire
from .errors import ApiError, bad_request
from .params import (
    ModelRef,
    chat_messages,
    engine_request,
    ensemble_extension,
    logprob_options,
    opt_bool,
    opt_number,
    opt_object,
    opt_str,
    read_json,
    resolve_model,
    sampling_fields,
    stop_strings,
    token_bytes,
)
from .respond import collect, joined_text, stream_response
from .state import NOTE, STATE
from .structured import ollama_format

OLLAMA_API_VERSION = "0.9.0"
"""The Ollama API version reported by /api/version (clients gate features on it)."""


def options_overrides(body: dict[str, Any], ens: EnsembleConfig) -> dict[str, Any]:
    opts = opt_object(body, "options")
    fields.check(opts, fields.OLLAMA_OPTIONS)
    n_ctx = opt_number(opts, "num_ctx", 1, integer=True, param="options.num_ctx")
    if n_ctx is not None and n_ctx > ens.n_ctx:
        raise bad_request(f"`options.num_ctx` is {n_ctx} but {ens.name!r} has a context of {ens.n_ctx} tokens; "
                          "send at most that, or raise `n_ctx` in models.yaml", "options.num_ctx")
    # a negative seed means a random one; num_predict -1 or -2 means until the context is full
    assert S.SEED.hi is not None
    seed = opt_number(opts, "seed", -S.SEED.hi, S.SEED.hi, integer=True, param="options.seed")
    n = opt_number(opts, "num_predict", -2, integer=True, param="options.num_predict")
    if n == 0:
        raise bad_request("`options.num_predict` must be positive (or -1 for no limit)", "options.num_predict")
    if not opt_bool(opts, "penalize_newline", True, param="options.penalize_newline"):
        raise bad_request("`options.penalize_newline: false` (sparing newlines from the penalties) is not "
                          "supported: newlines are penalised as any token (Ollama no longer reads it either); "
                          "remove it", "options.penalize_newline")
    return {
        **sampling_fields(opts, "ollama"),
        "seed": None if seed is None or seed < 0 else seed,
        "max_tokens": ens.n_ctx if n is not None and n < 0 else n,
        "stop": stop_strings(opts.get("stop"), "options.stop"),
    }


def _request(ref: ModelRef, body: dict[str, Any], **kw: Any) -> Request:
    choice = ensemble_extension(body, ref)
    grammar = ollama_format(body.get("format"))
    logprobs, top = logprob_options(body)
    if top and not logprobs:
        raise bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    overrides = dict(options_overrides(body, ref.ensemble), logprobs=logprobs or None,
                     top_logprobs=top if logprobs else None)
    return engine_request(ref, choice, overrides, grammar=grammar, **kw)


def parse_chat(body: dict[str, Any], engine: Engine) -> tuple[ModelRef, Request | None]:
    fields.check(body, fields.OLLAMA_CHAT)
    fields.check_messages(body.get("messages"), fields.OLLAMA_MESSAGE)
    ref = resolve_model(engine.config, body.get("model"), ollama=True)
    raw = body.get("messages")
    if raw is None or raw == []:
        ensemble_extension(body, ref)
        options_overrides(body, ref.ensemble)
        ollama_format(body.get("format"))
        return ref, None  # "load the model"
    messages = chat_messages(tools.engine_messages(raw, "ollama"))
    spec = tools.ollama_spec(body)
    if spec is not None and body.get("logprobs"):
        raise bad_request("`logprobs` is not supported with `tools` (an answer's calls are not tokens of its "
                          "content); drop one of them", "logprobs")
    if spec is not None and not fields.absent(body.get("format")):
        raise bad_request("`format` is not supported with `tools`: the tools' grammar shapes the answer; drop one "
                          "of them", "format")
    return ref, _request(ref, body, messages=messages, tools=spec)


def parse_generate(body: dict[str, Any], engine: Engine) -> tuple[ModelRef, Request | None]:
    fields.check(body, fields.OLLAMA_GENERATE)
    ref = resolve_model(engine.config, body.get("model"), ollama=True)
    prompt = opt_str(body, "prompt")
    system = opt_str(body, "system")
    raw = opt_bool(body, "raw")
    suffix = opt_str(body, "suffix")
    if suffix:  # fill in the middle: the members' FIM tokens make the prompt, never a chat template
        if system:
            raise bad_request("`system` has no place in a fill-in-the-middle prompt (`suffix`), which is built from "
                              "the model's FIM tokens, not its chat template; drop `system`", "system")
        return ref, _request(ref, body, fim=FimInput(prompt or "", suffix))
    if raw and system:
        raise bad_request("`system` does not apply with `raw: true` (the prompt is taken as written; Ollama "
                          "refuses it too); drop `system`, or write it into the raw prompt", "system")
    if not prompt:
        ensemble_extension(body, ref)
        options_overrides(body, ref.ensemble)
        ollama_format(body.get("format"))
        return ref, None
    if raw:
        return ref, _request(ref, body, prompt=prompt)
    messages = chat_messages(([{"role": "system", "content": system}] if system else [])
                             + [{"role": "user", "content": prompt}])
    return ref, _request(ref, body, messages=messages)


def _error_frame(err: ApiError) -> bytes:
    return wire.ndjson(wire.ollama_error(err.message))


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    engine = state.require_engine()
    ref, req = parse_chat(body, engine)
    use = None
    if req is not None and req.tools is not None:
        fmt, problem = await asyncio.get_running_loop().run_in_executor(None, engine.tool_support, req)
        if problem is not None:
            raise tools.unsupported(ref.name, problem)
        use = tools.ToolUse(req.tools, fmt)
    return await _answer(request, "chat", ref, req, body, use)


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    ref, req = parse_generate(body, state.require_engine())
    return await _answer(request, "generate", ref, req, body)


async def _answer(request: web.Request, kind: str, ref: ModelRef, req: Request | None,
                  body: dict[str, Any], use: tools.ToolUse | None = None) -> web.StreamResponse:
    state = request.app[STATE]
    stream_wanted = opt_bool(body, "stream", default=True)
    created_at = wire.now_rfc3339()
    if req is None:
        reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
        return web.json_response(wire.ollama_load_reply(kind, ref.name, created_at, reason), dumps=wire.dumps)
    note = request[NOTE]
    note.model = ref.name
    stream = state.open_stream(req, ref.ensemble.name, note)
    try:
        first = await state.first_event(stream)
        logprobs = req.params.logprobs
        tb = token_bytes(stream.engine, ref.ensemble.name) if logprobs else None

        def lp(tokens: Iterable[TokenEvent]) -> list[dict[str, Any]] | None:
            return [wire.ollama_logprob(t, tb) for t in tokens] if tb is not None else None

        if not stream_wanted:
            tokens, done = await collect(stream, first)
            text = joined_text(tokens, done)
            if use is None:
                final = wire.ollama_final(kind, ref.name, created_at, done, text, lp(tokens))
                return web.json_response(final, dumps=wire.dumps)
            whole = use.parser()
            whole.feed(text)
            whole.finish()
            calls = [c for c in map(tools.ollama_call, whole.calls) if c is not None]
            final = wire.ollama_final(kind, ref.name, created_at, done, whole.content, tool_calls=calls)
            return web.json_response(final, dumps=wire.dumps)

        parser = use.parser() if use is not None else None

        def parts(text: str, final: bool = False) -> Iterable[bytes]:
            if parser is None:
                if text:
                    yield wire.ndjson(wire.ollama_part(kind, ref.name, wire.now_rfc3339(), text))
                return
            events = parser.feed(text)
            if final:
                events += parser.finish()
            content, calls = tools.ollama_ready(events, parser)
            if content or calls:  # Ollama sends each call whole, in a chunk of its own
                yield wire.ndjson(wire.ollama_part(kind, ref.name, wire.now_rfc3339(), content, tool_calls=calls))

        def on_token(ev: TokenEvent) -> Iterable[bytes]:
            if tb is not None:
                yield wire.ndjson(wire.ollama_part(kind, ref.name, wire.now_rfc3339(), ev.text, lp([ev])))
            else:
                yield from parts(ev.text)

        def on_done(done: DoneEvent) -> Iterable[bytes]:
            yield from parts(done.text, final=True)
            yield wire.ndjson(wire.ollama_final(kind, ref.name, wire.now_rfc3339(), done))

        return await stream_response(request, stream, first, content_type=wire.NDJSON_CONTENT_TYPE, head=(),
                                     on_token=on_token, on_done=on_done, on_error=_error_frame,
                                     write_timeout=state.write_timeout)
    finally:
        stream.cancel("client_disconnect")


# --------------------------------------------------------------------------- model information


def _size(ens: EnsembleConfig, member: str | None) -> int:
    members = [m for m in ens.members if member is None or m.name == member]
    seen: dict[str, int] = {}
    for m in members:
        try:
            p = m.resolve_path()
            seen[str(p)] = p.stat().st_size
        except Exception:
            continue
    return sum(seen.values())


def _digest(ens: EnsembleConfig, member: str | None) -> str:
    desc = repr([(m.name, m.path, m.weight) for m in ens.members if member is None or m.name == member])
    return hashlib.sha256(f"{ens.name}:{ens.mode}:{desc}".encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _file_chat_template(path: str, size: int, mtime_ns: int) -> str | None:
    """A GGUF file's own chat template, read from its header (cached while the file is unchanged)."""
    return read_gguf_header(Path(path)).chat_template


def _chat_templates(members: Iterable[MemberConfig]) -> dict[str, dict[str, str]]:
    """Each member's chat template and where it came from (``file``, ``built-in NAME (models.yaml)``,
    ``models.yaml``, ``default chatml (the file has none)``). Reads the files' headers: off the loop."""
    out = {}
    for m in members:
        if m.chat_template is not None:
            t = chat_templates.choose(m.chat_template, None)
        else:
            try:
                path = m.resolve_path()
                st = path.stat()
                t = chat_templates.choose(None, _file_chat_template(str(path), st.st_size, st.st_mtime_ns))
            except (MeLocalError, OSError) as exc:
                out[m.name] = {"source": "unknown", "template": "", "error": str(exc)}
                continue
        out[m.name] = {"source": t.source, "template": t.text}
    return out


def _details(ens: EnsembleConfig, member: str | None) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": "me-local", "families": ["me-local"],
            "parameter_size": "", "quantization_level": ""}


def _modified_at(engine: Engine) -> str:
    try:
        ts = engine.config.path.stat().st_mtime
    except OSError:
        ts = 0.0
    return wire.rfc3339(ts)


def _entries(engine: Engine) -> Iterable[tuple[str, EnsembleConfig, str | None]]:
    for ens in engine.config.ensembles.values():
        yield ens.name, ens, None
        for m in ens.member_names:
            yield f"{ens.name}/{m}", ens, m


async def root(request: web.Request) -> web.Response:
    return web.Response(text="me-local is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "me_local": __version__})


async def tags(request: web.Request) -> web.Response:
    engine = request.app[STATE].require_engine()
    modified = _modified_at(engine)
    models = [
        {"name": name, "model": name, "modified_at": modified, "size": _size(ens, member),
         "digest": _digest(ens, member), "details": _details(ens, member)}
        for name, ens, member in _entries(engine)
    ]
    return web.json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    engine = request.app[STATE].require_engine()
    loaded = engine.loaded
    expires = wire.rfc3339(datetime.now(timezone.utc) + timedelta(days=3650))
    models = [
        {"name": name, "model": name, "size": _size(ens, member), "digest": _digest(ens, member),
         "details": _details(ens, member), "expires_at": expires, "size_vram": 0, "context_length": ens.n_ctx}
        for name, ens, member in _entries(engine) if ens.name in loaded
    ]
    return web.json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    engine = request.app[STATE].require_engine()
    body = await read_json(request)
    name = body.get("model", body.get("name"))
    if name is None:
        raise bad_request("`model` is required", "model")
    ref = resolve_model(engine.config, name, ollama=True)
    ens, s = ref.ensemble, ref.ensemble.sampling
    members = [m for m in ens.members if ref.member is None or m.name == ref.member]
    parameters = "\n".join([f"temperature {s.temperature}", f"top_k {s.top_k}", f"top_p {s.top_p}",
                            f"min_p {s.min_p}", f"num_predict {s.max_tokens}", f"num_ctx {ens.n_ctx}"])
    loop = asyncio.get_running_loop()
    templates = await loop.run_in_executor(None, _chat_templates, members)
    fim_template = await loop.run_in_executor(None, _fim_template, engine, ref)
    capabilities = ["completion"]
    if await loop.run_in_executor(None, _carries_tools, engine, ref):
        capabilities.append("tools")
    modelfile = "\n".join([f"# me-local {'member' if ref.member else 'ensemble'} {ref.name} "
                           f"(mode {'single' if ref.member else ens.mode})"]
                          + [f"# member {m.name} weight {m.weight} path {m.path} "
                             f"chat template {templates[m.name]['source']}" for m in members])
    return web.json_response({
        "modelfile": modelfile,
        "parameters": parameters,
        "template": fim_template or "",
        "details": _details(ens, ref.member),
        "model_info": {"general.architecture": "me-local", "me-local.context_length": ens.n_ctx,
                       "me-local.mode": "single" if ref.member else ens.mode,
                       "me-local.members": [m.name for m in members],
                       "me-local.chat_templates": templates,
                       **_granularity(engine, ens.name, ref.member)},
        "capabilities": capabilities + (["insert"] if fim_template else []),
        "modified_at": _modified_at(engine),
    })


def _fim_template(engine: Engine, ref: ModelRef) -> str | None:
    """For a model whose members (those that run) all have FIM tokens: a Go template with ``.Suffix``
    in Ollama's style, which is how Continue tells a model that can fill in the middle (its FIM tokens
    are the first member's; each member writes its own). None otherwise. Loads the ensemble if it is
    not loaded yet: off the loop."""
    ens = ref.ensemble
    loaded = engine.ensemble(ens.name)
    if ref.member is not None or ens.mode == "single":
        name = ref.member or ens.member or ens.members[0].name
        active = [m for m in loaded.members if m.name == name]
    else:
        active = [m for m, cfg in zip(loaded.members, ens.members) if cfg.weight > 0]
    if not active or not all(m.model.fim.capable for m in active):
        return None
    model = active[0].model

    def text(token: int) -> str:
        return model.token_texts[token].decode("utf-8", "replace")

    fim = model.fim
    return ("{{- if .Suffix }}" + text(fim.pre) + "{{ .Prompt }}" + text(fim.suf) + "{{ .Suffix }}" + text(fim.mid)
            + "{{- else }}{{ .Prompt }}{{- end }}"
            + "{{/* me-local: each member writes its own FIM tokens; chat uses each member's chat template, "
            + "model_info[\"me-local.chat_templates\"] */}}")


def _carries_tools(engine: Engine, ref: ModelRef) -> bool:
    """Whether the model can carry tools (its members' templates render a call and its result:
    engine/tools.py); a model that is not loaded cannot be probed, and is said not to."""
    if ref.ensemble.name not in engine.loaded:
        return False
    request = Request(ensemble=ref.ensemble.name, member=ref.member, messages=[])
    try:
        return engine.tool_support(request)[1] is None
    except MeLocalError:
        return False


def _granularity(engine: Engine, name: str, member: str | None) -> dict[str, Any]:
    """What `me` draws a member for, and why (a member model runs alone: none)."""
    loaded = engine.loaded.get(name)
    if member is not None or loaded is None:
        return {}
    plan = loaded.vocabulary
    return {"me-local.granularity": plan.granularity, "me-local.granularity_reason": plan.reason,
            "me-local.shared_vocabulary": plan.shared}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
