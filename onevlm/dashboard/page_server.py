"""The page's HTTP server: uvicorn in a thread of the service, with TLS and deadlines no client can outwait.

uvicorn closes a connection idle between requests (keep-alive timeout) but gives a request's head
no deadline, so a client that opens connections and sends their headers a byte at a time (slow
loris) would hold them for ever. :class:`_DeadlineH11Protocol` adds the deadline and, when more
than :data:`MAX_WAITING_CONNECTIONS` connections wait for a head at once, closes the oldest of
them: a real browser sends its head at once, so only the stragglers go. The asyncio loop holds
connections without a thread each, so idle connections tie up nothing else; a form body has its
own deadline (:mod:`onevlm.dashboard.web`); h11 refuses a malformed or negative
``Content-Length`` (400), the routes a head over
:data:`~onevlm.dashboard.web.MAX_HEAD_BYTES` (431). Each of these is logged as the
client's failure and the page goes on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections import OrderedDict
from typing import Any

from onevlm.dashboard.web import MAX_HEAD_BYTES
from onevlm.net.config import PageTls

logger = logging.getLogger(__name__)

#: Seconds a client may take to send a request's head (line and headers).
HEAD_TIMEOUT_SECONDS = 10.0
#: Seconds an idle keep-alive connection stays open between requests.
KEEP_ALIVE_SECONDS = 5
#: Connections that may wait for their request's head at once; beyond, the oldest waiting is closed.
MAX_WAITING_CONNECTIONS = 256
#: Seconds the server waits for requests in flight when it stops.
SHUTDOWN_GRACE_SECONDS = 5


def _protocol_class(head_timeout: float, max_waiting: int) -> type:
    """uvicorn's h11 protocol with a deadline for each request head (imported when the page starts)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: OrderedDict[Any, None] = OrderedDict()  # connections waiting for a head, oldest first (loop thread)

    class _DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_arrived()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's head arrived: the app has it now
                self._head_arrived()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._await_head()  # the next request on this connection gets its own deadline

        def _await_head(self) -> None:
            self._head_arrived()
            self._deadline = self.loop.call_later(head_timeout, self._head_late)
            waiting[self] = None
            while len(waiting) > max_waiting:
                oldest = next(iter(waiting))
                oldest._close_waiting("too_many_waiting_connections")

        def _head_arrived(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            waiting.pop(self, None)

        def _head_late(self) -> None:
            self._close_waiting("request_head_timeout")

        def _close_waiting(self, reason: str) -> None:
            self._head_arrived()
            if not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "-"
                logger.warning("event=dashboard_client_failure reason=%s client=%s", reason, client)
                self.transport.close()

    return _DeadlineH11Protocol


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


class PageServer:
    """The operator's page on ``host:port`` (0: any free port), HTTPS with ``tls``; not started.

    Parameters
    ----------
    asgi:
        The Starlette application (:meth:`onevlm.dashboard.web.PageRoutes.asgi`).
    host, port:
        Where to listen; the socket is bound here, so a taken port fails at once (``OSError``).
    tls:
        The certificate and private key, or ``None`` (plain HTTP).
    head_timeout, max_waiting:
        :data:`HEAD_TIMEOUT_SECONDS` and :data:`MAX_WAITING_CONNECTIONS` (tests shorten them).
    """

    def __init__(self, asgi: Any, host: str, port: int, tls: PageTls | None = None,
                 head_timeout: float = HEAD_TIMEOUT_SECONDS, max_waiting: int = MAX_WAITING_CONNECTIONS) -> None:
        import uvicorn

        # uvicorn's own start/stop lines ("Started server process ...") say nothing our log does not; its
        # warnings (invalid requests: the client's failure) stay
        uvicorn_log = logging.getLogger("uvicorn.error")
        if uvicorn_log.level == logging.NOTSET:
            uvicorn_log.setLevel(logging.WARNING)
        self.host = host
        self.tls = tls
        self._socket = _listening_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            asgi, http=_protocol_class(head_timeout, max_waiting), lifespan="off", log_config=None,
            access_log=False, server_header=False, timeout_keep_alive=KEEP_ALIVE_SECONDS,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            ssl_certfile=str(tls.certificate) if tls else None, ssl_keyfile=str(tls.private_key) if tls else None)
        config.load()  # reads the certificate and key now: a bad pair fails at start, naming the files
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        """The page's address (as configured: a wildcard host stays a wildcard)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (blocks; run it in a thread)."""
        self._serving.set()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._stopped.set()

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; returns once the page answers."""
        self._thread = threading.Thread(target=self.serve_forever, name="onevlm-page", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        if not self._server.started:
            raise RuntimeError(f"the operator's page did not start on {self.url} (see the log)")
        return self._thread

    def shutdown(self) -> None:
        """Stop serving (requests in flight get :data:`SHUTDOWN_GRACE_SECONDS`) and close the socket."""
        self._server.should_exit = True
        if self._serving.is_set():  # whichever thread serves: uvicorn closes the socket as it stops
            self._stopped.wait(timeout=SHUTDOWN_GRACE_SECONDS + 5)
        if self._stopped.is_set() or not self._serving.is_set():
            self._socket.close()
