"""The tokenizer routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``.

Two dialects are read, so that both kinds of client work unchanged:

- llama-server's: ``/tokenize`` takes ``content``, ``add_special`` (default false),
  ``parse_special`` (default true) and ``with_pieces`` (tokens as ``{"id", "piece"}``, the piece a
  string, or a list of bytes where it is not valid UTF-8 on its own); ``/detokenize`` takes
  ``tokens`` and answers ``content``.
- vLLM's, which lm-evaluation-harness's remote tokenizer (``tokenizer_backend=remote``) speaks:
  ``/tokenize`` takes ``prompt`` and ``add_special_tokens`` (default true) and answers ``tokens``,
  ``count`` and ``max_model_len``; ``/detokenize`` answers ``prompt``; ``GET /tokenizer_info``
  gives ``eos_token``, ``bos_token``, ``pad_token`` and ``chat_template``.

``model`` (optional, default the default ensemble; a query parameter for ``/tokenizer_info``) names
an ensemble whose members share one vocabulary, or one member (``ENSEMBLE/MEMBER``). A field
that is not one of these is refused, never ignored."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from ..backends.types import MemberContext
from ..engine import Engine, LoadedEnsemble
from . import wire
from .echo import display_bytes
from .errors import bad_request
from .params import SCOPE, ModelRef, opt_bool, opt_str, read_json, resolve_model, scoped
from .state import STATE

TOKENIZE_FIELDS = ("model", "content", "prompt", "add_special", "add_special_tokens", "parse_special",
                   "with_pieces", "return_token_strs")
DETOKENIZE_FIELDS = ("model", "tokens")


def _unknown(body: dict[str, Any], known: tuple[str, ...], route: str) -> None:
    extra = sorted(set(body) - set(known))
    if extra:
        raise bad_request(f"`{extra[0]}` is not a field of {route}; use {', '.join(known)}", extra[0])


@contextlib.asynccontextmanager
async def held(engine: Engine, ref: ModelRef) -> AsyncIterator[LoadedEnsemble]:
    """The ensemble loaded (off the loop, when a keep_alive unloaded it) and kept loaded meanwhile."""
    hold = engine.hold(ref.ensemble.name)
    loaded = await asyncio.get_running_loop().run_in_executor(None, hold.__enter__)
    try:
        yield loaded
    finally:
        hold.__exit__(None, None, None)


def tokenizer_member(engine: Engine, ref: ModelRef, loaded: LoadedEnsemble | None = None) -> MemberContext:
    """The member whose tokenizer speaks for ``ref``: the member itself, or an ensemble's first
    member when the members share one vocabulary (a 400 naming ``model`` otherwise)."""
    loaded = loaded or engine.ensemble(ref.ensemble.name)
    if ref.member is not None:
        return loaded.members[loaded.config.member_names.index(ref.member)]
    if not loaded.vocabulary.shared:
        raise bad_request(f"ensemble {ref.ensemble.name!r} has no single tokenizer: {loaded.vocabulary.mismatch}; "
                          f"name one member (model {ref.ensemble.name}/MEMBER)", "model")
    return loaded.members[0]


def _piece(data: bytes) -> str | list[int]:
    """llama-server's piece: the text, or its bytes where they are not valid UTF-8 alone."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = scoped(await read_json(request), request)
    engine = state.require_engine()
    _unknown(body, TOKENIZE_FIELDS, "/tokenize")
    ref = resolve_model(engine.config, body.get("model"))
    content = opt_str(body, "content")
    prompt = opt_str(body, "prompt")
    if (content is None) == (prompt is None):
        raise bad_request("give the text to tokenize as `content` (llama-server) or `prompt` (vLLM), once",
                          "content")
    if body.get("add_special") is not None and body.get("add_special_tokens") is not None:
        raise bad_request("give `add_special` or `add_special_tokens`, not both", "add_special")
    if body.get("add_special") is not None:
        add_special = opt_bool(body, "add_special")
    else:  # each dialect's default: llama-server adds no BOS unless asked, vLLM adds it
        add_special = opt_bool(body, "add_special_tokens", content is None)
    parse_special = opt_bool(body, "parse_special", True)
    with_pieces = opt_bool(body, "with_pieces")
    token_strs = opt_bool(body, "return_token_strs")
    text = content if content is not None else prompt or ""
    async with held(engine, ref) as loaded:  # not unloaded (keep_alive) while its tokenizer works
        member = tokenizer_member(engine, ref, loaded)
        ids = await asyncio.get_running_loop().run_in_executor(
            None, lambda: member.model.tokenize(text, add_special=add_special, parse_special=parse_special))
    tokens: list[Any] = [{"id": t, "piece": _piece(display_bytes(member, t))} for t in ids] if with_pieces \
        else list(ids)
    out: dict[str, Any] = {"tokens": tokens, "count": len(ids), "max_model_len": member.n_ctx}
    if token_strs:
        out["token_strs"] = [wire.token_text(display_bytes(member, t)) for t in ids]
    return web.json_response(out, dumps=wire.dumps)


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = scoped(await read_json(request), request)
    engine = state.require_engine()
    _unknown(body, DETOKENIZE_FIELDS, "/detokenize")
    ref = resolve_model(engine.config, body.get("model"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise bad_request("`tokens` must be a list of token ids", "tokens")
    async with held(engine, ref) as loaded:  # loaded off the loop (keep_alive), not unloaded while read
        member = tokenizer_member(engine, ref, loaded)
        n_vocab = member.n_vocab
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                raise bad_request(f"`tokens[{i}]` is {t!r}, not a token id of the vocabulary (0..{n_vocab - 1})",
                                  "tokens")
        text = b"".join(display_bytes(member, t) for t in tokens).decode("utf-8", "replace")
    return web.json_response({"content": text, "prompt": text}, dumps=wire.dumps)


async def tokenizer_info(request: web.Request) -> web.Response:
    """What a remote-tokenizer client needs besides /tokenize: the special tokens' text (the BOS
    only where the model puts one before a raw prompt: lm-evaluation-harness then begins a text
    with it, and otherwise with the EOS, as ``me-local eval`` does) and the chat template."""
    state = request.app[STATE]
    engine = state.require_engine()
    extra = sorted(set(request.query) - {"model"})
    if extra:
        raise bad_request(f"`{extra[0]}` is not a parameter of /tokenizer_info; use model", extra[0])
    ref = resolve_model(engine.config, scoped(dict(request.query), request).get("model"))
    async with held(engine, ref) as loaded:  # loaded off the loop (keep_alive), not unloaded while read
        member = tokenizer_member(engine, ref, loaded)
        model = member.model
        adds_bos = bool(member.raw_prompt(""))
        members = [member] if ref.member is not None else loaded.members
        templates = {m.model.template(m.chat_template).text for m in members}
    info = {
        "tokenizer_class": "me-local",
        "model": ref.name,
        "eos_token": model.eos_text if model.eos >= 0 else None,
        "eos_token_id": model.eos if model.eos >= 0 else None,
        "bos_token": model.bos_text if adds_bos and model.bos >= 0 else None,
        "bos_token_id": model.bos if adds_bos and model.bos >= 0 else None,
        "add_bos_token": adds_bos,
        "pad_token": None,
        "chat_template": templates.pop() if len(templates) == 1 else None,
        "vocab_size": model.n_vocab,
        "model_max_length": member.n_ctx,
    }
    return web.json_response(info, dumps=wire.dumps)


def add_routes(app: web.Application) -> None:
    for prefix in ("", SCOPE):  # SCOPE: /models/NAME/tokenize..., for clients that name no model
        app.router.add_post(prefix + "/tokenize", tokenize)
        app.router.add_post(prefix + "/detokenize", detokenize)
        app.router.add_get(prefix + "/tokenizer_info", tokenizer_info)
