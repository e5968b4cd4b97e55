"""Logging for the daemon: one line per event on stderr, and the access log.

journald and launchd capture stderr. Under journald (``$JOURNAL_STREAM`` names
stderr) a line carries no timestamp, the journal adds its own, and starts with a
``<N>`` syslog priority prefix so ``journalctl -p warning`` works; elsewhere it
starts with a timestamp. A message or traceback that spans lines is folded into
one line (``\\n`` written out), so one event is one journal entry.

The access log never contains the API key, headers, the query string or the
prompt: :func:`format_access` only sees the fields of an :class:`AccessRecord`,
and prints the prompt only when ``log_prompts`` is on (``--log-prompts``).
:class:`LineFormatter` also replaces any registered secret (the API key) wherever
it would appear, as a second line of defence.

What ``me-local serve`` calls::

    setup_logging(secrets=[api_key] if api_key else ())   # level: the CLI's --log-level
    access = AccessLog(log_prompts=log_prompts)
    access.log(AccessRecord("POST", request.path, 200, duration, prompt_tokens=12, completion_tokens=30, ...))
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import quote

LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOGGER = "me_local.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
REDACTED = "***"

#: syslog priorities (sd-daemon.h's SD_ERR...) for journald's level prefix.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journald stream systemd connected (``$JOURNAL_STREAM`` is ``DEV:INODE``)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class LineFormatter(logging.Formatter):
    """One event, one line: newlines folded, secrets replaced, journald priority prefix when asked."""

    def __init__(self, *, journal: bool = False, secrets: Iterable[str] = ()) -> None:
        super().__init__(JOURNAL_FORMAT if journal else TEXT_FORMAT)
        self.journal = journal
        # Very short strings would redact ordinary text; an API key is never that short.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if self.journal:
            text = f"<{_priority(record.levelno)}>{text}"
        return text


def enable_crash_traces(stream: TextIO | None = None) -> bool:
    """On a native crash, write every thread's Python stack to ``stream`` (stderr) before dying.

    llama.cpp runs in-process: a segfault, an abort or a SIGBUS (a mapped model file written
    under it) would otherwise end the process with no word in the log. :mod:`faulthandler`
    handles SIGSEGV, SIGFPE, SIGABRT, SIGBUS and SIGILL. The CLI's entry point calls this first,
    and ``serve`` again (stderr is the service's log). False when the stream has no file
    descriptor (then nothing can be written from a signal handler anyway).
    """
    stream = sys.stderr if stream is None else stream
    try:
        faulthandler.enable(file=stream, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no fileno(): an in-memory stream
        return False
    return True


def setup_logging(
    level: str | int | None = None,
    *,
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
    journal: bool | None = None,
) -> logging.Handler:
    """Route every log record to one line on ``stream`` (stderr), replacing the root logger's handlers.

    ``level`` (``"info"``, ``logging.INFO``...) sets the root level; None keeps the one the
    CLI's ``--log-level`` set. ``journal`` None detects journald from ``$JOURNAL_STREAM``.
    Returns the handler installed.
    """
    stream = sys.stderr if stream is None else stream
    if journal is None:
        journal = stream_is_journal(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journal=journal, secrets=secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


# ------------------------------------------------------------------ access log


@dataclass(frozen=True)
class AccessRecord:
    """What one request's access-log line may say. There is deliberately no field for headers."""

    method: str
    path: str
    status: int
    duration: float
    """Seconds from the request's arrival to the end of its response (the last chunk of a stream)."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    client: str | None = None
    prompt: str | None = None
    """Printed only when the access log has ``log_prompts``."""


def _token(text: str) -> str:
    """A client-supplied string made safe for one space-separated field (no spaces, quotes or controls)."""
    return quote(text, safe="/:@!$&'()*+,;=-._~%") or "-"


def format_access(record: AccessRecord, *, log_prompts: bool = False, max_prompt_chars: int = 2000) -> str:
    """``POST /v1/chat/completions 200 tokens=12+30 1.234s model=default client=127.0.0.1``.

    The query string is dropped (clients sometimes put keys there). ``tokens`` is
    prompt+completion, ``-`` where unknown. The prompt is appended, JSON-quoted and
    cut to ``max_prompt_chars``, only when ``log_prompts`` is true.
    """
    path = record.path.split("?", 1)[0]
    if record.prompt_tokens is None and record.completion_tokens is None:
        tokens = "-"
    else:
        tokens = f"{record.prompt_tokens or 0}+{record.completion_tokens or 0}"
    parts = [_token(record.method.upper()), _token(path), str(record.status), f"tokens={tokens}",
             f"{record.duration:.3f}s"]
    if record.model:
        parts.append(f"model={_token(record.model)}")
    if record.client:
        parts.append(f"client={_token(record.client)}")
    if log_prompts and record.prompt is not None:
        prompt = record.prompt
        if len(prompt) > max_prompt_chars:
            prompt = prompt[:max_prompt_chars] + f"…(+{len(record.prompt) - max_prompt_chars} chars)"
        parts.append("prompt=" + json.dumps(prompt, ensure_ascii=False))
    return " ".join(parts)


class AccessLog:
    """Writes one INFO line per request on the ``me_local.access`` logger."""

    def __init__(self, logger: logging.Logger | None = None, *, log_prompts: bool = False) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self.log_prompts = log_prompts

    def log(self, record: AccessRecord) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info("%s", format_access(record, log_prompts=self.log_prompts))
