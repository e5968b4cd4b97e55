"""The systemd notification protocol (``sd_notify(3)``), written directly.

A ``Type=notify`` service tells its manager how it is doing by sending datagrams
of newline-separated ``KEY=VALUE`` assignments to the ``AF_UNIX`` socket named in
``$NOTIFY_SOCKET``: a filesystem path, or ``@name`` for Linux's abstract
namespace. Where ``NOTIFY_SOCKET`` is unset (run by hand, under launchd, in a
container) every call here does nothing and returns ``False``; a failed send is
logged, never raised, so notifying cannot take the daemon down.

For a server with ``on_ready`` / ``on_stopping`` callback lists, ``describe()``
and ``async reload()`` (``me_local.server.runner.Server``), one call wires it all::

    hooks = SystemdHooks.attach(server)   # STATUS now; READY=1 + watchdog when ready; STOPPING=1
    ...                                   # SIGHUP handler: await hooks.reload(server)

The pieces, for use by hand::

    notifier = Notifier.from_env()
    notifier.status("loading 3 models")              # while loading
    notifier.extend_timeout(120)                      # optional, per slow model
    notifier.ready(status="serving default on 127.0.0.1:11435")   # /health is 200
    async with Watchdog.from_env(notifier):           # WATCHDOG=1 from the event loop
        ...                                           # serve until SIGTERM
        notifier.stopping()                           # first thing on SIGTERM/SIGINT
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

log = logging.getLogger("me_local.sdnotify")  # its name before it moved into service/

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"

_FIELD = re.compile(r"[A-Z][A-Z0-9_]*")


def _one_line(value: str) -> str:
    """A value may not contain a newline: it would start a new assignment."""
    return " ".join(str(value).splitlines())


class Notifier:
    """Sends notifications to one socket address (``None``: a no-op notifier)."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get(ENV_SOCKET))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _sockaddr(self) -> bytes | None:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        if self.address.startswith("/"):
            return os.fsencode(self.address)
        return None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram, in the order given.

        Returns True when the datagram was sent.
        """
        if self.address is None:
            return False
        for key in fields:
            if not _FIELD.fullmatch(key):
                raise ValueError(f"not a notification field name: {key!r}")
        payload = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items()).encode()
        addr = self._sockaddr()
        if addr is None:
            self._warn(f"unsupported {ENV_SOCKET} address {self.address!r} (want /path or @name)")
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, addr)
        except OSError as exc:
            self._warn(f"cannot notify the service manager at {self.address}: {exc}")
            return False
        log.debug("sd_notify %s", payload)
        return True

    def _warn(self, message: str) -> None:
        # Once at warning level: the watchdog would otherwise repeat it every few seconds.
        log.log(logging.DEBUG if self._warned else logging.WARNING, message)
        self._warned = True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: the models are loaded and the server answers."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line state shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload (SIGHUP) has begun; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is what ``Type=notify-reload`` needs; plain ``notify`` ignores it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.notify(RELOADING=1, MONOTONIC_USEC=usec)
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def watchdog(self) -> bool:
        """Keep-alive ping: the service is healthy."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start (or stop) timeout fires, e.g. per model loaded."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))


# ------------------------------------------------------------------ module-level shortcuts (read the environment)


def notify(**fields: object) -> bool:
    return Notifier.from_env().notify(**fields)


def ready(status: str | None = None) -> bool:
    return Notifier.from_env().ready(status)


def status(text: str) -> bool:
    return Notifier.from_env().status(text)


def stopping(status: str | None = None) -> bool:
    return Notifier.from_env().stopping(status)


def reloading(status: str | None = None) -> bool:
    return Notifier.from_env().reloading(status)


def watchdog() -> bool:
    return Notifier.from_env().watchdog()


# ------------------------------------------------------------------ watchdog


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off: ``WATCHDOG_USEC`` unset, not a positive integer,
    or ``WATCHDOG_PID`` naming another process.
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_WATCHDOG_USEC)
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", ENV_WATCHDOG_USEC, raw)
        return None
    if usec <= 0:
        return None
    pid = env.get(ENV_WATCHDOG_PID)
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``interval`` seconds from an asyncio task.

    The pings come from the daemon's event loop on purpose: when the loop stalls,
    they stop and systemd restarts the service, which is what the watchdog is for
    (a thread would keep pinging for a wedged server). ``check``, if given, is
    asked before each ping; a False answer withholds it (e.g. a dead worker thread).

    Use ``async with Watchdog.from_env(notifier): ...`` or ``start()`` / ``await stop()``.
    Disabled (start() does nothing) when the interval is None or the notifier is.
    ``sleep`` waits between pings (default ``asyncio.sleep``); tests pass one they drive.
    """

    def __init__(self, notifier: Notifier, interval: float | None, check: Callable[[], bool] | None = None,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.notifier = notifier
        self.interval = interval
        self.check = check
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(
        cls,
        notifier: Notifier | None = None,
        environ: Mapping[str, str] | None = None,
        check: Callable[[], bool] | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> Watchdog:
        return cls(notifier or Notifier.from_env(environ), watchdog_interval(environ), check, sleep)

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start pinging (call from inside the running loop). Idempotent."""
        if not self.enabled or self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="me-local-watchdog")
        log.debug("watchdog: WATCHDOG=1 every %.3gs", self.interval)

    async def stop(self) -> None:
        """Stop pinging and wait for the task to end. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        assert self.interval is not None
        while True:
            healthy = True
            if self.check is not None:
                try:
                    healthy = bool(self.check())
                except Exception:
                    log.exception("watchdog health check raised")
                    healthy = False
            if healthy:
                self.notifier.watchdog()
            else:
                log.warning("watchdog: health check failed; withholding WATCHDOG=1")
            await self._sleep(self.interval)

    async def __aenter__(self) -> Watchdog:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


# ------------------------------------------------------------------ wiring to the server


class NotifyingServer(Protocol):
    """What :class:`SystemdHooks` needs of a server (``me_local.server.runner.Server`` has it)."""

    on_ready: list[Callable[[Any], Any]]
    on_stopping: list[Callable[[Any], Any]]

    def describe(self) -> str: ...

    async def reload(self) -> bool: ...


class SystemdHooks:
    """READY=1 and the watchdog when the server is ready, STOPPING=1 when it stops, RELOADING=1 around a reload.

    Every notification is a no-op where ``NOTIFY_SOCKET`` is unset, so attaching is always safe.
    """

    def __init__(self, notifier: Notifier, watchdog: Watchdog) -> None:
        self.notifier = notifier
        self.watchdog = watchdog

    @classmethod
    def attach(cls, server: NotifyingServer, environ: Mapping[str, str] | None = None) -> SystemdHooks:
        notifier = Notifier.from_env(environ)
        hooks = cls(notifier, Watchdog.from_env(notifier, environ))
        server.on_ready.append(hooks.on_ready)
        server.on_stopping.append(hooks.on_stopping)
        notifier.status("loading the models")
        return hooks

    async def on_ready(self, server: NotifyingServer) -> None:
        self.notifier.ready(status=server.describe())
        self.watchdog.start()

    async def on_stopping(self, server: NotifyingServer) -> None:
        self.notifier.stopping(status="stopping")
        await self.watchdog.stop()

    async def reload(self, server: NotifyingServer) -> bool:
        """The body of a SIGHUP handler: reload, and say how it went (the old config stays on failure)."""
        self.notifier.reloading(status="reloading models.yaml")
        ok = await server.reload()
        status = server.describe() if ok else f"{server.describe()} (reload failed: still the previous config)"
        self.notifier.ready(status=status)
        return ok
