"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``.

Extensions: ``"ensemble": {"mode", "weights", "member"}`` in a request; ``id``
and ``member`` in chat logprobs, ``token_ids`` and ``members`` in completions
logprobs; the engine's figures in ``usage.me_local``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from .. import settings as S
from ..core import DoneEvent, TokenEvent
from ..engine import Engine, FimInput, Request
from ..tools import ToolParser
from . import fields, tools, wire
from .bridge import EventStream
from .echo import (
    Echo,
    EchoSpec,
    Prompt,
    check_token_prompts,
    completion_prompts,
    display_bytes,
    echo_prompt,
    echo_spec,
    join_logprobs,
)
from .errors import ApiError, bad_request
from .params import (
    SCOPE,
    ModelRef,
    chat_messages,
    engine_request,
    ensemble_extension,
    logprob_options,
    opt_bool,
    opt_number,
    opt_object,
    opt_setting,
    opt_str,
    read_json,
    resolve_model,
    sampling_fields,
    scoped,
    stop_strings,
    token_bytes,
)
from .respond import collect, joined_text, stream_response
from .state import NOTE, STATE, ServerState
from .structured import openai_grammar


@dataclass
class Call:
    """One parsed request: what to run and how to answer."""

    ref: ModelRef
    request: Request
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    tools: tools.ToolUse | None = None
    """Set when the answer is read for tool calls (:func:`resolve_tools`)."""

    @property
    def model(self) -> str:
        return self.ref.name


def sampling_overrides(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI sampling fields, type- and range-checked (``max_completion_tokens`` wins over
    ``max_tokens``)."""
    max_tokens = None
    for key in (*S.MAX_TOKENS.openai_also, S.MAX_TOKENS.openai):
        if max_tokens is None:
            max_tokens = opt_setting(body, S.MAX_TOKENS, key)
    return {
        **sampling_fields(body, "openai"),
        "seed": opt_setting(body, S.SEED),
        "max_tokens": max_tokens,
        "stop": stop_strings(body.get("stop")),
    }


def _common(body: dict[str, Any], engine: Engine) -> tuple[ModelRef, dict[str, Any], bool, bool]:
    ref = resolve_model(engine.config, body.get("model"))
    n = opt_number(body, "n", 1, 1, integer=True)
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "n")
    overrides = sampling_overrides(body)
    stream = opt_bool(body, "stream")
    options = opt_object(body, "stream_options")
    fields.check(options, fields.STREAM_OPTIONS)
    include_usage = stream and opt_bool(options, "include_usage", param="stream_options.include_usage")
    return ref, overrides, stream, include_usage


def _request(ref: ModelRef, body: dict[str, Any], overrides: dict[str, Any], **kw: Any) -> Request:
    return engine_request(ref, ensemble_extension(body, ref), overrides, **kw)


def parse_chat(body: dict[str, Any], engine: Engine) -> Call:
    fields.check(body, fields.OPENAI_CHAT)
    fields.check_messages(body.get("messages"), fields.OPENAI_MESSAGE)
    ref, overrides, stream, include_usage = _common(body, engine)
    spec = tools.openai_spec(body)
    messages = chat_messages(tools.engine_messages(body.get("messages"), "openai"))
    logprobs, top = logprob_options(body)
    if top and not logprobs:
        raise bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    grammar = openai_grammar(body)
    if spec is not None and spec.active:
        if logprobs:
            raise bad_request("`logprobs` is not supported with `tools` (an answer's calls are not tokens of its "
                              "content); drop one of them", "logprobs", code="unsupported_parameter")
        if grammar is not None:
            raise bad_request(f"`{grammar.param}` is not supported with `tools`: the tools' grammar shapes the "
                              "answer; drop one of them (or send `tool_choice: \"none\"`)", grammar.param,
                              code="unsupported_parameter")
    request = _request(ref, body, dict(overrides, logprobs=logprobs, top_logprobs=top), messages=messages,
                       grammar=grammar, tools=spec)
    return Call(ref, request, stream, include_usage, logprobs, top)


async def resolve_tools(call: Call, engine: Engine) -> None:
    """For a request with tools: the format its members write calls in (``call.tools``), or the 400
    saying the model cannot carry tools. (Probing the templates renders and tokenizes: off the loop.)"""
    spec = call.request.tools
    if spec is None or not spec.active:
        return
    fmt, problem = await asyncio.get_running_loop().run_in_executor(None, engine.tool_support, call.request)
    if problem is not None:
        raise tools.unsupported(call.model, problem)
    call.tools = tools.ToolUse(spec, fmt)


@dataclass
class CompletionCall(Call):
    """A completions request: one engine request per prompt (``request`` is the first), whether
    the prompts are echoed (how: ``echo``) and whether anything is generated after them."""

    prompts: list[Prompt] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    echo: EchoSpec | None = None
    generate: bool = True
    batch: bool = False


def _zero_max_tokens(body: dict[str, Any]) -> bool:
    """The limit in force (``max_completion_tokens`` over ``max_tokens``) is 0: with ``echo``, score
    the prompt only."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    return not isinstance(value, bool) and value == 0


_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens")


def parse_completion(body: dict[str, Any], engine: Engine) -> CompletionCall:
    fields.check(body, fields.OPENAI_COMPLETIONS)
    echo = opt_bool(body, "echo")
    generate = True
    if echo and _zero_max_tokens(body):  # echo alone: nothing generated (as lm-evaluation-harness asks)
        generate = False
        body = {k: v for k, v in body.items() if k not in _MAX_TOKEN_KEYS}
    ref, overrides, stream, include_usage = _common(body, engine)
    prompts, batch = completion_prompts(body.get("prompt"))
    best_of = opt_number(body, "best_of", 1, integer=True)
    if best_of not in (None, 1):
        raise bad_request("only best_of=1 is supported", "best_of")
    if stream and (echo or batch):
        raise bad_request(f"`stream` is not supported with {'`echo`' if echo else 'several prompts'}; "
                          "drop `stream` to get the whole answer at once", "stream")
    logprobs = opt_setting(body, S.TOP_LOGPROBS, "logprobs")  # completions: an integer, the top count
    want = logprobs is not None
    choice = ensemble_extension(body, ref)
    suffix = opt_str(body, "suffix")
    if suffix:
        fim_prompts(prompts, echo)
    check_token_prompts(engine, ref, choice, prompts)
    spec = echo_spec(engine, ref, choice, prompts, logprobs) if echo else None
    params = dict(overrides, logprobs=want, top_logprobs=logprobs or 0)
    grammar = openai_grammar(body)
    requests = [engine_request(ref, choice, params, grammar=grammar, **_prompt_fields(p, suffix)) for p in prompts]
    return CompletionCall(ref, requests[0], stream, include_usage, want, logprobs or 0, prompts=prompts,
                          requests=requests, echo=spec, generate=generate, batch=batch)


def fim_prompts(prompts: list[Prompt], echo: bool) -> None:
    """With ``suffix`` (fill in the middle) each prompt is the text before the gap: a string."""
    if echo:
        raise bad_request("`echo` does not apply with `suffix`: a fill-in-the-middle prompt is built from FIM "
                          "tokens, not the text to repeat; drop `echo`", "echo")
    if not all(isinstance(p, str) for p in prompts):
        raise bad_request("`suffix` needs the prompt as text (the text before the gap), not token ids", "prompt")


def _prompt_fields(prompt: Prompt, suffix: str | None) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"fim": FimInput(prompt, suffix)} if suffix else {"prompt": prompt}
    return {"tokens": prompt}


def _error_frame(err: ApiError) -> bytes:
    return wire.sse(wire.openai_error(err.message, err.type, err.code, err.param))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    engine = state.require_engine()
    call = parse_chat(body, engine)
    await resolve_tools(call, engine)
    return await _run(request, state, call, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = scoped(await read_json(request), request)
    # off the loop: token-id prompts and echo read the members, loading an ensemble keep_alive unloaded
    call = await asyncio.get_running_loop().run_in_executor(None, parse_completion, body, state.require_engine())
    if call.echo is None and not call.batch:
        return await _run(request, state, call, chat=False)
    return await _run_choices(request, state, call)


async def _run_choices(request: web.Request, state: ServerState, call: CompletionCall) -> web.Response:
    """Several prompts, or echoed ones: one choice per prompt, each run to its end in turn."""
    note = request[NOTE]
    note.model = call.model
    note.prompt = "\n".join(p if isinstance(p, str) else str(p) for p in call.prompts)
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = cached = 0
    dones: list[DoneEvent] = []
    for index, (prompt, req) in enumerate(zip(call.prompts, call.requests)):
        text, logprobs, reason = "", None, "length"
        spec = call.echo
        if spec is not None:
            echoed = await state.run_job(functools.partial(_echo, spec=spec, prompt=prompt))
            text, logprobs = echoed.text, echoed.logprobs
            if not call.generate:
                prompt_tokens += echoed.n_tokens
        if call.generate:
            stream = state.open_stream(req, call.ref.ensemble.name)
            try:
                first = await state.first_event(stream)
                tokens, done = await collect(stream, first)
            finally:
                stream.cancel("client_disconnect")  # a no-op once the generation has ended
            tb = token_bytes(stream) if call.logprobs else _no_bytes
            if spec is not None and done.end is not None:  # the end token follows, as OpenAI lists it
                tokens = [*tokens, _end_token(stream, done.end)]
            gen_lp = wire.completion_logprobs(tokens, tb, len(text), call.top_logprobs > 0) if call.logprobs else None
            text += joined_text(tokens, done)
            logprobs = join_logprobs(logprobs, gen_lp)
            reason = wire.openai_finish_reason(done.finish_reason)
            prompt_tokens += done.stats.prompt_tokens
            completion_tokens += done.stats.generated_tokens
            cached += done.stats.cached_prompt_tokens
            dones.append(done)
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
        if call.generate and (ext := wire.grammar_extension(dones[-1].grammar)) and len(call.prompts) > 1:
            choice["me_local"] = ext  # a batch's usage is a sum: each choice says how its grammar ended
        choices.append(choice)
    note.prompt_tokens, note.completion_tokens = prompt_tokens, completion_tokens
    if len(dones) == 1 and len(choices) == 1:
        usage = wire.openai_usage(dones[0].stats, dones[0].finish_reason, dones[0].grammar)
    else:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
    body = {"id": wire.new_id("cmpl"), "object": "text_completion", "created": wire.now_unix(), "model": call.model,
            "choices": choices, "usage": usage}
    return web.json_response(body, dumps=wire.dumps)


def _end_token(stream: EventStream, end: TokenEvent) -> TokenEvent:
    """The end-of-generation token as an entry: its control text (``<|im_end|>``), no output text."""
    members = stream.loaded.members
    member = next((m for m in members if m.name == end.member), members[0])
    return replace(end, piece=display_bytes(member, end.id), text="")


def _echo(engine: Engine, cancel: Callable[[], bool], *, spec: EchoSpec, prompt: Prompt) -> Echo:
    return echo_prompt(engine, spec, prompt, cancel)


async def _run(request: web.Request, state: ServerState, call: Call, *, chat: bool) -> web.StreamResponse:
    note = request[NOTE]
    note.model = call.model
    stream = state.open_stream(call.request, call.ref.ensemble.name, note)
    try:
        first = await state.first_event(stream)
        tb = token_bytes(stream) if call.logprobs else _no_bytes
        cid, created = wire.new_id("chatcmpl" if chat else "cmpl"), wire.now_unix()
        if not call.stream:
            tokens, done = await collect(stream, first)
            text = joined_text(tokens, done)
            if chat:
                lps = [wire.chat_logprob(t, tb) for t in tokens] if call.logprobs else None
                calls = None
                if call.tools is not None:
                    parser = call.tools.parser()
                    parser.feed(text)
                    parser.finish()
                    text, calls = parser.content, [tools.openai_call(c) for c in parser.calls]
                return web.json_response(wire.chat_completion(cid, created, call.model, text, done, lps, calls),
                                         dumps=wire.dumps)
            clp = wire.completion_logprobs(tokens, tb, 0, call.top_logprobs > 0) if call.logprobs else None
            return web.json_response(wire.text_completion(cid, created, call.model, text, done, clp),
                                     dumps=wire.dumps)
        frames = ChatFrames(call, cid, created, tb) if chat else CompletionFrames(call, cid, created, tb)
        return await stream_response(
            request, stream, first, content_type=wire.SSE_CONTENT_TYPE, head=frames.head(),
            on_token=frames.token, on_done=frames.done, on_error=_error_frame, tail=(wire.SSE_DONE,),
            write_timeout=state.write_timeout,
        )
    finally:
        stream.cancel("client_disconnect")  # a no-op once the generation has ended


def _no_bytes(token: int) -> bytes:
    return b""


class ChatFrames:
    def __init__(self, call: Call, cid: str, created: int, tb: wire.TokenBytes) -> None:
        self.call, self.cid, self.created, self.tb = call, cid, created, tb
        self.parser: ToolParser | None = call.tools.parser() if call.tools is not None else None
        """Reads the answer for tool calls (None: the text is all content)."""

    def _chunk(self, delta: dict[str, Any], **kw: Any) -> bytes:
        return wire.sse(wire.chat_chunk(self.cid, self.created, self.call.model, delta,
                                        include_usage=self.call.include_usage, **kw))

    def head(self) -> Iterable[bytes]:
        yield self._chunk({"role": "assistant", "content": ""})

    def _text(self, text: str, final: bool = False) -> Iterable[bytes]:
        if self.parser is None:
            if text:
                yield self._chunk({"content": text})
            return
        events = self.parser.feed(text)
        if final:
            events += self.parser.finish()
        for delta in tools.openai_deltas(events):
            yield self._chunk(delta)

    def token(self, ev: TokenEvent) -> Iterable[bytes]:
        if self.call.logprobs:
            yield self._chunk({"content": ev.text}, logprobs=[wire.chat_logprob(ev, self.tb)])
        else:
            yield from self._text(ev.text)

    def done(self, done: DoneEvent) -> Iterable[bytes]:
        yield from self._text(done.text, final=True)
        reason = wire.openai_finish_reason(done.finish_reason)
        if self.parser is not None:
            reason = tools.finish_reason(reason, self.parser.calls)
        yield self._chunk({}, finish_reason=reason)
        if self.call.include_usage:
            usage = wire.openai_usage(done.stats, done.finish_reason, done.grammar)
            yield wire.sse(wire.usage_chunk(self.cid, self.created, self.call.model, "chat.completion.chunk", usage))


class CompletionFrames:
    def __init__(self, call: Call, cid: str, created: int, tb: wire.TokenBytes) -> None:
        self.call, self.cid, self.created, self.tb = call, cid, created, tb
        self.offset = 0

    def _chunk(self, text: str, **kw: Any) -> bytes:
        return wire.sse(wire.completion_chunk(self.cid, self.created, self.call.model, text,
                                              include_usage=self.call.include_usage, **kw))

    def head(self) -> Iterable[bytes]:
        return ()

    def token(self, ev: TokenEvent) -> Iterable[bytes]:
        if self.call.logprobs:
            lp = wire.completion_logprobs([ev], self.tb, self.offset, self.call.top_logprobs > 0)
            yield self._chunk(ev.text, logprobs=lp)
        elif ev.text:
            yield self._chunk(ev.text)
        self.offset += len(ev.text)

    def done(self, done: DoneEvent) -> Iterable[bytes]:
        if done.text:
            yield self._chunk(done.text)
        yield self._chunk("", finish_reason=wire.openai_finish_reason(done.finish_reason))
        if self.call.include_usage:
            usage = wire.openai_usage(done.stats, done.finish_reason, done.grammar)
            yield wire.sse(wire.usage_chunk(self.cid, self.created, self.call.model, "text_completion", usage))


def model_extension(engine: Engine, name: str, member: str | None) -> dict[str, Any]:
    cfg = engine.config.ensembles[name]
    default = engine.config.get(None).name == name and member is None
    if member is not None:
        return {"kind": "member", "ensemble": name, "member": member, "n_ctx": cfg.n_ctx, "default": False}
    loaded = engine.loaded.get(name)
    return {
        "kind": "ensemble",
        "mode": cfg.mode,
        "granularity": loaded.vocabulary.granularity if loaded is not None else cfg.granularity,
        "members": [{"name": m.name, "weight": w} for m, w in zip(cfg.members, cfg.normalized_weights())],
        "n_ctx": cfg.n_ctx,
        "parallel": cfg.parallel,
        "default": default,
    }


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.require_engine()
    created = int(state.started)
    data = []
    for ens in engine.config.ensembles.values():
        data.append(wire.openai_model(ens.name, created, model_extension(engine, ens.name, None)))
        for m in ens.member_names:
            data.append(wire.openai_model(f"{ens.name}/{m}", created, model_extension(engine, ens.name, m)))
    return web.json_response({"object": "list", "data": data}, dumps=wire.dumps)


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.require_engine()
    ref = resolve_model(engine.config, request.match_info["name"])
    ext = model_extension(engine, ref.ensemble.name, ref.member)
    return web.json_response(wire.openai_model(ref.name, int(state.started), ext), dumps=wire.dumps)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post(SCOPE + "/v1/completions", completions)
