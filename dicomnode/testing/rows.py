"""Database rows of received images, written directly (tests of what reads them: the
scheduler, status, retention, history), with defaults for every column a test does not care
about."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from dicomnode.db.schema import Association, Instance, Job, Output, Rejection, Report, Result
from dicomnode.db.session import Database, db_now, utcnow
from dicomnode.queue import jobs as q
from dicomnode.queue.retry import RetryPolicy

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def instance_row(sop_instance_uid: str, association_id: str, **columns: Any) -> Instance:
    """The row of a DX image ``sop_instance_uid`` received over ``association_id`` just now,
    of study ``1.2.3`` (series ``1.2.3.1``), a 1-byte file that is nowhere; ``columns``
    override any of that."""
    values: dict[str, Any] = {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "sop_class_uid": DX_STORAGE,
        "transfer_syntax_uid": EXPLICIT_LITTLE_ENDIAN,
        "path": f"/nowhere/{sop_instance_uid}.dcm",
        "size": 1,
        "calling_ae": "MOD",
        "received_at": utcnow(),
    }
    values.update(columns)
    return Instance(sop_instance_uid=sop_instance_uid, association_id=association_id, **values)


def result_row(
    uid: str, report_id: int, model: str, version: str, *found: tuple[int, bool]
) -> Result:
    """The result of image ``uid`` in round ``report_id``: its findings (class, localisation
    uncertain), or none: not assessed."""
    return Result(
        sop_instance_uid=uid,
        report_id=report_id,
        model_name=model,
        model_version=version,
        outcome="ok" if found else "skipped",
        findings=[{"predicted": c, "localisation_uncertain": u} for c, u in found],
        created_at=utcnow(),
    )


def output_row(uid: str, report_id: int, kind: str = "SC", source: str | None = None) -> Output:
    """The row of the node's result object ``uid`` (an SC, PR, SR or KO) of round
    ``report_id``, made from image ``source``, its file at ``/results/<uid>.dcm``."""
    return Output(
        sop_instance_uid=uid,
        series_instance_uid="9",
        report_id=report_id,
        kind=kind,
        source_sop_instance_uid=source,
        path=f"/results/{uid}.dcm",
        created_at=utcnow(),
    )


def rejection_row(uid: str, study_uid: str, code: str = "113001", note: str = "8.1") -> Rejection:
    """The record that rejection note ``note`` (titled ``code``) rejected ``uid``."""
    return Rejection(
        sop_instance_uid=uid,
        study_instance_uid=study_uid,
        code=code,
        note_sop_instance_uid=note,
        rejected_at=utcnow(),
    )


def round_row(db: Database, key: str, *, image_at: datetime, made_at: datetime) -> int:
    """A done round (of knee-kl, study ``1.2.<key>``) of one image received at ``image_at``
    over association ``a1`` (made if missing), its SR made at ``made_at``; the round's id."""
    with db.session() as s:
        if s.get(Association, "a1") is None:
            s.add(Association(id="a1", calling_ae="MOD", receiver="n", started_at=image_at))
        report = Report(
            study_instance_uid=f"1.2.{key}",
            model_name="knee-kl",
            model_version="2",
            sequence=1,
            calling_ae="MOD",
            state="done",
            created_at=image_at,
            finished_at=made_at,
        )
        s.add(report)
        s.flush()
        s.add(
            instance_row(
                f"1.9.{key}",
                "a1",
                study_instance_uid=f"1.2.{key}",
                report_id=report.id,
                received_at=image_at,
            )
        )
        return report.id


def send_row(db: Database, round_id: int, key: str, *, done_at: datetime | None) -> None:
    """A send (to PACS) of one of the round's results: delivered at ``done_at``, or queued."""
    with db.session() as s:
        q.enqueue(s, [q.JobSpec(q.JobKind.SEND, key, 5, report_id=round_id, peer="PACS")])
        if done_at is not None:
            s.execute(
                update(Job)
                .where(Job.dedupe_key == key)
                .values(state=q.JobState.DONE, finished_at=done_at)
            )


def fill_known_state(db: Database) -> None:
    """A node's database in a known state (tests of status figures and alerts): three
    images (one purged, 5 bytes held), a done round of knee-kl (its image graded KL2), two
    infer jobs (one due for five minutes), sends: PACS done, PACS retrying, ARCH dead."""
    with db.session() as s:
        s.add(Association(id="a1", calling_ae="MOD", receiver="n", started_at=utcnow()))
        s.flush()
        report = Report(
            study_instance_uid="1.2.3",
            model_name="knee-kl",
            model_version="2",
            sequence=1,
            calling_ae="MOD",
            state="done",
            created_at=utcnow(),
            finished_at=utcnow(),
        )
        s.add_all(
            [
                instance_row("1.1", "a1", size=2, state="done"),
                instance_row("1.2", "a1", size=3, state="skipped"),
                instance_row("1.3", "a1", size=7, state="purged"),
                report,
            ]
        )
        s.flush()
        s.add(result_row("1.1", report.id, "knee-kl", "2", (2, False)))
    infer = [q.JobSpec(q.JobKind.INFER, f"infer:{i}", 3, group_key="m") for i in range(2)]
    sends = [
        q.JobSpec(q.JobKind.SEND, f"{i}>PACS", 5, group_key="PACS", peer="PACS") for i in (1, 2)
    ]
    with db.session() as s:
        q.enqueue(
            s,
            [*infer, *sends, q.JobSpec(q.JobKind.SEND, "3>ARCH", 1, group_key="ARCH", peer="ARCH")],
        )
    with db.session() as s:
        first, second = q.claim(s, q.JobKind.SEND, "w", 30, limit=2, group_key="PACS")
        q.complete(s, first.id, "w")
        q.fail(s, second, "w", "no association", RetryPolicy(5, 60, 600))
        (dead,) = q.claim(s, q.JobKind.SEND, "w", 30, group_key="ARCH")
        q.fail(s, dead, "w", "0xA900", RetryPolicy(1, 1, 1))
        early = db_now(s) - timedelta(minutes=5)
        s.execute(update(Job).where(Job.dedupe_key == "infer:0").values(run_after=early))


def metrics_without_a_database(tmp_path: Path) -> tuple[bytes, bool]:
    """The metrics text of a node under ``tmp_path`` whose database was never made (as one
    that is down), and whether the scrape read a database (it did not)."""
    from dicomnode.metrics import exposition
    from dicomnode.testing.node import make_settings

    settings = make_settings(tmp_path)
    db = Database(settings.database.url)
    try:
        return exposition(db, settings)
    finally:
        db.dispose()
