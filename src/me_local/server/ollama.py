"""The Ollama-compatible routes, so editor plugins that speak Ollama work unchanged:
``GET /``, ``GET /api/version``, ``GET /api/tags``, ``POST /api/show``,
``GET /api/ps``, ``POST /api/chat``, ``POST /api/generate``; ``/api/pull`` and the other
model-management routes answer what me-local does instead (its models come from models.yaml).

Answers stream as NDJSON by default (``"stream": false`` gives one object).
``options`` maps temperature, top_p, top_k, min_p, seed, num_predict, stop,
num_ctx (the request's context, up to the ensemble's max_ctx), the penalties (repeat_penalty,
repeat_last_n, presence_penalty, frequency_penalty) and me-local's logit_bias; ``truncate``
leaves out a conversation's oldest turns that do not fit the context; ``keep_alive`` says how
long the ensemble stays loaded; ``format`` constrains the answer to JSON, ``tools`` lets it call
functions. What the other fields and options get is in :mod:`.fields` (a 400 for any that would
change the answer). Models are listed as ``NAME:latest``, as Ollama lists them; names with or
without the tag are accepted. The ``ensemble`` extension works here too.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import re
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__, chat_templates
from .. import settings as S
from ..backends.gguf_check import GgufHeader, read_gguf_header
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


LATEST = ":latest"
"""The tag Ollama gives a model named without one; /api/tags and /api/ps list names with it."""

FOREVER_S = 292 * 365 * 86400
"""How far ahead /api/ps puts ``expires_at`` for a model kept for ever, as Ollama does (Go's longest duration)."""

_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive(body: dict[str, Any]) -> float | None:
    """``keep_alive`` in seconds: a duration as Go writes one (``"5m"``, ``"1h30m"``, ``"0"``) or a
    number of seconds; None (absent, or negative): for ever, me-local's default."""
    value = body.get("keep_alive")
    if value is None or value == "":
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        digits = text[1:] if text.startswith(("-", "+")) else text
        try:
            seconds = sign * float(digits)  # seconds, as Ollama takes a number
        except ValueError:
            parts = _DURATION_PART.findall(digits)
            if parts and "".join(n + u for n, u in parts) == digits:
                seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds is None or not math.isfinite(seconds):
        raise bad_request(f"`keep_alive` must be a duration such as \"5m\", \"1h30m\" or \"0\", or a number of "
                          f"seconds (negative: keep the model loaded for ever), got {value!r}", "keep_alive")
    return None if seconds < 0 or seconds >= FOREVER_S else seconds


def num_ctx(opts: dict[str, Any], ens: EnsembleConfig) -> int | None:
    """``options.num_ctx``: the request's context, at least n_ctx's lower bound and at most the
    ensemble's ``max_ctx``."""
    n_ctx: int | None = opt_number(opts, "num_ctx", S.N_CTX.lo, integer=True, param="options.num_ctx")
    if n_ctx is not None and n_ctx > ens.ctx_ceiling:
        raise bad_request(f"`options.num_ctx` is {n_ctx} but ensemble {ens.name!r} allows contexts of at most "
                          f"{ens.ctx_ceiling} tokens (`max_ctx` in models.yaml); send at most that, or raise "
                          "`max_ctx`", "options.num_ctx")
    return n_ctx


def options_overrides(body: dict[str, Any], ens: EnsembleConfig) -> dict[str, Any]:
    """The sampling overrides of ``options``, and its ``n_ctx`` (``num_ctx``; the caller takes it out)."""
    opts = opt_object(body, "options")
    fields.check(opts, fields.OLLAMA_OPTIONS)
    n_ctx = num_ctx(opts, ens)
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
        "max_tokens": (n_ctx or ens.n_ctx) if n is not None and n < 0 else n,
        "stop": stop_strings(opts.get("stop"), "options.stop"),
        "n_ctx": n_ctx,
    }


def _request(ref: ModelRef, body: dict[str, Any], **kw: Any) -> Request:
    choice = ensemble_extension(body, ref)
    grammar = ollama_format(body.get("format"))
    logprobs, top = logprob_options(body)
    if top and not logprobs:
        raise bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    overrides = dict(options_overrides(body, ref.ensemble), logprobs=logprobs or None,
                     top_logprobs=top if logprobs else None)
    n_ctx = overrides.pop("n_ctx")
    truncate = opt_bool(body, "truncate", default=True)  # Ollama's default
    return engine_request(ref, choice, overrides, grammar=grammar, n_ctx=n_ctx, truncate=truncate,
                          keep_alive=keep_alive(body), **kw)


def _check_load(ref: ModelRef, body: dict[str, Any]) -> None:
    """A request without messages or prompt loads (or unloads) the model: its fields are checked all the same."""
    ensemble_extension(body, ref)
    options_overrides(body, ref.ensemble)
    opt_bool(body, "truncate")
    keep_alive(body)
    ollama_format(body.get("format"))


def parse_chat(body: dict[str, Any], engine: Engine) -> tuple[ModelRef, Request | None]:
    fields.check(body, fields.OLLAMA_CHAT)
    fields.check_messages(body.get("messages"), fields.OLLAMA_MESSAGE)
    ref = resolve_model(engine.config, body.get("model"))
    raw = body.get("messages")
    if raw is None or raw == []:
        _check_load(ref, body)
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
    ref = resolve_model(engine.config, body.get("model"))
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
        _check_load(ref, body)
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
    if req is None:  # load the ensemble, or with keep_alive 0 unload it (once its requests in flight are done)
        seconds, engine = keep_alive(body), state.require_engine()
        loop = asyncio.get_running_loop()
        if seconds == 0:
            await loop.run_in_executor(None, engine.unload, ref.ensemble.name)
        else:
            await loop.run_in_executor(None, engine.keep_alive, ref.ensemble.name, seconds)
        reason = "unload" if seconds == 0 else "load"
        return web.json_response(wire.ollama_load_reply(kind, ref.name, created_at, reason), dumps=wire.dumps)
    note = request[NOTE]
    note.model = ref.name
    stream = state.open_stream(req, ref.ensemble.name, note)
    try:
        first = await state.first_event(stream)
        logprobs = req.params.logprobs
        tb = token_bytes(stream) if logprobs else None

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
def _file_header(path: str, size: int, mtime_ns: int) -> GgufHeader:
    """A GGUF file's header (cached while the file is unchanged)."""
    return read_gguf_header(Path(path))


def _file_chat_template(path: str, size: int, mtime_ns: int) -> str | None:
    """A GGUF file's own chat template, read from its header."""
    return _file_header(path, size, mtime_ns).chat_template


def _trained_contexts(members: Iterable[MemberConfig]) -> dict[str, int | None]:
    """Each member's model's trained context (its GGUF's ``<arch>.context_length``; None: unknown)."""
    out: dict[str, int | None] = {}
    for m in members:
        try:
            path = m.resolve_path()
            st = path.stat()
            out[m.name] = _file_header(str(path), st.st_size, st.st_mtime_ns).context_length
        except (MeLocalError, OSError):
            out[m.name] = None
    return out


def _context_length(ens: EnsembleConfig, members: Iterable[MemberConfig], trained: dict[str, int | None]) -> int:
    """The largest context a request gets whole on every member: ``max_ctx``, or a member's trained
    context where that is smaller (a member never gets more). What clients size their prompts to."""
    return min([ens.ctx_ceiling] + [n for m in members if (n := trained.get(m.name))])


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
    """Every ensemble and member model, named ``NAME:latest`` as Ollama lists models (clients such as
    langchain-ollama match a name against this list)."""
    engine = request.app[STATE].require_engine()
    modified = _modified_at(engine)
    models = [
        {"name": name + LATEST, "model": name + LATEST, "modified_at": modified, "size": _size(ens, member),
         "digest": _digest(ens, member), "details": _details(ens, member)}
        for name, ens, member in _entries(engine)
    ]
    return web.json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    """The ensembles loaded now (a member model is loaded with its ensemble): the memory they take
    (weights, each model once, and every slot's KV caches; ``size_vram`` the part on a GPU), their
    largest context, and when their keep_alive unloads them."""
    engine = request.app[STATE].require_engine()
    now = datetime.now(timezone.utc)
    models = []
    for name, loaded in engine.loaded.items():
        if loaded.closing:
            continue
        ens, expires_in = loaded.config, loaded.expires_in()
        expires = now + timedelta(seconds=FOREVER_S if expires_in is None else expires_in)
        models.append({"name": name + LATEST, "model": name + LATEST, "size": loaded.memory_bytes,
                       "digest": _digest(ens, None), "details": _details(ens, None),
                       "expires_at": wire.rfc3339(expires), "size_vram": loaded.gpu_bytes,
                       "context_length": loaded.context_length})
    return web.json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    engine = request.app[STATE].require_engine()
    body = await read_json(request)
    name = body.get("model", body.get("name"))
    if name is None:
        raise bad_request("`model` is required", "model")
    ref = resolve_model(engine.config, name)
    ens, s = ref.ensemble, ref.ensemble.sampling
    members = [m for m in ens.members if ref.member is None or m.name == ref.member]
    parameters = "\n".join([f"temperature {s.temperature}", f"top_k {s.top_k}", f"top_p {s.top_p}",
                            f"min_p {s.min_p}", f"num_predict {s.max_tokens}", f"num_ctx {ens.n_ctx}"])
    loop = asyncio.get_running_loop()
    templates = await loop.run_in_executor(None, _chat_templates, members)
    fim_template, tools, granularity = await loop.run_in_executor(None, _loaded_facts, engine, ref)
    capabilities = ["completion"] + (["tools"] if tools else [])
    trained = await loop.run_in_executor(None, _trained_contexts, members)
    modelfile = "\n".join([f"# me-local {'member' if ref.member else 'ensemble'} {ref.name} "
                           f"(mode {'single' if ref.member else ens.mode})"]
                          + [f"# member {m.name} weight {m.weight} path {m.path} "
                             f"chat template {templates[m.name]['source']}" for m in members])
    return web.json_response({
        "modelfile": modelfile,
        "parameters": parameters,
        "template": fim_template or "",
        "details": _details(ens, ref.member),
        "model_info": {"general.architecture": "me-local",
                       "me-local.context_length": _context_length(ens, members, trained),
                       "me-local.n_ctx": ens.n_ctx, "me-local.max_ctx": ens.ctx_ceiling,
                       "me-local.trained_context_lengths": trained,
                       "me-local.mode": "single" if ref.member else ens.mode,
                       "me-local.members": [m.name for m in members],
                       "me-local.chat_templates": templates,
                       **granularity},
        "capabilities": capabilities + (["insert"] if fim_template else []),
        "modified_at": _modified_at(engine),
    })


def _loaded_facts(engine: Engine, ref: ModelRef) -> tuple[str | None, bool, dict[str, Any]]:
    """What /api/show reads from the loaded members: the FIM template, whether they carry tools, the
    granularity. An ensemble that is not loaded (keep_alive) is loaded for it and unloaded again, as
    Ollama's /api/show loads nothing. Blocks: off the loop."""
    with engine.peek(ref.ensemble.name):
        return (_fim_template(engine, ref), _carries_tools(engine, ref),
                _granularity(engine, ref.ensemble.name, ref.member))


def _fim_template(engine: Engine, ref: ModelRef) -> str | None:
    """For a model whose members (those that run) all have FIM tokens: a Go template with ``.Suffix``
    in Ollama's style, which is how Continue tells a model that can fill in the middle (its FIM tokens
    are the first member's; each member writes its own). None otherwise. The ensemble is loaded
    (:func:`_loaded_facts`)."""
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
    engine/tools.py). The ensemble is loaded (:func:`_loaded_facts`)."""
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


# --------------------------------------------------------------------------- model management

_FROM_YAML = "me-local's models come from models.yaml"


async def pull(request: web.Request) -> web.StreamResponse:
    """Nothing to download: a model me-local serves answers success (as Ollama does for a model that is
    up to date); any other name, a 400 saying where models come from."""
    engine = request.app[STATE].require_engine()
    body = await read_json(request)
    name = opt_str(body, "model" if "model" in body else "name", param="model")
    shown = ", ".join(n + LATEST for n, _, _ in _entries(engine))
    if not name:
        raise bad_request(f"`model` is required: the name of a model in models.yaml ({shown})", "model")
    try:
        resolve_model(engine.config, name)
    except ApiError:
        name = None
    if not name:
        raise bad_request(f"me-local does not download models: {body.get('model', body.get('name'))!r} is not one of "
                          f"its models ({shown}); {_FROM_YAML}: put the GGUF file in an ensemble of "
                          f"{engine.config.path} and reload the daemon (SIGHUP)", "model", code="pull_not_supported")
    if opt_bool(body, "stream", default=True):
        return web.Response(body=wire.ndjson({"status": "success"}), content_type=wire.NDJSON_CONTENT_TYPE)
    return web.json_response({"status": "success"})


def _unsupported(what: str, fix: str) -> Any:
    async def route(request: web.Request) -> web.Response:
        engine = request.app[STATE].require_engine()
        raise bad_request(f"me-local does not {what}: {_FROM_YAML} ({engine.config.path}); {fix}",
                          code="not_supported")

    return route


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/pull", pull)
    app.router.add_post("/api/push", _unsupported("push models", "copy the GGUF files and models.yaml instead"))
    app.router.add_post("/api/create", _unsupported("create models", "add an ensemble to models.yaml and reload "
                                                    "the daemon (SIGHUP)"))
    app.router.add_post("/api/copy", _unsupported("copy models", "add an ensemble to models.yaml under the new "
                                                  "name and reload the daemon (SIGHUP)"))
    app.router.add_delete("/api/delete", _unsupported("delete models", "remove the ensemble from models.yaml and "
                                                      "reload the daemon (SIGHUP)"))
