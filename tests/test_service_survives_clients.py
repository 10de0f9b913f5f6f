"""No client ends the service: abandoned HTTP requests and resets on the status port leave `onevlm serve` and its
DICOM listener running (a process that restored the default SIGPIPE action died of the first one, silently)."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from dicom_peers import ServeProcess, echoscu, free_port, listener_port, write_service_config

pytestmark = pytest.mark.slow


def _abandon(port: int, request: bytes, reset: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        if reset:  # RST instead of FIN: the peer's next write fails at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_abandoned_requests_and_resets_on_the_status_port_do_not_end_the_service(tmp_path):
    status_port = free_port()
    config = write_service_config(tmp_path / "service.yaml", tmp_path / "spool", status_port=status_port)
    with ServeProcess(config, tmp_path / "serve.log") as serve:
        for i in range(10):
            _abandon(status_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", reset=i % 2 == 0)
            _abandon(status_port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", reset=True)
        time.sleep(1.0)  # let the server threads write their answers into the closed sockets
        assert serve.process.poll() is None, f"onevlm serve ended ({serve.process.returncode}):\n{serve.log_tail()}"
        echo = echoscu(listener_port(config))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        with socket.create_connection(("127.0.0.1", status_port), timeout=5) as sock:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = sock.recv(200)
        assert answer.startswith(b"HTTP/1.")
