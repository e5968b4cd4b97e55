"""The daemon's operating-system resources: open-file descriptors and the C heap.

* :func:`raise_open_file_limit`: ``serve`` raises its soft ``RLIMIT_NOFILE`` to the hard
  limit at start-up (the soft default is often 1,024: a few hundred slow clients).
* :class:`AcceptErrors`: the event loop's exception handler. When ``accept()`` fails for
  want of descriptors, asyncio retries every second and reports each failure with a
  traceback; this turns that into one line per interval naming the fix.
* :func:`trim_heap`: glibc's ``malloc_trim(0)`` after a reload freed the old models, so
  resident memory returns to where it was (a no-op without glibc).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("me_local.server")

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]

_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def open_file_limit() -> tuple[int, int] | None:
    """(soft, hard) RLIMIT_NOFILE, or None where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_open_file_limit(ceiling: int = 1 << 20) -> tuple[int, int] | None:
    """Raise the soft open-file limit to the hard one (at most ``ceiling``); returns (old, new)
    when it changed, None otherwise."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    for value in (target, 10240):  # macOS refuses more than OPEN_MAX (10240) under an unlimited hard limit
        if soft == resource.RLIM_INFINITY or value <= soft:
            return None
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (value, hard))
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-file limit to %d: %s", value, exc)
            continue
        return soft, value
    return None


class AcceptErrors:
    """An event-loop exception handler that reports ``accept()`` running out of descriptors
    (or memory) in one line per ``interval`` seconds, without a traceback; every other
    report goes to ``fallback`` (the loop's default handler when None)."""

    def __init__(self, fallback: ExceptionHandler | None = None, interval: float = 10.0) -> None:
        self.fallback = fallback
        self.interval = interval
        self.failures = 0
        """accept() failures since the last line."""
        self._last: float | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS
                and "accept" in str(context.get("message", ""))):
            if self.fallback is not None:
                self.fallback(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.failures += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        log.error("cannot accept connections: %s (%d failure(s) since the last report; reported every %g s "
                  "at most); %s", exc.strerror or exc, self.failures, self.interval, _hint(exc.errno))
        self.failures = 0


def _hint(code: int | None) -> str:
    if code == errno.EMFILE:
        limit = open_file_limit()
        now = f" (now {limit[0]})" if limit is not None else ""
        return (f"raise the open-file limit{now}: LimitNOFILE= in the service unit, or `ulimit -n` before "
                "`me-local serve`; clients that never finish a request are closed after --header-timeout")
    if code == errno.ENFILE:
        return "the whole system is out of file descriptors (fs.file-max)"
    return "the system is short of memory for sockets"


def trim_heap() -> bool:
    """Return the C heap's free memory to the system (glibc's ``malloc_trim(0)``); False where
    there is no glibc. Call it after freeing something big (the models a reload replaced)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc only, not musl
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_size_t]
    func.restype = ctypes.c_int
    return func
