"""The operator's page on Starlette + uvicorn: TLS, and clients that cannot block other users.

Each test serves the page of an empty spool on loopback (a real uvicorn server, in this process,
with shortened deadlines) and plays the client with raw sockets: a negative, malformed or huge
Content-Length, a body that never ends, a head sent a byte at a time, a flood of idle connections
(slow loris). The page must answer everyone else in time, and log each as the client's failure.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicom_peers import LogRecords, make_tls_files, wait_until
from onevlm.net.config import parse_config

TOKEN_ENV = "ONEVLM_TEST_PAGE_SERVER_TOKEN"
TOKEN = "page-server-token-3c1d"
HEAD_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5


class ServedPage:
    """An empty spool's page on 127.0.0.1 (any free port) with short deadlines."""

    def __init__(self, root: Path, dashboard: dict, **limits) -> None:
        from onevlm.cards.repository import CardRepository, default_cards_dir
        from onevlm.dashboard.server import DashboardApp
        from onevlm.dashboard.web import make_page_server
        from onevlm.net.journal import Journal
        from onevlm.net.spool import Spool

        self.config = parse_config({"spool_dir": str(root / "spool"), "dashboard": dashboard})
        Spool(self.config.spool_dir, self.config.group_by)
        self.journal = Journal(self.config.journal_path)
        self.app = DashboardApp(self.config, self.journal, CardRepository.load(default_cards_dir()), None,
                                self.journal.status)
        limits = {"head_timeout": HEAD_TIMEOUT, "body_timeout": BODY_TIMEOUT, **limits}
        self.server = make_page_server(self.app, "127.0.0.1", 0, **limits)
        self.server.start()
        self.port = self.server.port

    def get(self, path: str, timeout: float = 10) -> tuple[int, float]:
        """(status, seconds) of a plain GET on a fresh connection."""
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            return response.status, time.perf_counter() - started
        finally:
            connection.close()

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        """Send ``data`` on a fresh connection and read until the server closes it or the timeout."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return _read_all(sock)

    def close(self) -> None:
        self.server.shutdown()
        self.journal.close()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(chunks)


@pytest.fixture
def served(tmp_path):
    pages = []

    def serve(dashboard: dict | None = None, **limits) -> ServedPage:
        pages.append(ServedPage(tmp_path / f"page{len(pages)}", dashboard or {}, **limits))
        return pages[-1]

    yield serve
    for page in pages:
        page.close()


def test_bad_content_lengths_are_refused_at_once(served):
    page = served()
    post = b"POST /review HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    for length in (b"-1", b"abc", b"1e3", b" 5, 7"):
        started = time.perf_counter()
        answer = page.raw(post + b"Content-Length: " + length + b"\r\n\r\n", timeout=5)
        assert answer.startswith(b"HTTP/1.1 400"), (length, answer[:200])
        assert time.perf_counter() - started < 2, length  # refused before any body is awaited
    # a declared body larger than any form is refused without reading it
    answer = page.raw(post + b"Content-Length: 1000000000\r\nConnection: close\r\n\r\n", timeout=5)
    assert answer.startswith(b"HTTP/1.1 413") and b"too large" in answer
    # a head larger than the bound
    answer = page.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n", timeout=5)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert page.get("/status")[0] == 200


def test_a_body_that_never_arrives_times_out_and_blocks_no_one(served):
    page = served()
    with LogRecords("onevlm.dashboard") as logs:
        with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
            sock.sendall(b"POST /review HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: 500\r\n\r\nform_key=")
            started = time.perf_counter()
            status, seconds = page.get("/status")  # others are answered meanwhile
            assert status == 200 and seconds < 1.0
            answer = _read_all(sock)
            waited = time.perf_counter() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert BODY_TIMEOUT - 0.2 <= waited < BODY_TIMEOUT + 3
        assert "reason=body_timeout" in logs.text()
    assert page.get("/")[0] == 200


def test_a_head_sent_too_slowly_is_cut_off_and_logged(served):
    page = served()
    with LogRecords("onevlm.dashboard") as logs:
        with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
            started = time.perf_counter()
            sock.sendall(b"GET / HTTP/1.1\r\n")
            closed = None
            for _ in range(20):  # a header line every 0.5 s: the head never completes in time
                time.sleep(0.5)
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    closed = time.perf_counter() - started
                    break
            if closed is None:  # the close may surface only on reading
                assert _read_all(sock) == b""
                closed = time.perf_counter() - started
        assert closed < HEAD_TIMEOUT + 3, closed
        wait_until(lambda: "reason=request_head_timeout" in logs.text(), 5)
    # a keep-alive connection's next request head has a deadline too
    with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /status HTTP/1.1\r\n")  # ... and never the rest
        started = time.perf_counter()
        _read_all(sock)
        assert time.perf_counter() - started < max(HEAD_TIMEOUT, 5) + 3


@pytest.mark.slow
def test_a_slow_loris_holding_many_connections_does_not_stop_the_page(served):
    """400 connections held open (half idle, half trickling a head), more than may wait at once: the page answers."""
    page = served(head_timeout=30, max_waiting=100)  # the deadline alone would not save anyone within the test
    held: list[socket.socket] = []
    stop = threading.Event()
    try:
        for i in range(400):
            sock = socket.create_connection(("127.0.0.1", page.port), timeout=5)
            if i % 2:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)

        def trickle() -> None:
            while not stop.wait(0.5):
                for sock in held[1::2]:
                    try:
                        sock.sendall(b"X-A: b\r\n")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        with LogRecords("onevlm.dashboard") as logs:
            times = []
            for path in ("/", "/studies", "/review", "/status", "/calibration") * 2:
                status, seconds = page.get(path, timeout=10)
                assert status == 200, path
                times.append(seconds)
            assert max(times) < 2.0, times
            assert "reason=too_many_waiting_connections" in logs.text()
        # the oldest waiting connections were closed to make room; the newest are still held
        closed = 0
        for sock in held[:100]:
            sock.settimeout(0.05)
            try:
                closed += sock.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed >= 90, closed
    finally:
        stop.set()
        for sock in held:
            sock.close()
    assert page.get("/status")[0] == 200


def test_the_page_over_tls_sets_a_secure_cookie(served, tmp_path, monkeypatch):
    tls = make_tls_files(tmp_path / "tls")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    page = served({"token_env": TOKEN_ENV, "tls": {"certificate": str(tls["cert"]), "private_key": str(tls["key"])}})
    assert page.server.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(tls["ca"]))
    connection = http.client.HTTPSConnection("127.0.0.1", page.port, timeout=10, context=context)
    connection.request("GET", "/login")
    response = connection.getresponse()
    body = response.read().decode()
    assert response.status == 200 and "Strict-Transport-Security" in response.headers
    key = page.app.form_key
    assert key in body
    form = f"form_key={key}&token={TOKEN}&next=/review"
    connection.request("POST", "/login", body=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
    response = connection.getresponse()
    response.read()
    assert response.status == 303 and response.headers["Location"] == "/review"
    cookie = response.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    connection.close()
    # plain HTTP to the TLS port gets nothing useful, and the page goes on
    answer = page.raw(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
    assert b'"received"' not in answer
    connection = http.client.HTTPSConnection("127.0.0.1", page.port, timeout=10, context=context)
    connection.request("GET", "/status")
    assert connection.getresponse().status == 200
    connection.close()


def test_without_tls_the_cookie_is_not_marked_secure(served, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    page = served({"token_env": TOKEN_ENV})
    connection = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)
    form = f"form_key={page.app.form_key}&token={TOKEN}&next=/"
    connection.request("POST", "/login", body=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
    response = connection.getresponse()
    response.read()
    assert response.status == 303 and "Secure" not in response.headers["Set-Cookie"]
    assert "Strict-Transport-Security" not in response.headers
    connection.close()


def test_serve_refuses_an_off_loopback_page_without_tls_and_says_why(tmp_path, monkeypatch):
    config = tmp_path / "service.yaml"
    config.write_text(f"spool_dir: {tmp_path / 'spool'}\nstatus_port: 1\n"
                      f"dashboard: {{host: 0.0.0.0, token_env: {TOKEN_ENV}}}\n")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    done = subprocess.run([sys.executable, "-m", "onevlm", "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "dashboard.host" in done.stderr and "dashboard.tls" in done.stderr and "insecure_http" in done.stderr
    assert "Traceback" not in done.stderr
