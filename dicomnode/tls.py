"""DICOM TLS: the SSL contexts of the node's TLS listener and of its sends to TLS peers.

Both sides authenticate: the node shows its certificate (``tls.certificate``) and
accepts only peers whose certificates ``tls.ca_certificates`` signed; a sender must
show one too unless ``tls.require_client_certificate`` is off. A certificate that
``tls.crl_file`` revokes is refused. TLS 1.2 at least.
"""

from __future__ import annotations

import ssl

from dicomnode.config import TlsSettings
from dicomnode.errors import ConfigError


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of the node's TLS listener."""
    context = _context(tls, ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of a send to a TLS peer (its certificate verified, the node's shown)."""
    context = _context(tls, ssl.Purpose.SERVER_AUTH)
    context.check_hostname = tls.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _context(tls: TlsSettings, purpose: ssl.Purpose) -> ssl.SSLContext:
    missing = tls.missing()
    if missing:
        raise ConfigError(f"DICOM TLS needs {', '.join(missing)}")
    assert tls.certificate and tls.private_key and tls.ca_certificates
    try:
        context = ssl.create_default_context(purpose, cafile=str(tls.ca_certificates))
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.crl_file is not None:
            context.load_verify_locations(cafile=str(tls.crl_file))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot use the TLS files (tls.certificate {tls.certificate}, tls.private_key "
            f"{tls.private_key}, tls.ca_certificates {tls.ca_certificates}, tls.crl_file "
            f"{tls.crl_file}): {exc}"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def https_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of a send to a peer's https DICOMweb service: its certificate verified
    against ``tls.ca_certificates`` when given (else the system's certificate authorities),
    its host name unless ``tls.check_hostname`` is off, and the node's certificate shown
    when the node has one (a service that asks for it)."""
    try:
        cafile = str(tls.ca_certificates) if tls.ca_certificates else None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        if tls.certificate and tls.private_key:
            context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot use the TLS files for https (tls.certificate {tls.certificate}, "
            f"tls.private_key {tls.private_key}, tls.ca_certificates {tls.ca_certificates}): "
            f"{exc}"
        ) from exc
    context.check_hostname = tls.check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
