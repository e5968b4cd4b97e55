"""The llama-cpp-python adapter: the one module that imports llama_cpp.

It owns loading a GGUF file once and sharing it between members and slots
(:class:`ModelStore`), one llama context per (slot, member)
(:class:`LlamaMember`), batched decode with logits only at the last position,
llama.cpp's native sampler chain for single-member steps, the chat template
from the file's metadata, and mapping llama.cpp failures to the error tree.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_cpp as L
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..core.types import Cancelled, SamplingParams
from ..errors import BackendError, ModelLoadError, RequestError

log = logging.getLogger("me_local.llama")

#: Used when a GGUF file carries no ``tokenizer.chat_template`` (documented in the README).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ggml's levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


@L.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: Any) -> None:
    # llama.cpp is chatty on stderr; route it to logging at debug (errors at warning)
    msg = text.decode("utf-8", "replace").rstrip()
    if msg:
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", msg)


@cache
def _init_backend() -> None:
    L.llama_log_set(_log_callback, ctypes.c_void_p(0))
    L.llama_backend_init()


def llama_cpp_version() -> str:
    return str(llama_cpp.__version__)


def supports_gpu_offload() -> bool:
    _init_backend()
    return bool(L.llama_supports_gpu_offload())


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_threads() -> int:
    return max(1, min(available_cpus(), 8))


def _meta_str(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, ctypes.sizeof(buf))
    if n < 0:
        return None
    if n >= ctypes.sizeof(buf):  # long template: retry with the exact size
        buf = ctypes.create_string_buffer(n + 1)
        L.llama_model_meta_val_str(model, key.encode(), buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", "replace")


class LoadedModel:
    """One GGUF file loaded once: weights, vocabulary, pieces and metadata."""

    def __init__(self, path: Path, n_gpu_layers: int = 0, *, vocab_only: bool = False) -> None:
        _init_backend()
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        params = L.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 1_000_000
        params.vocab_only = vocab_only
        ptr = L.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp could not load {str(path)!r}; check that it is a complete GGUF model file "
                f"(llama-cpp-python {llama_cpp_version()} may also be too old for its architecture)"
            )
        self.ptr = ptr
        self.vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(ptr))
        self.size_bytes = path.stat().st_size
        self.chat_template = _meta_str(ptr, "tokenizer.chat_template")
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self._eog = np.array([bool(L.llama_vocab_is_eog(self.vocab, t)) for t in range(self.n_vocab)])
        self.pieces = [self._piece(t, special=False) for t in range(self.n_vocab)]
        texts = [L.llama_vocab_get_text(self.vocab, t) or b"" for t in range(self.n_vocab)]
        # what llama.cpp's speculative decoding checks between draft and target: vocabulary
        # type, size, BOS/EOS and every token's text
        h = hashlib.sha256()
        h.update(f"{L.llama_vocab_type(self.vocab)}:{self.n_vocab}:".encode())
        h.update(f"{L.llama_vocab_bos(self.vocab)}:{L.llama_vocab_eos(self.vocab)}:".encode())
        for t in texts:
            h.update(t + b"\x00")
        self.token_texts = texts
        self.fingerprint = h.hexdigest()
        self.bos_text = self._piece(self.bos, special=True).decode("utf-8", "replace") if self.bos >= 0 else ""
        self.eos_text = self._piece(self.eos, special=True).decode("utf-8", "replace") if self.eos >= 0 else ""
        self.refs = 0

    def _piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        arr = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_special, parse_special)
        if n < 0:
            arr = (L.llama_token * -n)()
            n = L.llama_tokenize(self.vocab, data, len(data), arr, -n, add_special, parse_special)
        if n < 0:
            raise RequestError("the prompt could not be tokenized", param="prompt")
        return list(arr[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.pieces[t] for t in tokens).decode("utf-8", "replace")

    def format_chat(self, messages: Sequence[dict[str, Any]]) -> str:
        template = self.chat_template or DEFAULT_CHAT_TEMPLATE
        try:
            formatter = Jinja2ChatFormatter(template, eos_token=self.eos_text, bos_token=self.bos_text)
            return formatter(messages=list(messages)).prompt  # type: ignore[arg-type]
        except Exception as exc:  # a template error is the request's (roles) or the file's fault
            raise RequestError(
                f"the chat template of {self.path.name} rejected these messages ({exc}); "
                "check the roles and their order",
                param="messages",
            ) from None

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None


def inspect_model(path: Path) -> LoadedModel:
    """Vocabulary and metadata only (no weights): for `me-local models` and validation."""
    model = LoadedModel(path, vocab_only=True)
    model.close()
    return model


class ModelStore:
    """Loads each (file, n_gpu_layers) once and shares it between members and slots.

    It also holds the decode gate: a semaphore bounding how many llama_decode
    calls run at once, so that concurrent slots never put more spinning
    llama.cpp threads on the CPU than it has (see docs/architecture.md). The
    gate is taken per decode call, not per request, so requests on different
    slots still interleave token by token.
    """

    def __init__(self, max_concurrent_decodes: int | None = None) -> None:
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._lock = threading.Lock()
        if max_concurrent_decodes is None:
            max_concurrent_decodes = max(1, available_cpus() // default_threads())
        self.gate = threading.BoundedSemaphore(max_concurrent_decodes)

    def acquire(self, path: Path, n_gpu_layers: int = 0) -> LoadedModel:
        key = (str(path.resolve()), n_gpu_layers)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = LoadedModel(path, n_gpu_layers)
            model.refs += 1
            return model

    def release(self, model: LoadedModel) -> None:
        with self._lock:
            model.refs -= 1
            if model.refs <= 0:
                self._models.pop((str(model.path.resolve()), model.n_gpu_layers), None)
                model.close()

    def __len__(self) -> int:
        return len(self._models)


class NativeSampler:
    """llama.cpp's sampler chain, in the core's order: temperature, top-k, top-p, min-p, draw.
    It reads the member's last logits inside llama.cpp: nothing vocabulary-sized crosses into Python."""

    def __init__(self, member: LlamaMember, params: SamplingParams, seed: int) -> None:
        self._ctx = member._ctx
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if params.greedy:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if params.temperature != 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
            if params.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._chain = chain

    def sample(self) -> int:
        return int(L.llama_sampler_sample(self._chain, self._ctx, -1))

    def close(self) -> None:
        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None


class LlamaMember:
    """One member in one slot: a llama context over a shared model."""

    def __init__(
        self,
        name: str,
        model: LoadedModel,
        settings: ContextSettings,
        system: str | None = None,
        gate: threading.BoundedSemaphore | None = None,
    ):
        self.name = name
        self._gate = gate
        self.model = model
        self.system = system
        n_threads = settings.n_threads or default_threads()
        cparams = L.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx
        cparams.n_batch = settings.n_batch
        cparams.n_ubatch = min(settings.n_batch, 512)
        cparams.n_seq_max = 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        ctx = L.llama_init_from_model(model.ptr, cparams)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {settings.n_ctx} tokens for member {name!r}; "
                "lower n_ctx in models.yaml or free some memory"
            )
        self._ctx = ctx
        self._mem = L.llama_get_memory(ctx)
        # llama.cpp may pad the context (to 256 cells); the configured n_ctx is the limit users asked for
        self._n_ctx = min(settings.n_ctx, int(L.llama_n_ctx(ctx)))
        self._n_batch = max(1, min(settings.n_batch, int(L.llama_n_batch(ctx))))
        self._batch = L.llama_batch_init(self._n_batch, 0, 1)
        self._cached: list[int] = []
        self._has_logits = False
        self._logits_view: np.ndarray | None = None

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
            L.llama_memory_seq_rm(self._mem, 0, n, -1)
            del self._cached[n:]
            self._has_logits = False

    def evaluate(self, tokens: Sequence[int], cancel: Callable[[], bool] | None = None) -> None:
        tokens = list(tokens)
        if len(self._cached) + len(tokens) > self._n_ctx:
            raise BackendError(
                f"member {self.name!r}: {len(self._cached) + len(tokens)} tokens do not fit its context "
                f"of {self._n_ctx}"
            )
        batch = self._batch
        for start in range(0, len(tokens), self._n_batch):
            if start and cancel is not None and cancel():
                raise Cancelled
            chunk = tokens[start : start + self._n_batch]
            last_chunk = start + self._n_batch >= len(tokens)
            n_past = len(self._cached)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            if last_chunk:
                batch.logits[len(chunk) - 1] = 1
            batch.n_tokens = len(chunk)
            if self._gate is not None:
                with self._gate:
                    rc = L.llama_decode(self._ctx, batch)
            else:
                rc = L.llama_decode(self._ctx, batch)
            if rc != 0:
                self._resync()
                raise BackendError(f"llama.cpp failed to evaluate {len(chunk)} tokens for {self.name!r} (code {rc})")
            self._cached.extend(chunk)
        self._has_logits = True

    def _resync(self) -> None:
        """After a failed decode, trust llama.cpp's memory for how much of the cache is valid."""
        pos_max = int(L.llama_memory_seq_pos_max(self._mem, 0))
        del self._cached[pos_max + 1 :]
        self._has_logits = False

    def logits(self) -> np.ndarray:
        if not self._has_logits:
            raise BackendError(f"member {self.name!r} has no logits yet")
        ptr = L.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def make_sampler(self, params: SamplingParams, seed: int) -> NativeSampler:
        return NativeSampler(self, params, seed)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def token_bytes(self, token: int) -> bytes:
        return self.model.pieces[token]

    # -- prompts ---------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Format messages with this member's own template (its system prompt first)."""
        msgs = [dict(m) for m in messages]
        if self.system:
            if msgs and msgs[0].get("role") == "system":
                msgs[0]["content"] = f"{self.system}\n\n{msgs[0].get('content') or ''}"
            else:
                msgs.insert(0, {"role": "system", "content": self.system})
        text = self.model.format_chat(msgs)
        starts_with_bos = bool(self.model.bos_text) and text.startswith(self.model.bos_text)
        return self.model.tokenize(text, add_special=self.model.add_bos and not starts_with_bos)

    def raw_prompt(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True)

    def close(self) -> None:
        if self._ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None
