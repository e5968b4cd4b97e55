"""Embeddings through the engine (``Engine.embed``): which members make an ensemble's vector, the
inputs tokenized and fitted to the context, each member's embedding context used one request at
a time, and the members' vectors combined (:func:`me_local.core.embedding.combine`).

A member model (``ENSEMBLE/MEMBER``) is that member's vector. An ensemble's is the weighted
concatenation of its members' vectors (members of weight 0 take no part; members over one model
file count once, with their weights summed; a ``single``-mode ensemble is its member's), so that
the cosine similarity of two normalised ensemble vectors is the weighted mean of the members'.
Embedding contexts are apart from the generation slots: an embedding request never waits for a
slot, nor changes what a slot has cached; it shares the CPU with generations through the
backend's decode gate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backends.types import Embedder
from ..core.embedding import Vectors, combine, fit
from ..errors import ContextOverflowError, RequestError
from .ensemble import LoadedEnsemble


@dataclass
class EmbedRequest:
    """Inputs to embed under an ensemble or one of its members: ``texts``, or ``tokens`` (token ids,
    taken as they are: no BOS added), for members that share one vocabulary."""

    ensemble: str | None = None
    member: str | None = None
    texts: list[str] | None = None
    tokens: list[list[int]] | None = None
    normalize: bool = True
    """Each member's vector made unit length (and so the whole, :func:`combine`)."""
    truncate: bool = False
    """Cut an input longer than the limit to its first tokens (False: refuse it)."""
    limit: int | None = None
    """The most tokens an input may have (Ollama's ``num_ctx``); None: the ensemble's ``n_ctx``."""
    limit_name: str = "the ensemble's n_ctx"
    """What set the limit, for the error ("`options.num_ctx`")."""
    dimensions: int | None = None
    """The length the client expects; anything but the vectors' own is refused."""
    param: str = "input"
    labels: list[str] | None = None
    """How errors name each input (default ``input[i]``)."""
    overflow_fix: str = "shorten it or split it"
    """What an error for an input longer than the limit suggests."""
    keep_alive: float | None = None
    """Seconds the ensemble stays loaded once idle, as a generation request's (None: for ever)."""


@dataclass(frozen=True)
class EmbedResult:
    vectors: Vectors
    """One row per input."""
    prompt_tokens: int
    """Tokens evaluated: each member's tokens of each input (after any cut)."""
    truncated: tuple[int, ...]
    """The inputs that were cut to the limit."""
    members: tuple[str, ...]
    """The members whose vectors make these, in order."""
    load_seconds: float
    """Time this request spent making embedding contexts (their first use)."""

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1])


def embedding_members(loaded: LoadedEnsemble, member: str | None = None) -> list[tuple[int, float]]:
    """The members whose vectors make the embedding of ``loaded`` (or of its member ``member``), as
    (index, weight): one per model file, in the ensemble's order."""
    cfg = loaded.config
    if member is None and cfg.mode == "single":
        member = cfg.member or cfg.members[0].name
    if member is not None:
        return [(cfg.member_names.index(cfg.get_member(member).name), 1.0)]
    by_model: dict[int, list[float]] = {}
    out: list[list[float]] = []
    for i, m in enumerate(cfg.members):
        if m.weight <= 0:
            continue
        key = id(loaded.members[i].model)  # members over one file embed alike: one vector, their weights summed
        if key in by_model:
            by_model[key][1] += m.weight
        else:
            by_model[key] = [float(i), m.weight]
            out.append(by_model[key])
    return [(int(i), w) for i, w in out]


def run_embed(loaded: LoadedEnsemble, request: EmbedRequest, cancel: Callable[[], bool] | None = None) -> EmbedResult:
    """Embed ``request``'s inputs (refused with a RequestError naming the field before anything is
    evaluated; ContextOverflowError for an input too long without ``truncate``)."""
    if (request.texts is None) == (request.tokens is None):
        raise RequestError("give the inputs as texts or as token ids", param=request.param)
    groups = embedding_members(loaded, request.member)
    load_seconds = 0.0
    embedders: list[Embedder] = []
    for i, _ in groups:
        e, seconds = loaded.embedder(i)
        embedders.append(e)
        load_seconds += seconds
    dims = sum(e.n_embd for e in embedders)
    if request.dimensions is not None and request.dimensions != dims:
        what = "the ensemble's vectors (its members' concatenated)" if len(groups) > 1 else "its vectors"
        raise RequestError(f"`dimensions` is {request.dimensions} but {what} have {dims}; me-local's models are not "
                           f"trained to be cut to fewer: send {dims} or leave `dimensions` out", param="dimensions")
    n_inputs = len(request.texts if request.texts is not None else request.tokens or [])
    labels = request.labels or [f"{request.param}[{j}]" for j in range(n_inputs)]
    if request.tokens is not None and len(groups) > 1 and not loaded.vocabulary.shared:
        raise RequestError(f"inputs of token ids need members that share one vocabulary "
                           f"({loaded.vocabulary.mismatch}); send text, or name one member (model ENSEMBLE/MEMBER)",
                           param=request.param)
    truncated: set[int] = set()
    inputs: list[list[list[int]]] = []
    for e in embedders:
        limit = min(request.limit or e.n_ctx, e.n_ctx)
        toks = _token_inputs(e, request, labels)
        fitted = []
        for j, t in enumerate(toks):
            if not t:
                raise RequestError(f"{labels[j]} is empty; send some text to embed", param=request.param)
            if len(t) > limit:
                if not request.truncate:
                    raise ContextOverflowError(
                        f"{labels[j]} is {len(t)} tokens but member {e.name!r} embeds at most {limit} tokens "
                        f"({request.limit_name}); {request.overflow_fix}", param=request.param)
                t = fit(t, limit, ends_with_eos=e.adds_eos and request.texts is not None)
                truncated.add(j)
            fitted.append(t)
        inputs.append(fitted)
    parts = []
    for (i, _), e, toks in zip(groups, embedders, inputs):
        if not toks:
            parts.append(np.zeros((0, e.n_embd)))
            continue
        with loaded.using_embedder(i, cancel) as held:
            parts.append(held.embed(toks, cancel))
    vectors = combine(parts, [w for _, w in groups], normalize=request.normalize)
    names = tuple(loaded.config.members[i].name for i, _ in groups)
    prompt_tokens = sum(len(t) for toks in inputs for t in toks)
    return EmbedResult(vectors, prompt_tokens, tuple(sorted(truncated)), names, load_seconds)


def _token_inputs(e: Embedder, request: EmbedRequest, labels: list[str]) -> list[list[int]]:
    if request.texts is not None:
        return [e.tokenize(t) for t in request.texts]
    out = []
    for j, ids in enumerate(request.tokens or []):
        for k, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < e.n_vocab:
                raise RequestError(f"{labels[j]}[{k}] is {t!r}, not a token id of the vocabulary (0..{e.n_vocab - 1})",
                                   param=request.param)
        out.append(list(ids))
    return out
