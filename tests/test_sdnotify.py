"""The systemd notify protocol against real AF_UNIX datagram sockets bound by the test."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from me_local.service import sdnotify
from me_local.service.sdnotify import Notifier, SystemdHooks, Watchdog, watchdog_interval


class Listener:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what NOTIFY_SOCKET says

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def drain(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096))
        except BlockingIOError:
            return out


@pytest.fixture(params=["path", "abstract"])
def listener(request) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # AF_UNIX paths must stay short
        path = os.path.join(folder, "notify")
        sock.bind(path)
        address = path
    else:
        name = f"me-local-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    try:
        yield Listener(sock, address)
    finally:
        sock.close()
        if request.param == "path":
            os.unlink(address)
            os.rmdir(os.path.dirname(address))


def test_messages_arrive_with_exact_bytes(listener: Listener) -> None:
    n = Notifier(listener.address)
    assert n.enabled
    assert n.ready()
    assert listener.recv() == b"READY=1"
    assert n.ready(status="serving default on 127.0.0.1:11435")
    assert listener.recv() == b"READY=1\nSTATUS=serving default on 127.0.0.1:11435"
    assert n.status("loading 2 of 3 models")
    assert listener.recv() == b"STATUS=loading 2 of 3 models"
    assert n.watchdog()
    assert listener.recv() == b"WATCHDOG=1"
    assert n.stopping()
    assert listener.recv() == b"STOPPING=1"
    assert n.extend_timeout(90)
    assert listener.recv() == b"EXTEND_TIMEOUT_USEC=90000000"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", listener.recv())
    assert m and before <= int(m.group(1)) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_a_newline_cannot_inject_an_assignment(listener: Listener) -> None:
    assert Notifier(listener.address).status("ok\nREADY=1")
    assert listener.recv() == b"STATUS=ok READY=1"
    with pytest.raises(ValueError):
        Notifier(listener.address).notify(**{"READY=1\nX": 1})


def test_module_functions_read_notify_socket(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    assert sdnotify.ready("up")
    assert sdnotify.status("still up")
    assert sdnotify.watchdog()
    assert sdnotify.stopping()
    assert [listener.recv() for _ in range(4)] == [b"READY=1\nSTATUS=up", b"STATUS=still up", b"WATCHDOG=1",
                                                   b"STOPPING=1"]


def test_no_notify_socket_is_a_no_op(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled
    assert sdnotify.ready() is False and sdnotify.stopping() is False and sdnotify.watchdog() is False
    assert listener.drain() == []


def test_an_unreachable_socket_is_logged_not_raised(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="me_local.sdnotify"):
        assert n.ready() is False
        assert n.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot notify the service manager" in warnings[0].getMessage()
    assert Notifier("relative/path").ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


class Ticks:
    """A stand-in for ``asyncio.sleep`` that the test drives: the watchdog waits in it until ``release``.

    The watchdog's timing is then a sequence of observable events (it went to sleep, with which interval),
    never a race against the wall clock of a shared machine.
    """

    def __init__(self) -> None:
        self.intervals: list[float] = []
        self._asleep = asyncio.Event()
        self._wake: asyncio.Future[None] | None = None

    async def sleep(self, seconds: float) -> None:
        self.intervals.append(seconds)
        self._wake = asyncio.get_running_loop().create_future()
        self._asleep.set()
        await self._wake

    async def asleep(self) -> None:
        """Wait until the watchdog has gone to sleep (after its ping, if any)."""
        await asyncio.wait_for(self._asleep.wait(), 10)
        self._asleep.clear()

    def release(self) -> None:
        """The interval has passed: let the watchdog run again when the loop next runs."""
        assert self._wake is not None and not self._wake.done()
        self._wake.set_result(None)


async def test_watchdog_pings_from_the_event_loop_and_stops_cleanly(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "100000"}  # ping every 0.05 s
    ticks = Ticks()
    wd = Watchdog.from_env(environ=env, sleep=ticks.sleep)
    assert wd.enabled and wd.interval == 0.05
    async with wd:
        await ticks.asleep()
        assert wd.running and ticks.intervals == [0.05]
        assert listener.drain() == [b"WATCHDOG=1"]
        # The interval has passed, but while the loop is blocked nothing pings: a wedged daemon
        # gets restarted, as it should.
        ticks.release()
        assert listener.drain() == []  # (this test has not yielded to the loop since)
        await ticks.asleep()  # the loop ran again: the ping follows
        assert listener.drain() == [b"WATCHDOG=1"]
    assert not wd.running
    assert listener.drain() == []  # stopped for good, although its sleep was never released
    await wd.stop()  # idempotent


async def test_watchdog_counts_pings(listener: Listener) -> None:
    ticks = Ticks()
    wd = Watchdog(Notifier(listener.address), interval=0.05, sleep=ticks.sleep)
    wd.start()
    wd.start()  # idempotent: still one task
    for _ in range(3):
        await ticks.asleep()
        ticks.release()
    await ticks.asleep()
    await wd.stop()
    assert listener.drain() == [b"WATCHDOG=1"] * 4  # at 0, 0.05, 0.10, 0.15 s
    assert ticks.intervals == [0.05] * 4


async def test_watchdog_withholds_pings_when_unhealthy(listener: Listener) -> None:
    healthy = False
    ticks = Ticks()
    wd = Watchdog(Notifier(listener.address), interval=0.05, check=lambda: healthy, sleep=ticks.sleep)
    async with wd:
        for _ in range(2):
            await ticks.asleep()
            assert listener.drain() == []
            ticks.release()
        healthy = True
        await ticks.asleep()
    assert listener.drain() == [b"WATCHDOG=1"]


async def test_watchdog_disabled_without_interval_or_socket(listener: Listener) -> None:
    ticks = Ticks()
    for wd in (Watchdog(Notifier(listener.address), None, sleep=ticks.sleep),
               Watchdog(Notifier(None), 0.05, sleep=ticks.sleep)):
        assert not wd.enabled
        async with wd:
            await asyncio.sleep(0)  # a task, had one been started, would run now
            assert not wd.running
    assert listener.drain() == [] and ticks.intervals == []


async def _datagram(listener: Listener, wanted: bytes, timeout: float = 10.0) -> None:
    """Wait (without blocking the loop) until ``wanted`` arrives; other datagrams are dropped."""
    deadline = time.monotonic() + timeout
    while wanted not in listener.drain():
        assert time.monotonic() < deadline, f"no {wanted!r} within {timeout} s"
        await asyncio.sleep(0.01)


class FakeServer:
    """The surface SystemdHooks uses of me_local.server.runner.Server."""

    def __init__(self) -> None:
        self.on_ready: list = []
        self.on_stopping: list = []
        self.reload_ok = True

    def describe(self) -> str:
        return "serving default on http://127.0.0.1:11435"

    async def reload(self) -> bool:
        return self.reload_ok


async def test_hooks_notify_ready_watchdog_reload_and_stopping(listener: Listener) -> None:
    server = FakeServer()
    hooks = SystemdHooks.attach(server, {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "100000"})
    assert listener.recv() == b"STATUS=loading the models"
    assert listener.drain() == [] and not hooks.watchdog.running  # nothing more until the server is ready
    for callback in server.on_ready:
        await callback(server)
    assert listener.recv() == b"READY=1\nSTATUS=serving default on http://127.0.0.1:11435"
    await _datagram(listener, b"WATCHDOG=1")
    assert hooks.watchdog.running

    server.reload_ok = False
    assert await hooks.reload(server) is False
    assert listener.recv().startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert listener.recv() == b"READY=1\nSTATUS=serving default on http://127.0.0.1:11435 (reload failed: still " \
                              b"the previous config)"

    for callback in server.on_stopping:
        await callback(server)
    assert not hooks.watchdog.running
    assert [m for m in listener.drain() if m != b"WATCHDOG=1"] == [b"STOPPING=1\nSTATUS=stopping"]
