"""The operator's page as a Starlette application: its routes, the token rule, bounded request bodies.

Every route calls :class:`~onevlm.dashboard.server.DashboardApp` in a worker thread (the journal is
SQLite, read under its lock). A form body is read with a size bound and a deadline, so a client
that sends its body slowly, or declares more than a form can be, is refused (408, 413) without
holding anything another user needs; the request head has its own deadline in
:mod:`onevlm.dashboard.page_server`. Every answer carries the same security headers. Research use
only.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

from onevlm.dashboard import pages
from onevlm.dashboard.server import MAX_FORM_BYTES, DashboardApp, HttpError, Response

logger = logging.getLogger(__name__)

#: Largest request head (request line and headers), bytes.
MAX_HEAD_BYTES = 16_384
#: Seconds a client may take to send a form's body once its head has arrived.
BODY_TIMEOUT_SECONDS = 10.0

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'",
}
#: Under TLS, browsers are told to keep to HTTPS (a year, as is usual).
HSTS = "max-age=31536000"


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


async def read_body(request: Request, limit: int = MAX_FORM_BYTES, timeout: float = BODY_TIMEOUT_SECONDS) -> bytes:
    """The request's body, at most ``limit`` bytes, all of it within ``timeout`` seconds.

    Raises
    ------
    HttpError
        413 when the declared or received body is larger than ``limit``; 408 when it does not
        arrive in time (the client's failure: logged, the connection then closes).
    """
    declared = request.headers.get("content-length")
    # h11 has already refused a negative or malformed Content-Length (400) before we get here
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the request is too large (at most {limit} bytes)")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, f"the request is too large (at most {limit} bytes)")
                chunks.append(chunk)
    except TimeoutError:
        logger.warning("event=dashboard_client_failure reason=body_timeout client=%s path=%s seconds=%s",
                       _client(request), request.url.path, timeout)
        raise HttpError(408, f"the request's body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


class _HeadLimit:
    """Refuses (431) a request whose head is larger than :data:`MAX_HEAD_BYTES`.

    h11 bounds a head that arrives in pieces; one that arrives whole in a single read reaches us.
    """

    def __init__(self, app: Starlette, send_response: Callable[[Response], StarletteResponse]) -> None:
        self.app = app
        self.send_response = send_response

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + \
                sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > MAX_HEAD_BYTES:
                client = scope.get("client") or ("-",)
                logger.warning("event=dashboard_client_failure reason=head_too_large client=%s bytes=%d",
                               client[0], size)
                message = f"the request head is too large (at most {MAX_HEAD_BYTES} bytes)"
                answer = self.send_response(Response(431, pages.error_page(431, message).encode()))
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class PageRoutes:
    """The URL map of the page over one :class:`DashboardApp`.

    Parameters
    ----------
    app:
        The page logic.
    tls:
        Whether the page is served over HTTPS (adds ``Strict-Transport-Security``).
    body_timeout:
        Seconds a form body may take to arrive (:data:`BODY_TIMEOUT_SECONDS`).
    """

    def __init__(self, app: DashboardApp, tls: bool = False, body_timeout: float = BODY_TIMEOUT_SECONDS) -> None:
        self.app = app
        self.headers = {**SECURITY_HEADERS, **({"Strict-Transport-Security": HSTS} if tls else {})}
        self.body_timeout = body_timeout

    def asgi(self) -> Starlette:
        """The Starlette application (routes, and error pages for unknown paths and methods)."""
        open_routes = [
            Route("/healthz", self._open(lambda r: self.app.probe("alive"))),
            Route("/readyz", self._open(lambda r: self.app.probe("ready"))),
            Route("/login", self._login, methods=["GET", "POST"]),
        ]
        guarded = [
            Route("/status", self._guarded(lambda r: self.app.status_response())),
            Route("/metrics", self._guarded(lambda r: self.app.metrics_response())),
            Route("/", self._guarded(lambda r: self.app.overview())),
            Route("/studies", self._guarded(lambda r: self.app.studies(dict(r.query_params)))),
            Route("/studies/{key}", self._guarded(lambda r: self.app.decision(r.path_params["key"],
                                                                              dict(r.query_params)))),
            Route("/review", self._guarded(lambda r: self.app.review_queue(dict(r.query_params)))),
            Route("/review", self._record, methods=["POST"]),
            Route("/calibration", self._guarded(lambda r: self.app.calibration_health())),
        ]
        app = Starlette(routes=open_routes + guarded, exception_handlers={HTTPException: self._http_exception})
        return _HeadLimit(app, self._send)

    # -- answers --------------------------------------------------------------------------------

    def _send(self, response: Response) -> StarletteResponse:
        return StarletteResponse(response.body, response.status, {**self.headers, **response.headers},
                                 media_type=response.content_type)

    async def _answer(self, request: Request, work: Callable[[], Response]) -> StarletteResponse:
        """Run ``work`` in a thread; a refusal becomes its error page, a defect of ours a plain 500."""
        try:
            return self._send(await run_in_threadpool(work))
        except HttpError as exc:
            return self._send(self.app.error(request.url.path, exc))
        except Exception:  # a defect of ours: the traceback in the log only
            logger.exception("event=dashboard_error path=%s", request.url.path)
            return self._send(Response(500, pages.error_page(500, "internal error (see the service log)").encode()))

    def _refusal(self, request: Request, exc: HttpError) -> StarletteResponse:
        return self._send(self.app.error(request.url.path, exc))

    async def _http_exception(self, request: Request, exc: Exception) -> StarletteResponse:
        status = getattr(exc, "status_code", 500)
        message = {404: f"no page {request.url.path}",
                   405: f"{request.method} is not allowed here"}.get(status, getattr(exc, "detail", "refused"))
        return self._refusal(request, HttpError(status, message))

    def _check(self, request: Request) -> Response | None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return self.app.access(request.method, request.url.path, target, request.headers)

    # -- routes ---------------------------------------------------------------------------------

    def _open(self, page: Callable[[Request], Response]) -> Callable[[Request], Awaitable[StarletteResponse]]:
        async def endpoint(request: Request) -> StarletteResponse:
            return await self._answer(request, lambda: page(request))
        return endpoint

    def _guarded(self, page: Callable[[Request], Response]) -> Callable[[Request], Awaitable[StarletteResponse]]:
        async def endpoint(request: Request) -> StarletteResponse:
            def work() -> Response:
                return self._check(request) or page(request)
            return await self._answer(request, work)
        return endpoint

    async def _form_body(self, request: Request) -> bytes:
        return await read_body(request, MAX_FORM_BYTES, self.body_timeout)

    async def _login(self, request: Request) -> StarletteResponse:
        try:
            body = await self._form_body(request) if request.method == "POST" else b""
        except HttpError as exc:
            return self._refusal(request, exc)
        except ClientDisconnect:
            return self._client_gone(request)
        return await self._answer(request, lambda: self.app.login(request.method, dict(request.query_params), body))

    async def _record(self, request: Request) -> StarletteResponse:
        try:
            denied = self._check(request)
            if denied is not None:
                return self._send(denied)
            body = await self._form_body(request)
        except HttpError as exc:
            return self._refusal(request, exc)
        except ClientDisconnect:
            return self._client_gone(request)
        client = _client(request)
        return await self._answer(request, lambda: self.app.record(body, request.headers, client))

    def _client_gone(self, request: Request) -> StarletteResponse:
        logger.warning("event=dashboard_client_failure reason=disconnected_mid_body client=%s path=%s",
                       _client(request), request.url.path)
        return self._send(Response(400, b"", "text/plain"))


def make_page_server(app: DashboardApp, host: str, port: int, **limits: float):
    """The page of ``app`` on ``host:port`` (HTTPS when ``dashboard.tls`` is set): a bound, not started server.

    ``limits``: ``head_timeout``, ``max_waiting`` (:class:`~onevlm.dashboard.page_server.PageServer`) and
    ``body_timeout`` (:class:`PageRoutes`), for tests.

    Raises
    ------
    OSError
        If the port is taken or the certificate/key cannot be read.
    """
    from onevlm.dashboard.page_server import PageServer

    tls = app.settings.tls
    routes = PageRoutes(app, tls=tls is not None, **({"body_timeout": limits.pop("body_timeout")}
                                                      if "body_timeout" in limits else {}))
    return PageServer(routes.asgi(), host, port, tls, **limits)
