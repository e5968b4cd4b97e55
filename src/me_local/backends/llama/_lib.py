"""The llama_cpp library itself: its import, its log routed to Python logging (with
the error lines captured per thread, to quote llama.cpp's reason in our errors), the
backend's one-time initialisation, and its version.

Importing this sets nothing in the environment: call :func:`me_local.runtime.prepare`
before it is first imported (the entry points do).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_cpp as L

from ...errors import ModelLoadError

log = logging.getLogger("me_local.llama")

# ggml's levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


class _ErrorCapture(threading.local):
    lines: list[str] | None = None


_errors = _ErrorCapture()


def _log(level: int, text: bytes, user_data: int | None) -> None:
    # llama.cpp is chatty on stderr; route it to logging at debug (errors at warning)
    msg = text.decode("utf-8", "replace").rstrip()
    if not msg:
        return
    if level == 4 and _errors.lines is not None:  # llama.cpp logs on the thread that called it
        _errors.lines.append(msg)  # quoted in the error me-local raises: log it once, at debug
        log.debug("%s", msg)
    else:
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", msg)


_log_callback = L.llama_log_callback(_log)
"""The C callback (kept referenced here for as long as llama.cpp may call it)."""


@contextlib.contextmanager
def capture_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs on this thread meanwhile (to quote its reason in ours)."""
    lines: list[str] = []
    outer, _errors.lines = _errors.lines, lines
    try:
        yield lines
    finally:
        _errors.lines = outer


def llama_reason(lines: Sequence[str]) -> str:
    """llama.cpp's first error line, without its function-name prefix."""
    for line in lines:
        text = re.sub(r"^\w+: ", "", line.strip()).removeprefix("error loading model: ").strip()
        if text:
            return text
    return "no reason given"


@cache
def init_backend() -> None:
    L.llama_log_set(_log_callback, ctypes.c_void_p(0))
    L.llama_backend_init()


def llama_cpp_version() -> str:
    return str(llama_cpp.__version__)


def supports_gpu_offload() -> bool:
    init_backend()
    return bool(L.llama_supports_gpu_offload())


def load_failure(path: Path, architecture: str | None, lines: Sequence[str]) -> ModelLoadError:
    """llama.cpp refused a file whose GGUF header is sound: most often an architecture it does not know."""
    arch = repr(architecture) if architecture else "(none named)"
    return ModelLoadError(
        f"llama.cpp could not load {str(path)!r} ({llama_reason(lines)}); llama-cpp-python "
        f"{llama_cpp_version()} may be too old for its architecture {arch}: upgrade it, or if that "
        "architecture is supported, re-download or re-copy the file"
    )


def fill_batch(batch: Any, tokens: Sequence[int], start: int, *, outputs: bool) -> None:
    """Put ``tokens`` in ``batch`` (sequence 0, positions from ``start``), each with an output
    (logits or an embedding) when ``outputs``, none otherwise."""
    for j, tok in enumerate(tokens):
        batch.token[j] = tok
        batch.pos[j] = start + j
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = 0
        batch.logits[j] = 1 if outputs else 0
    batch.n_tokens = len(tokens)
