"""``ssl.SSLContext`` objects for the listener and for destinations, from the configuration."""

from __future__ import annotations

import ssl

from onevlm.net.config import TlsConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The listener's TLS context (``None`` when no certificate is configured)."""
    if tls.certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        # Client certificates are then required and checked against this CA.
        context.load_verify_locations(str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """A destination's TLS context (``None`` for a plain association)."""
    if not tls.require and tls.ca_certificates is None and tls.certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificates) if tls.ca_certificates else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # DICOM nodes are addressed by IP; the CA still verifies the peer
    if tls.certificate is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context
