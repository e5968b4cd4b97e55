"""The real ``me-local serve`` process: start-up checks and errors, and SIGTERM
with streams in flight on the default model (SmolLM2)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from .server_helpers import free_port, wait_until


class Daemon:
    """``python -m me_local.cli serve ...`` with its stderr collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "me_local.cli", "--log-level", "info", "serve", "--port", str(self.port), *args]

        def limit() -> None:  # in the child, before exec: its open-file limit (soft, hard)
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})}, preexec_fn=limit)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> None:
        wait_until(lambda: "me-local: serving" in self.stderr or self.proc.poll() is not None, timeout)
        assert self.proc.poll() is None, self.stderr

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*args: str, **kw) -> Daemon:
        d = Daemon(*args, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def tiny_yaml(tmp_path: Path, path: Path) -> Path:
    cfg = tmp_path / "models.yaml"
    cfg.write_text(textwrap.dedent(f"""
        ensembles:
          tiny:
            n_ctx: 128
            members:
              - {{name: one, path: {path}, n_threads: 1}}
        """))
    return cfg


def test_refuses_a_public_address_without_an_api_key(daemons):
    d = daemons("--host", "0.0.0.0")
    assert d.wait_exit() == 2
    assert "refusing to listen on '0.0.0.0'" in d.stderr and "--api-key" in d.stderr


def test_a_broken_config_fails_before_listening(daemons, tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("ensembles: [1, 2\n")
    d = daemons("--config", str(bad))
    assert d.wait_exit() == 2
    assert "invalid YAML" in d.stderr and "listening" not in d.stderr


def test_a_model_that_cannot_load_exits_2_with_the_reason(daemons, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    d = daemons("--config", str(tiny_yaml(tmp_path, junk)))
    assert d.wait_exit() == 2
    assert "listening on" in d.stderr and "junk.gguf" in d.stderr
    assert "has a damaged header" in d.stderr and "re-download or re-copy the file" in d.stderr


def test_a_busy_port_is_reported(daemons, tmp_path, tiny_models):
    cfg = str(tiny_yaml(tmp_path, tiny_models["a1"]))
    first = daemons("--config", cfg)
    first.wait_ready()
    cmd = [sys.executable, "-m", "me_local.cli", "serve", "--port", str(first.port), "--config", cfg]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{first.port}" in out.stderr and "--port" in out.stderr
    assert httpx.get(first.url + "/health", timeout=10).status_code == 200


def test_sigint_stops_an_idle_daemon_with_status_0(daemons, tmp_path, tiny_models):
    d = daemons("--config", str(tiny_yaml(tmp_path, tiny_models["a1"])))
    d.wait_ready()
    assert httpx.get(d.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"
    d.proc.send_signal(signal.SIGINT)
    assert d.wait_exit() == 0
    assert "received SIGINT" in d.stderr and "stopped" in d.stderr


def test_out_of_descriptors_is_survived_and_logged_once_without_a_traceback(daemons, tmp_path, tiny_models):
    """More half-sent requests than descriptors: the header timeout frees them, /health answers again,
    and the failing accept() is one line per interval naming the fix (not a traceback per retry)."""
    cfg = tiny_yaml(tmp_path, tiny_models["a1"])
    d = daemons("--config", str(cfg), "--header-timeout", "1", nofile=(64, 64))
    d.wait_ready()
    half_open = []
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=30)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        half_open.append(sock)
    wait_until(lambda: "cannot accept connections" in d.stderr, timeout=60)
    assert httpx.get(d.url + "/health", timeout=60).status_code == 200
    for sock in half_open:
        sock.close()
    lines = [line for line in d.lines if "cannot accept connections" in line]
    assert 1 <= len(lines) <= 2, lines
    assert "Too many open files" in lines[0] and "LimitNOFILE" in lines[0] and "ulimit -n" in lines[0]
    assert "Traceback" not in d.stderr and "socket.accept() out of system resource" not in d.stderr


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
def test_serve_raises_its_soft_open_file_limit_to_the_hard_one(daemons, tmp_path, tiny_models):
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 4096)
    d = daemons("--config", str(tiny_yaml(tmp_path, tiny_models["a1"])), nofile=(256, hard))
    d.wait_ready()
    limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
    (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]
    assert f"raised the open-file limit from 256 to {hard}" in d.stderr


def test_sighup_reloads_the_config_and_a_broken_one_keeps_the_old(daemons, tmp_path, tiny_models):
    cfg = tiny_yaml(tmp_path, tiny_models["a1"])
    d = daemons("--config", str(cfg))
    d.wait_ready()

    def ids() -> list[str]:
        return [m["id"] for m in httpx.get(d.url + "/v1/models", timeout=10).json()["data"]]

    assert ids() == ["tiny", "tiny/one"]
    cfg.write_text(cfg.read_text().replace("tiny:", "fresh:"))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: ids() == ["fresh", "fresh/one"], timeout=60)
    cfg.write_text("ensembles: {fresh: {members: []}}\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in d.stderr, timeout=60)
    assert "must be a non-empty list of members" in d.stderr
    assert ids() == ["fresh", "fresh/one"]
    chat = httpx.post(d.url + "/v1/chat/completions", timeout=30,
                      json={"model": "fresh", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert chat.status_code == 200
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_served_file_replaced_in_place_keeps_serving_and_a_broken_one_is_not_reloaded(daemons, tmp_path,
                                                                                       tiny_models):
    served = tmp_path / "served.gguf"
    shutil.copyfile(tiny_models["a1"], served)
    d = daemons("--config", str(tiny_yaml(tmp_path, served)))
    d.wait_ready()

    def complete() -> str:
        r = httpx.post(d.url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "Hello world", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    first = complete()
    served.write_bytes(served.read_bytes()[:5000])  # truncated in place (mmap: false: the weights are in memory)
    assert complete() == first and d.proc.poll() is None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in d.stderr, timeout=60)
    assert "served.gguf' is truncated or damaged" in d.stderr and "re-download or re-copy the file" in d.stderr
    assert complete() == first
    shutil.copyfile(tiny_models["a2"], served)  # `cp` over it: written in place
    assert complete() == first
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded:" in d.stderr, timeout=60)
    assert complete() != first  # the reload read the new file
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


@pytest.mark.smollm
def test_sigterm_ends_streams_in_flight_with_a_final_chunk_and_exits_0(daemons, tmp_path, smollm_path):
    cfg = tmp_path / "models.yaml"
    cfg.write_text(textwrap.dedent(f"""
        ensembles:
          default:
            n_ctx: 2048
            parallel: 2
            members:
              - {{name: concise, path: {smollm_path}, weight: 1, n_threads: 1}}
              - {{name: playful, path: {smollm_path}, weight: 1, n_threads: 1}}
        """))
    d = daemons("--config", str(cfg))
    d.wait_ready()
    health = httpx.get(d.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["ensembles"]["default"]["slots"] == 2

    story = [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]
    bodies: dict[str, bytes] = {}
    first_token = {"openai": threading.Event(), "ollama": threading.Event()}

    def consume(name: str, path: str, body: dict, marker: bytes) -> None:
        buf = b""
        with httpx.Client(timeout=120) as http, http.stream("POST", d.url + path, json=body) as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_bytes():
                buf += chunk
                if buf.count(marker) >= 2:
                    first_token[name].set()
        bodies[name] = buf

    threads = [
        threading.Thread(target=consume, args=("openai", "/v1/chat/completions", {
            "messages": story, "max_tokens": 1500, "temperature": 1.0, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}}, b"data: ")),
        threading.Thread(target=consume, args=("ollama", "/api/chat", {
            "model": "default", "messages": story, "options": {"num_predict": 1500, "seed": 2}}, b'"done":false')),
    ]
    for t in threads:
        t.start()
    assert all(e.wait(120) for e in first_token.values()), d.stderr
    d.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    for t in threads:
        t.join(60)
    assert d.wait_exit(60) == 0, d.stderr
    assert time.monotonic() - t0 < 60

    events = [json.loads(f[6:]) for f in bodies["openai"].strip().split(b"\n\n") if f != b"data: [DONE]"]
    assert bodies["openai"].endswith(b"data: [DONE]\n\n")
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    usage = events[-1]["usage"]
    assert usage["me_local"]["finish_reason"] == "cancelled" and 0 < usage["completion_tokens"] < 1500
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text.strip()  # the real model said something before it was stopped

    lines = [json.loads(line) for line in bodies["ollama"].strip().split(b"\n")]
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "cancelled" and 0 < final["eval_count"] < 1500
    assert all(line["done"] is False for line in lines[:-1])
    assert "received SIGTERM" in d.stderr and "ending 2 stream(s) in flight" in d.stderr


def test_a_native_crash_leaves_every_threads_python_stack_in_the_log(daemons, tmp_path, tiny_models):
    """faulthandler is on in serve: a SIGSEGV (here sent by kill, as llama.cpp's would arrive) is not silent."""
    d = daemons("--config", str(tiny_yaml(tmp_path, tiny_models["a1"])))
    d.wait_ready()
    d.proc.send_signal(signal.SIGSEGV)
    assert d.wait_exit() == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in d.stderr
    assert "most recent call first" in d.stderr and "runner.py" in d.stderr  # the loop thread, in serve


def test_a_native_crash_in_the_cli_is_not_silent(tmp_path, tiny_config):
    cmd = [sys.executable, "-m", "me_local.cli", "chat", "--config", str(tiny_config), "-e", "pair"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "ME_LOCAL_HOME": str(tmp_path)})
    try:
        assert proc.stdout is not None
        assert b"me-local chat on" in proc.stdout.readline()  # it is waiting for input now
        proc.send_signal(signal.SIGSEGV)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGSEGV
    assert b"Fatal Python error: Segmentation fault" in err and b"chat.py" in err
