"""A member's embedding context (:class:`LlamaEmbedder`): a llama context of its own over the
member's shared model, with embeddings on, apart from every generation slot.

llama.cpp outputs every token of a decode while embeddings are on, and computes a language
model's output layer (its logits) for each; its own pooling also needs a whole input in one
micro-batch, so a 2,048-token input to Gemma 3 (262,144 logits a row) would hold 2 GiB. So the
context pools nothing itself (pooling type none), and the vectors are pooled in numpy
(:mod:`me_local.core.embedding`) as the model file declares (``{arch}.pooling_type``), which for a
causal model needs only:

* last (and :data:`DEFAULT_POOLING`, for a file that declares none): the input but its last token
  decoded with embeddings off and no output, as a prompt is (no logits), then the last token alone,
  with its vector: one row of logits per input;
* cls: the first token alone (it has read nothing after it);
* mean: every token's vector, a bounded chunk at a time (:data:`EMBED_CHUNK_BYTES` of logit rows).

Each input is decoded on its own: llama.cpp's results for a token depend slightly on what else is in
its decode (measured: putting several inputs' sequences in one decode moved SmolLM2's vectors by up
to 6e-4 in cosine, Gemma 3's by 4e-3), and a text's vector should not depend on the request it came
in. A non-causal model (BERT-style encoders) and a reranker are refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp as L

from ...core.embedding import DEFAULT_POOLING, Pooler
from ...core.types import Cancelled
from ...errors import BackendError, ModelLoadError, RequestError
from ._lib import fill_batch
from .context import CELL_PAD, KV_BYTES
from .model import LoadedModel, _meta_str
from .threads import default_threads

if TYPE_CHECKING:
    from .store import ModelStore

POOLING_NAMES = {L.LLAMA_POOLING_TYPE_MEAN: "mean", L.LLAMA_POOLING_TYPE_CLS: "cls",
                 L.LLAMA_POOLING_TYPE_LAST: "last"}
EMBED_CHUNK_BYTES = 128 << 20
"""Logit rows per embedding decode: at most this many bytes of float32 rows (llama.cpp computes and
keeps a language model's logits for every token an embeddings context outputs)."""


@dataclass(frozen=True)
class EmbedSettings:
    n_ctx: int
    """The longest input, in tokens (the ensemble's n_ctx)."""
    n_batch: int = 512
    """Tokens per decode at most (the ensemble's n_batch; for mean pooling, fewer where the logit rows
    would pass :data:`EMBED_CHUNK_BYTES`)."""
    n_threads: int | None = None


def declared_pooling(model: LoadedModel) -> tuple[str, str]:
    """The pooling ``model`` declares (its GGUF's ``{arch}.pooling_type``), or
    :data:`DEFAULT_POOLING` when it declares none, and where that came from."""
    assert model.ptr is not None
    arch = _meta_str(model.ptr, "general.architecture") or ""
    causal = _meta_str(model.ptr, f"{arch}.attention.causal")
    if causal is not None and causal.strip().lower() in ("false", "0"):
        raise RequestError(
            f"{model.path.name} ({arch}) is not a causal language model (its attention is bidirectional); "
            "me-local embeds with its members' language models only", param="model")
    raw = _meta_str(model.ptr, f"{arch}.pooling_type")
    value = int(raw) if raw is not None and raw.strip().lstrip("-").isdigit() else L.LLAMA_POOLING_TYPE_NONE
    if value == L.LLAMA_POOLING_TYPE_RANK:
        raise RequestError(f"{model.path.name} is a reranking model (pooling type rank): it scores pairs of texts "
                           "and makes no embeddings", param="model")
    if value in POOLING_NAMES:
        return POOLING_NAMES[value], f"declared by the file ({arch}.pooling_type {value})"
    return DEFAULT_POOLING, "me-local's default: the file declares no pooling"


class LlamaEmbedder:
    """A member's embedding context. Given the ``store`` its model came from, :meth:`close`
    gives the model back to it. One caller at a time (the engine's ``LoadedEnsemble.using_embedder``)."""

    def __init__(self, name: str, model: LoadedModel, settings: EmbedSettings,
                 gate: threading.BoundedSemaphore | None = None, *, store: ModelStore | None = None) -> None:
        self.name = name
        self.model = model
        self._gate = gate
        self._store = store
        self.pooling, self.pooling_source = declared_pooling(model)
        assert model.ptr is not None
        self.n_embd = int(L.llama_model_n_embd_out(model.ptr)) or model.n_embd
        rows = max(1, EMBED_CHUNK_BYTES // (4 * (model.n_vocab + self.n_embd)))  # each output costs a logit row
        self._n_ctx = settings.n_ctx
        every = self.pooling == "mean"
        self.capacity = max(1, min(settings.n_batch, settings.n_ctx, rows if every else settings.n_batch))
        """Tokens per decode (for last and cls pooling, only one token of an input has an output)."""
        n_threads = settings.n_threads or default_threads()
        self._n_threads = self._threads_now = n_threads
        cparams = L.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx
        cparams.n_batch = cparams.n_ubatch = self.capacity
        cparams.n_seq_max = 1
        cparams.embeddings = True
        # pooled here, a chunk at a time: none in llama.cpp (which a file that declares no pooling
        # gets by default; naming NONE for it would log a warning at every start)
        declares = self.pooling_source.startswith("declared")
        cparams.pooling_type = L.LLAMA_POOLING_TYPE_NONE if declares else L.LLAMA_POOLING_TYPE_UNSPECIFIED
        cparams.n_threads = cparams.n_threads_batch = n_threads
        ctx = L.llama_init_from_model(model.ptr, cparams)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create an embedding context of {settings.n_ctx} tokens for "
                                 f"member {name!r}; lower n_ctx in models.yaml or free some memory")
        if L.llama_pooling_type(ctx) != L.LLAMA_POOLING_TYPE_NONE:
            L.llama_free(ctx)
            raise BackendError(f"llama.cpp pools the embeddings of {model.path.name} itself; me-local cannot read "
                               "its token vectors")
        self._ctx: L.llama_context_p | None = ctx
        self._mem = L.llama_get_memory(ctx)
        self._batch = L.llama_batch_init(self.capacity, 0, 1)
        self.adds_eos = bool(L.llama_vocab_get_add_eos(model.vocab))

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def memory_bytes(self) -> int:
        """Its KV cache's bytes (f16, ``n_ctx`` cells rounded up as llama.cpp pads them); 0 once closed."""
        cells = -(-self._n_ctx // CELL_PAD) * CELL_PAD
        return self.model.kv_bytes(cells, KV_BYTES["f16"]) if self._ctx else 0

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    def tokenize(self, text: str) -> list[int]:
        """An input's tokens: the text as text (markup is not parsed), with the BOS and EOS the
        model adds to a text."""
        return self.model.tokenize(text, add_special=True, parse_special=False)

    def embed(self, inputs: Sequence[Sequence[int]], cancel: Callable[[], bool] | None = None
              ) -> npt.NDArray[np.float64]:
        """Each input's pooled vector (not normalised), one row per input. Each input is decoded on its
        own, so its vector does not depend on what else is asked with it."""
        for i, toks in enumerate(inputs):
            if not toks or len(toks) > self._n_ctx:
                raise BackendError(f"input {i} of member {self.name!r} has {len(toks)} tokens; its embedding context "
                                   f"takes 1 to {self._n_ctx}")
        out = np.zeros((len(inputs), self.n_embd))
        ctx = self._context()
        try:
            for i, toks in enumerate(inputs):
                out[i] = self._every_token(ctx, toks, cancel) if self.pooling == "mean" else \
                    self._one_token(ctx, toks, cancel)
                L.llama_memory_clear(self._mem, True)
        finally:
            L.llama_memory_clear(self._mem, True)
        return out

    def _every_token(self, ctx: L.llama_context_p, tokens: Sequence[int], cancel: Callable[[], bool] | None
                     ) -> npt.NDArray[np.float64]:
        """Mean pooling: every token's vector, a bounded chunk of rows at a time."""
        pooler = Pooler(self.pooling, self.n_embd)
        for start in range(0, len(tokens), self.capacity):
            if cancel is not None and cancel():
                raise Cancelled
            pooler.add(self._decode(ctx, tokens[start:start + self.capacity], start, outputs=True))
        return pooler.result()

    def _one_token(self, ctx: L.llama_context_p, tokens: Sequence[int], cancel: Callable[[], bool] | None
                   ) -> npt.NDArray[np.float32]:
        """Last-token pooling: the tokens before the last go in as a prompt does, with no output (no
        logits, no vectors), then the last one alone with its vector. For cls pooling, the first token
        alone: a causal model's first token has read nothing after it."""
        if self.pooling == "cls":
            tokens = tokens[:1]
        for start in range(0, len(tokens) - 1, self.capacity):
            if cancel is not None and cancel():
                raise Cancelled
            self._decode(ctx, tokens[start:min(start + self.capacity, len(tokens) - 1)], start, outputs=False)
        if cancel is not None and cancel():
            raise Cancelled
        row: npt.NDArray[np.float32] = self._decode(ctx, tokens[-1:], len(tokens) - 1, outputs=True)[0]
        return row

    def _decode(self, ctx: L.llama_context_p, tokens: Sequence[int], start: int, *, outputs: bool
                ) -> npt.NDArray[np.float32]:
        """One decode of ``tokens`` (positions from ``start``); with ``outputs``, every token's vector
        (without, none: the tokens only fill the cache)."""
        batch = self._batch
        n = len(tokens)
        fill_batch(batch, tokens, start, outputs=outputs)
        L.llama_set_embeddings(ctx, outputs)
        cpu = self.model.cpu
        if cpu is not None:
            threads = cpu.threads_for(self._n_threads)
            if threads != self._threads_now:
                L.llama_set_n_threads(ctx, threads, threads)
                self._threads_now = threads
        if self._gate is not None:
            with self._gate:
                rc = L.llama_decode(ctx, batch)
        else:
            rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise BackendError(f"llama.cpp failed to evaluate {n} tokens for the embeddings of {self.name!r} "
                               f"(code {rc})")
        if not outputs:
            return np.zeros((0, self.n_embd), dtype=np.float32)
        ptr = L.llama_get_embeddings(ctx)
        if not ptr:
            raise BackendError(f"llama.cpp returned no embeddings for {self.name!r}")
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_embd))

    def _context(self) -> L.llama_context_p:
        if self._ctx is None:
            raise BackendError(f"the embedding context of {self.name!r} is closed")
        return self._ctx

    def close(self) -> None:
        """Free the context, then give the model back to the store it came from (if any)."""
        if self._ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None
        store, self._store = self._store, None
        if store is not None:
            store.release(self.model)
