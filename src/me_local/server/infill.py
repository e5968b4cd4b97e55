"""llama-server's ``POST /infill``, for the editor plugins that call it (llama.vim, llama.vscode).

The request gives the text before the gap (``input_prefix``, then ``prompt``), after it
(``input_suffix``) and other files' text (``input_extra``); every member of the ensemble builds
its own prompt from its FIM tokens in llama-server's layout (:mod:`me_local.fim`), cut to its
context as llama-server cuts it, and the answer has llama-server's shape (``content``, ``stop``,
``tokens_predicted``, ``timings``...), streamed as server-sent events or whole. What me-local does
with each field is in :data:`.fields.INFILL`; ``/models/NAME/infill`` fixes the model.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import settings as S
from ..core import DoneEvent, GenerationStats, MemberStats, TokenEvent
from ..engine import Engine, FimChunk, FimInput, LineLimits, Plan, Request
from . import fields, wire
from .errors import ApiError, bad_request
from .params import (
    SCOPE,
    ModelRef,
    engine_request,
    ensemble_extension,
    opt_bool,
    opt_number,
    read_json,
    resolve_model,
    sampling_fields,
    scoped,
    stop_strings,
)
from .respond import collect, joined_text, stream_response
from .state import NOTE, STATE, prompt_text

SAMPLER_NAMES = {
    "temperature": "temperature", "temp": "temperature", "top_k": "top_k", "top-k": "top_k",
    "top_p": "top_p", "top-p": "top_p", "nucleus": "top_p", "min_p": "min_p", "min-p": "min_p",
    "infill": "infill", "penalties": "penalties", "dry": "dry", "typ_p": "typ_p", "typical_p": "typ_p",
    "typical": "typ_p", "typ-p": "typ_p", "xtc": "xtc", "top_n_sigma": "top_n_sigma",
}
"""llama-server's sampler names (and the alternative spellings it accepts), canonical."""
SAMPLER_LETTERS = {"t": "temperature", "k": "top_k", "p": "top_p", "m": "min_p", "i": "infill", "e": "penalties",
                   "d": "dry", "y": "typ_p", "x": "xtc", "s": "top_n_sigma"}
"""llama-server's one-letter form (``"samplers": "kpmt"``)."""
CHAIN = ("temperature", "top_k", "top_p", "min_p", "infill")
"""The samplers me-local applies, in its order (temperature and top_k commute)."""
RANK = {"temperature": 0, "top_k": 0, "top_p": 1, "min_p": 2, "infill": 3}
OFF: dict[str, float | int] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
"""An unlisted sampler's neutral setting."""
INFILL_TOP_K_MAX = 1000
"""llama.cpp's infill sampler compares every pair of the candidates it gets (their texts): after top-k's few
dozen that is nothing, over a whole vocabulary it would take minutes per token. It needs top_k up to this."""


def _text(body: dict[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if value is None:
        raise bad_request(f"`{key}` is required: {what} (send \"\" when there is none)", key)
    if not isinstance(value, str):
        raise bad_request(f"`{key}` must be a string, got {type(value).__name__}", key)
    return value


def extra_chunks(value: Any) -> tuple[FimChunk, ...]:
    """``input_extra``: a list of ``{"text", "filename"}`` objects (``time`` is accepted, as llama.vim sends it)."""
    if value is None:
        return ()
    shape = 'a list of {"filename": string, "text": string} objects'
    if not isinstance(value, list):
        raise bad_request(f"`input_extra` must be {shape}", "input_extra")
    fields.check_messages(value, fields.INFILL_EXTRA, "input_extra")
    chunks = []
    for i, item in enumerate(value):
        where = f"input_extra[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"`{where}` must be an object with `text` and `filename`; `input_extra` is {shape}",
                              where)
        text, filename = item.get("text"), item.get("filename")
        if not isinstance(text, str):
            raise bad_request(f"`{where}.text` must be a string (the chunk's text)", f"{where}.text")
        if filename is not None and not isinstance(filename, str):
            raise bad_request(f"`{where}.filename` must be a string", f"{where}.filename")
        chunks.append(FimChunk(text, filename) if filename is not None else FimChunk(text))
    return tuple(chunks)


def parse_samplers(value: Any) -> list[str] | None:
    """``samplers`` as canonical names in the order given (None: absent)."""
    if value is None:
        return None
    if isinstance(value, str):
        bad = sorted({c for c in value if c not in SAMPLER_LETTERS})
        if bad:
            raise bad_request(f"`samplers` has the letter(s) {', '.join(bad)}, which name no sampler; use "
                              f"{''.join(SAMPLER_LETTERS)}", "samplers")
        return [SAMPLER_LETTERS[c] for c in value]
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise bad_request("`samplers` must be a list of sampler names (or a string of their letters)", "samplers")
    unknown = [n for n in value if n not in SAMPLER_NAMES]
    if unknown:
        raise bad_request(f"`samplers` names {unknown[0]!r}, which is not a sampler me-local knows; use "
                          f"{', '.join(CHAIN)} (and penalties, dry, typ_p, xtc, top_n_sigma, which do nothing here)",
                          "samplers")
    return [SAMPLER_NAMES[n] for n in value]


def apply_samplers(names: list[str], overrides: dict[str, Any], generates: bool) -> list[str]:
    """Turn off what ``names`` leaves out (a value sent for one is a 400 when anything is generated), turn
    on ``infill`` when listed; the effective chain, in order (another order than me-local's is a 400)."""
    chain = [n for n in dict.fromkeys(names) if n in RANK]
    for a, b in itertools.pairwise(chain):
        if RANK[b] < RANK[a]:
            raise bad_request(f"`samplers` puts {b} after {a}, and me-local applies them in the order "
                              f"{', '.join(CHAIN)} (temperature and top_k in either order); send them in that order",
                              "samplers")
    for name, neutral in OFF.items():
        if name not in chain:
            if overrides.get(name) is not None and generates:
                raise bad_request(f"`{name}` has no effect, since `samplers` does not list {name}; add {name} to "
                                  f"`samplers` or drop `{name}`", name)
            overrides[name] = neutral
    overrides["infill"] = "infill" in chain
    return chain


@dataclass
class InfillCall:
    ref: ModelRef
    request: Request
    stream: bool
    n_predict: int | None
    """As given (None: the ensemble's default); 0: nothing is generated."""
    response_fields: list[str] | None
    settings: dict[str, Any] = field(default_factory=dict)
    """llama-server's ``generation_settings`` (the seed is added from the answer)."""


def parse_infill(body: dict[str, Any], engine: Engine) -> InfillCall:
    fields.check(body, fields.INFILL)
    ref = resolve_model(engine.config, body.get("model"))
    prefix = _text(body, "input_prefix", "the text before the gap")
    suffix = _text(body, "input_suffix", "the text after the gap")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise bad_request("`prompt` must be a string (the text before the gap on the cursor's line)", "prompt")
    extra = extra_chunks(body.get("input_extra"))
    n = opt_number(body, "n_predict", -1, integer=True)
    if n is None:
        n = opt_number(body, "max_tokens", -1, integer=True)
    assert S.SEED.hi is not None
    seed = opt_number(body, "seed", -S.SEED.hi, S.SEED.hi, integer=True)
    t_max = opt_number(body, "t_max_predict_ms", None)
    n_indent = opt_number(body, "n_indent", 0, integer=True)
    stream = opt_bool(body, "stream")
    wanted = body.get("response_fields")
    if wanted is not None and (not isinstance(wanted, list) or not all(isinstance(f, str) for f in wanted)):
        raise bad_request("`response_fields` must be a list of field names (`a/b` for a nested one)",
                          "response_fields")
    overrides: dict[str, Any] = {
        **sampling_fields(body, "openai"),
        "seed": None if seed is None or seed < 0 else seed,
        "max_tokens": None if n is None else ref.ensemble.n_ctx if n < 0 else n,
        "stop": stop_strings(body.get("stop")),
    }
    names = parse_samplers(body.get("samplers"))
    chain = apply_samplers(names, overrides, n != 0) if names is not None else list(CHAIN[:4])
    limits = LineLimits(n_indent=n_indent or 0, t_max_predict_ms=float(t_max) if t_max and t_max > 0 else 0.0)
    fim = FimInput(prefix, suffix, prompt or "", extra, layout="repo", fit=True, param="model")
    request = engine_request(ref, ensemble_extension(body, ref), overrides, fim=fim, limits=limits)
    p = request.params
    if p.infill and not 0 < p.top_k <= INFILL_TOP_K_MAX:
        raise bad_request(f"`infill` in `samplers` needs top_k between 1 and {INFILL_TOP_K_MAX} before it (it compares "
                          f"every pair of candidates), and top_k is {p.top_k}: list top_k (and send `top_k`, as "
                          "llama.vim and llama.vscode do)", "samplers")
    settings = {"n_predict": -1 if n is not None and n < 0 else p.max_tokens, "temperature": p.temperature,
                "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p, "samplers": chain, "stop": list(p.stop),
                "n_indent": limits.n_indent, "t_max_predict_ms": limits.t_max_predict_ms, "stream": stream}
    return InfillCall(ref, request, stream, n, wanted, settings)


def _fim_report(plan: Plan) -> tuple[int, bool, dict[str, Any]]:
    """The prompt's length (the longest member's), whether any part was cut, and what each member kept."""
    evaluated = max((len(p) for p in plan.prompts), default=0)
    truncated = any(f.truncated for f in plan.fim.values())
    ext = {"fim": {name: {"tokens": len(f.tokens), "kept": f.kept, "dropped": f.dropped}
                   for name, f in plan.fim.items()}}
    return evaluated, truncated, ext


def _plan_only(engine: Engine, cancel: Callable[[], bool], *, request: Request) -> Plan:
    return engine.plan_request(request)[1]


def _final(call: InfillCall, content: str, done: DoneEvent, plan: Plan) -> dict[str, Any]:
    evaluated, truncated, ext = _fim_report(plan)
    settings = dict(call.settings, seed=done.stats.seed)
    final = wire.infill_final(call.ref.name, content, done, evaluated=evaluated, settings=settings,
                              truncated=truncated, extension=ext)
    return final if call.response_fields is None else wire.nested_fields(final, call.response_fields)


def _error_frame(err: ApiError) -> bytes:
    return wire.sse(wire.openai_error(err.message, err.type, err.code, err.param))


async def infill(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = scoped(await read_json(request), request)
    engine = state.require_engine()
    call = parse_infill(body, engine)
    note = request[NOTE]
    note.model = call.ref.name
    if call.n_predict == 0:  # nothing to generate: the prompt is built (and checked), not evaluated
        note.prompt = prompt_text(call.request)
        plan = await state.run_job(functools.partial(_plan_only, request=call.request), name="me-local-infill")
        evaluated = _fim_report(plan)[0]
        stats = GenerationStats(mode=plan.mode, seed=call.request.params.seed or 0, prompt_tokens=evaluated,
                                members=[MemberStats(name=name) for name in call.ref.ensemble.member_names])
        final = _final(call, "", DoneEvent("length", stats), plan)
        if "timings" in final:
            final["timings"]["prompt_n"] = 0  # counted, not evaluated
        if call.stream:  # the final event alone
            return web.Response(body=wire.sse(final), headers={"Content-Type": wire.SSE_CONTENT_TYPE,
                                                               "Cache-Control": "no-cache"})
        return web.json_response(final, dumps=wire.dumps)
    planned: list[Plan] = []
    call.request.on_plan = planned.append
    stream = state.open_stream(call.request, call.ref.ensemble.name, note)
    try:
        first = await state.first_event(stream)
        plan = planned[-1]  # planned before the first event
        evaluated = _fim_report(plan)[0]
        if not call.stream:
            tokens, done = await collect(stream, first)
            return web.json_response(_final(call, joined_text(tokens, done), done, plan), dumps=wire.dumps)

        def on_token(ev: TokenEvent) -> Iterable[bytes]:
            if ev.text:
                yield wire.sse(wire.infill_partial(ev.text, ev.index + 1, evaluated))

        def on_done(done: DoneEvent) -> Iterable[bytes]:
            if done.text:
                yield wire.sse(wire.infill_partial(done.text, done.stats.generated_tokens, evaluated))
            yield wire.sse(_final(call, "", done, plan))

        return await stream_response(request, stream, first, content_type=wire.SSE_CONTENT_TYPE, head=(),
                                     on_token=on_token, on_done=on_done, on_error=_error_frame,
                                     write_timeout=state.write_timeout)
    finally:
        stream.cancel("client_disconnect")  # a no-op once the generation has ended


def add_routes(app: web.Application) -> None:
    app.router.add_post("/infill", infill)
    app.router.add_post(SCOPE + "/infill", infill)
