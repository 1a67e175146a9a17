"""A throwaway public-key infrastructure for the DICOM TLS tests (``/usr/bin/openssl``)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
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


def revoke(folder: Path, ca_certificate: Path, revoked: Identity) -> Path:
    """A certificate revocation list of the CA ``ca_certificate`` (made by :func:`make_pki`
    in ``folder``) that revokes ``revoked``; its path."""
    ca_key = ca_certificate.with_suffix(".key")
    config = folder / "ca.cnf"
    config.write_text(
        "[ ca ]\ndefault_ca = CA_default\n[ CA_default ]\ndatabase = index.txt\n"
        "crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n"
    )
    (folder / "index.txt").touch()
    (folder / "crlnumber").write_text("01\n")
    crl = folder / "revoked.crl.pem"
    signing = ("-config", str(config), "-keyfile", str(ca_key), "-cert", str(ca_certificate))
    _run("ca", *signing, "-revoke", str(revoked.certificate), cwd=folder)
    _run("ca", *signing, "-gencrl", "-out", str(crl), cwd=folder)
    return crl
