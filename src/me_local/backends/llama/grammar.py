"""Grammars over a llama.cpp vocabulary (:class:`LlamaGrammar`, the core's
:class:`~me_local.core.types.Constraint`): a standalone ``llama_sampler_init_grammar``
sampler per (request, member), never inside a sampler chain, because
``llama_sampler_sample`` accepts every token it draws into each sampler of its chain and a
speculative token (word-level ME's kept boundary token, a rejected draw) would then advance
the grammar. The core accepts only committed tokens, and every accept is checked first:
llama.cpp aborts the process (SIGABRT, which Python cannot catch) when its grammar is made
to accept a token it rejects, or an end-of-generation token before it is complete.

Checking a token is a one-element ``llama_sampler_apply`` (microseconds); a mask over the
whole vocabulary costs 8-15 ms for SmolLM2's 49,152 tokens and 45-110 ms for Gemma 3's
262,144, which is why :class:`~.context.NativeSampler` takes the exact shortcuts of
docs/grammar.md before it asks for one."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp as L

from ...core.types import GrammarRejected, GrammarSpec
from ...errors import BackendError, RequestError
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
            raise RequestError(
                f"the grammar in {spec.param} is not valid GBNF for llama.cpp ({llama_reason(errors)}); "
                "check its syntax, that it has a root rule, and that no rule is left-recursive",
                param=spec.param)
        self._smpl: L.llama_sampler_p | None = smpl
        self._banned = model.grammar_banned
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
        if self._mask is None:
            n = self._model.n_vocab
            if self._full is None:
                self._full = TokenArray(n)
            L.llama_sampler_apply(self._sampler(), self._full.fill(np.arange(n, dtype=np.int32)))
            self._mask = self._full.finite(n) & ~self._banned
        mask: npt.NDArray[np.bool_] = self._mask
        return mask

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
