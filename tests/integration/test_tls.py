"""DICOM TLS: the node's TLS listener, and results sent to a peer over TLS (both sides
authenticated by certificates a test CA signed; ``/usr/bin/openssl`` makes them)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from dicomnode.audit.trail import AuditTrail
from dicomnode.config import Settings
from dicomnode.db.schema import Instance
from dicomnode.db.session import Database
from dicomnode.errors import ConfigError
from dicomnode.peers import PeerInfo
from dicomnode.receive import scp
from dicomnode.send.scu import echo, send_files
from dicomnode.service import start_listeners, stop_receiving
from dicomnode.testing.audit import read_audit_file
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.peers import LOOPBACK, CollectingSCP, free_port
from dicomnode.testing.tls import OPENSSL, Identity, Pki, make_pki
from dicomnode.tls import client_context

pytestmark = pytest.mark.skipif(not Path(OPENSSL).is_file(), reason="openssl is not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: certificates the node must not trust."""
    return make_pki(tmp_path_factory.mktemp("stranger"), "stranger")


def _with_tls(settings: Settings, pki: Pki, **tls: object) -> Settings:
    section = settings.tls.model_copy(
        update={
            "certificate": pki.node.certificate,
            "private_key": pki.node.private_key,
            "ca_certificates": pki.ca_certificate,
            **tls,
        }
    )
    plain_port = free_port() if settings.node.port else 0  # 0: DICOM TLS only
    node = settings.node.model_copy(update={"port": plain_port})
    return settings.model_copy(update={"tls": section, "node": node})


def _sender_context(ca: Path, identity: Identity | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(str(identity.certificate), str(identity.private_key))
    return context


def _store_over_tls(port: int, context: ssl.SSLContext | None) -> int | None:
    """C-STORE one radiograph as the registered sender MOD; its status, None if refused."""
    image = make_radiograph(body_part="KNEE")
    sender = AE(ae_title="MOD")
    sender.add_requested_context(image.SOPClassUID, ExplicitVRLittleEndian)
    sender.acse_timeout = sender.network_timeout = sender.connection_timeout = 5
    tls_args = None if context is None else (context, "localhost")
    assoc = sender.associate(LOOPBACK, port, ae_title="DICOMNODE", tls_args=tls_args)
    if not assoc.is_established:
        return None
    status = int(assoc.send_c_store(image).Status)
    assoc.release()
    return status


@contextmanager
def _listening(
    settings: Settings,
    db: Database,
    pki: Pki,
    *,
    tls_sender: bool = False,
    audit_file: Path | None = None,
    **tls: object,
) -> Iterator[Settings]:
    """The node's plain and TLS listeners, as `serve` starts them, with the sender MOD
    registered (``tls: true`` when ``tls_sender``), auditing to ``audit_file`` when given;
    the settings they run with."""
    from dicomnode.config import PeerSettings
    from dicomnode.peers import sync_config_peers

    sender = PeerSettings(ae_title="MOD", host=LOOPBACK, port=104, tls=tls_sender)
    secured = _with_tls(
        settings.model_copy(update={"peers": {"MOD": sender}}), pki, **{"port": free_port(), **tls}
    )
    if audit_file is not None:
        audit = secured.audit.model_copy(update={"transport": "file", "file": audit_file})
        secured = secured.model_copy(update={"audit": audit})
    with db.session() as session:
        sync_config_peers(session, dict(secured.peers))
    handlers = scp.StoreHandlers(secured, db, AuditTrail.from_settings(secured))
    servers = start_listeners(secured, db, handlers)
    try:
        yield secured
    finally:
        stop_receiving(servers, handlers, drain_seconds=5)
        handlers.audit.close()


def test_the_tls_listener_takes_only_senders_with_a_trusted_certificate(
    settings: Settings, db: Database, pki: Pki, stranger: Pki, tmp_path: Path
) -> None:
    audit_file = tmp_path / "audit.log"
    with _listening(settings, db, pki, audit_file=audit_file) as secured:
        port = secured.tls.port
        assert _store_over_tls(port, _sender_context(pki.ca_certificate, pki.peer)) == 0
        assert _store_over_tls(port, _sender_context(pki.ca_certificate, None)) is None
        assert _store_over_tls(port, _sender_context(pki.ca_certificate, stranger.peer)) is None
        assert _store_over_tls(port, None) is None  # plain DICOM on the TLS port
        assert _store_over_tls(secured.node.port, None) == 0  # plain DICOM on node.port
    with db.session() as session:
        assert len(session.execute(select(Instance)).scalars().all()) == 2
    # the audit trail: each refused handshake a Node Authentication failure, by address
    records = read_audit_file(audit_file)
    refused = [r for r in records if r.event_type == "110126"]
    assert len(refused) == 3
    for record in refused:
        assert record.identification.get("EventOutcomeIndicator") == "4"
        description = record.identification.findtext("EventOutcomeDescription") or ""
        assert description.startswith("TLS handshake failed")
        assert record.participants()[1].get("UserID") == LOOPBACK
    received = [r for r in records if r.event_id == "110104"]
    assert [r.participants()[0].get("UserID") for r in received] == ["MOD", "MOD"]


def test_a_peer_registered_for_tls_may_not_send_in_the_clear(
    settings: Settings, db: Database, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer with tls: true that calls the plain port (a modality left on its old
    settings) would put patient images on the network unencrypted: it is turned away,
    and the log says which port it must call."""
    trusted = _sender_context(pki.ca_certificate, pki.peer)
    with _listening(settings, db, pki, tls_sender=True) as secured:
        assert _store_over_tls(secured.node.port, None) is None
        assert _store_over_tls(secured.tls.port, trusted) == 0
    assert f"must call the TLS port {secured.tls.port}" in caplog.text
    with _listening(settings, db, pki, tls_sender=True, peers_call_over_tls=False) as allowed:
        assert _store_over_tls(allowed.node.port, None) == 0  # the site chose to allow it
    with _listening(settings, db, pki, tls_sender=True, port=0) as plain_only:
        assert _store_over_tls(plain_only.node.port, None) == 0  # no TLS port to call
    with db.session() as session:
        assert len(session.execute(select(Instance)).scalars().all()) == 3


def _listening_ports() -> set[int]:
    """The TCP ports this process listens on."""
    connections = psutil.Process().net_connections(kind="tcp")
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}


def test_a_node_may_listen_for_dicom_tls_only(
    settings: Settings, db: Database, pki: Pki, stranger: Pki
) -> None:
    """``node.port: 0``: no plain listener at all (a site whose policy forbids DICOM in the
    clear); the TLS port receives, names the node, and the health probe asks it over TLS."""
    from dicomnode.health import check_scp

    tls_only = settings.model_copy(update={"node": settings.node.model_copy(update={"port": 0})})
    before = _listening_ports()
    with _listening(tls_only, db, pki) as secured:
        assert secured.node.port == 0 and secured.scp_port == secured.tls.port
        assert _listening_ports() - before == {secured.tls.port}  # nothing listens in the clear
        trusted = _sender_context(pki.ca_certificate, pki.peer)
        assert _store_over_tls(secured.tls.port, trusted) == 0
        probe = check_scp(secured)
        assert probe.ok and f":{secured.tls.port} (DICOM TLS) answers" in probe.detail
        assert scp.receiver_name(secured).endswith(f":{secured.tls.port}")
        untrusted = secured.tls.model_copy(
            update={
                "certificate": stranger.node.certificate,
                "private_key": stranger.node.private_key,
            }
        )
        refused = check_scp(secured.model_copy(update={"tls": untrusted}))
        assert not refused.ok and "does not accept the node's own certificate" in refused.detail
    with db.session() as session:
        assert len(session.execute(select(Instance)).scalars().all()) == 1


def test_dicom_tls_only_needs_the_tls_port() -> None:
    from dicomnode.config import load_settings

    with pytest.raises(
        ConfigError, match=r"node\.port 0 \(no plain DICOM listener\) needs tls\.port"
    ):
        load_settings(None, environ={}, overrides={"node": {"port": 0}})


def test_a_revoked_certificate_is_refused_both_ways(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """A stolen or retired device's certificate stays valid until it expires unless the
    node reads the CA's revocation list (tls.crl_file)."""
    from dicomnode.testing.tls import revoke

    pki = make_pki(tmp_path / "pki")
    crl = revoke(tmp_path / "pki", pki.ca_certificate, pki.peer)
    with _listening(settings, db, pki, crl_file=crl) as secured:
        port = secured.tls.port
        assert _store_over_tls(port, _sender_context(pki.ca_certificate, pki.peer)) is None
        assert _store_over_tls(port, _sender_context(pki.ca_certificate, pki.node)) == 0
        revoked_pacs = CollectingSCP(
            ae_title="PACS", ssl_context=_pacs_context(pki.peer, pki.ca_certificate)
        ).start()
        try:
            peer = PeerInfo("PACS", "PACS", "127.0.0.1", revoked_pacs.port, tls=True)
            result = write_dataset(make_radiograph(body_part="KNEE"), tmp_path / "r.dcm")
            context = client_context(secured.tls)
            (refused,) = send_files(peer, [result], calling_ae="DICOMNODE", timeout=5, tls=context)
        finally:
            revoked_pacs.stop()
    assert not refused.ok and revoked_pacs.received == []


def _pacs_context(identity: Identity, ca: Path) -> ssl.SSLContext:
    """A TLS PACS's context: it shows ``identity`` and wants the node's certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.load_cert_chain(str(identity.certificate), str(identity.private_key))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_a_silent_connection_does_not_hold_other_senders_off_the_tls_port(
    settings: Settings, db: Database, pki: Pki
) -> None:
    """pynetdicom shakes hands in its accept loop: one client that connects and says nothing
    blocked every TLS sender. The node shakes hands in each connection's own thread."""
    import socket

    with (
        _listening(settings, db, pki) as secured,
        socket.create_connection((LOOPBACK, secured.tls.port)),  # connects, says nothing
    ):
        context = _sender_context(pki.ca_certificate, pki.peer)
        assert _store_over_tls(secured.tls.port, context) == 0  # within its 5 s time-outs


def test_results_reach_a_tls_peer_whose_certificate_the_node_trusts(
    settings: Settings, pki: Pki, stranger: Pki, tmp_path: Path
) -> None:
    secured = _with_tls(settings, pki)
    result = write_dataset(make_radiograph(body_part="KNEE"), tmp_path / "result.dcm")

    trusted = CollectingSCP(
        ae_title="PACS", ssl_context=_pacs_context(pki.peer, pki.ca_certificate)
    ).start()
    impostor = CollectingSCP(
        ae_title="PACS", ssl_context=_pacs_context(stranger.peer, pki.ca_certificate)
    ).start()
    node_tls = client_context(secured.tls)
    try:
        peer = PeerInfo("PACS", "PACS", "127.0.0.1", trusted.port, tls=True)
        (delivered,) = send_files(peer, [result], calling_ae="DICOMNODE", timeout=5, tls=node_tls)
        assert echo(peer, calling_ae="DICOMNODE", timeout=5, tls=node_tls).status == 0
        fake = PeerInfo("PACS", "PACS", "127.0.0.1", impostor.port, tls=True)
        (refused,) = send_files(fake, [result], calling_ae="DICOMNODE", timeout=5, tls=node_tls)
        (untold,) = send_files(peer, [result], calling_ae="DICOMNODE", timeout=5)
    finally:
        trusted.stop()
        impostor.stop()
    assert delivered.ok and len(trusted.received) == 1
    assert not refused.ok and refused.retry and impostor.received == []
    assert not untold.ok and not untold.retry
    assert "reached over TLS, but the node has no TLS settings" in untold.reason


def test_tls_needs_its_files(settings: Settings, tmp_path: Path) -> None:
    from dicomnode.config import load_settings

    with pytest.raises(ConfigError, match=r"tls\.port needs tls\.certificate, tls\.private_key"):
        load_settings(None, environ={}, overrides={"tls": {"port": 2762}})
    absent = tmp_path / "absent.pem"
    with pytest.raises(ConfigError, match=r"peers\.PACS\.tls needs .*absent\.pem: no such file"):
        load_settings(
            None,
            environ={},
            overrides={
                "peers": {"PACS": {"ae_title": "PACS", "host": "h", "port": 104, "tls": True}},
                "tls": {"certificate": str(absent)},
            },
        )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    broken = settings.tls.model_copy(
        update={"certificate": garbage, "private_key": garbage, "ca_certificates": garbage}
    )
    with pytest.raises(ConfigError, match="cannot use the TLS files"):
        client_context(broken)


def test_a_revocation_list_past_due_refuses_every_certificate_and_health_says_so(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """The failure the health check and the metric warn of: once the CRL's nextUpdate has
    passed, OpenSSL refuses every certificate of its CA ("CRL has expired"), a good one too."""
    from datetime import UTC, datetime, timedelta

    from dicomnode.health import check_certificates
    from dicomnode.testing.tls import issue_crl, revoke

    pki = make_pki(tmp_path / "pki")
    due = datetime.now(UTC) - timedelta(hours=1)
    crl = revoke(tmp_path / "pki", pki.ca_certificate, pki.peer, due=due)
    good = _sender_context(pki.ca_certificate, pki.node)
    with _listening(settings, db, pki, crl_file=crl) as secured:
        assert _store_over_tls(secured.tls.port, good) is None
        check = check_certificates(secured)
    assert not check.ok
    assert check.detail.startswith("tls.crl_file: the revocation list of CN=test test CA ended")
    assert "every certificate its CA signed is refused" in check.detail
    fresh = issue_crl(tmp_path / "pki", pki.ca_certificate)  # the CA's next list
    with _listening(settings, db, pki, crl_file=fresh) as secured:
        assert _store_over_tls(secured.tls.port, good) == 0
