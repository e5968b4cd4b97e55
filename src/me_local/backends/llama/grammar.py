"""Grammars over a llama.cpp vocabulary (:class:`LlamaGrammar`, the core's
:class:`~me_local.core.types.Constraint`): a standalone ``llama_sampler_init_grammar``
sampler per (request, member), never inside a sampler chain, because
``llama_sampler_sample`` accepts every token it draws into each sampler of its chain and a
speculative token (word-level ME's kept boundary token, a rejected draw) would then advance
the grammar. The core accepts only committed tokens, and every accept is checked first:
llama.cpp aborts the process (SIGABRT, which Python cannot catch) when its grammar is made
to accept a token it rejects, or an end-of-generation token before it is complete.

Checking a token is a one-element ``llama_sampler_apply`` (microseconds); an apply to the
whole vocabulary costs about 9 ms for SmolLM2's 49,152 tokens and 48 ms for Gemma 3's
262,144 on a quiet 2-core EPYC (docs/performance.md). So :class:`~.context.NativeSampler`
takes the exact shortcuts of docs/grammar.md before it asks for a whole mask, and
:meth:`LlamaGrammar.mask` applies the grammar only to the tokens whose first bytes can come
next (:class:`PrefixIndex`): well under a millisecond where the grammar forces a few
characters (a key, punctuation), an apply to the whole vocabulary where most may come
(inside a string)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp as L

from ...core.types import GrammarRejected, GrammarSpec
from ...errors import BackendError, RequestError
from ...grammar.gbnf import gbnf_syntax_error
from ._lib import capture_errors, llama_reason

if TYPE_CHECKING:
    from .model import LoadedModel

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""llama_token_data as numpy sees it."""


class TokenArray:
    """A reusable llama_token_data_array of up to ``capacity`` entries, filled from numpy."""

    def __init__(self, capacity: int) -> None:
        self.arr = L.llama_token_data_array()
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._data = (L.llama_token_data * self.capacity)()
        self.view: npt.NDArray[np.void] = np.frombuffer(memoryview(self._data), dtype=TOKEN_DATA)

    def fill(self, ids: npt.NDArray[Any], logits: npt.NDArray[Any] | float = 0.0) -> Any:
        """Set the first ``len(ids)`` entries (growing when needed); returns ``byref`` of the array."""
        n = len(ids)
        if n > self.capacity:
            self._allocate(max(n, 2 * self.capacity))
        v = self.view[:n]
        v["id"] = ids
        v["logit"] = logits
        v["p"] = 0.0
        a = self.arr
        a.data = ctypes.cast(self._data, L.llama_token_data_p)  # type: ignore[assignment]
        a.size = n
        a.selected = -1
        a.sorted = False
        return ctypes.byref(a)

    def finite(self, n: int) -> npt.NDArray[np.bool_]:
        """Which of the first ``n`` entries kept a finite logit (in place: a grammar's apply
        neither reorders nor drops entries)."""
        out: npt.NDArray[np.bool_] = np.isfinite(self.view[:n]["logit"])
        return out


SPLIT = 1024
"""A first byte with more tokens than this is split by the second byte (see :class:`PrefixIndex`)."""


class PrefixIndex:
    """A model's tokens grouped by their first byte (and, for crowded first bytes such as the
    space, by their second), with a one-byte token for each byte: what :meth:`LlamaGrammar.mask`
    needs to apply a grammar to a superset of the allowed tokens rather than to the whole
    vocabulary. Built once per model (:attr:`LoadedModel.grammar_index`). Tokens that are
    banned, end the generation or have no text are left out (end tokens are checked apart)."""

    def __init__(self, model: LoadedModel) -> None:
        n = model.n_vocab
        banned, eog = model.grammar_banned, model.eog
        b0 = np.full(n, -1, dtype=np.int16)
        b1 = np.full(n, -1, dtype=np.int16)
        for t, p in enumerate(model.pieces):
            if p and not banned[t] and not eog[t]:
                b0[t] = p[0]
                if len(p) > 1:
                    b1[t] = p[1]
        self.probe = np.array([model.byte_token(b) if model.byte_token(b) is not None else -1 for b in range(256)],
                              dtype=np.int32)
        """Per byte: a token whose text is that byte alone (-1: none)."""
        self.has_probe = self.probe >= 0
        self.probes = self.probe[self.has_probe]
        order = np.argsort(b0, kind="stable").astype(np.int32)
        bounds = np.searchsorted(b0[order], np.arange(257))
        self.first = [order[bounds[b]:bounds[b + 1]] for b in range(256)]
        """Per first byte: the tokens that begin with it."""
        self.everything = np.arange(n, dtype=np.int32)
        self.second: dict[int, tuple[npt.NDArray[np.int32], list[npt.NDArray[np.int32]]]] = {}
        """For crowded first bytes: (the tokens that are that byte alone, the others per second byte)."""
        for b in range(256):
            ids = self.first[b]
            if len(ids) > SPLIT and self.has_probe[b]:
                sec = b1[ids]
                o = ids[np.argsort(sec, kind="stable")]
                cuts = np.searchsorted(b1[o], np.arange(-1, 257))
                self.second[b] = (o[cuts[0]:cuts[1]], [o[cuts[c + 1]:cuts[c + 2]] for c in range(256)])
        self.eog_ids = np.flatnonzero(eog).astype(np.int32)


class LlamaGrammar:
    """One grammar's state over one model's vocabulary (the core's Constraint). Besides what
    the grammar rejects it disallows :attr:`LoadedModel.grammar_banned` (control tokens whose
    text the grammar would read, while me-local writes nothing for them) and, through the
    grammar, end-of-generation tokens until the grammar is complete."""

    _smpl: L.llama_sampler_p | None = None
    _mask: npt.NDArray[np.bool_] | None = None

    def __init__(self, model: LoadedModel, spec: GrammarSpec, member: str) -> None:
        self._model = model
        self._member = member
        self._spec = spec
        with capture_errors() as errors:
            smpl = L.llama_sampler_init_grammar(model.vocab, spec.gbnf.encode("utf-8"), b"root")
        if not smpl:
            # llama.cpp's parser prints its reason on stderr and logs only "failed to parse grammar"
            reason = gbnf_syntax_error(spec.gbnf) or llama_reason(errors)
            raise RequestError(
                f"the grammar in {spec.param} is not valid GBNF for llama.cpp ({reason}); "
                "check its syntax, that it has a root rule, and that no rule is left-recursive",
                param=spec.param)
        self._smpl: L.llama_sampler_p | None = smpl
        self._banned = model.grammar_banned
        self._index = model.grammar_index  # built once per model, when its first grammar is planned (0.2-0.6 s)
        self._eog_ids = np.flatnonzero(model.eog).astype(np.int32)
        self._small = TokenArray(1024)
        self._full: TokenArray | None = None
        self._mask: npt.NDArray[np.bool_] | None = None
        """The whole-vocabulary mask in the current state (until the next accept)."""

    def _sampler(self) -> L.llama_sampler_p:
        if not self._smpl:
            raise BackendError(f"the grammar of member {self._member!r} is closed")
        return self._smpl

    # -- the Constraint protocol ----------------------------------------------------
    def allowed(self, ids: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.bool_]:
        ids = np.asarray(ids, dtype=np.int32)
        if self._mask is not None:
            known: npt.NDArray[np.bool_] = self._mask[ids]
            return known
        n = len(ids)
        if n == 0:
            return np.zeros(0, dtype=bool)
        arr = self._small
        L.llama_sampler_apply(self._sampler(), arr.fill(ids))
        out: npt.NDArray[np.bool_] = arr.finite(n) & ~self._banned[ids]
        return out

    def mask(self) -> npt.NDArray[np.bool_]:
        """The whole vocabulary's mask, from one apply to the tokens whose first bytes (two, for
        crowded ones) can come next, which holds every allowed token: a token the grammar
        allows begins with a byte (sequence) it allows, and a one-byte token (the probe) says
        whether it does, partial UTF-8 included. A byte without a probe token keeps its tokens.
        Exact, and at forced positions (a key, punctuation) hundreds of times cheaper than an
        apply to the whole vocabulary."""
        if self._mask is None:
            index = self._index
            smpl = self._sampler()
            first = np.flatnonzero(self._next_bytes(smpl, index))
            if len(first) > 128:  # most bytes may come (inside a string): most tokens may
                self._mask = self._apply(smpl, index.everything)
                return self._mask
            parts = [index.eog_ids]
            for b in first:
                split = index.second.get(int(b))
                if split is None:
                    parts.append(index.first[b])
                    continue
                singles, by_second = split
                parts.append(singles)
                clone = L.llama_sampler_clone(smpl)  # the grammar after the byte b (the probe, allowed)
                if not clone:
                    raise BackendError(f"llama.cpp could not copy the grammar of member {self._member!r}")
                try:
                    L.llama_sampler_accept(clone, int(index.probe[b]))
                    parts += [by_second[c] for c in np.flatnonzero(self._next_bytes(clone, index))]
                finally:
                    L.llama_sampler_free(clone)
            ids = np.concatenate(parts)
            self._mask = self._apply(smpl, ids)
        mask: npt.NDArray[np.bool_] = self._mask
        return mask

    def mask_everything(self) -> npt.NDArray[np.bool_]:
        """:meth:`mask` by one apply to the whole vocabulary (the reference it is tested against)."""
        return self._apply(self._sampler(), self._index.everything)

    def _apply(self, smpl: L.llama_sampler_p, ids: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_]:
        """The mask over the vocabulary after applying the grammar to ``ids`` (the rest: not allowed)."""
        if self._full is None:
            self._full = TokenArray(len(ids))
        L.llama_sampler_apply(smpl, self._full.fill(ids))
        out = np.zeros(self._model.n_vocab, dtype=bool)
        out[ids[self._full.finite(len(ids))]] = True
        out &= ~self._banned
        return out

    def _next_bytes(self, smpl: L.llama_sampler_p, index: PrefixIndex) -> npt.NDArray[np.bool_]:
        """Per byte: whether a token could begin with it now (True where no probe token tells)."""
        arr = self._small
        L.llama_sampler_apply(smpl, arr.fill(index.probes))
        out = ~index.has_probe
        out[index.has_probe] = arr.finite(len(index.probes))
        return out

    def accept(self, token: int) -> None:
        if self._model.is_eog(token) or not self.allowed(np.array([token]))[0]:
            raise GrammarRejected(f"member {self._member!r}: the grammar in {self._spec.param} does not allow "
                                  f"token {token} ({self._model.pieces[token]!r}) here")
        L.llama_sampler_accept(self._sampler(), token)
        self._mask = None

    def accept_bytes(self, data: bytes) -> None:
        """Feed ``data`` as this vocabulary's tokens of it (its own tokenization when that
        spells the bytes exactly, else one token per byte), on a clone of the state, so a
        rejection leaves the state as it was."""
        if not data:
            return
        tokens = self._model.spell(data)
        if tokens is None:
            raise BackendError(f"member {self._member!r} cannot spell {data[:40]!r} in its own tokens to advance "
                               f"its grammar (its vocabulary lacks a byte of it)")
        clone = L.llama_sampler_clone(self._sampler())
        if not clone:
            raise BackendError(f"llama.cpp could not copy the grammar of member {self._member!r}")
        saved, self._smpl, self._mask = self._smpl, clone, None
        try:
            for t in tokens:
                self.accept(t)
        except BaseException:
            L.llama_sampler_free(clone)
            self._smpl, self._mask = saved, None
            raise
        L.llama_sampler_free(saved)

    def complete(self) -> bool:
        # llama.cpp keeps an end-of-generation token's logit exactly when the grammar is complete
        if len(self._eog_ids) == 0:
            return False
        return bool(self.allowed(self._eog_ids[:1])[0])

    def only_end(self) -> bool:
        if not self.complete():
            return False
        m = self.mask()
        return not bool((m & ~self._model.eog).any())

    def close(self) -> None:
        if self._smpl:
            L.llama_sampler_free(self._smpl)
            self._smpl = None
        self._mask = None

    def __del__(self) -> None:
        self.close()
