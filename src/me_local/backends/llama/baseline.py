"""The bench's reference, not the engine's: llama-cpp-python's own high-level loop
(``Llama.create_completion(stream=True)``), loaded and configured the way the members
are, and timed the way the engine's generations are."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import llama_cpp
from llama_cpp import llama_cpp as L
from llama_cpp.llama_types import CreateCompletionStreamResponse

from ...core.types import SamplingParams, tokens_per_second
from ...errors import BackendError, ModelLoadError
from ..gguf_check import read_gguf_header
from ..hugepages import load_with_huge_pages
from ._lib import capture_errors, init_backend, llama_cpp_version, llama_reason, load_failure, log
from .context import KV_TYPES, ContextSettings
from .model import LoadSettings


@dataclass
class CompletionTiming:
    """One streamed completion, timed the way GenerationStats times the engine."""

    ttft_s: float
    total_s: float
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str | None
    generated_bytes: int = 0
    """UTF-8 bytes of the text generated."""
    first_bytes: int = 0
    """UTF-8 bytes of the text the first chunk carried."""

    @property
    def tokens_per_s(self) -> float:
        """Generation speed after the first token, as the engine reports it."""
        return tokens_per_second(self.generated_tokens, self.total_s - self.ttft_s)

    @property
    def bytes_per_s(self) -> float:
        """Text speed after the first chunk: its bytes over the time from the first chunk to the last."""
        span = self.total_s - self.ttft_s
        return (self.generated_bytes - self.first_bytes) / span if span > 0 else 0.0


@dataclass
class _Build:
    """What llama.cpp answered while ``Llama`` was built on this thread (None: not asked)."""

    model_loaded: bool | None = None
    context_created: bool | None = None


_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _llama_build(load: LoadSettings) -> Iterator[_Build]:
    """Make ``llama_cpp.Llama`` load a model the way :class:`LoadedModel` does, and record
    which of llama.cpp's steps failed, if one did.

    Llama (llama-cpp-python 0.3.36) has arguments for n_gpu_layers and use_mmap but none
    for use_extra_bufts (repacking) or lazy_mode: it starts from
    ``llama_model_default_params()`` and sets its own fields. So while it is built, that
    function returns defaults with ours applied (Llama then sets n_gpu_layers and
    load_mode from its arguments, which BaselineCompletion passes the same way). Llama
    raises a ValueError whichever step fails, so the model load and the context creation
    are watched too: a failure is then named by what llama.cpp returned.
    """
    original_defaults = L.llama_model_default_params
    original_load = L.llama_model_load_from_file
    original_init = L.llama_init_from_model
    build = _Build()
    me = threading.get_ident()

    def defaults() -> L.llama_model_params:
        params: L.llama_model_params = original_defaults()
        load.apply(params)
        return params

    def load_from_file(path_model: bytes, params: L.llama_model_params, /) -> L.llama_model_p | None:
        mine = threading.get_ident() == me
        # huge pages for the read weights, as LoadedModel asks: right after the load, before the context
        ptr: L.llama_model_p | None = load_with_huge_pages(lambda: original_load(path_model, params),
                                                           read_weights=mine and not load.mmap)
        if mine:
            build.model_loaded = bool(ptr)
        return ptr

    def init_from_model(model: L.llama_model_p, params: L.llama_context_params, /) -> L.llama_context_p | None:
        ctx: L.llama_context_p | None = original_init(model, params)
        if threading.get_ident() == me:
            build.context_created = bool(ctx)
        return ctx

    with _BUILD_LOCK:
        L.llama_model_default_params = defaults
        L.llama_model_load_from_file = load_from_file
        L.llama_init_from_model = init_from_model
        try:
            yield build
        finally:
            L.llama_model_default_params = original_defaults
            L.llama_model_load_from_file = original_load
            L.llama_init_from_model = original_init


class BaselineCompletion:
    """``llama_cpp.Llama(...).create_completion(..., stream=True)`` on one model file,
    loaded as the members load it (:class:`LoadSettings`: repacking, mmap, GPU layers), with
    the context settings a :class:`LlamaMember` uses (n_ctx, n_batch, n_ubatch, threads,
    flash attention as llama.cpp's ``auto`` picks on CPU). ``me-local bench`` measures
    ``single`` mode against it."""

    def __init__(
        self,
        path: Path,
        settings: ContextSettings,
        load: LoadSettings | None = None,
    ) -> None:
        init_backend()
        load = load or LoadSettings.resolve()
        n_threads = settings.threads()
        self.path = path
        self.load = load
        header = read_gguf_header(path)
        log.info("baseline: %s", load.describe(path.name))
        try:
            with _llama_build(load) as build, capture_errors() as errors:
                llm = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=settings.n_ctx,
                    n_batch=settings.n_batch,
                    n_ubatch=settings.n_ubatch,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    n_gpu_layers=load.n_gpu_layers if load.n_gpu_layers >= 0 else -1,
                    use_mmap=load.mmap,
                    flash_attn=True,
                    type_k=KV_TYPES[settings.kv_cache_type],
                    type_v=KV_TYPES[settings.kv_cache_type],
                    verbose=False,
                )
        except ValueError:  # Llama's one exception for every step; which step failed is recorded
            if build.model_loaded is False:
                raise load_failure(path, header.architecture, errors) from None
            if build.context_created is False:
                raise ModelLoadError(
                    f"llama.cpp could not create a context of {settings.n_ctx} tokens for the baseline on "
                    f"{path.name} ({llama_reason(errors)}); lower n_ctx in models.yaml or free some memory"
                ) from None
            raise
        self._llm: llama_cpp.Llama | None = llm
        used = llm.model_params
        if bool(used.use_extra_bufts) != load.repack or (int(used.load_mode) == L.LLAMA_LOAD_MODE_MMAP) != load.mmap:
            self.close()
            raise BackendError(
                f"llama-cpp-python {llama_cpp_version()} did not load {path.name} with the members' settings "
                f"(use_extra_bufts {bool(used.use_extra_bufts)}, load_mode {int(used.load_mode)}), so the "
                "baseline would not be comparable; report this as a me-local bug"
            )

    def run(
        self,
        prompt_tokens: Sequence[int],
        n_tokens: int,
        params: SamplingParams,
        seed: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> CompletionTiming:
        llm = self._llm
        if llm is None:
            raise BackendError(f"the baseline on {self.path.name} is closed")
        prompt = list(prompt_tokens)
        t0 = clock()
        first: float | None = None
        finish: str | None = None
        n_bytes = first_bytes = 0
        # with stream=True the result is an iterator of chunks (the stubs do not say so)
        chunks = cast(Iterator[CreateCompletionStreamResponse], llm.create_completion(
            prompt,
            max_tokens=n_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repeat_penalty=1.0,
            seed=seed & 0xFFFFFFFF,
            stream=True,
        ))
        for chunk in chunks:
            size = len(chunk["choices"][0]["text"].encode("utf-8"))
            if first is None:
                first = clock()
                first_bytes = size
            n_bytes += size
            finish = chunk["choices"][0].get("finish_reason") or finish
        total = clock() - t0
        # llm.n_tokens counts what was evaluated: the prompt and every sampled token but the
        # last one when the limit ended the run (an end-of-generation token is not counted).
        evaluated = int(llm.n_tokens) - len(prompt)
        generated = evaluated + 1 if finish == "length" else evaluated
        return CompletionTiming(
            ttft_s=(first - t0) if first is not None else total,
            total_s=total,
            generated_tokens=max(0, generated),
            prompt_tokens=len(prompt),
            finish_reason=finish,
            generated_bytes=n_bytes,
            first_bytes=first_bytes,
        )

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def baseline_completion_speed(
    path: Path,
    prompt_tokens: Sequence[int],
    n_tokens: int,
    params: SamplingParams,
    *,
    seed: int = 0,
    settings: ContextSettings | None = None,
    load: LoadSettings | None = None,
) -> CompletionTiming:
    """One timed ``create_completion(stream=True)`` run (loads the model, runs, frees it)."""
    baseline = BaselineCompletion(path, settings or ContextSettings(), load)
    try:
        return baseline.run(prompt_tokens, n_tokens, params, seed)
    finally:
        baseline.close()
