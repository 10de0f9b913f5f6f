"""Helpers for the Node-side tests (dcmjs, OHIF): node_modules checks, a throwaway Orthanc, and a
loopback server that serves OHIF's built viewer and proxies DICOMweb to Orthanc from one origin.

The viewer server binds to 127.0.0.1. Orthanc 1.10 has no bind-address option and listens on all
interfaces, on free ephemeral ports, so it runs with ``RemoteAccessAllowed: false`` (REST from
loopback only) and rejects every DICOM association (no known calling AE title). Everything is
stopped by the context managers, also when a test fails, and the child processes get SIGTERM if
the test process itself dies. Research use only.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import mimetypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
JS_DIR = REPO / "tests" / "js"
NODE_MODULES = JS_DIR / "node_modules"
OHIF_DIST = NODE_MODULES / "@ohif" / "app" / "dist"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path(os.environ.get("ONEVLM_CHROMIUM", "/usr/bin/chromium"))
INSTALL_HINT = "run `PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/js` first (make test does)"


# --------------------------------------------------------------------------- node


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node (Node.js >= 20) is not on PATH; the dcmjs/OHIF tests need it")
    return node


def require_node_modules(*packages: str) -> None:
    """Fail (never skip: CI installs them) with an install hint when tests/js/node_modules lacks a package."""
    missing = [name for name in packages if not (NODE_MODULES / name / "package.json").is_file()]
    if missing:
        pytest.fail(f"tests/js/node_modules lacks {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)
    if shutil.which("node") is None:
        pytest.fail("node (Node.js >= 20) is not on PATH; the dcmjs/OHIF tests need it", pytrace=False)


def run_node(script: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``node tests/js/<script> args...`` from tests/js in its own process group.

    On a timeout the whole group (node and any Chromium it started) is killed and
    ``subprocess.TimeoutExpired`` is raised; after a normal exit leftovers of the group are killed too.
    """
    process = subprocess.Popen(
        [node_binary(), str(JS_DIR / script), *args],
        cwd=JS_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", **(env or {})},
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(process, timeout=5)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(process.args, timeout, output=stdout, stderr=stderr) from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# --------------------------------------------------------------------------- ports and processes


def _die_with_parent() -> None:
    """``preexec_fn``: Linux sends the child SIGTERM when the test process dies (no orphans on a kill)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A currently free TCP port on loopback, from the kernel's ephemeral range (unusual ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a process we started (its own process group), then kill it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def port_is_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


# --------------------------------------------------------------------------- Orthanc


def dicomweb_plugin() -> Path:
    """The Orthanc DICOMweb plugin installed by the Debian package orthanc-dicomweb."""
    candidates = [Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"), *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))]
    for path in candidates:
        if path.is_file():
            return path
    raise RuntimeError("the Orthanc DICOMweb plugin is missing: apt-get install orthanc-dicomweb")


class Orthanc:
    """A throwaway Orthanc with the DICOMweb plugin; storage, index and log under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = workdir / "orthanc.log"
        self.process: subprocess.Popen | None = None
        self.version: str | None = None

    def config(self) -> dict:
        return {
            "Name": "onevlm-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpThreadsCount": 16,
            "KeepAlive": True,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": "ONEVLMTEST",
            # No modality is configured and nothing is "always allowed": every association is refused.
            "DicomModalities": {},
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckCalledAet": True,
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "OverwriteInstances": True,
            "SaveJobs": False,
            "StableAge": 1,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }

    def start(self, timeout: float = 30) -> "Orthanc":
        orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(orthanc).exists():
            raise RuntimeError("Orthanc is missing: apt-get install orthanc orthanc-dicomweb")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [orthanc, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                system = self.get_json("/system")
                plugins = self.get_json("/plugins")
                if "dicom-web" not in plugins:
                    raise RuntimeError(f"Orthanc started without the DICOMweb plugin ({plugins}):\n{self.log_tail()}")
                self.version = system.get("Version")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> "Orthanc":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: dict):
        """POST a JSON body to the REST API; returns the decoded answer."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def store(self, path: Path) -> dict:
        """POST one DICOM file to ``/instances``; returns Orthanc's answer (ID, Status...)."""
        request = urllib.request.Request(
            self.url + "/instances", data=Path(path).read_bytes(), method="POST",
            headers={"Content-Type": "application/dicom"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused {path}: {answer}")
        return answer


# --------------------------------------------------------------------------- OHIF viewer + proxy


def ohif_app_config(data_source_root: str = "/dicom-web", wado_uri_root: str = "/wado") -> str:
    """Our ``app-config.js``: one DICOMweb data source (Orthanc, same origin), nothing remote."""
    configuration = {
        "friendlyName": "onevlm test Orthanc",
        "name": "orthanc",
        "wadoUriRoot": wado_uri_root,
        "qidoRoot": data_source_root,
        "wadoRoot": data_source_root,
        "qidoSupportsIncludeField": False,
        "supportsReject": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    }
    config = {
        "name": "onevlm e2e",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 10, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": configuration,
            }
        ],
    }
    return "/** onevlm e2e test config: OHIF reads DICOMweb from the same origin. */\nwindow.config = " + json.dumps(config, indent=2) + ";\n"


_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade",
}
_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".css": "text/css",
    ".html": "text/html; charset=utf-8", ".json": "application/json", ".jsonc": "application/json",
    ".svg": "image/svg+xml", ".woff2": "font/woff2", ".png": "image/png", ".ico": "image/x-icon",
    ".map": "application/json", ".txt": "text/plain",
}


class ViewerServer:
    """Serve OHIF's ``dist/`` on loopback, with our app-config.js and a same-origin proxy.

    ``/dicom-web/...`` and ``/wado...`` go to Orthanc; any other path that is not a file of
    ``dist/`` answers ``index.html`` (OHIF is a single-page app). Every request is recorded in
    ``self.requests`` as (method, path, status) for diagnostics.
    """

    PROXIED = ("/dicom-web/", "/dicom-web?", "/wado")

    def __init__(self, dist: Path, upstream_port: int, app_config: str) -> None:
        self.dist = dist.resolve()
        self.upstream_port = upstream_port
        self.app_config = app_config.encode()
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "onevlm-test"

            def log_message(self, *args) -> None:  # quiet; see server.requests
                pass

            def _record(self, status: int) -> None:
                with server._lock:
                    server.requests.append((self.command, self.path, status))

            def _common_headers(self) -> None:
                # Cross-origin isolation lets cornerstone use SharedArrayBuffer; all resources are same-origin.
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")

            def do_GET(self) -> None:
                self._dispatch()

            def do_HEAD(self) -> None:
                self._dispatch()

            def do_POST(self) -> None:
                self._dispatch()

            def do_OPTIONS(self) -> None:
                self._dispatch()

            def _dispatch(self) -> None:
                try:
                    if self.path.startswith(ViewerServer.PROXIED):
                        self._proxy()
                    elif self.command in ("GET", "HEAD"):
                        self._static()
                    else:
                        self._send(405, b"method not allowed\n", "text/plain")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
                self._common_headers()
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self._record(status)

            def _static(self) -> None:
                path = self.path.split("?", 1)[0].split("#", 1)[0]
                if path == "/app-config.js":
                    self._send(200, server.app_config, "text/javascript")
                    return
                relative = urllib.request.url2pathname(path).lstrip("/")
                target = (server.dist / relative).resolve()
                if server.dist not in target.parents or not target.is_file():
                    # SPA route (/viewer, /segmentation...) or unknown path: the app shell.
                    target = server.dist / "index.html"
                content_type = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                self._send(200, target.read_bytes(), content_type, cache=target.name != "index.html")

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                # Keep the browser's Host: Orthanc builds BulkDataURIs from it, so they point here.
                upstream = http.client.HTTPConnection("127.0.0.1", server.upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self._common_headers()
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self._record(response.status)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = False

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-viewer-server", daemon=True)

    def __enter__(self) -> "ViewerServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def failed_requests(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return [r for r in self.requests if r[2] >= 400]


@contextlib.contextmanager
def ohif_stack(workdir: Path, files: Sequence[Path]) -> Iterator[tuple[Orthanc, ViewerServer]]:
    """Orthanc holding ``files`` plus the OHIF viewer server in front of it; both stopped on exit."""
    require_node_modules("@ohif/app")
    if not (OHIF_DIST / "index.html").is_file():
        pytest.fail(f"{OHIF_DIST} has no index.html: {INSTALL_HINT}", pytrace=False)
    with Orthanc(workdir / "orthanc") as orthanc:
        for path in files:
            orthanc.store(path)
        with ViewerServer(OHIF_DIST, orthanc.http_port, ohif_app_config()) as viewer:
            yield orthanc, viewer


# --------------------------------------------------------------------------- our DICOM objects


def head_ct_with_finding(out: Path) -> Path:
    """pydicom's 128x128 CT_small with a header that names its anatomy and a finding, so the embedded
    router routes it to one card (the bare file names neither: a five-way stage-1 tie, a review case)."""
    import pydicom

    from conftest import pydicom_file

    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.BodyPartExamined = "HEAD"
    ds.ReasonForStudy = "suspected subdural hemorrhage"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def write_routing_sr(router, source: Path, out: Path, boxes=(), execution=None) -> tuple[object, Path]:
    """Route ``source`` with ``router`` and write its routing SR (with ``boxes`` and the cards'
    results from ``execution``, a callable of the decision returning a sequence) to ``out``."""
    import pydicom

    from onevlm.inputs import load_input
    from onevlm.reports.routing_sr import build_routing_sr

    decision = router.route(load_input(source))
    header = pydicom.dcmread(source, stop_before_pixels=True)
    captions = {card.id: card.task_caption for card in router.cards}
    results = execution(decision) if execution is not None else ()
    sr = build_routing_sr(decision, [header], header, boxes=list(boxes), card_captions=captions, executions=results)
    out.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(out, enforce_file_format=True)
    return decision, out


def write_box_seg(source: Path, out: Path, boxes) -> Path:
    """Write the box SEG of ``boxes`` on ``source`` to ``out``."""
    import pydicom

    from onevlm.reports.box_seg import build_box_seg

    seg = build_box_seg(pydicom.dcmread(source), list(boxes))
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out, enforce_file_format=True)
    return out


def tracking_uids(sr_path: Path) -> dict[str, str]:
    """Tracking identifier -> tracking unique identifier of each measurement group of an SR file."""
    import pydicom

    result = {}
    for item in pydicom.dcmread(sr_path).ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010":
            for group in item.ContentSequence:
                texts = {c.ConceptNameCodeSequence[0].CodeValue: c for c in group.ContentSequence}
                result[texts["112039"].TextValue] = texts["112040"].UID
    return result
