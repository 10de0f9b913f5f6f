"""The Storage SCP: C-ECHO and C-STORE for every storage SOP class, acknowledging only what is stored.

The C-STORE handler writes the encoded dataset to the spool (fsync, atomic rename) and records
it before it returns Success; it does no inference. Failure to store answers 0xA700 (out of
resources); a dataset we cannot parse is quarantined and answered 0xC000 (cannot understand).
While the spool's disk is below its free-space bounds (:class:`~onevlm.net.disk_space.DiskGuard`)
every C-STORE is answered 0xA700 before anything is written; associations and C-ECHO are still
answered, and storing resumes by itself when space returns.
Calling AE titles are checked against an allow-list, the called AE title must match, source
addresses can be restricted, and TLS can be required.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from typing import Callable

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt, sop_class
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from onevlm.net.config import ListenerConfig
from onevlm.disk_full import is_disk_full
from onevlm.net.disk_space import DiskGuard
from onevlm.net.journal import Journal
from onevlm.net.spool import Spool, SpoolError
from onevlm.net.tls import server_context

logger = logging.getLogger(__name__)

#: Retired image storage SOP classes still found in archives (pynetdicom knows only current ones).
RETIRED_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.5": "NuclearMedicineImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
}


def register_retired_storage() -> None:
    """Teach pynetdicom that retired storage SOP classes are storage (else it aborts on them)."""
    for uid, keyword in RETIRED_STORAGE.items():
        if keyword not in sop_class.__dict__:
            sop_class.register_uid(uid, keyword, StorageServiceClass)


register_retired_storage()

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle's algorithm: without it every C-STORE response waits ~45 ms for an ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # a socket already closed by the peer
        pass


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus: TCP_NODELAY on every accepted socket, an address
    allow-list checked before any byte is read, and (``reuse_port``) SO_REUSEPORT so several
    listener processes share one port and the kernel spreads associations across them."""

    reuse_port = False
    allowed_networks: tuple = ()

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):
        # Not super().get_request(): pynetdicom does the TLS handshake there, in the one thread that
        # accepts connections, on a socket without a timeout, so a peer that connects and never
        # starts the handshake blocks every other association. Here the handshake happens on the
        # first read, in the association's own thread, and a silent peer times out.
        sock, address = self.socket.accept()
        sock.settimeout(self.ae.network_timeout)
        set_nodelay(sock)
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request, client_address) -> bool:
        if not self.allowed_networks:
            return True
        try:
            address = ipaddress.ip_address(client_address[0])
        except ValueError:
            return False
        if any(address in network for network in self.allowed_networks):
            return True
        logger.warning("event=connection_refused address=%s reason=address_not_allowed", client_address[0])
        return False


class ReusePortAssociationServer(AssociationServer):
    reuse_port = True


class Listener:
    """A running (or startable) Storage SCP bound to a spool and a journal.

    ``reuse_port``: bind with SO_REUSEPORT (several listener processes on one port).
    ``disk_guard``: refuse (0xA700) every C-STORE while it says the spool's disk is too full;
    ``None``: only a write that fails refuses.
    """

    def __init__(self, config: ListenerConfig, spool: Spool, journal: Journal,
                 on_stored: Callable[[str], None] | None = None, reuse_port: bool = False,
                 disk_guard: DiskGuard | None = None) -> None:
        if disk_guard is not None and not isinstance(disk_guard, DiskGuard):
            raise TypeError("disk_guard must be a DiskGuard or None")
        self.disk_guard = disk_guard
        self.config = config
        self.spool = spool
        self.journal = journal
        self.on_stored = on_stored
        self.reuse_port = reuse_port
        self._server = None
        self._thread: threading.Thread | None = None
        self._networks = tuple(ipaddress.ip_network(a, strict=False) for a in config.allowed_addresses)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for uid in RETIRED_STORAGE:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_ae_titles)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_bytes
        ae.network_timeout = self.config.network_timeout_seconds
        ae.acse_timeout = min(30.0, self.config.network_timeout_seconds)
        ae.dimse_timeout = self.config.network_timeout_seconds
        return ae

    def _handle_echo(self, event) -> int:
        return SUCCESS

    def _count_refused(self) -> None:
        try:
            self.journal.count("refused")
        except Exception as exc:  # the journal shares the (full) disk: the answer matters more than the count
            logger.error("event=journal_failed counter=refused error=%s", exc)

    def _refuse_for_space(self, event, calling: str, reason: str) -> int:
        """Answer 0xA700 without writing; only the first refusal of a pause is logged (then counted)."""
        if self.disk_guard is None or self.disk_guard.note_refusal():
            sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
            # further refusals of this pause are counted (journal "refused", /status), not logged
            logger.warning("event=refused reason=disk_space sop=%s calling_ae=%s detail=%s", sop, calling, reason)
        self._count_refused()
        return OUT_OF_RESOURCES

    def _handle_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        if self.disk_guard is not None:
            # Checked before anything is written: what we may not be able to keep is never acknowledged.
            reason = self.disk_guard.problem()
            if reason is not None:
                return self._refuse_for_space(event, calling, reason)
        try:
            size = event.request.DataSet.getbuffer().nbytes  # not getvalue(): no copy of a large instance
        except Exception:
            size = 0
        if size > self.config.max_instance_bytes:
            self._count_refused()
            logger.warning("event=refused reason=too_large bytes=%d calling_ae=%s", size, calling)
            return OUT_OF_RESOURCES
        try:
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            self._count_refused()
            logger.warning("event=refused reason=unreadable calling_ae=%s error=%s", calling, exc)
            return CANNOT_UNDERSTAND
        try:
            stored = self.spool.store(encoded)
        except ValueError as exc:
            try:
                path = self.spool.quarantine(encoded, f"calling AE {calling}: {exc}")
                self.journal.count("quarantined")
            except Exception as error:  # cannot keep it for a person to see: let the sender keep it
                if is_disk_full(error) and self.disk_guard is not None:
                    self.disk_guard.note_full(error, "quarantining an instance")
                logger.error("event=quarantine_failed calling_ae=%s error=%s", calling, error)
                return OUT_OF_RESOURCES
            logger.warning("event=quarantined file=%s calling_ae=%s reason=%s", path.name, calling, exc)
            return CANNOT_UNDERSTAND
        except SpoolError as exc:
            # The spool removed its partial file: nothing of this instance is on disk or in the journal.
            logger.error("event=store_failed calling_ae=%s error=%s", calling, exc)
            if is_disk_full(exc):
                if self.disk_guard is not None:
                    self.disk_guard.note_full(exc, "storing an instance")
                self._count_refused()
            return OUT_OF_RESOURCES
        try:
            new = self.journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path,
                                               stored.sop_class_uid, calling)
        except Exception as exc:  # the file is durable; a restart's recovery records it
            logger.error("event=journal_failed sop=%s error=%s", stored.sop_instance_uid, exc)
            if is_disk_full(exc) and self.disk_guard is not None:
                self.disk_guard.note_full(exc, "recording an instance in the journal")
            new = True
        logger.info("event=%s sop=%s group=%s calling_ae=%s", "stored" if new else "duplicate",
                    stored.sop_instance_uid, stored.group_key, calling)
        if self.on_stored is not None:
            self.on_stored(stored.group_key)
        return SUCCESS

    def _handle_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        # The title the caller asked for, from its A-ASSOCIATE-RQ (acceptor.ae_title is our own).
        called = str(getattr(requestor.primitive, "called_ae_title", "") or "").strip()
        logger.warning("event=association_rejected address=%s calling_ae=%s called_ae=%s", requestor.address,
                       requestor.ae_title, called)

    def _handle_abort(self, event) -> None:
        logger.info("event=association_aborted address=%s", event.assoc.requestor.address)

    def start(self) -> None:
        """Start serving in background threads (returns once the port is bound)."""
        ae = self._make_ae()
        handlers = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ABORTED, self._handle_abort),
        ]
        server_class = ReusePortAssociationServer if self.reuse_port else AssociationServer
        server = ae.make_server((self.config.host, self.config.port), evt_handlers=handlers,
                                ssl_context=server_context(self.config.tls), server_class=server_class)
        server.allowed_networks = self._networks
        # What AE.start_server does besides make_server: the AE counts its active associations
        # (for maximum_associations) through its servers, and shutdown() removes the server again.
        ae._servers.append(server)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="onevlm-scp", daemon=True)
        self._thread.start()
        logger.info("event=listening ae_title=%s host=%s port=%d tls=%s", self.config.ae_title, self.config.host,
                    self.port, self.config.tls.certificate is not None)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self.config.port

    @property
    def thread(self) -> threading.Thread | None:
        """The thread serving associations (``None`` before :meth:`start`)."""
        return self._thread

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
