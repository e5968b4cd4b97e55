"""The connection layer of a real listening server, driven with raw sockets: clients that never
finish their headers or body, clients that never read, malformed HTTP, and shutdown with
a stuck writer. Every wait is for an event (a closed socket, a counter, a log line) with a
generous deadline; no test asserts on elapsed time."""

from __future__ import annotations

import json
import logging
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from me_local.server import ServerSettings

from .server_helpers import LiveServer, engine_loader, wait_until, write_tiny_config

DEADLINE = 30.0


@pytest.fixture
def live(tmp_path: Path, tiny_models) -> Iterator:
    servers: list[LiveServer] = []

    def start(config: Path | None = None, **settings) -> LiveServer:
        config = config or write_tiny_config(tmp_path, tiny_models)
        server = LiveServer(ServerSettings(port=0, **settings), engine_loader(config)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def connect(live: LiveServer, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it sets the window
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", live.server.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a response"
        body += chunk
    return status, headers, body[:length]


def health(live: LiveServer) -> int:
    return httpx.get(live.url + "/health", timeout=DEADLINE).status_code


# --------------------------------------------------------------------------- header and body timeouts


def test_a_connection_that_never_finishes_its_headers_is_closed(live):
    server = live(header_timeout=0.3)
    half = connect(server)
    half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the headers never end
    silent = connect(server)  # sends nothing at all
    assert read_until_closed(half) == b""
    assert read_until_closed(silent) == b""
    assert health(server) == 200


def test_an_idle_keep_alive_connection_is_closed_after_the_header_timeout(live):
    server = live(header_timeout=0.3)
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert headers.get("connection", "keep-alive").lower() != "close"
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request starts and stalls
    assert read_until_closed(sock) == b""


def test_a_complete_request_is_not_cut_by_the_header_timeout(live):
    """The header timeout bounds waiting for headers, not a response that takes longer."""
    server = live(header_timeout=0.3)
    with httpx.Client(timeout=DEADLINE) as http:
        resp = http.post(server.url + "/v1/completions",
                         json={"model": "solo", "prompt": "Once upon a time", "max_tokens": 40, "seed": 1})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 40
        assert http.get(server.url + "/health").status_code == 200  # the same connection, reused


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_a_body_shorter_than_its_content_length_gets_408(live, api):
    server = live(body_timeout=0.3)
    path = "/v1/completions" if api == "openai" else "/api/generate"
    sock = connect(server)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100\r\n\r\n".encode() + b'{"model": "tiny", ')
    status, headers, body = read_response(sock)
    assert status == 408
    assert headers["connection"].lower() == "close"
    error = json.loads(body)["error"]
    if api == "openai":
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        message = error["message"]
    else:
        message = error
    assert message == "the request body did not arrive within 0.3 s; send the whole body at once"
    assert health(server) == 200


def test_an_unterminated_chunked_body_gets_408(live):
    server = live(body_timeout=0.3)
    sock = connect(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")  # no terminating 0-length chunk
    status, headers, body = read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["connection"].lower() == "close"


# --------------------------------------------------------------------------- clients that never read

LONG_CONFIG = """
ensembles:
  long:
    n_ctx: 16384
    members:
      - {{name: one, path: {a1}, n_threads: 1}}
"""


def long_config(tmp_path: Path, tiny_models) -> Path:
    path = tmp_path / "long.yaml"
    path.write_text(textwrap.dedent(LONG_CONFIG.format(a1=tiny_models["a1"])))
    return path


MAX_TOKENS = 16000


def start_unread_stream(server: LiveServer) -> socket.socket:
    """A streaming chat of up to 16,000 tokens with big frames (20 logprobs each, about 2 kB) whose
    client never reads: its stream outgrows the socket buffers long before it could end."""
    body = json.dumps({"model": "long", "messages": [{"role": "user", "content": "Tell me a story"}],
                       "max_tokens": MAX_TOKENS, "seed": 1, "temperature": 1.0, "logprobs": True,
                       "top_logprobs": 20, "stream": True}).encode()
    sock = connect(server, rcvbuf=4096)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def cancellations(server: LiveServer, reason: str) -> float:
    return server.server.state.metrics.cancellations.get(ensemble="long", reason=reason)


def test_a_client_that_never_reads_is_cut_off_after_the_write_timeout(live, tmp_path, tiny_models, caplog):
    caplog.set_level(logging.INFO, logger="me_local")
    server = live(long_config(tmp_path, tiny_models), write_timeout=0.5)
    sock = start_unread_stream(server)
    wait_until(lambda: cancellations(server, "write_timeout") == 1, DEADLINE)
    state = server.server.state
    wait_until(lambda: not state.streams, DEADLINE)  # the generation ended and left its slot
    generated = state.metrics.tokens.get(ensemble="long")
    assert 0 < generated < MAX_TOKENS
    assert state.metrics.generations.get(ensemble="long", finish_reason="cancelled") == 1
    assert any("did not read for 0.5 s" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    read_until_closed(sock)  # the server aborted the connection
    assert health(server) == 200


def test_shutdown_does_not_wait_for_a_client_that_never_reads(live, tmp_path, tiny_models, caplog):
    caplog.set_level(logging.INFO, logger="me_local")
    server = live(long_config(tmp_path, tiny_models), write_timeout=600, shutdown_grace=0.5)
    sock = start_unread_stream(server)
    connections = server.server.connections
    wait_until(lambda: any(c.writing_paused for c in connections()), DEADLINE)  # blocked on the client
    server.server.request_shutdown()
    server.thread.join(DEADLINE)
    assert not server.thread.is_alive()
    assert cancellations(server, "shutdown") == 1
    assert any("aborting 1 connection" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConnectionResetError):  # aborted (RST), not a graceful close that waits for the client
        while sock.recv(65536):
            pass


# --------------------------------------------------------------------------- malformed HTTP

MALFORMED = [
    (b"GET /health HTTP/1.1\r\n\r\n", "Missing 'Host' header"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "Got more than 8190 bytes"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", "Got more than 8190 bytes"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", "Transfer-Encoding can't be present with Content-Length"),
]


def test_malformed_requests_get_400_and_one_log_line_without_a_traceback(live, caplog):
    caplog.set_level(logging.INFO)
    server = live()
    for request, reason in MALFORMED:
        caplog.clear()
        sock = connect(server)
        sock.sendall(request)
        reply = read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.0 400 ") or reply.startswith(b"HTTP/1.1 400 "), reply[:100]
        wait_until(lambda: any("malformed HTTP request" in r.getMessage() for r in caplog.records), DEADLINE)
        lines = [r for r in caplog.records if r.name.startswith(("aiohttp", "me_local.server"))]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        (line,) = lines
        assert line.levelno == logging.INFO and line.exc_info is None
        assert line.getMessage().startswith("rejected a malformed HTTP request from 127.0.0.1: ")
        assert reason in line.getMessage() and "\n" not in line.getMessage()
    assert health(server) == 200


def test_the_settings_are_bounded():
    from me_local.errors import UsageError

    for field in ("header_timeout", "body_timeout", "write_timeout"):
        for bad in (0, -1, 0.01, 1e9):
            with pytest.raises(UsageError, match=field.replace("_", "-")):
                ServerSettings(**{field: bad}).check()
        ServerSettings(**{field: 5}).check()

