"""``dicomnode health``: is the node doing its work? For a container's health check and a
monitoring system (exit status 0 when every check passes, 1 when one fails).

A port that accepts TCP connections says little: the kernel completes a connection even
when nothing in the node accepts it, and a node whose workers are stuck still listens.
The checks are what a radiology IT engineer would look at:

``database``  reachable, at this version's schema revision;
``scp``       the DICOM listener answers an association request (the node rejects the
              probe, which calls with the node's own AE title from the node's own
              address, quietly: an answer is enough);
``disk``      free space above ``storage.min_free_mb`` (below it C-STORE is refused);
``tls``       with TLS files given: no certificate of them has expired, nor a revocation list
              come due (a warning in the detail ``tls.expiry_warning_days`` before);
``audit``     with ``audit.transport`` set: the audit record repository accepts a connection
              (TCP, TLS with a handshake), the audit file can be written (UDP: the host
              resolves);
``queue``     jobs that could run are not left waiting while no job moved for
              ``stalled_minutes`` (workers dead, stuck, or none running for this database);
              "could run" as a worker claims (a report waits for its round, an SR for its
              overlays).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.config import Settings
from dicomnode.db import migrate
from dicomnode.db.schema import Job
from dicomnode.db.session import Database, db_now
from dicomnode.errors import AuditError, ConfigError
from dicomnode.queue.jobs import due_since
from dicomnode.store.files import free_mb
from dicomnode.tls import client_context, has_files, tls_state

log = logging.getLogger(__name__)

PROBE_SECONDS = 10.0
"""How long the listener has to answer the probe's association request."""


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``detail`` says what was found (never patient data)."""

    name: str
    ok: bool
    detail: str


def check_database(settings: Settings) -> Check:
    try:
        problem = migrate.schema_problem(settings.database.url)
    except Exception as exc:  # any driver error means the same: not reachable
        return Check("database", False, f"not reachable: {type(exc).__name__}: {exc}")
    return Check("database", not problem, problem or "reachable, schema current")


def check_scp(settings: Settings, timeout: float = PROBE_SECONDS) -> Check:
    """Ask the listener for an association as the node itself (a loopback call under the
    node's own AE title, which the node rejects without a warning). A node that listens for
    DICOM TLS only is asked over TLS, showing its own certificate."""
    host = "127.0.0.1" if settings.node.host in ("0.0.0.0", "") else settings.node.host
    port = settings.scp_port
    over_tls = not settings.node.port
    where = f"{host}:{port}" + (" (DICOM TLS)" if over_tls else "")
    try:
        tls_args = (_probe_context(settings), host) if over_tls else None
    except ConfigError as exc:
        return Check("scp", False, f"{where} cannot be asked: {exc}")
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    library = logging.getLogger("pynetdicom")
    level = library.level
    library.setLevel(logging.CRITICAL)  # the outcome is this check's line
    try:
        assoc = ae.associate(host, port, ae_title=settings.node.ae_title, tls_args=tls_args)
    except Exception as exc:  # an address that does not resolve, ...
        return Check("scp", False, f"{where} cannot be asked: {type(exc).__name__}: {exc}")
    finally:
        library.setLevel(level)
    if assoc.is_established:
        assoc.release()
        return Check("scp", True, f"{where} answers (association accepted)")
    if assoc.is_rejected:
        return Check("scp", True, f"{where} answers (the probe is rejected, as it should be)")
    hint = " or does not accept the node's own certificate" if over_tls else ""
    return Check("scp", False, f"{where} does not answer an association request{hint}")


def _probe_context(settings: Settings) -> ssl.SSLContext:
    """The probe's TLS: the node's own certificate shown, the listener's verified against
    ``tls.ca_certificates`` (not its host name: the probe calls its own listener)."""
    context = client_context(settings.tls)
    context.check_hostname = False
    return context


def check_disk(settings: Settings) -> Check:
    free, floor = free_mb(settings.storage.data_dir), settings.storage.min_free_mb
    detail = f"{free:,.0f} MB free in {settings.storage.data_dir} (floor {floor:,} MB)"
    return Check(
        "disk", free >= floor, detail + ("" if free >= floor else ": senders are turned away")
    )


CONSEQUENCES = {
    "tls.certificate": "TLS senders and peers refuse it",
    "tls.ca_certificates": "the senders and peers whose certificates it signed are refused",
    "tls.crl_file": "every certificate its CA signed is refused until a new list is there",
}
"""What follows once a certificate of each TLS file has ended (a list: is past due)."""


def check_certificates(settings: Settings, now: datetime | None = None) -> Check:
    """Failed when a certificate of the TLS files has expired or a revocation list is past
    due; its detail names the soonest to end, with a warning when it ends within
    ``tls.expiry_warning_days``."""
    now = now or datetime.now(UTC)
    state = tls_state(settings.tls)
    if state is None or not (state.files or state.problem):
        return Check("tls", True, "no certificate to expire")
    if state.problem:
        return Check("tls", False, state.problem)
    found = state.files
    ended = [e for e in found if e.days_left(now) <= 0]
    if ended:
        first = ended[0]
        return Check(
            "tls",
            False,
            f"{first.what} ended {first.ends:%Y-%m-%d %H:%M} UTC: {CONSEQUENCES[first.setting]}"
            + (f" ({len(ended) - 1} more ended)" if len(ended) > 1 else ""),
        )
    soonest = found[0]
    days = soonest.days_left(now)
    detail = f"the soonest to end: {soonest.what}, {soonest.ends:%Y-%m-%d} ({days:.0f} days)"
    if days < state.warning_days:
        detail = f"WARNING: renew it: {detail}"
    return Check("tls", True, detail)


def check_audit(settings: Settings) -> Check:
    """The audit trail's destination can be written to now."""
    from dicomnode.audit.trail import transport_of

    try:  # the transport alone: a trail would adopt the spool of a stopped node
        transport = transport_of(settings)
        assert transport is not None
        return Check("audit", True, transport.probe())
    except (AuditError, ConfigError) as exc:
        return Check("audit", False, f"{exc}: audit messages wait in memory (audit.queue_size)")


def check_queue(session: Session, stalled_minutes: float, now: datetime | None = None) -> Check:
    """Failed when a job could have run ``stalled_minutes`` ago and no job moved since."""
    now = now or db_now(session)
    since = now - timedelta(minutes=stalled_minutes)
    waiting = session.execute(
        select(func.count(), func.min(Job.run_after)).where(due_since(since))
    ).one()
    moves = session.execute(select(func.max(Job.updated_at), func.max(Job.heartbeat_at))).one()
    last_move = max((t for t in moves if t is not None), default=None)
    count = int(waiting[0])
    if count == 0:
        return Check("queue", True, "no job waits longer than it should")
    if last_move is not None and last_move >= since:
        return Check("queue", True, f"{count} job(s) waiting; jobs are moving")
    minutes = (now - waiting[1]).total_seconds() / 60
    return Check(
        "queue",
        False,
        f"{count} job(s) could run {minutes:.0f} min ago and no job moved for "
        f"{stalled_minutes:g} min: are the workers running (`serve` with workers.count > 0, "
        "or `dicomnode worker`)?",
    )


def run_checks(settings: Settings, *, scp: bool = True, stalled_minutes: float = 10) -> list[Check]:
    """Every check, in order; the queue only when the database is usable."""
    checks = [check_database(settings)]
    if scp:
        checks.append(check_scp(settings))
    checks.append(check_disk(settings))
    if has_files(settings.tls):
        checks.append(check_certificates(settings))
    if settings.audit.transport != "off":
        checks.append(check_audit(settings))
    if checks[0].ok:
        db = Database(settings.database.url)
        try:
            with db.reading() as session:  # every 30 s in Docker: no write lock
                checks.append(check_queue(session, stalled_minutes))
        finally:
            db.dispose()
    return checks
