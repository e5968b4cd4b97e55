"""Reading request bodies: JSON parsing, typed and bounded fields, model names,
and what the OpenAI and Ollama routes read alike (sampling fields, logprob
options, chat messages, the ``ensemble`` extension, the engine request).

Bounds come from :mod:`me_local.settings`. Every function raises
:class:`ApiError` (400 or 404) naming the field and the fix; nothing a client
sends gets past here as a surprise for the engine.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from .. import settings as S
from ..config import Config, EnsembleConfig
from ..engine import Messages, Request, normalize_messages, sampling_params
from ..grammar import json_type_name
from ..settings import Setting
from . import wire
from .bridge import EventStream
from .errors import ApiError, bad_request
from .state import STATE

Api = Literal["openai", "ollama"]


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object: 413 past the size limit, 408 when it has not arrived within the
    body timeout (a Content-Length larger than the body, an unterminated chunked body), 400 when
    it is not JSON or holds text that is not Unicode."""
    timeout = request.app[STATE].body_timeout
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, f"the request body is too large ({exc.text})", code="request_too_large") from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s; send the whole body at once",
                       code="request_timeout", close=True) from None
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    check_unicode(body)
    return body


def check_unicode(body: dict[str, Any]) -> None:
    """400 naming the field when a string holds a lone UTF-16 surrogate.

    JSON's ``\\ud800`` escape (and the raw bytes of a surrogate, which ``json.loads`` lets
    through) decode to a ``str`` that cannot be encoded again, so it would fail deep in the
    engine; refusing it here covers every route.
    """
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            bad = _lone_surrogate(value)
            if bad is not None:
                raise bad_request(f"`{path}` contains a lone UTF-16 surrogate ({bad}); send valid Unicode", path)
        elif isinstance(value, dict):
            for key in value:
                bad = _lone_surrogate(key)
                if bad is not None:
                    where = f"a key of `{path}`" if path else "a key of the request body"
                    raise bad_request(f"{where} contains a lone UTF-16 surrogate ({bad}); send valid Unicode",
                                      path or None)
            stack.extend(reversed([(f"{path}.{key}" if path else key, item) for key, item in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{i}]", item) for i, item in enumerate(value)]))


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate of ``text`` as a ``\\uXXXX`` escape, or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def opt_number(body: dict[str, Any], key: str, lo: float | None, hi: float | None = None, *,
               integer: bool = False, param: str | None = None) -> Any:
    """body[key] if present and not null, checked to be a number (an integer) in [lo, hi]."""
    v = body.get(key)
    param = param or key
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        kind = "an integer" if integer else "a number"
        raise bad_request(f"`{param}` must be {kind}, got {json_type_name(v)}", param)
    if integer and not isinstance(v, int):
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
            v = int(v)
        else:
            raise bad_request(f"`{param}` must be an integer, got {v!r}", param)
    if not isinstance(v, int) and not math.isfinite(v):
        raise bad_request(f"`{param}` must be a finite number", param)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else \
            f"at least {lo}" if lo is not None else f"at most {hi}"
        raise bad_request(f"`{param}` must be {bounds}, got {v}", param)
    return v


def opt_setting(body: dict[str, Any], setting: Setting[Any], key: str | None = None, *,
                param: str | None = None) -> Any:
    """body[key] (default: the setting's name) if present and not null, checked against the setting's
    type and bounds."""
    return opt_number(body, key or setting.name, setting.lo, setting.hi, integer=setting.type is int,
                      param=param)


def opt_bool(body: dict[str, Any], key: str, default: bool = False, *, param: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"`{param or key}` must be true or false, got {json_type_name(v)}", param or key)
    return v


def opt_str(body: dict[str, Any], key: str, *, param: str | None = None) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad_request(f"`{param or key}` must be a string, got {json_type_name(v)}", param or key)
    return v


def opt_object(body: dict[str, Any], key: str, *, param: str | None = None) -> dict[str, Any]:
    v = body.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_request(f"`{param or key}` must be an object, got {json_type_name(v)}", param or key)
    return v


def stop_strings(value: Any, param: str = "stop") -> tuple[str, ...] | None:
    """A string or a list of strings (at most 16)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if S.STOP.hi is not None and len(value) > S.STOP.hi:
            raise bad_request(f"`{param}` has {len(value)} strings; at most {S.STOP.hi} are allowed", param)
        return tuple(s for s in value if s)
    raise bad_request(f"`{param}` must be a string or a list of strings", param)


# --------------------------------------------------------------------------- what both APIs read

PLAIN_SAMPLING = (S.TEMPERATURE, S.TOP_P, S.TOP_K, S.MIN_P, *S.PENALTIES)
"""The sampling settings both APIs take as plain bounded numbers (seed, the token limit and stop
strings each API spells its own way)."""


def sampling_fields(obj: dict[str, Any], api: Api) -> dict[str, Any]:
    """temperature, top_p, top_k, min_p, the penalties and the logit bias from the request (OpenAI:
    its body; Ollama: its ``options``), typed and bounded; None where absent."""
    out = {}
    for setting in PLAIN_SAMPLING:
        path = setting.openai if api == "openai" else setting.ollama
        assert path is not None
        out[setting.name] = opt_setting(obj, setting, path.rpartition(".")[2], param=path)
    path = S.LOGIT_BIAS.openai if api == "openai" else S.LOGIT_BIAS.ollama
    assert path is not None
    out["logit_bias"] = logit_bias(obj.get("logit_bias"), path)
    return out


def logit_bias(value: Any, param: str) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: an object of token ids (strings of digits) to biases, -100..100."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"`{param}` must be an object of token ids to biases, such as {{\"13\": -100}}, "
                          f"got {json_type_name(value)}", param)
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token, b = S.logit_bias_entry(key, bias)
        except ValueError as exc:
            raise bad_request(f"`{param}`: {exc}; send token ids as strings of digits, with biases between "
                              f"{S.show_number(S.LOGIT_BIAS.lo or 0)} and {S.show_number(S.LOGIT_BIAS.hi or 0)}",
                              param) from None
        out[token] = b
    return out


def logprob_options(body: dict[str, Any]) -> tuple[bool, int]:
    """``logprobs`` (true or false) and ``top_logprobs`` (0..20), as chat completions and
    Ollama's routes take them."""
    logprobs = opt_bool(body, "logprobs")
    top = opt_setting(body, S.TOP_LOGPROBS) or 0
    return logprobs, top


def chat_messages(value: Any) -> Messages:
    """A request's ``messages``, checked and normalised once: the engine takes them as they are."""
    return normalize_messages(value)


def token_bytes(stream: EventStream) -> wire.TokenBytes:
    """A token's bytes, for logprobs, where an event does not carry them (:func:`wire.top_alternatives`):
    the first member's (token granularity: the members share one vocabulary), of the loaded ensemble
    that ran the stream (its pieces stay readable after a keep_alive unloaded it)."""
    tb: wire.TokenBytes = stream.loaded.members[0].token_bytes
    return tb


def engine_request(ref: ModelRef, choice: EnsembleChoice, overrides: dict[str, Any], **kw: Any) -> Request:
    """The engine's request: the ensemble's sampling defaults under the request's overrides (None
    keeps the default), and its ``ensemble`` extension."""
    return Request(ensemble=ref.ensemble.name, params=sampling_params(ref.ensemble.sampling, **overrides),
                   mode=choice.mode, weights=choice.weights, member=choice.member,
                   granularity=choice.granularity, **kw)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelRef:
    """What a model name points at: an ensemble, or one member of it (``ENSEMBLE/MEMBER``)."""

    name: str
    ensemble: EnsembleConfig
    member: str | None = None


def model_names(config: Config) -> list[str]:
    names = []
    for ens in config.ensembles.values():
        names.append(ens.name)
        names += [f"{ens.name}/{m}" for m in ens.member_names]
    return names


def resolve_model(config: Config, name: Any) -> ModelRef:
    """An ensemble name or ``ENSEMBLE/MEMBER``; missing means the default ensemble. Any route
    takes Ollama's ``:latest`` tag (``/api/tags`` lists the models so, and Ollama's own OpenAI
    routes accept it)."""
    if name is None or name == "":
        ens = config.get(None)
        return ModelRef(ens.name, ens)
    if not isinstance(name, str):
        raise bad_request(f"`model` must be a string, got {json_type_name(name)}", "model")
    key = name[: -len(":latest")] if name.endswith(":latest") else name
    if key in config.ensembles:
        return ModelRef(name, config.ensembles[key])
    ens_name, sep, member = key.partition("/")
    if sep and ens_name in config.ensembles and member in config.ensembles[ens_name].member_names:
        return ModelRef(name, config.ensembles[ens_name], member)
    shown = ", ".join(model_names(config))
    raise ApiError(404, f"model {name!r} not found; available models: {shown}", code="model_not_found",
                   param="model")


SCOPE = "/models/{model:[^/]+(?:/[^/]+)?}"
"""A path prefix that fixes the model for the routes under it (``/models/NAME/v1/completions``,
``/models/NAME/tokenize``...): for clients that cannot name a model on every call, such as
lm-evaluation-harness's remote tokenizer, which derives its URLs from the completions URL."""


def scoped(body: dict[str, Any], request: web.Request, key: str = "model") -> dict[str, Any]:
    """``body`` with the model of the path's scope (if any): a ``model`` the body names must be
    that one."""
    scope = request.match_info.get("model")
    if scope is None:
        return body
    given = body.get(key)
    if given not in (None, "", scope):
        raise bad_request(f"`{key}` is {given!r} but this path is for model {scope!r}; drop `{key}` or use "
                          f"/models/{given}/...", key)
    return {**body, key: scope}


@dataclass(frozen=True)
class EnsembleChoice:
    mode: str | None = None
    weights: dict[str, float] | None = None
    member: str | None = None
    granularity: str | None = None


def ensemble_extension(body: dict[str, Any], ref: ModelRef) -> EnsembleChoice:
    """The ``"ensemble": {"mode", "granularity", "weights", "member"}`` request extension,
    checked against the ensemble; a member model (``ENSEMBLE/MEMBER``) fixes single mode."""
    ext = opt_object(body, "ensemble")
    unknown = sorted(set(ext) - {"mode", "granularity", "weights", "member"})
    if unknown:
        raise bad_request(f"`ensemble.{unknown[0]}` is not a setting; use mode, granularity, weights or member",
                          "ensemble")
    names = ref.ensemble.member_names
    mode = opt_str(ext, "mode", param="ensemble.mode")
    if mode is not None and mode not in S.MODES:
        raise bad_request(f"`ensemble.mode` must be one of {', '.join(S.MODES)}, got {mode!r}", "ensemble.mode")
    granularity = opt_str(ext, "granularity", param="ensemble.granularity")
    if granularity is not None and granularity not in S.GRANULARITIES:
        raise bad_request(f"`ensemble.granularity` must be one of {', '.join(S.GRANULARITIES)}, got {granularity!r}",
                          "ensemble.granularity")
    member = opt_str(ext, "member", param="ensemble.member")
    if member is not None and member not in names:
        raise bad_request(f"ensemble {ref.ensemble.name!r} has no member {member!r}; members: {', '.join(names)}",
                          "ensemble.member", code="member_not_found")
    weights = None
    raw_w = ext.get("weights")
    if raw_w is not None:
        if not isinstance(raw_w, dict) or not raw_w:
            raise bad_request("`ensemble.weights` must be an object of member names to weights", "ensemble.weights")
        weights = {}
        for k in raw_w:
            if k not in names:
                raise bad_request(f"ensemble {ref.ensemble.name!r} has no member {k!r}; members: {', '.join(names)}",
                                  "ensemble.weights", code="member_not_found")
            w = opt_setting(raw_w, S.WEIGHT, k, param=f"ensemble.weights.{k}")
            if w is None:
                raise bad_request(f"`ensemble.weights.{k}` must be a number, got null", f"ensemble.weights.{k}")
            weights[k] = float(w)
        final = [weights.get(m.name, m.weight) for m in ref.ensemble.members]
        if sum(final) <= 0:
            raise bad_request("all weights are zero; give at least one member a positive weight", "ensemble.weights")
    if ref.member is not None:
        if mode not in (None, "single") or member not in (None, ref.member) or granularity is not None:
            raise bad_request(f"model {ref.name!r} is the single member {ref.member!r}; drop `ensemble.mode`, "
                              "`ensemble.member` and `ensemble.granularity` or use the ensemble's own name",
                              "ensemble")
        return EnsembleChoice(mode="single", weights=weights, member=ref.member)
    return EnsembleChoice(mode=mode, weights=weights, member=member, granularity=granularity)
