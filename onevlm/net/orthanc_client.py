"""Orthanc's REST API over urllib3, for the intake's many small requests.

The intake asks Orthanc for one instance's tags as each instance arrives: hundreds of requests a
second on a busy day, on the same cores Orthanc acknowledges with. ``requests`` costs about
1.2 ms of CPU per such request (it re-reads the environment and re-merges settings on each),
urllib3 — the transport underneath it — about 0.5 ms (``bench/orthanc_intake_bench.py``), so the
intake talks to urllib3 directly. The environment's proxy and CA-bundle settings are read once,
as requests would read them, and basic authentication is sent with every request.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

import urllib3


class OrthancError(RuntimeError):
    """Orthanc answered with an HTTP error status."""

    def __init__(self, status: int, url: str, body: bytes) -> None:
        super().__init__(f"{url}: HTTP {status} {body[:200].decode('utf-8', 'replace').strip()}")
        self.status = status
        self.url = url


class OrthancClient:
    """GET requests to one Orthanc (``url``: its REST root), pooled connections.

    Parameters
    ----------
    url:
        ``http(s)://host:port`` (a path prefix, behind a reverse proxy, is kept).
    username, password:
        Basic authentication, when Orthanc asks for it.
    timeout:
        Seconds for one request.
    connections:
        Connections kept open (one per thread that asks at once).
    """

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 timeout: float = 60, connections: int = 8) -> None:
        self.base = url.rstrip("/")
        self.headers = urllib3.make_headers(basic_auth=f"{username}:{password or ''}") if username else {}
        # A GET is safe to send again: twice more, for a kept-alive connection Orthanc has just closed
        # (its KeepAliveTimeout) or a reset; HTTP error statuses are answers, never retried.
        retries = urllib3.Retry(total=2, redirect=0, status=0, raise_on_status=False, backoff_factor=0.05)
        options: dict[str, Any] = {"maxsize": connections, "retries": retries,
                                   "timeout": urllib3.Timeout(total=timeout), "headers": self.headers}
        if self.base.startswith("https:"):
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if bundle is None:
                import certifi

                bundle = certifi.where()
            options.update(cert_reqs="CERT_REQUIRED", ca_certs=bundle)
        host = urllib3.util.parse_url(self.base).host or ""
        proxy = urllib.request.getproxies().get(self.base.split(":", 1)[0])
        if proxy and not urllib.request.proxy_bypass(host):
            self.pool: urllib3.PoolManager = urllib3.ProxyManager(proxy, **options)
        else:
            self.pool = urllib3.PoolManager(**options)

    def get(self, path: str) -> bytes:
        """The body of ``GET {url}{path}``; raises :class:`OrthancError` for an error status."""
        response = self.pool.request("GET", self.base + path)
        if response.status >= 400:
            raise OrthancError(response.status, self.base + path, response.data)
        return response.data

    def get_json(self, path: str) -> Any:
        """``GET {url}{path}`` parsed as JSON."""
        return json.loads(self.get(path))

    def close(self) -> None:
        self.pool.clear()
