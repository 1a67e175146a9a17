"""DICOM TLS: the SSL contexts of the node's TLS listener and of its sends to TLS peers.

Both sides authenticate: the node shows its certificate (``tls.certificate``) and
accepts only peers whose certificates ``tls.ca_certificates`` signed; a sender must
show one too unless ``tls.require_client_certificate`` is off. A certificate that
``tls.crl_file`` revokes is refused. TLS 1.2 at least.

Those files expire: a certificate at its notAfter (the node's own, and a CA's, are then
refused by every TLS sender and peer), and a revocation list at its nextUpdate (OpenSSL then
refuses every certificate of that CA: "CRL has expired"). :func:`expiries` reads when, for
``dicomnode health`` and the metrics.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dicomnode.config import TlsSettings
from dicomnode.errors import ConfigError

CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


@dataclass(frozen=True)
class Expiry:
    """When a certificate of a TLS file stops being valid (its notAfter), or a revocation
    list is due to be replaced (its nextUpdate)."""

    setting: str
    """``tls.certificate``, ``tls.ca_certificates`` or ``tls.crl_file``."""
    subject: str
    """The certificate's subject, the list's issuer (RFC 4514)."""
    ends: datetime
    """UTC."""

    @property
    def what(self) -> str:
        kind = "the revocation list of" if self.setting == "tls.crl_file" else "the certificate"
        return f"{self.setting}: {kind} {self.subject}"

    def days_left(self, now: datetime) -> float:
        """Days from ``now`` (UTC) to its end (0 or less: it has ended)."""
        return (self.ends - now).total_seconds() / 86400


@dataclass(frozen=True)
class TlsState:
    """The TLS files' certificates and revocation lists, soonest to end first; or why they
    cannot be read (``health``, ``status`` and the metrics read them with :func:`tls_state`)."""

    files: tuple[Expiry, ...]
    problem: str = ""
    warning_days: int = 30
    """``tls.expiry_warning_days``: one that ends sooner is to be renewed."""


def tls_state(tls: TlsSettings) -> TlsState | None:
    """The :func:`expiries` of the TLS files, or the problem reading them; None when no TLS
    file is given."""
    if not has_files(tls):
        return None
    try:
        return TlsState(tuple(expiries(tls)), "", tls.expiry_warning_days)
    except ConfigError as exc:
        return TlsState((), str(exc), tls.expiry_warning_days)


def has_files(tls: TlsSettings) -> bool:
    """Whether any TLS file is given (the listener's, TLS peers', https peers')."""
    return any(path is not None for path in (tls.certificate, tls.ca_certificates, tls.crl_file))


def expiries(tls: TlsSettings) -> list[Expiry]:
    """Every certificate of ``tls.certificate`` and ``tls.ca_certificates`` and every
    revocation list of ``tls.crl_file`` given, soonest first; of those with the same subject
    in a file (a CA renewed, its old certificate left beside the new) the latest alone.

    Raises
    ------
    ConfigError
        If a file cannot be read, or holds no certificate (no list) in PEM.
    """
    from cryptography import x509

    found = []
    for setting, path in (
        ("tls.certificate", tls.certificate),
        ("tls.ca_certificates", tls.ca_certificates),
    ):
        if path is not None:
            try:
                certificates = x509.load_pem_x509_certificates(_read(path, setting))
            except ValueError as exc:
                raise ConfigError(f"{setting} {path}: no PEM certificate ({exc})") from None
            found += [
                Expiry(setting, c.subject.rfc4514_string(), c.not_valid_after_utc)
                for c in certificates
            ]
    if tls.crl_file is not None:
        found += _crl_expiries(tls.crl_file)
    latest: dict[tuple[str, str], Expiry] = {}
    for expiry in sorted(found, key=lambda e: e.ends):
        latest[(expiry.setting, expiry.subject)] = expiry
    return sorted(latest.values(), key=lambda e: e.ends)


def _crl_expiries(path: Path) -> list[Expiry]:
    from cryptography import x509

    blocks = CRL_BLOCK.findall(_read(path, "tls.crl_file"))
    if not blocks:
        raise ConfigError(f"tls.crl_file {path}: no PEM revocation list")
    found = []
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise ConfigError(f"tls.crl_file {path}: a list cannot be read ({exc})") from None
        if crl.next_update_utc is not None:  # a list with none is never due
            found.append(Expiry("tls.crl_file", crl.issuer.rfc4514_string(), crl.next_update_utc))
    return found


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: {exc.strerror or exc}") from None


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
