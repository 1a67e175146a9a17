"""A throwaway public-key infrastructure for the DICOM TLS tests (``/usr/bin/openssl``)."""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Identity:
    """A certificate (PEM) and its private key."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    """A certificate authority and identities it signed for 127.0.0.1 and localhost."""

    ca_certificate: Path
    node: Identity
    peer: Identity


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path, name: str = "test") -> Pki:
    """A CA ``name`` in ``folder`` and two identities it signed (the node, a peer)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = folder / f"{name}-ca.key", folder / f"{name}-ca.pem"
    _run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name} test CA", "-keyout", str(ca_key), "-out", str(ca), cwd=folder,
    )  # fmt: skip
    return Pki(
        ca,
        _identity(folder, f"{name}-node", ca, ca_key),
        _identity(folder, f"{name}-peer", ca, ca_key),
    )


def _identity(folder: Path, name: str, ca: Path, ca_key: Path) -> Identity:
    key, request, certificate = (folder / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
    extensions = folder / f"{name}.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    _run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(request), cwd=folder,
    )  # fmt: skip
    _run(
        "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(certificate),
        cwd=folder,
    )  # fmt: skip
    return Identity(certificate, key)


def revoke(
    folder: Path, ca_certificate: Path, revoked: Identity, *, due: datetime | None = None
) -> Path:
    """A certificate revocation list of the CA ``ca_certificate`` (made by :func:`make_pki`
    in ``folder``) that revokes ``revoked`` (:func:`issue_crl`); its path."""
    config = _ca_config(folder)
    (folder / "index.txt").touch()
    (folder / "crlnumber").write_text("01\n")
    _run("ca", *_signing(config, ca_certificate), "-revoke", str(revoked.certificate), cwd=folder)
    return issue_crl(folder, ca_certificate, due=due)


def issue_crl(folder: Path, ca_certificate: Path, *, due: datetime | None = None) -> Path:
    """The CA's revocation list of what :func:`revoke` revoked so far, its next update
    ``due`` (two days on when not given; one issued a day before a ``due`` in the past)."""
    crl = folder / "revoked.crl.pem"
    dates: tuple[str, ...] = ()
    if due is not None:
        dates = (
            "-crl_lastupdate", _openssl_time(min(due, datetime.now(UTC)) - timedelta(days=1)),
            "-crl_nextupdate", _openssl_time(due),
        )  # fmt: skip
    signing = _signing(_ca_config(folder), ca_certificate)
    _run("ca", *signing, "-gencrl", *dates, "-out", str(crl), cwd=folder)
    return crl


def _ca_config(folder: Path) -> Path:
    config = folder / "ca.cnf"
    config.write_text(
        "[ ca ]\ndefault_ca = CA_default\n[ CA_default ]\ndatabase = index.txt\n"
        "crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n"
    )
    return config


def _signing(config: Path, ca_certificate: Path) -> tuple[str, ...]:
    ca_key = ca_certificate.with_suffix(".key")
    return ("-config", str(config), "-keyfile", str(ca_key), "-cert", str(ca_certificate))


def _openssl_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")


def expired_identity(folder: Path, ca_certificate: Path, name: str, *, ended: datetime) -> Identity:
    """An identity the CA of :func:`make_pki` signed for 127.0.0.1 whose certificate was
    valid for the ten days up to ``ended``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate(ca_certificate.read_bytes())
    ca_key = serialization.load_pem_private_key(
        ca_certificate.with_suffix(".key").read_bytes(), password=None
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ended - timedelta(days=10))
        .not_valid_after(ended)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    identity = Identity(folder / f"{name}.pem", folder / f"{name}.key")
    identity.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    identity.private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return identity
