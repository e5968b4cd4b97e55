"""The systemd readiness protocol against a real ``me-local serve`` process and
a real AF_UNIX datagram socket bound by the test (as systemd would)."""

from __future__ import annotations

import signal
import socket
import time

import httpx

from .test_server_process import daemons, tiny_yaml  # noqa: F401  (fixture)


def _recv_all(sock: socket.socket, until: bytes, timeout: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096)
        except TimeoutError:
            break
        got.append(msg)
        if until in msg:
            break
    return got


def test_ready_after_health_watchdog_reload_and_stopping(daemons, tmp_path, tiny_models):  # noqa: F811
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    cfg = tiny_yaml(tmp_path, tiny_models["a1"])
    d = daemons("--config", str(cfg), env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    try:
        health_before_ready = []
        messages: list[bytes] = []
        deadline = time.monotonic() + 120
        while not any(b"READY=1" in m for m in messages) and time.monotonic() < deadline:
            try:
                health_before_ready.append(httpx.get(d.url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                health_before_ready.append(None)
            messages += _recv_all(sock, b"READY=1", 0.05)
        ready = next(m for m in messages if b"READY=1" in m)
        # the moment READY=1 arrives the daemon already answers /health with 200
        assert httpx.get(d.url + "/health", timeout=5).status_code == 200
        assert health_before_ready and health_before_ready[0] != 200  # it was polled while still loading
        assert b"STATUS=" in ready and b"tiny" in ready
        # WATCHDOG=1 at half of WATCHDOG_USEC (0.4 s): several within 2 s
        pings = [m for m in _recv_all(sock, b"never", 2.0) if m == b"WATCHDOG=1"]
        assert len(pings) >= 2
        # SIGHUP: RELOADING=1 then READY=1 again
        d.proc.send_signal(signal.SIGHUP)
        after_hup = b"\n".join(_recv_all(sock, b"READY=1", 30))
        assert b"RELOADING=1" in after_hup and b"READY=1" in after_hup
        assert after_hup.index(b"RELOADING=1") < after_hup.index(b"READY=1")
        # a request shows up in the access log, without the prompt text
        r = httpx.post(d.url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "secret words"}], "max_tokens": 3})
        assert r.status_code == 200
        # SIGTERM: STOPPING=1 and exit status 0
        d.proc.send_signal(signal.SIGTERM)
        tail = b"\n".join(_recv_all(sock, b"STOPPING=1", 30))
        assert b"STOPPING=1" in tail
        assert d.wait_exit() == 0
        access = [line for line in d.lines if "POST /v1/chat/completions 200" in line]
        assert len(access) == 1 and "tokens=" in access[0]
        assert "secret words" not in d.stderr
    finally:
        sock.close()
