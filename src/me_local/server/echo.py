"""Completions' prompts and ``echo``.

A completions ``prompt`` is a string, a list of token ids (an ensemble whose members share one
vocabulary, or one member), or a batch of either (a list of strings or of token-id lists: one
choice per prompt, ``index`` in order), as OpenAI's legacy completions API takes it.

``echo: true`` with ``logprobs: N`` returns the prompt's own tokens with their log-probabilities
under the ensemble (:meth:`Engine.score`, exact, no sampling), in the legacy shape:

- token granularity: one entry per token, the mixture's log-probability ``log Σ_k λ_k p_k``, and
  with ``N > 0`` the mixture's top ``N`` alternatives (exact: every member's row of a position
  at once). The first entry has no log-probability (``null``) when nothing precedes it (a model
  without BOS, a token-id prompt); the tokens a model puts before a raw text prompt (its BOS)
  are context, not entries, so there the first token has its value too.
- word granularity (members with different vocabularies): one entry per unit of the ensemble's
  word-level likelihood (docs/likelihood.md: where every member begins a word), each with its
  value after the start of the text (each member's BOS, or EOS): the values sum to the prompt's
  log-likelihood. ``top_logprobs`` entries are ``null``: the ensemble's most probable next
  words are not defined by one pass (each member's alternatives are pieces of words in its own
  vocabulary, and a word's probability needs every member's tokenizations of it).

The work runs on a thread of its own (:meth:`ServerState.run_job`): it tokenizes, waits for a
slot and scores."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine import Engine, LoadedEnsemble, ScoreRequest
from ..errors import RequestError
from . import wire
from .errors import bad_request
from .params import EnsembleChoice, ModelRef

Prompt = str | list[int]


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def completion_prompts(value: Any) -> tuple[list[Prompt], bool]:
    """The prompts of a completions request and whether it is a batch: a string, a list of token
    ids, or a list of strings or of token-id lists (a list of one string or one id list is one
    prompt, as before)."""
    shapes = "a string, a list of token ids, or a list of strings or of token-id lists"
    if isinstance(value, str):
        return [value], False
    if _is_ids(value):
        return [list(value)], False
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value), len(value) > 1
        if all(_is_ids(p) for p in value):
            return [list(p) for p in value], len(value) > 1
        for i, p in enumerate(value):
            if isinstance(p, list) and not p:
                raise bad_request(f"`prompt[{i}]` is an empty list of token ids", "prompt")
            if not (isinstance(p, str) or _is_ids(p) or (isinstance(p, int) and not isinstance(p, bool))):
                raise bad_request(f"`prompt[{i}]` is {json.dumps(p)}: `prompt` must be {shapes}", "prompt")
        raise bad_request(f"`prompt` must be {shapes}, not a mix (prompts of one request are all text or "
                          "all token ids)", "prompt")
    if isinstance(value, list):
        raise bad_request("`prompt` is an empty list; give a prompt", "prompt")
    raise bad_request(f"`prompt` must be {shapes}", "prompt")


def _mode(choice: EnsembleChoice, default: str) -> str:
    """The mode a request runs in, as the engine decides it: naming a member without a mode is single."""
    return choice.mode or ("single" if choice.member is not None else default)


def check_token_prompts(engine: Engine, ref: ModelRef, choice: EnsembleChoice, prompts: list[Prompt]) -> None:
    """Token-id prompts need one vocabulary (the ensemble's members share one, or one member
    runs), and every id in it: a 400 naming the prompt otherwise."""
    if all(isinstance(p, str) for p in prompts):
        return
    loaded = engine.ensemble(ref.ensemble.name)
    cfg = loaded.config
    one = None
    if _mode(choice, cfg.mode) == "single":
        one = choice.member or cfg.member or cfg.members[0].name
    if one is None and not loaded.vocabulary.shared:
        raise bad_request(f"a prompt of token ids needs members that share one vocabulary, and in ensemble "
                          f"{cfg.name!r} {loaded.vocabulary.mismatch}; send the prompt as text, or name one member "
                          f"(model {cfg.name}/MEMBER)", "prompt")
    n_vocab = loaded.members[cfg.member_names.index(one) if one is not None else 0].n_vocab
    for i, p in enumerate(prompts):
        for j, t in enumerate(p):
            if not isinstance(t, int) or not 0 <= t < n_vocab:
                where = f"prompt[{i}][{j}]" if len(prompts) > 1 else f"prompt[{j}]"
                raise bad_request(f"`{where}` is {t}, not a token id of the vocabulary (0..{n_vocab - 1})", "prompt")


def echo_spec(engine: Engine, ref: ModelRef, choice: EnsembleChoice, prompts: list[Prompt], logprobs: int | None
              ) -> EchoSpec:
    """How to echo these prompts: the ensemble's mixture at its (or the request's) weights, or one
    member alone (``ENSEMBLE/MEMBER``, mode single); at the request's or the ensemble's granularity."""
    loaded = engine.ensemble(ref.ensemble.name)
    cfg = loaded.config
    mode = _mode(choice, cfg.mode)
    member = None
    if mode == "single":
        member = choice.member or cfg.member or cfg.members[0].name
    if member is not None and choice.weights:
        raise bad_request(f"`ensemble.weights` have no effect when one member ({member!r}) is scored; drop them "
                          "or score the ensemble", "ensemble.weights")
    if member is not None:
        granularity = "token"
    else:
        try:
            granularity = loaded.vocabulary.check("me", choice.granularity)
        except RequestError as exc:
            raise bad_request(str(exc), "ensemble.granularity") from None
    if granularity == "word" and not all(isinstance(p, str) for p in prompts):
        raise bad_request(f"ensemble {cfg.name!r} scores at granularity word, where a prompt's entries are words, not "
                          "tokens: send the prompt as text, or ask for \"ensemble\": {\"granularity\": \"token\"}",
                          "prompt")
    return EchoSpec(cfg.name, member, choice.weights, granularity, logprobs is not None, logprobs or 0,
                    bool(logprobs))


@dataclass(frozen=True)
class EchoSpec:
    """How a request's prompts are echoed: scored on ``ensemble`` (one ``member`` alone, or the
    ensemble at ``weights``) at ``granularity``; ``logprobs``: score at all (``top`` alternatives,
    listed when ``with_top``)."""

    ensemble: str
    member: str | None
    weights: dict[str, float] | None
    granularity: str
    logprobs: bool
    top: int
    with_top: bool


@dataclass
class Echo:
    text: str
    """The prompt as echoed (a token-id prompt: its tokens' text)."""
    logprobs: dict[str, Any] | None
    """The legacy lists of the prompt's entries (None without logprobs)."""
    n_tokens: int
    """The prompt's tokens (usage)."""


def display_bytes(member: Any, token: int) -> bytes:
    """A token's text as echoed: its piece, or for a control token (whose piece is empty) its
    vocabulary text (``<|im_start|>``), so that the entries spell a raw prompt's markup."""
    piece: bytes = member.token_bytes(token)
    if piece:
        return piece
    texts = member.model.token_texts
    return bytes(texts[token]) if token < len(texts) else b""


def _entries(pieces: list[bytes]) -> tuple[list[str], list[int]]:
    """Each piece's text and its offset (characters) into the pieces' joined text; a piece
    that ends inside a UTF-8 character counts the character where it completes."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    texts, offsets, at = [], [], 0
    for p in pieces:
        texts.append(wire.token_text(p))
        offsets.append(at)
        at += len(dec.decode(p))
    return texts, offsets


def echo_prompt(engine: Engine, spec: EchoSpec, prompt: Prompt, cancel: Callable[[], bool]) -> Echo:
    """Score one prompt for ``echo`` (on a worker thread: it may wait for a slot), the ensemble held
    loaded while its members tokenize."""
    with engine.hold(spec.ensemble) as loaded:
        return _echo_prompt(engine, loaded, spec, prompt, cancel)


def _echo_prompt(engine: Engine, loaded: LoadedEnsemble, spec: EchoSpec, prompt: Prompt,
                 cancel: Callable[[], bool]) -> Echo:
    names = loaded.config.member_names
    m = loaded.members[names.index(spec.member) if spec.member is not None else 0]
    if spec.granularity == "word":
        if not isinstance(prompt, str):  # refused by echo_spec already
            raise RequestError("a prompt of token ids is echoed at token granularity only", param="prompt")
        return _echo_words(engine, spec, prompt, m, cancel)
    if isinstance(prompt, str):
        ids = m.raw_prompt(prompt)
        prefix = m.raw_prompt("")
        k = len(prefix) if prefix and ids[:len(prefix)] == prefix else 0
    else:
        ids, k = list(prompt), 0
    shown = ids[k:]
    pieces = [display_bytes(m, t) for t in shown]
    text = prompt if isinstance(prompt, str) else b"".join(pieces).decode("utf-8", "replace")
    if not spec.logprobs:
        return Echo(text, None, len(ids))
    texts, offsets = _entries(pieces)
    lps: list[float | None] = [None] * len(shown)
    tops: list[dict[str, float | None] | None] = [None] * len(shown)
    n_ctx = k or 1  # the tokens the first scored one follows
    if len(ids) > n_ctx:
        try:
            tl = engine.score(ScoreRequest(ensemble=spec.ensemble, context=ids[:n_ctx], text=ids[n_ctx:],
                                           weights=spec.weights, member=spec.member, granularity="token",
                                           top_n=spec.top), cancel)
        except RequestError as exc:
            if exc.param in ("context", "text"):
                exc.param = "prompt"
            raise
        unit = tl.unit_logp(tl.weights if tl.weights is not None else [1.0] * len(tl.members))
        for i in range(n_ctx, len(ids)):
            j = i - k
            lps[j] = wire.logprob_value(float(unit[i - n_ctx]))
            if spec.with_top and tl.mixture_top is not None:
                top: dict[str, float | None] = {}
                for tid, v in tl.mixture_top[i - n_ctx]:
                    top.setdefault(wire.token_text(display_bytes(m, tid)), wire.logprob_value(v))
                if any(tid == ids[i] for tid, _ in tl.mixture_top[i - n_ctx]):
                    top[texts[j]] = lps[j]  # the same number as token_logprobs: "is it the best?" compares them
                tops[j] = top
    logprobs = {
        "tokens": texts,
        "token_logprobs": lps,
        "top_logprobs": tops if spec.with_top else None,
        "text_offset": offsets,
        "token_ids": shown,
        "members": [None] * len(shown),
    }
    return Echo(text, logprobs, len(ids))


def _echo_words(engine: Engine, spec: EchoSpec, prompt: str, m: Any, cancel: Callable[[], bool]) -> Echo:
    if not spec.logprobs:
        return Echo(prompt, None, len(m.raw_prompt(prompt)))
    try:
        tl = engine.score(ScoreRequest(ensemble=spec.ensemble, context="", text=prompt, weights=spec.weights,
                                       member=spec.member, granularity="word"), cancel)
    except RequestError as exc:
        if exc.param in ("context", "text"):
            exc.param = "prompt"
        raise
    unit = tl.unit_logp(tl.weights if tl.weights is not None else [1.0] * len(tl.members))
    data = prompt.encode()
    pieces = [data[a:b] for a, b in tl.spans.tolist()]
    texts, offsets = _entries(pieces)
    n = len(pieces)
    logprobs = {
        "tokens": texts,
        "token_logprobs": [wire.logprob_value(float(v)) for v in unit],
        "top_logprobs": [None] * n if spec.with_top else None,
        "text_offset": offsets,
        "token_ids": [None] * n,
        "members": [None] * n,
    }
    return Echo(prompt, logprobs, tl.scores[0].n)


def join_logprobs(first: dict[str, Any] | None, then: dict[str, Any] | None) -> dict[str, Any] | None:
    """The echoed prompt's logprob lists followed by the generated tokens'."""
    if first is None or then is None:
        return first or then
    out: dict[str, Any] = {}
    for key in first:
        a, b = first[key], then[key]
        out[key] = None if a is None and b is None else (a or []) + (b or [])
    return out
