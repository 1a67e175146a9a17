"""`dicomnode health`: the queue check tells waiting from stuck."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode.config import Settings
from dicomnode.db.schema import Job
from dicomnode.db.session import Database, utcnow
from dicomnode.health import check_certificates, check_queue
from dicomnode.metrics import exposition
from dicomnode.queue import jobs as q
from dicomnode.testing.queue import add_report
from dicomnode.testing.tls import Pki, expired_identity, make_pki, revoke

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


def _age_every_job(db: Database, minutes: float) -> None:
    then = utcnow() - timedelta(minutes=minutes)
    with db.session() as s:
        for job in s.query(Job):
            job.run_after = job.created_at = job.updated_at = then


def test_jobs_that_wait_while_nothing_moves_fail_the_check(db: Database) -> None:
    with db.session() as s:
        assert check_queue(s, 10).ok  # an empty queue
        q.enqueue(s, [q.JobSpec(q.JobKind.SEND, f"{i}>PACS", 5, peer="PACS") for i in range(3)])
    with db.session() as s:
        assert check_queue(s, 10).ok  # just queued: waiting is not stalling
    _age_every_job(db, 25)
    with db.session() as s:
        stalled = check_queue(s, 10)
    assert not stalled.ok
    assert "3 job(s) could run 25 min ago" in stalled.detail and "workers" in stalled.detail
    with db.session() as s:  # a worker takes one: the queue moves again
        q.claim(s, q.JobKind.SEND, "w", 30)
    with db.session() as s:
        moving = check_queue(s, 10)
    assert moving.ok and "jobs are moving" in moving.detail


def test_jobs_waiting_for_their_retry_time_are_not_stalled(db: Database) -> None:
    with db.session() as s:
        q.enqueue(s, [q.JobSpec(q.JobKind.SEND, "1>PACS", 5, peer="PACS")])
    _age_every_job(db, 60)
    with db.session() as s:
        for job in s.query(Job):
            job.state, job.run_after = "failed", utcnow() + timedelta(minutes=5)  # backing off
    with db.session() as s:
        assert check_queue(s, 10).ok


def test_a_report_waiting_for_its_round_is_not_stalled(db: Database) -> None:
    """A report job is claimed once its round's images are analysed: while one of them
    backs off after a failure, the report is not a job that could run."""
    report_id = add_report(db, "1.2.3")
    with db.session() as s:
        q.enqueue(
            s,
            [
                q.JobSpec(q.JobKind.INFER, "1.2.3.4", 3, report_id=report_id),
                q.JobSpec(q.JobKind.REPORT, "report-1", 3, report_id=report_id),
            ],
        )
    _age_every_job(db, 60)
    with db.session() as s:
        infer = s.query(Job).filter(Job.kind == "infer").one()
        infer.state, infer.run_after = "failed", utcnow() + timedelta(minutes=5)
    with db.session() as s:
        assert check_queue(s, 10).ok


def _tls(settings: Settings, pki: Pki, **files: object) -> Settings:
    tls = {
        "certificate": pki.node.certificate,
        "private_key": pki.node.private_key,
        "ca_certificates": pki.ca_certificate,
        **files,
    }
    return settings.model_copy(update={"tls": settings.tls.model_copy(update=tls)})


def test_certificates_warn_before_they_end_and_fail_once_ended(
    settings: Settings, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")  # every certificate valid for two days
    secured = _tls(settings, pki)
    check = check_certificates(secured)
    assert check.ok and check.detail.startswith("WARNING: renew it: the soonest to end: tls.")
    quiet = secured.model_copy(
        update={"tls": secured.tls.model_copy(update={"expiry_warning_days": 1})}
    )
    assert "WARNING" not in check_certificates(quiet).detail
    later = datetime.now(UTC) + timedelta(days=3)
    ended = check_certificates(secured, now=later)
    assert not ended.ok and "ended" in ended.detail and "(1 more ended)" in ended.detail
    assert ended.detail.endswith(
        "TLS senders and peers refuse it (1 more ended)"  # whichever ended first
        if ended.detail.startswith("tls.certificate:")
        else "the senders and peers whose certificates it signed are refused (1 more ended)"
    )


def test_an_old_certificate_beside_its_successor_is_no_alarm_and_a_bad_file_is(
    settings: Settings, tmp_path: Path
) -> None:
    """A CA bundle that still holds the CA's expired certificate beside its renewed one (same
    subject): the renewed one counts. A file that holds no certificate fails the check."""
    pki = make_pki(tmp_path / "pki")
    old = expired_identity(
        tmp_path, pki.ca_certificate, "test test CA", ended=datetime.now(UTC) - timedelta(days=1)
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old.certificate.read_bytes() + pki.ca_certificate.read_bytes())
    assert check_certificates(_tls(settings, pki, ca_certificates=bundle)).ok
    alone = check_certificates(_tls(settings, pki, ca_certificates=old.certificate))
    assert not alone.ok and alone.detail.endswith(
        "the senders and peers whose certificates it signed are refused"
    )
    leaf = expired_identity(
        tmp_path, pki.ca_certificate, "test-old-node", ended=datetime.now(UTC) - timedelta(days=1)
    )
    ended = check_certificates(_tls(settings, pki, certificate=leaf.certificate))
    assert not ended.ok and ended.detail.startswith(
        "tls.certificate: the certificate CN=test-old-node ended"
    )
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    refused = check_certificates(_tls(settings, pki, certificate=broken))
    assert not refused.ok and "tls.certificate" in refused.detail
    assert "no PEM certificate" in refused.detail


def test_the_metrics_give_each_certificates_end_and_the_lists_next_update(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    from cryptography import x509

    pki = make_pki(tmp_path / "pki")
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=5)
    crl = revoke(tmp_path / "pki", pki.ca_certificate, pki.peer, due=due)
    text, _ = exposition(db, _tls(settings, pki, crl_file=crl))
    node = x509.load_pem_x509_certificate(pki.node.certificate.read_bytes())
    lines = text.decode().splitlines()
    expected = {
        'setting="tls.certificate",subject="CN=test-node"': node.not_valid_after_utc.timestamp(),
        'setting="tls.crl_file",subject="CN=test test CA"': due.timestamp(),
    }
    for labels, value in expected.items():
        (line,) = [
            x for x in lines if x.startswith("dicomnode_tls_expiry_timestamp_seconds{" + labels)
        ]
        assert float(line.rsplit(" ", 1)[1]) == value
    assert sum(x.startswith("dicomnode_tls_expiry_timestamp_seconds{") for x in lines) == 3
    assert b"dicomnode_tls_expiry" not in exposition(db, settings)[0]  # no TLS files: none


def test_status_lists_each_certificate_and_the_time_left(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    from rich.console import Console

    from dicomnode.status import node_status, render_status
    from dicomnode.tls import tls_state

    pki = make_pki(tmp_path / "pki")
    assert tls_state(settings.tls) is None  # no TLS files: no table
    state = tls_state(_tls(settings, pki).tls)
    assert state is not None and not state.problem
    assert {(f.setting, f.subject) for f in state.files} == {
        ("tls.certificate", "CN=test-node"),
        ("tls.ca_certificates", "CN=test test CA"),
    }
    with db.reading() as session:
        tables = render_status(node_status(session, tls=state))
    console = Console(width=200, record=True)
    console.print(tables[-1])
    text = console.export_text()
    assert "TLS certificates and lists" in text and "CN=test-node" in text
    assert "2 days: renew it" in text or "1 days: renew it" in text
    broken = tmp_path / "broken.pem"
    broken.write_text("no certificate")
    assert (
        "no PEM certificate"
        in (tls_state(_tls(settings, pki, certificate=broken).tls) or state).problem
    )
