"""A Storage SCU: send DICOM files to a node by C-STORE, each in its own transfer syntax.

Used by the exporter (results to the PACS) and by ``onevlm send`` (a scanner stand-in for
demos and tests). One association per call; TCP_NODELAY on the socket.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context

from onevlm.net.listener import set_nodelay

logger = logging.getLogger(__name__)

SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
MAX_CONTEXTS = 128


class AssociationError(ConnectionError):
    """The peer could not be reached or refused the association."""


@dataclass(frozen=True)
class SendResult:
    """The outcome of one C-STORE: the file, its SOP Instance UID, the status (None: not sent)."""

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS_STATUSES


def _contexts(headers: Sequence[pydicom.Dataset]) -> list:
    pairs = {}
    for ds in headers:
        sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        pairs.setdefault((sop_class, syntax), None)
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} SOP class/transfer syntax pairs: more than one association can carry")
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


def send_files(paths: Iterable[str | Path], host: str, port: int, called_ae: str, calling_ae: str,
               timeout: float = 30.0, tls: ssl.SSLContext | None = None) -> list[SendResult]:
    """C-STORE every file to ``called_ae@host:port`` over one association.

    Raises
    ------
    AssociationError
        If the association cannot be established (the files are then all unsent).
    """
    paths = [Path(p) for p in paths]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = _contexts(headers)
    try:
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=(tls, None) if tls else None)
    except Exception as exc:
        raise AssociationError(f"cannot associate with {called_ae}@{host}:{port}: {exc}") from exc
    if not assoc.is_established:
        raise AssociationError(f"{called_ae}@{host}:{port} rejected or aborted the association")
    set_nodelay(assoc.dul.socket.socket)
    results = []
    try:
        for path, header in zip(paths, headers):
            uid = str(header.file_meta.MediaStorageSOPInstanceUID)
            if not assoc.is_established:
                results.append(SendResult(path, uid, None, "association lost"))
                continue
            try:
                status = assoc.send_c_store(pydicom.dcmread(path))
                code = getattr(status, "Status", None)
                results.append(SendResult(path, uid, code, None if code in SUCCESS_STATUSES else "no success status"))
            except Exception as exc:
                results.append(SendResult(path, uid, None, f"{type(exc).__name__}: {exc}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
