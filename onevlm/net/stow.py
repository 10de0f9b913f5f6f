"""Send result files to a DICOMweb service by STOW-RS, through ``dicomweb-client``.

The same outbox, retry and exactly-once rules as C-STORE apply (the exporter calls this instead of
a C-STORE association). The service's answer is read per instance: a referenced instance is sent,
a failed one (Failed SOP Sequence, with its reason) is retried, and an HTTP or connection error
fails the whole request.

The outbox's durable retry (with backoff, surviving restarts) is the only retry: the client's own
retries are switched off, and the configured timeout replaces whatever timeout the client passes
(dicomweb-client 0.61 and later set their own 20 s), so one request to a dead server ends within
the destination's ``timeout_seconds``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from onevlm.net.config import Destination

logger = logging.getLogger(__name__)

#: Failure Reason (0008,1197) values, as PS3.18 lists them, in words.
FAILURE_REASONS = {0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                   0xC000: "cannot understand", 0xC122: "referenced transfer syntax not supported",
                   0x0110: "processing failure", 0x0122: "referenced SOP class not supported"}


@dataclass(frozen=True)
class StowResult:
    """One file's outcome."""

    path: Path
    ok: bool
    error: str | None = None


def _session(destination: Destination):
    import requests

    session = requests.Session()
    auth = destination.auth
    if auth.kind == "basic":
        session.auth = (auth.username or "", os.environ.get(auth.password_env or "", ""))
    elif auth.kind == "bearer":
        session.headers["Authorization"] = f"Bearer {os.environ.get(auth.token_env or '', '')}"
    return session


def stow_files(paths: Sequence[Path], destination: Destination, timeout: float | None = None) -> list[StowResult]:
    """Store ``paths`` at ``destination.dicomweb`` in one STOW-RS request; one result per file, in order.

    ``timeout`` (seconds, default the destination's ``timeout_seconds``) bounds connecting and each
    read of the answer.

    Raises
    ------
    OSError
        When the request itself fails (connection, HTTP status other than 200/202/409), naming the URL.
    """
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(path) for path in paths]
    session = _session(destination)
    session.request = _with_timeout(session.request, destination.timeout_seconds if timeout is None else timeout)
    client = DICOMwebClient(url=destination.dicomweb, session=session)
    client.set_http_retry_params(retry=False)  # the outbox retries, durably
    try:
        answer = client.store_instances(datasets=datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise OSError(f"{destination.dicomweb}: STOW-RS answered HTTP {status}") from exc
    except requests.RequestException as exc:
        raise OSError(f"{destination.dicomweb}: STOW-RS request failed: {type(exc).__name__}: {exc}") from exc
    stored = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
    failed = {str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0x0110))
              for item in answer.get("FailedSOPSequence", [])}
    results = []
    for path, ds in zip(paths, datasets):
        uid = str(ds.SOPInstanceUID)
        if uid in stored:
            results.append(StowResult(path, True))
        elif uid in failed:
            reason = failed[uid]
            results.append(StowResult(path, False, f"STOW-RS failure 0x{reason:04X} "
                                                   f"({FAILURE_REASONS.get(reason, 'unknown reason')})"))
        else:
            results.append(StowResult(path, False, "STOW-RS answer does not mention the instance"))
    return results


def _with_timeout(request, timeout: float):
    def call(method, url, **kwargs):
        kwargs["timeout"] = timeout  # ours, not the client's default
        return request(method, url, **kwargs)

    return call
