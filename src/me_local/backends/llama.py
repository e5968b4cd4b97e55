"""The llama-cpp-python adapter: the one module that imports llama_cpp.

It owns loading a GGUF file once and sharing it between members and slots
(:class:`ModelStore`), one llama context per (slot, member)
(:class:`LlamaMember`), batched decode with logits only at the last position,
llama.cpp's native sampler chain for single-member steps, the chat template
from the file's metadata, and mapping llama.cpp failures to the error tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

#: How many times a llama.cpp CPU thread spins at a barrier before it sleeps (GNU OpenMP).
#: llama.cpp's CPU threads meet at an OpenMP barrier after every graph node (~900 per
#: token here). libgomp's default spins 300,000 times first; when another process takes
#: one of a small machine's cores, the waiting thread then burns its core while its
#: partner is descheduled, and a decode goes from 18 ms to seconds (measured on 2 cores:
#: one busy process next to a 2-thread decode, 6 s for what takes 18 ms alone). A short
#: spin costs nothing on a quiet machine (18.0 ms either way) and keeps that case at
#: ~49 ms. libgomp reads it once, when it loads with llama_cpp; a user's own setting
#: wins. See docs/performance.md.
GOMP_SPINCOUNT = "300"
os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


def cuda_graphs_wanted(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether to leave llama.cpp's CUDA graphs on (ME_LOCAL_CUDA_GRAPHS=1).

    ``me`` decodes a member's catch-up as one batch whose size changes from step to
    step (1, 2, 3 ... tokens), and llama.cpp re-captures a context's CUDA graph
    whenever its batch shape changes. Measured on an H100 (docs/gpu.md): decodes
    alternating 1/2/3 tokens took 4.46 ms with graphs against 3.14 ms without,
    and ``me`` went from 0.98x to 1.41x ``ce`` with them off, while ``single``
    lost about 8%. So me-local turns them off (GGML_CUDA_DISABLE_GRAPHS, read by
    ggml at its first CUDA graph; any value disables, so the opt-out is ours).
    CPU builds ignore it.
    """
    return env.get("ME_LOCAL_CUDA_GRAPHS") == "1"


if not cuda_graphs_wanted():
    os.environ.setdefault("GGML_CUDA_DISABLE_GRAPHS", "1")

import llama_cpp  # noqa: E402  (after GOMP_SPINCOUNT: libgomp loads with it)
import numpy as np  # noqa: E402
from llama_cpp import llama_cpp as L  # noqa: E402
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from ..core.types import Cancelled, SamplingParams  # noqa: E402
from ..errors import BackendError, ConfigError, ModelLoadError, RequestError  # noqa: E402
from ..settings import KV_CACHE_TYPE, N_BATCH, N_CTX  # noqa: E402
from .cpu import cpu_flags, decide_repack  # noqa: E402
from .gguf_check import read_gguf_header  # noqa: E402

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


class _ErrorCapture(threading.local):
    lines: list[str] | None = None


_errors = _ErrorCapture()


@L.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: Any) -> None:
    # llama.cpp is chatty on stderr; route it to logging at debug (errors at warning)
    msg = text.decode("utf-8", "replace").rstrip()
    if not msg:
        return
    if level == 4 and _errors.lines is not None:  # llama.cpp logs on the thread that called it
        _errors.lines.append(msg)  # quoted in the error me-local raises: log it once, at debug
        log.debug("%s", msg)
    else:
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", msg)


@contextlib.contextmanager
def _capture_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs on this thread meanwhile (to quote its reason in ours)."""
    lines: list[str] = []
    outer, _errors.lines = _errors.lines, lines
    try:
        yield lines
    finally:
        _errors.lines = outer


def _llama_reason(lines: Sequence[str]) -> str:
    """llama.cpp's first error line, without its function-name prefix."""
    for line in lines:
        text = re.sub(r"^\w+: ", "", line.strip()).removeprefix("error loading model: ").strip()
        if text:
            return text
    return "no reason given"


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


class CpuShare:
    """Divides the CPU threads between generations that decode at the same time.

    llama.cpp's CPU backend gives every calling thread its own team of ``n_threads``
    workers, which spin at each of a graph's barriers. Two slots decoding at once with
    all cores each oversubscribe the cores, and both then run slower than one slot alone
    (measured on 2 cores, SmolLM2-135M: one stream 147 tokens/s; two streams with 2
    threads each 2 x 58; with 1 thread each 2 x 87). So a decode asks for its threads
    here: every OS thread that decoded within the last ``window`` seconds counts as an
    active generation (a generation runs on one thread; the members of a slot take turns
    on it, so they count once), and each gets ``cores // active`` threads (at least 1, at
    most what it asked for).
    """

    def __init__(self, cores: int | None = None, window: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cores = cores or default_threads()
        self.window = window
        self._clock = clock
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()

    def threads_for(self, wanted: int) -> int:
        now = self._clock()
        with self._lock:
            self._last[threading.get_ident()] = now
            for ident in [i for i, t in self._last.items() if now - t > self.window]:
                del self._last[ident]
            active = len(self._last)
        return max(1, min(wanted, self.cores // active))

    @property
    def active(self) -> int:
        now = self._clock()
        with self._lock:
            return sum(1 for t in self._last.values() if now - t <= self.window)


@dataclass(frozen=True)
class LoadSettings:
    """How a model file is loaded; members whose settings are equal share one load."""

    n_gpu_layers: int = 0
    repack: bool = True
    """llama_model_params.use_extra_bufts: let llama.cpp repack weights for its faster CPU kernels."""
    mmap: bool = False
    """Map the file (False: read the weights into memory, so the file may change under a running model)."""
    repack_reason: str = field(default="", compare=False)
    """Why ``repack`` is what it is (for the load-time log line)."""

    @classmethod
    def resolve(cls, repack: str = "auto", *, mmap: bool = False, n_gpu_layers: int = 0,
                flags: frozenset[str] | None = None) -> LoadSettings:
        """From a member's settings (repack auto | on | off) and this CPU's flags."""
        on, reason = decide_repack(repack, cpu_flags() if flags is None else flags)
        return cls(n_gpu_layers=n_gpu_layers, repack=on, mmap=mmap, repack_reason=reason)

    def apply(self, params: Any) -> None:
        """Set these on a llama_model_params."""
        params.n_gpu_layers = self.n_gpu_layers if self.n_gpu_layers >= 0 else 1_000_000
        params.use_extra_bufts = self.repack
        if self.mmap:
            params.load_mode = L.LLAMA_LOAD_MODE_MMAP
        else:
            # read every tensor now; lazy reading maps the file even without mmap
            params.load_mode = L.LLAMA_LOAD_MODE_NONE
            params.lazy_mode = L.LLAMA_LAZY_MODE_OFF

    def describe(self, name: str) -> str:
        weights = ("mapped from the file (mmap: true; replace it with mv, never in place)" if self.mmap
                   else "read into memory (mmap: false)")
        return f"repack {'on' if self.repack else 'off'} for {name}: {self.repack_reason}; weights {weights}"


def _load_failure(path: Path, architecture: str | None, lines: Sequence[str]) -> ModelLoadError:
    """llama.cpp refused a file whose GGUF header is sound: most often an architecture it does not know."""
    arch = repr(architecture) if architecture else "(none named)"
    return ModelLoadError(
        f"llama.cpp could not load {str(path)!r} ({_llama_reason(lines)}); llama-cpp-python "
        f"{llama_cpp_version()} may be too old for its architecture {arch}: upgrade it, or if that "
        "architecture is supported, re-download or re-copy the file"
    )


class LoadedModel:
    """One GGUF file loaded once: weights, vocabulary, pieces and metadata."""

    def __init__(self, path: Path, load: LoadSettings | None = None, *, vocab_only: bool = False) -> None:
        _init_backend()
        load = load or LoadSettings.resolve()
        self.path = path
        self.load = load
        self.n_gpu_layers = load.n_gpu_layers
        header = read_gguf_header(path)  # a damaged file gets its own message, before llama.cpp reads it
        params = L.llama_model_default_params()
        load.apply(params)
        params.vocab_only = vocab_only
        if not vocab_only:
            log.info("%s", load.describe(path.name))
        with _capture_errors() as errors:
            ptr = L.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise _load_failure(path, header.architecture, errors)
        self.ptr = ptr
        self.vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(ptr))
        # layer shapes are not read in a vocabulary-only load (llama.cpp aborts if asked)
        self.n_embd = 0 if vocab_only else int(L.llama_model_n_embd(ptr))
        self.n_head = 0 if vocab_only else int(L.llama_model_n_head(ptr))
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
        self.store_key: tuple[str, LoadSettings] | None = None
        """Set by the ModelStore that shares this model: its key there."""
        self.cpu: CpuShare | None = None
        """Set by the ModelStore that shares this model: the CPU threads its contexts share."""

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
            formatter = _chat_formatter(template, self.eos_text, self.bos_text)
            return formatter(messages=list(messages)).prompt  # type: ignore[arg-type]
        except Exception as exc:  # a template error is the request's (roles) or the file's fault
            raise RequestError(
                f"the chat template of {self.path.name} rejected these messages ({exc}); "
                "check the roles and their order",
                param="messages",
            ) from None

    def chat_tokens(self, messages: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> list[int]:
        """The prompt for chat messages. Only the template's own markup may produce special
        tokens: text in a message's content that reads as a control token (``<|im_end|>``)
        is tokenized as plain text, so a user cannot forge turns. ``labels`` name the
        messages in errors (default ``messages[i]``)."""
        marked = {}
        for i, m in enumerate(messages):
            found = self._control_texts(m.get("content") or "")
            if found is not None:
                marked[i] = found
        if not marked:  # nothing at stake: the rendered text as one piece, exactly as always
            text = self.format_chat(messages)
            starts_with_bos = bool(self.bos_text) and text.startswith(self.bos_text)
            return self.tokenize(text, add_special=self.add_bos and not starts_with_bos)
        return self._chat_tokens_with_text_content(messages, marked, labels)

    _control_pattern: re.Pattern[str] | None = None

    def _control_texts(self, text: str) -> list[str] | None:
        """None when ``text`` tokenizes the same with and without special-token parsing;
        otherwise the control-token texts it contains."""
        if self._control_pattern is None:
            # the texts that parse_special adds to the split: control and unknown tokens
            kinds = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
            texts = {self.token_texts[t].decode("utf-8", "replace") for t in range(self.n_vocab)
                     if L.llama_vocab_get_attr(self.vocab, t) & kinds}
            alternatives = sorted((re.escape(t) for t in texts if t), key=len, reverse=True)
            self._control_pattern = re.compile("|".join(alternatives) or "(?!)")
        if not text or not self._control_pattern.search(text):  # a quick scan, then the exact test
            return None
        special = self.tokenize(text, add_special=False, parse_special=True)
        if special == self.tokenize(text, add_special=False, parse_special=False):
            return None
        kinds = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
        found = [self._piece(t, special=True).decode("utf-8", "replace") for t in special
                 if L.llama_vocab_get_attr(self.vocab, t) & kinds]
        return list(dict.fromkeys(found))

    def _chat_tokens_with_text_content(self, messages: Sequence[dict[str, Any]], marked: dict[int, list[str]],
                                       labels: Sequence[str] | None) -> list[int]:
        """Render the template with a unique mark in place of each marked message's content,
        split the text at the marks, and tokenize the template's pieces with special-token
        parsing and the contents without. The pieces' boundaries may tokenize a little
        differently from one whole text, so this path is taken only when it is needed.
        A template that trims the content or leaves a message out is followed; one that
        rewrites it otherwise cannot be, and the request is refused rather than forged."""
        tag = os.urandom(6).hex()
        marks = {i: f"\ue000me-local-content-{tag}-{i}\ue001" for i in marked}
        probe = [dict(m) for m in messages]
        for i, mark in marks.items():
            probe[i]["content"] = _PAD + mark + _PAD
        text = self.format_chat(probe)

        def refuse(i: int) -> RequestError:
            label = labels[i] if labels is not None else f"messages[{i}]"
            found = ", ".join(marked[i]) or "control-token text"
            return RequestError(
                f"{label} contains {found}, which is markup for {self.path.name}; its chat template "
                "rewrites message content, so that text cannot be kept as plain text: remove it from the message",
                param="messages",
            )

        hits = []
        for i, mark in marks.items():
            n = text.count(mark)
            if n == 1:
                hits.append((text.index(mark), i))
            elif n or f"{tag}-{i}" in text.lower():  # repeated or rewritten
                raise refuse(i)
            # else the template left this message's content out: nothing of it to tokenize
        pieces: list[tuple[str, bool]] = []  # (text, is message content)
        pos = 0
        for at, i in sorted(hits):
            content = str(messages[i].get("content") or "")
            before = text[pos:at]
            # the template kept the padding around the mark, or trimmed it (Jinja's `trim`)
            if before.endswith(_PAD):
                before = before[: -len(_PAD)]
            else:
                content = content.lstrip()
            pos = at + len(marks[i])
            if text.startswith(_PAD, pos):
                pos += len(_PAD)
            else:
                content = content.rstrip()
            pieces += [(before, False), (content, True)]
        pieces.append((text[pos:], False))
        for piece, is_content in pieces:
            if not is_content and (_PAD in piece or "\ue000" in piece or "\ue001" in piece):
                raise refuse(min(marked))  # the template cut or moved a mark or its padding: do not guess
        # BOS as for the whole text: added unless the template's text starts with it
        starts_with_bos = bool(self.bos_text) and pieces[0][0].startswith(self.bos_text)
        tokens = [self.bos] if self.add_bos and self.bos >= 0 and not starts_with_bos else []
        for piece, is_content in pieces:
            if piece:
                tokens += self.tokenize(piece, add_special=False, parse_special=not is_content)
        return tokens

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None


#: Whitespace put around a content mark to see whether a chat template trims message content.
_PAD = " \u3000\t"


@cache
def _chat_formatter(template: str, eos_text: str, bos_text: str) -> Jinja2ChatFormatter:
    """A compiled chat template (compiling takes milliseconds; rendering is thread-safe)."""
    return Jinja2ChatFormatter(template, eos_token=eos_text, bos_token=bos_text)


def inspect_model(path: Path) -> LoadedModel:
    """Vocabulary and metadata only (no weights): for `me-local models` and validation."""
    model = LoadedModel(path, LoadSettings(repack=False, mmap=False), vocab_only=True)
    model.close()
    return model


class ModelStore:
    """Loads each (file, load settings) once and shares it between members and slots.

    It also shares the CPU between slots, so that concurrent slots never put more
    spinning llama.cpp threads on the CPU than it has (see docs/architecture.md and
    docs/performance.md): ``cpu`` (a :class:`CpuShare`) gives each decode
    ``cores // active generations`` threads, and the decode gate, a semaphore taken per
    decode call (so requests on different slots still interleave token by token), bounds
    how many decodes run at once to one per core. On 2 cores, two slots decode side by
    side with one thread each (2 x 87 tokens/s on SmolLM2-135M), where taking turns with
    two threads each gave 2 x 68 and one slot alone gives 147.
    """

    def __init__(self, max_concurrent_decodes: int | None = None, cpu: CpuShare | None = None) -> None:
        self._models: dict[tuple[str, LoadSettings], LoadedModel] = {}
        self._lock = threading.Lock()
        self.cpu = cpu or CpuShare()
        if max_concurrent_decodes is None:
            max_concurrent_decodes = max(1, self.cpu.cores)
        self.gate = threading.BoundedSemaphore(max_concurrent_decodes)

    def acquire(self, path: Path, load: LoadSettings | None = None) -> LoadedModel:
        load = load or LoadSettings.resolve()
        key = (str(path.resolve()), load)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = LoadedModel(path, load)
                model.cpu = self.cpu
                model.store_key = key
            model.refs += 1
            return model

    def release(self, model: LoadedModel) -> None:
        with self._lock:
            model.refs -= 1
            if model.refs <= 0:
                if model.store_key is not None:
                    self._models.pop(model.store_key, None)
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


_KV_TYPES = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0, "q4_0": L.GGML_TYPE_Q4_0}


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = N_CTX.default
    n_batch: int = N_BATCH.default
    n_threads: int | None = None
    kv_cache_type: str = KV_CACHE_TYPE.default
    """f16, q8_0 or q4_0 for both K and V; a quantized V cache needs flash attention, which is then forced on."""


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
        if settings.kv_cache_type != "f16":
            head = model.n_embd // max(1, model.n_head)
            if head % 32:  # q8_0 and q4_0 pack 32 values per block
                raise ConfigError(
                    f"kv_cache_type {settings.kv_cache_type} needs an attention head size that is a multiple "
                    f"of 32, and {model.path.name} has {head}; set kv_cache_type: f16 for this ensemble"
                )
            cparams.type_k = cparams.type_v = _KV_TYPES[settings.kv_cache_type]
            cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = L.llama_init_from_model(model.ptr, cparams)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {settings.n_ctx} tokens for member {name!r}; "
                "lower n_ctx in models.yaml or free some memory"
            )
        self._ctx = ctx
        self._n_threads = n_threads
        self._threads_now = n_threads
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
            if L.llama_memory_seq_rm(self._mem, 0, n, -1):
                del self._cached[n:]
            else:  # recurrent/hybrid memories cannot drop a tail: start over rather than lie
                L.llama_memory_clear(self._mem, True)
                self._cached.clear()
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
            self._share_cpu()
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

    def _share_cpu(self) -> None:
        cpu = self.model.cpu
        if cpu is None:
            return
        n = cpu.threads_for(self._n_threads)
        if n != self._threads_now:
            L.llama_set_n_threads(self._ctx, n, n)
            self._threads_now = n

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
        """Format messages with this member's own template (its system prompt first).
        Message content is tokenized as text: see :meth:`LoadedModel.chat_tokens`."""
        msgs = [dict(m) for m in messages]
        labels = [f"messages[{i}]" for i in range(len(msgs))]
        if self.system:
            if msgs and msgs[0].get("role") == "system":
                msgs[0]["content"] = f"{self.system}\n\n{msgs[0].get('content') or ''}"
                labels[0] = f"messages[0] (with the system prompt of member {self.name!r})"
            else:
                msgs.insert(0, {"role": "system", "content": self.system})
                labels.insert(0, f"the system prompt of member {self.name!r}")
        return self.model.chat_tokens(msgs, labels)

    def raw_prompt(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True)

    def close(self) -> None:
        if self._ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None


# -- the bench's reference: llama-cpp-python's own high-level loop ---------------------------


@dataclass
class CompletionTiming:
    """One streamed completion, timed the way GenerationStats times the engine."""

    ttft_s: float
    total_s: float
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str | None

    @property
    def tokens_per_s(self) -> float:
        """Generation speed after the first token: (n - 1) / (end - first token)."""
        span = self.total_s - self.ttft_s
        if self.generated_tokens < 2 or span <= 0:
            return 0.0
        return (self.generated_tokens - 1) / span


_DEFAULT_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def _llama_model_defaults(load: LoadSettings) -> Iterator[None]:
    """Make ``llama_cpp.Llama`` load a model the way :class:`LoadedModel` does.

    Llama (llama-cpp-python 0.3.36) has arguments for n_gpu_layers and use_mmap but none
    for use_extra_bufts (repacking) or lazy_mode: it starts from
    ``llama_model_default_params()`` and sets its own fields. So while it is built, that
    function returns defaults with ours applied (Llama then sets n_gpu_layers and
    load_mode from its arguments, which BaselineCompletion passes the same way).
    """
    original = L.llama_model_default_params

    def defaults() -> Any:
        params = original()
        load.apply(params)
        return params

    with _DEFAULT_PARAMS_LOCK:
        L.llama_model_default_params = defaults
        try:
            yield
        finally:
            L.llama_model_default_params = original


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
        _init_backend()
        load = load or LoadSettings.resolve()
        n_threads = settings.n_threads or default_threads()
        self.path = path
        self.load = load
        header = read_gguf_header(path)
        log.info("baseline: %s", load.describe(path.name))
        try:
            with _llama_model_defaults(load), _capture_errors() as errors:
                self._llm: Any = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=settings.n_ctx,
                    n_batch=settings.n_batch,
                    n_ubatch=min(settings.n_batch, 512),
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    n_gpu_layers=load.n_gpu_layers if load.n_gpu_layers >= 0 else -1,
                    use_mmap=load.mmap,
                    flash_attn=True,
                    type_k=_KV_TYPES[settings.kv_cache_type],
                    type_v=_KV_TYPES[settings.kv_cache_type],
                    verbose=False,
                )
        except ValueError:  # llama-cpp-python's way of saying "could not load"
            raise _load_failure(path, header.architecture, errors) from None
        used = self._llm.model_params
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
        prompt = list(prompt_tokens)
        t0 = clock()
        first: float | None = None
        finish: str | None = None
        for chunk in llm.create_completion(
            prompt,
            max_tokens=n_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repeat_penalty=1.0,
            seed=seed & 0xFFFFFFFF,
            stream=True,
        ):
            if first is None:
                first = clock()
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
