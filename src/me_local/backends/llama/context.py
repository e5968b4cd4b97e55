"""One member in one slot (:class:`LlamaMember`): a llama context over a shared model,
batched decode with logits only at the last position (or, to score a text, at every
position, a chunk at a time: :meth:`LlamaMember.evaluate_rows`), and llama.cpp's native sampler
chain (:class:`NativeSampler`) for single-member steps."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp as L

from ...chat_templates import ChatTemplate
from ...core.sampling import shaped_logits
from ...core.types import Cancelled, Constraint, GrammarSpec, NoTokenAllowed, SamplingParams
from ...errors import BackendError, ModelLoadError, SettingError
from ...settings import KV_CACHE_TYPE, N_BATCH, N_CTX
from ..types import ChatMessage, ToolDefinitions
from ._lib import fill_batch
from .grammar import LlamaGrammar, TokenArray
from .model import LoadedModel
from .threads import default_threads

if TYPE_CHECKING:
    from .store import ModelStore


def _add_transforms(chain: L.llama_sampler_p, params: SamplingParams, seed: int,
                   infill_vocab: L.llama_vocab_p | None) -> None:
    """The core's transforms in its order (temperature, top-k, top-p, min-p, then llama.cpp's
    infill sampler when ``infill_vocab`` is given, then the draw; or greedy) added to ``chain``."""
    if params.greedy:
        if infill_vocab is not None:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_infill(infill_vocab))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return
    if params.temperature != 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
    if params.top_k > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
    if infill_vocab is not None:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_infill(infill_vocab))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))


CANDIDATES = 1024
"""How many of the most likely tokens a constrained draw checks against the grammar before it
asks for the whole vocabulary's mask (checking 1,024 tokens costs about 0.1 ms; the mask
8-110 ms)."""


class NativeSampler:
    """llama.cpp's sampler chain, in the core's order: temperature, top-k, top-p, min-p, the infill
    sampler (when asked for), draw, after an optional restriction to some tokens (word-level ME's
    word starts, a logit bias of -inf in the chain), the request's logit bias and the penalties
    (:func:`me_local.core.sampling.penalize` is their reference). Unconstrained, it reads its
    context's last logits inside llama.cpp: nothing vocabulary-sized crosses into Python.

    The penalties count the generated tokens the sampler has seen: the ones it draws and the ones
    :meth:`observe` shows it (the other members'); :meth:`forget` starts over.

    With a constraint (a grammar) it draws from the distribution restricted to the allowed
    tokens, renormalised, then truncated (docs/grammar.md), and takes the exact shortcuts
    there before it asks the constraint for its whole-vocabulary mask: without truncation
    (top-k 0, top-p 1, min-p 0) it draws unconstrained and keeps the token if the grammar
    allows it (p(x)/p(G) overall, exactly the restricted distribution); with top-k it checks
    the :data:`CANDIDATES` most likely tokens, and when k of them are allowed those k are the
    restricted top-k; greedy, the most likely allowed candidate. The transforms then run on an
    array of the allowed tokens only, after the bias and the penalties (applied in numpy by
    :func:`~me_local.core.sampling.shaped_logits`, over the same tokens the native penalties
    count). It never accepts a token into the constraint: the core does, once the token is
    committed."""

    def __init__(self, ctx: L.llama_context_p, params: SamplingParams, seed: int, n_vocab: int,
                 restrict: tuple[npt.NDArray[np.bool_], ctypes.Array[L.llama_logit_bias]] | None = None, *,
                 model: LoadedModel | None = None) -> None:
        self._ctx = ctx
        self._params = params
        self._seed = seed
        self._n_vocab = n_vocab
        self._fallback = -1
        self._restrict = restrict[0] if restrict is not None else None
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if restrict is not None:  # first, so the transforms see the restricted distribution
            arr = restrict[1]
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(arr), arr))
        if params.logit_bias:
            arr = (L.llama_logit_bias * len(params.logit_bias))(
                *(L.llama_logit_bias(t, b) for t, b in params.logit_bias))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(arr), arr))
        self._penalties: L.llama_sampler_p | None = None
        if params.penalized:  # -1 (all) is the whole context: llama.cpp reads a negative window as 0 (off)
            last_n = params.repeat_last_n if params.repeat_last_n > 0 else int(L.llama_n_ctx(ctx))
            self._penalties = L.llama_sampler_init_penalties(
                n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty)
            L.llama_sampler_chain_add(chain, self._penalties)
        self._history: list[int] = []
        """The tokens the penalties count, as the native penalties sampler has them (for the
        constrained path, which shapes the logits in numpy)."""
        infill = params.infill and model is not None
        if infill and model is not None:
            # the infill sampler answers llama_vocab_eot when it keeps no text token; a vocabulary
            # without an end-of-turn token gets -1 there: its end-of-generation token stands in
            self._fallback = model.eos if model.eos >= 0 else int(np.flatnonzero(model.eog)[0])
        _add_transforms(chain, params, seed, model.vocab if infill and model is not None else None)
        self._chain: L.llama_sampler_p | None = chain
        self._bare: L.llama_sampler_p | None = None
        """The transforms alone, for arrays of allowed tokens (built on first use)."""
        self._arr: TokenArray | None = None
        k = params.top_k
        self._untruncated = (k <= 0 or k >= n_vocab) and params.top_p >= 1.0 and params.min_p <= 0.0

    def sample(self, constraint: Constraint | None = None) -> int:
        if constraint is None:
            token = int(L.llama_sampler_sample(self._chain, self._ctx, -1))
            if self._penalties is not None:
                self._history.append(token)
            return token if token >= 0 else self._fallback
        token = self._constrained(constraint)
        if self._penalties is not None:  # what llama_sampler_sample's accept does on the other path
            L.llama_sampler_accept(self._penalties, token)
            self._history.append(token)
        return token

    def _constrained(self, constraint: Constraint) -> int:
        p = self._params
        raw = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, -1), shape=(self._n_vocab,))
        shaped = p.shapes_logits
        logits = shaped_logits(raw, self._history, p) if shaped else raw
        if p.greedy:
            cand = self._top(logits, CANDIDATES)
            ok = constraint.allowed(cand)
            if ok.any():
                return int(cand[int(np.argmax(ok))])
        elif self._untruncated:
            if shaped:  # the native chain would count the token in its penalties before the check
                ids = np.arange(self._n_vocab) if self._restrict is None else np.flatnonzero(self._restrict)
                token = self._draw(ids, logits)
            else:
                token = int(L.llama_sampler_sample(self._chain, self._ctx, -1))
            if constraint.allowed(np.array([token], dtype=np.int32))[0]:
                return token
        elif 0 < p.top_k < self._n_vocab:
            cand = self._top(logits, max(CANDIDATES, 4 * p.top_k))
            keep = cand[constraint.allowed(cand)]
            if len(keep) >= p.top_k:
                return self._draw(keep[: p.top_k], logits)
        mask = constraint.mask()
        if self._restrict is not None:
            mask = mask & self._restrict
        ids = np.flatnonzero(mask & np.isfinite(logits))
        if len(ids) == 0:
            raise NoTokenAllowed("no token is allowed")
        return self._draw(ids, logits)

    def _top(self, logits: npt.NDArray[Any], m: int) -> npt.NDArray[np.intp]:
        """The ``m`` most likely tokens (within the restriction), most likely first."""
        lg = logits if self._restrict is None else np.where(self._restrict, logits, -np.inf)
        n = self._n_vocab
        if m < n:  # the m-th largest logit, then every token at or above it (partition beats argpartition)
            idx = np.flatnonzero(lg >= np.partition(lg, n - m)[n - m])
        else:
            idx = np.arange(n)
        idx = idx[np.argsort(-lg[idx], kind="stable")]
        out: npt.NDArray[np.intp] = idx[np.isfinite(lg[idx])]
        return out

    def _draw(self, ids: npt.NDArray[np.intp], logits: npt.NDArray[Any]) -> int:
        """Run the transforms and the draw on an array of ``ids`` (allowed tokens)."""
        if self._bare is None:
            self._bare = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            _add_transforms(self._bare, self._params, self._seed ^ 0x6A6A, None)
            self._arr = TokenArray(CANDIDATES)
        assert self._arr is not None
        ref = self._arr.fill(ids, logits[ids])
        L.llama_sampler_apply(self._bare, ref)
        arr = self._arr.arr
        if not 0 <= arr.selected < arr.size:
            raise BackendError("llama.cpp's sampler chain selected no token")
        return int(arr.data[arr.selected].id)

    def observe(self, tokens: Sequence[int]) -> None:
        if self._penalties is not None:
            for t in tokens:
                L.llama_sampler_accept(self._penalties, t)
            self._history.extend(tokens)

    def forget(self) -> None:
        if self._penalties is not None:  # the penalties alone: resetting the chain would restart the draw's seed
            L.llama_sampler_reset(self._penalties)
            self._history.clear()

    def close(self) -> None:
        for chain in (self._chain, self._bare):
            if chain:
                L.llama_sampler_free(chain)
        self._chain = self._bare = None
        self._penalties = None

    def __del__(self) -> None:
        self.close()


SCORE_CHUNK_BYTES = 128 << 20
"""Logit rows per scoring decode: at most this many bytes of float32 rows (128 for a
262,144-token vocabulary, 512 for 49,152 with the default n_batch, which bounds it too).
llama.cpp's output buffer grows to it on a context's first scoring and stays, and so do the
pages of the compute graph's logits: about 2 MiB of resident memory a row for Gemma 3
(+250 MiB at 128 rows, +120 MiB at 64). On this machine's 2 CPU cores Gemma 3 270M scores
232 and 251 tokens/s with 64 and 128 rows (its output layer, 262,144 x 640, is computed
faster in larger batches), SmolLM2 271 and 279 with 341 and 512 (docs/performance.md)."""

KV_TYPES = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0, "q4_0": L.GGML_TYPE_Q4_0}
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
"""Bytes per KV cache element of each ``kv_cache_type`` (q8_0 and q4_0 pack 32 values in 34 and 18 bytes)."""
CELL_PAD = 256
"""llama.cpp rounds a context's cells up to a multiple of this."""


def available_memory() -> int | None:
    """The memory the system can give without swapping (Linux's MemAvailable), in bytes; None
    where it cannot say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = N_CTX.default
    n_batch: int = N_BATCH.default
    n_threads: int | None = None
    kv_cache_type: str = KV_CACHE_TYPE.default
    """f16, q8_0 or q4_0 for both K and V; a quantized V cache needs flash attention, which is then forced on."""

    @property
    def n_ubatch(self) -> int:
        """The micro-batch llama.cpp computes at once (at most 512)."""
        return min(self.n_batch, 512)

    def threads(self) -> int:
        """The CPU threads a context uses (``n_threads``, else the machine's default)."""
        return self.n_threads or default_threads()


class LlamaMember:
    """One member in one slot: a llama context over a shared model.

    Given the ``store`` its model was acquired from, :meth:`close` gives the model back
    to it (:meth:`ModelStore.open_member` makes such owned members); without one, the
    caller releases the model itself."""

    def __init__(
        self,
        name: str,
        model: LoadedModel,
        settings: ContextSettings,
        system: str | None = None,
        gate: threading.BoundedSemaphore | None = None,
        *,
        store: ModelStore | None = None,
        chat_template: str | None = None,
    ):
        self.name = name
        self._gate = gate
        self.model = model
        self.system = system
        self.chat_template = chat_template
        """models.yaml's ``chat_template`` (a built-in's name or Jinja text); None: the file's."""
        self._store = store
        self._settings = settings
        self._ctx: L.llama_context_p | None = None
        self._create(settings.n_ctx)

    def _create(self, n_ctx: int) -> None:
        """A llama context of ``n_ctx`` tokens (the cache starts empty)."""
        settings, model, name = self._settings, self.model, self.name
        n_threads = settings.threads()
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = settings.n_batch
        cparams.n_ubatch = settings.n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        if settings.kv_cache_type != "f16":
            head = model.n_embd // max(1, model.n_head)
            if head % 32:  # q8_0 and q4_0 pack 32 values per block
                raise SettingError(
                    f"kv_cache_type {settings.kv_cache_type} needs an attention head size that is a multiple "
                    f"of 32, and {model.path.name} has {head}; set kv_cache_type: f16 for this ensemble",
                    setting="kv_cache_type",
                )
            cparams.type_k = cparams.type_v = KV_TYPES[settings.kv_cache_type]
            cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = L.llama_init_from_model(model.ptr, cparams) if model.ptr else None
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {n_ctx} tokens for member {name!r}; "
                "lower n_ctx in models.yaml (or the context the request asks for) or free some memory"
            )
        self._ctx = ctx
        self._n_threads = n_threads
        self._threads_now = n_threads
        self._mem = L.llama_get_memory(ctx)
        self._cells = int(L.llama_n_ctx(ctx))
        # llama.cpp may pad the context (to 256 cells); the configured n_ctx is the limit users asked for
        self._n_ctx = min(n_ctx, self._cells)
        self._n_batch = max(1, min(settings.n_batch, int(L.llama_n_batch(ctx))))
        self._batch = L.llama_batch_init(self._n_batch, 0, 1)
        self._cached: list[int] = []
        self._has_logits = False

    def _free(self) -> None:
        if self._ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None

    @property
    def memory_bytes(self) -> int:
        """The KV cache's bytes (every cell of every layer; llama.cpp allocates it whole)."""
        return self.model.kv_bytes(self._cells, KV_BYTES[self._settings.kv_cache_type]) if self._ctx else 0

    def resize(self, n_ctx: int) -> None:
        """A new context of ``n_ctx`` tokens in place of this one (the cache starts empty), if the
        system has the memory for its KV cache; otherwise a ModelLoadError, and the old one stays."""
        if self._ctx is None:
            raise BackendError(f"member {self.name!r} is closed")
        cells = -(-n_ctx // CELL_PAD) * CELL_PAD
        need = self.model.kv_bytes(cells, KV_BYTES[self._settings.kv_cache_type]) - self.memory_bytes
        free = available_memory()
        if free is not None and need > free:
            raise ModelLoadError(
                f"a context of {n_ctx} tokens for member {self.name!r} needs {need >> 20} MiB more memory for its "
                f"KV cache, and the system has {free >> 20} MiB available; ask for a smaller context (num_ctx), "
                "lower max_ctx in models.yaml, or free some memory")
        old = self._n_ctx
        self._free()
        try:
            self._create(n_ctx)
        except ModelLoadError:
            self._create(old)  # keep serving at the size it had
            raise

    def _context(self) -> L.llama_context_p:
        if self._ctx is None:
            raise BackendError(f"member {self.name!r} is closed")
        return self._ctx

    # -- the Member protocol -------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def cached(self) -> Sequence[int]:
        return self._cached

    def truncate(self, n: int) -> None:
        if n < len(self._cached):
            if L.llama_memory_seq_rm(self._mem, 0, n, -1):
                del self._cached[n:]
            else:  # recurrent/hybrid memories cannot drop a tail: start over rather than lie
                L.llama_memory_clear(self._mem, True)
                self._cached.clear()
            self._has_logits = False

    def evaluate(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None) -> None:
        tokens = list(tokens)
        self._check_fits(len(tokens))
        for start in range(0, len(tokens), self._n_batch):
            if start and cancel is not None and cancel():
                raise Cancelled
            chunk = tokens[start : start + self._n_batch]
            self._decode(chunk, all_logits=False, last_logits=start + self._n_batch >= len(tokens))
        self._has_logits = True

    def evaluate_rows(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None
                      ) -> Iterator[npt.NDArray[np.float32]]:
        """Scoring (:class:`me_local.core.scoring.ScoringMember`): the current logits, then each
        chunk of :attr:`score_rows` tokens decoded with logits at every position, as views
        of llama.cpp's output buffer (valid until the next decode). A chunk's rows are what
        llama.cpp's output buffer holds at once (it is sized by the rows a batch asks for),
        so a long text never costs ``n_tokens x n_vocab`` floats."""
        tokens = list(tokens)
        if not self._has_logits:
            raise BackendError(f"member {self.name!r} has no logits to score from; evaluate its context first")
        self._check_fits(len(tokens))
        yield self.logits()[None, :]
        step = self.score_rows
        ctx = self._context()
        for start in range(0, len(tokens), step):
            if cancel is not None and cancel():
                raise Cancelled
            chunk = tokens[start : start + step]
            self._decode(chunk, all_logits=True)
            self._has_logits = True
            ptr = L.llama_get_logits(ctx)
            yield np.ctypeslib.as_array(ptr, shape=(len(chunk), self.model.n_vocab))

    @property
    def score_rows(self) -> int:
        """Tokens per decode when scoring: every one has a row of logits, and llama.cpp's output
        buffer holds them all (:data:`SCORE_CHUNK_BYTES` at most, within ``n_batch``)."""
        return max(1, min(self._n_batch, SCORE_CHUNK_BYTES // (4 * self.model.n_vocab)))

    def _check_fits(self, n: int) -> None:
        if len(self._cached) + n > self._n_ctx:
            raise BackendError(
                f"member {self.name!r}: {len(self._cached) + n} tokens do not fit its context of {self._n_ctx}"
            )

    def _decode(self, chunk: Sequence[int], *, all_logits: bool, last_logits: bool = True) -> None:
        """One llama_decode of ``chunk`` (at most n_batch tokens) after the cache; logits at
        every position, or at the last one only when ``last_logits``."""
        ctx = self._context()
        batch = self._batch
        n_past = len(self._cached)
        fill_batch(batch, chunk, n_past, outputs=all_logits)
        if last_logits:
            batch.logits[len(chunk) - 1] = 1
        self._share_cpu(ctx)
        if self._gate is not None:
            with self._gate:
                rc = L.llama_decode(ctx, batch)
        else:
            rc = L.llama_decode(ctx, batch)
        if rc != 0:
            self._resync()
            raise BackendError(f"llama.cpp failed to evaluate {len(chunk)} tokens for {self.name!r} (code {rc})")
        self._cached.extend(chunk)

    def _share_cpu(self, ctx: L.llama_context_p) -> None:
        cpu = self.model.cpu
        if cpu is None:
            return
        n = cpu.threads_for(self._n_threads)
        if n != self._threads_now:
            L.llama_set_n_threads(ctx, n, n)
            self._threads_now = n

    def _resync(self) -> None:
        """After a failed decode, trust llama.cpp's memory for how much of the cache is valid."""
        pos_max = int(L.llama_memory_seq_pos_max(self._mem, 0))
        del self._cached[pos_max + 1 :]
        self._has_logits = False

    def logits(self) -> npt.NDArray[np.float32]:
        if not self._has_logits:
            raise BackendError(f"member {self.name!r} has no logits yet")
        ptr = L.llama_get_logits_ith(self._context(), -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def make_sampler(self, params: SamplingParams, seed: int) -> NativeSampler:
        return NativeSampler(self._context(), params, seed, self.model.n_vocab, model=self.model)

    def make_constraint(self, spec: GrammarSpec) -> LlamaGrammar:
        return self.model.make_grammar(spec, self.name)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    # -- word-level ME (core.words.WordMember) ---------------------------------
    @property
    def word_start(self) -> npt.NDArray[np.bool_]:
        return self.model.word_start

    @property
    def eog(self) -> npt.NDArray[np.bool_]:
        return self.model.eog

    def tokenize_text(self, text: str) -> list[int]:
        return self.model.tokenize_text(text)

    def make_word_start_sampler(self, params: SamplingParams, seed: int) -> NativeSampler:
        return NativeSampler(self._context(), params, seed, self.model.n_vocab,
                             restrict=(self.model.word_start, self.model.word_start_bias()), model=self.model)

    def token_bytes(self, token: int) -> bytes:
        return self.model.pieces[token]

    # -- prompts ---------------------------------------------------------------
    @property
    def template(self) -> ChatTemplate:
        """The chat template this member renders with, and where it came from."""
        return self.model.template(self.chat_template)

    def chat_prompt(self, messages: Sequence[ChatMessage], *, tools: ToolDefinitions | None = None,
                    labels: Sequence[str] | None = None) -> list[int]:
        """Format messages with this member's own template (its system prompt first), which
        receives ``tools``. Message content is tokenized as text: see :meth:`LoadedModel.chat_tokens`."""
        msgs = [dict(m) for m in messages]
        labels = list(labels) if labels is not None else [f"messages[{i}]" for i in range(len(msgs))]
        if self.system:
            if msgs and msgs[0].get("role") == "system":
                msgs[0]["content"] = f"{self.system}\n\n{msgs[0].get('content') or ''}"
                labels[0] = f"messages[0] (with the system prompt of member {self.name!r})"
            else:
                msgs.insert(0, {"role": "system", "content": self.system})
                labels.insert(0, f"the system prompt of member {self.name!r}")
        return self.model.chat_tokens(msgs, labels, self.template, tools)

    def raw_prompt(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True)

    def close(self) -> None:
        """Free the context, then give the model back to the store it came from (if any)."""
        self._free()
        store, self._store = self._store, None
        if store is not None:
            store.release(self.model)
