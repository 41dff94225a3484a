"""Request heads are bounded in size and time, whatever HTTP parser serves them.

A client that streams header lines for ever is cut off after MAX_HEADER_SIZE bytes (431, connection closed)
and the process's memory stays flat; a client that sends half a request line, or connects and sends nothing,
is disconnected after HEADER_TIMEOUT; legal requests, large heads included, are answered as before.

The listener is exercised in its own process (`tests.support.bounded_server`, served by the same
`adapters.inbound.server.serve` as the service) with httptools and with h11, and once through the real
service process (`bootstrap.py`, uvicorn's "auto" parser).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from adapters.inbound.bounded_http import DEFAULT_MAX_HEAD_BYTES
from tests.support.http_server import free_port
from tests.support.service_process import ROOT, ServiceProcess, service_config, wait_for
from tests.support.stack import fake_servers

HEAD_TIMEOUT = 0.5
SAFETY = 30.0  # only so a broken server fails the test instead of hanging it; never reached when it works
FLOOD_LIMIT = 64 * 1024 * 1024  # a server that has not cut us off after this much has no bound
RSS_BOUND = 64 * 1024 * 1024


class Listener:
    def __init__(self, port: int, pid: int) -> None:
        self.port, self.pid = port, pid

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=SAFETY)
        return sock

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def _started(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "the listener exited"
    with suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    return False


@pytest.fixture(params=["httptools", "h11"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    port = free_port()
    with (tmp_path / "listener.log").open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.bounded_server",
                str(port),
                request.param,
                str(HEAD_TIMEOUT),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: _started(port, proc), timeout=20, what="listener up")
            yield Listener(port, proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    assert "Traceback" not in (tmp_path / "listener.log").read_text()


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server still sends, read until it closes the connection (a reset counts as closed)."""
    received = b""
    with suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def flood_headers(sock: socket.socket) -> int:
    """Send header lines until the server stops taking them; the number of bytes it took."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    line = b"X-Flood: " + b"a" * 1000 + b"\r\n"
    block = line * 256
    sent = 0
    with suppress(ConnectionResetError, BrokenPipeError):
        while sent < FLOOD_LIMIT:
            sock.sendall(block)
            sent += len(block)
    return sent


def test_endless_header_lines_are_cut_off_in_bounded_memory(listener: Listener) -> None:
    before = listener.rss()
    with listener.connect() as sock:
        sent = flood_headers(sock)
        assert sent < FLOOD_LIMIT, "the server took 64 MiB of headers without cutting the client off"
        closed_by_server(sock)
    assert listener.rss() - before < RSS_BOUND
    assert httpx.get(f"http://127.0.0.1:{listener.port}/healthz", timeout=5).status_code == 200


def test_a_head_of_exactly_the_limit_without_its_end_gets_431(listener: Listener) -> None:
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: "
    with listener.connect() as sock:
        sock.sendall(start + b"a" * (DEFAULT_MAX_HEAD_BYTES - len(start)))
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_a_half_sent_request_line_is_closed_after_the_head_timeout(listener: Listener) -> None:
    with listener.connect() as sock:
        sock.sendall(b"POST /webh")
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]


def test_half_sent_headers_are_closed_after_the_head_timeout(listener: Listener) -> None:
    with listener.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        assert closed_by_server(sock).startswith(b"HTTP/1.1 408 ")


def test_a_connection_that_never_sends_is_closed(listener: Listener) -> None:
    with listener.connect() as sock:
        assert closed_by_server(sock) == b""


def test_a_second_request_left_half_sent_on_a_kept_alive_connection_is_closed(listener: Listener) -> None:
    with listener.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /heal")
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer, answer


def test_normal_requests_still_work_with_large_legal_heads(listener: Listener) -> None:
    big = {f"x-h{i}": "v" * 1000 for i in range(40)}  # 40 KiB of headers: under the 64 KiB bound
    with httpx.Client(base_url=f"http://127.0.0.1:{listener.port}", timeout=5) as client:
        for _ in range(3):  # kept alive: the bound applies per request, not per connection
            response = client.get("/healthz", headers=big)
            assert response.status_code == 200 and response.json()["headers"] >= 40
        body = b"<" * (200 * 1024)  # a head and a body larger than the bound together, in one write
        assert client.post("/webhook", content=body).status_code == 200


@pytest.mark.slow
def test_the_service_process_bounds_heads(tmp_path: Path) -> None:
    with fake_servers() as servers:
        config = service_config(tmp_path / "config.ini", servers)
        with config.open("a", encoding="utf-8") as f:
            f.write(f"\n[SERVER]\nHEADER_TIMEOUT = {HEAD_TIMEOUT}\n")
        service = ServiceProcess(config).start()
        try:
            assert service.proc is not None
            listener = Listener(service.port, service.proc.pid)
            before = listener.rss()
            with listener.connect() as sock:
                assert flood_headers(sock) < FLOOD_LIMIT
                closed_by_server(sock)
            assert listener.rss() - before < RSS_BOUND
            with listener.connect() as sock:
                sock.sendall(b"POST /webhook?msg_sig")
                assert closed_by_server(sock).startswith(b"HTTP/1.1 408 ")
            assert httpx.get(service.url + "/healthz", timeout=5).status_code == 200
        finally:
            service.stop()
        logs = service.logs()
        assert "431: request head larger than" in logs and "408: request head not complete" in logs, logs
        assert "Traceback" not in logs
