"""SQLAlchemy tables.

``associations``  one row per DICOM association that sent us instances.
``instances``     every received instance (file path, UIDs, routing facts).
``reports``       one processing round of one study by one model; owns the SR.
``results``       one model's answer for one instance (probabilities, peak).
``outputs``       result objects written by the node (SC and SR files).
``jobs``          the persistent queue (see :mod:`dicomnode.queue.jobs`).
``peers``         known application entities (editable at run time).
``model_cards``   the card of every model version the node opened a round with.

No column is meant for patient names or IDs; the instance files keep them. One holds
header free text: ``instances.descriptions`` (Study and Series Description, Protocol Name,
read for routing), where a site may have typed anything; ``dicomnode forget`` deletes it
with the study.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)


class Base(DeclarativeBase):
    pass


class Peer(Base):
    __tablename__ = "peers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), index=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16), default="cli")
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    commitment: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Results delivered to it are followed by a storage commitment request (revision 0007)."""
    dicomweb: Mapped[str] = mapped_column(String(1024), default="", server_default="")
    """Base URL of its DICOMweb service: results go by STOW-RS (revision 0008)."""
    dicomweb_auth_file: Mapped[str] = mapped_column(String(1024), default="", server_default="")
    """The file holding its DICOMweb Authorization header value (revision 0008)."""


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    released_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    receiver: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """The receiving node (``host:port``) whose SCP holds it; ``None`` before revision 0002."""


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    descriptions: Mapped[str] = mapped_column(Text, default="")
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    """Bytes of the file as received (64-bit since revision 0004: files over 2 GiB)."""
    calling_ae: Mapped[str] = mapped_column(String(16))
    association_id: Mapped[str] = mapped_column(ForeignKey("associations.id"), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    state: Mapped[str] = mapped_column(String(16), default="received", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    report_id: Mapped[int | None] = mapped_column(
        ForeignKey("reports.id"), nullable=True, index=True
    )
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """:class:`~dicomnode.values.Priority` of its analysis (revision 0012): from its sender's
    C-STORE Priority and ``routing.urgent_callers`` / ``background_callers``."""


class Rejection(Base):
    """An instance that a rejection note (IHE IOCM: a Key Object Selection document titled
    "Rejected for Quality Reasons", "Rejected for Patient Safety Reasons", ...) withdrew
    (revision 0009): it is analysed no more, reports leave it out, and what the node made
    from it is rejected in turn."""

    __tablename__ = "rejections"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    code: Mapped[str] = mapped_column(String(16))
    """The rejection note's title: a DCM code value (113001, 113037, 113038 or 113039)."""
    note_sop_instance_uid: Mapped[str] = mapped_column(UID)
    rejected_at: Mapped[datetime] = mapped_column(DateTime)


class ModelCardRecord(Base):
    """The card of a model version the node opened a round with (revision 0010), as JSON:
    a study is reported again (a rejection note, weeks later) by the version that reported it,
    whose SR and rejection notes name it as the earlier SR did, also after that version left
    ``models/``."""

    __tablename__ = "model_cards"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    """Its weights' checksum, as its outputs state it."""
    card: Mapped[str] = mapped_column(Text)
    first_used_at: Mapped[datetime] = mapped_column(DateTime)


class Report(Base):
    __tablename__ = "reports"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "model_name", "sequence"),
        Index("ix_reports_state", "state"),  # the scheduler's open rounds (0013)
        Index("ix_reports_finished", "finished_at"),  # the last hour's turnaround (0013)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    sequence: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    withdrawal_code: Mapped[str] = mapped_column(String(16), default="", server_default="")
    """Set on a round that withdraws the study's results (``dicomnode withdraw``, revision
    0011): the DCM code of its rejection note's title; its report is that note, no SR."""
    withdrawal_note: Mapped[str] = mapped_column(Text, default="", server_default="")
    """The administrator's words on why, for the note's Key Object Description."""


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "model_name", "model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(ForeignKey("instances.sop_instance_uid"))
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    findings: Mapped[list[dict[str, object]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Output(Base):
    __tablename__ = "outputs"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    source_sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    """The image it was made from (an overlay's, a presentation state's; indexed since 0013:
    what a rejected image's results are)."""
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("kind", "dedupe_key"),
        Index("ix_jobs_claim", "kind", "state", "run_after"),
        Index("ix_jobs_priority", "kind", "state", "priority", "run_after"),  # claims
        Index("ix_jobs_peer", "kind", "peer", "state", "finished_at"),  # status, metrics
        Index("ix_jobs_finished", "kind", "state", "finished_at"),  # the last hour's turnaround
        Index("ix_jobs_instance", "sop_instance_uid", "kind"),  # an object's jobs (0013)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    dedupe_key: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    group_key: Mapped[str] = mapped_column(String(255), default="", index=True)
    report_id: Mapped[int | None] = mapped_column(
        ForeignKey("reports.id"), nullable=True, index=True
    )
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    peer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """:class:`~dicomnode.values.Priority`: due jobs of a kind are claimed highest first
    (revision 0012)."""
    run_after: Mapped[datetime] = mapped_column(DateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    resend: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """A send queued by ``dicomnode resend``, not by the round's report (revision 0006): left
    out of the turnaround, whose end is the round's first delivery."""
    committed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    """A delivered send whose peer then committed to keep the object (storage commitment,
    revision 0007)."""


class CommitmentRequest(Base):
    """A storage commitment request (N-ACTION) made by a commit job, until its report comes
    (revision 0007): the report names its transaction only."""

    __tablename__ = "commitment_requests"

    transaction_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime)
