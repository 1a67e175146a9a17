"""How long ``dicomnode status``, a metrics scrape and a scheduler pass take once the database
holds years of records: the node keeps every job's row (a study's history), so these reads must
stay quick as the tables grow (about 700,000 jobs a year at a busy site: 500 images a day, each
with its analysis, a share of a report and three sends; and with them 140,000 images, 70,000
rounds, their results and 210,000 result objects)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from dicomnode.db.migrate import upgrade
from dicomnode.db.schema import Association, Instance, Job, Output, Report, Result
from dicomnode.db.session import Database, utcnow
from dicomnode.metrics import exposition
from dicomnode.queue import jobs as q
from dicomnode.status import node_status
from dicomnode.studies import ready_rounds
from dicomnode.testing.node import make_settings
from dicomnode.values import Priority

KINDS = ("infer", "report", "send", "send", "send")
"""The mix of a busy site's jobs: per image its analysis, a report, three sends."""

BATCH = 50_000
UID_ROOT = "1.2.826.0.1.3680043.10"


def records(scratch: Path, jobs: int) -> dict[str, Any]:
    """Seconds of one ``status`` read and one metrics scrape (each the second of two, the
    first warming the caches) on a SQLite database of ``jobs`` finished jobs; then, with a
    backlog of a quarter as many analyses due (one in a hundred urgent), the median
    milliseconds of a worker's claim of a batch of 8 (:func:`claim_ms`) and of a look-up of
    a result object's sends by its SOP Instance UID (:func:`lookup_ms`)."""
    settings = make_settings(scratch / "records")
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    try:
        _fill(db, jobs)
        _fill_records(db, jobs // len(KINDS))

        def status() -> None:
            with db.reading() as session:
                node_status(session, 10, settings.storage, settings.results)

        def scheduler_pass() -> None:
            with db.session() as session:  # as the scheduler: SQLite's write lock held
                ready_rounds(session, settings.study.settle_seconds)

        figures = {
            "jobs": jobs,
            "images": jobs // len(KINDS),
            "status_seconds": _second_of_two(status),
            "metrics_seconds": _second_of_two(lambda: exposition(db, settings)),
            "ready_ms": 1000.0 * _second_of_two(scheduler_pass),
        }
        figures["lookup_ms"] = lookup_ms(db, jobs)
        _fill_backlog(db, jobs // 4)
        return {**figures, "backlog": jobs // 4, "claim_ms": claim_ms(db)}
    finally:
        db.dispose()


def _fill(db: Database, jobs: int) -> None:
    now = utcnow()
    for start in range(0, jobs, BATCH):
        rows = [_row(i, jobs, now) for i in range(start, min(jobs, start + BATCH))]
        with db.session() as session:
            session.execute(insert(Job), rows)


def _fill_records(db: Database, images: int) -> None:
    """The records that go with the jobs: ``images`` images received (two a study, fifty an
    association; all but the last week's purged), each study's round reported, a result per
    image, an overlay per image and an SR per round."""
    now = utcnow()
    for start in range(0, images, BATCH):
        stop = min(images, start + BATCH)
        at = [now - timedelta(seconds=(images - i) * 180) for i in range(start, stop)]
        rows = list(zip(range(start, stop), at, strict=True))
        with db.session() as session:
            session.execute(
                insert(Association),
                [_association(i, when) for i, when in rows if i % 50 == 0],
            )
            session.execute(insert(Report), [_report(i, when) for i, when in rows if i % 2 == 0])
            session.execute(insert(Instance), [_instance(i, when, now) for i, when in rows])
            session.execute(insert(Result), [_result(i, when) for i, when in rows])
            session.execute(insert(Output), [_output(i, "SC", when) for i, when in rows])
            session.execute(
                insert(Output), [_output(i, "SR", when) for i, when in rows if i % 2 == 0]
            )


def _association(i: int, at: Any) -> dict[str, Any]:
    return {"id": f"bench-{i // 50}", "calling_ae": "MOD", "started_at": at, "released_at": at}


def _report(i: int, at: Any) -> dict[str, Any]:
    return {
        "id": i // 2 + 1,
        "study_instance_uid": f"{UID_ROOT}.2.{i // 2}",
        "model_name": "knee-kl",
        "model_version": "2.0.2",
        "sequence": 1,
        "calling_ae": "MOD",
        "state": "done",
        "created_at": at,
        "finished_at": at,
    }


def _instance(i: int, at: Any, now: Any) -> dict[str, Any]:
    recent = now - at < timedelta(days=7)
    return {
        "sop_instance_uid": f"{UID_ROOT}.3.{i}",
        "study_instance_uid": f"{UID_ROOT}.2.{i // 2}",
        "series_instance_uid": f"{UID_ROOT}.4.{i // 2}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "modality": "DX",
        "body_part": "KNEE",
        "path": f"/data/{i}.dcm",
        "size": 8_000_000 if recent else 4_000,
        "calling_ae": "MOD",
        "association_id": f"bench-{i // 50}",
        "received_at": at,
        "state": "done" if recent else "purged",
        "report_id": i // 2 + 1,
    }


def _result(i: int, at: Any) -> dict[str, Any]:
    return {
        "sop_instance_uid": f"{UID_ROOT}.3.{i}",
        "report_id": i // 2 + 1,
        "model_name": "knee-kl",
        "model_version": "2.0.2",
        "outcome": "ok",
        "findings": [{"predicted": i % 5, "localisation_uncertain": i % 7 == 0}],
        "created_at": at,
    }


def _output(i: int, kind: str, at: Any) -> dict[str, Any]:
    return {
        "sop_instance_uid": f"{UID_ROOT}.5.{kind}.{i}",
        "series_instance_uid": f"{UID_ROOT}.6.{i // 2}",
        "report_id": i // 2 + 1,
        "kind": kind,
        "source_sop_instance_uid": f"{UID_ROOT}.3.{i}" if kind == "SC" else None,
        "path": f"/results/{kind}/{i}.dcm",
        "created_at": at,
    }


def _fill_backlog(db: Database, due: int) -> None:
    """``due`` analyses waiting (queued an hour ago and since), one in a hundred urgent."""
    now = utcnow()
    for start in range(0, due, BATCH):
        rows = []
        for i in range(start, min(due, start + BATCH)):
            at = now - timedelta(seconds=3600 * (due - i) / due)
            row = _row(i, due, at)
            row.update(
                kind="infer",
                dedupe_key=f"backlog:{i}",
                state="queued",
                attempts=0,
                finished_at=None,
                priority=Priority.HIGH if i % 100 == 50 else Priority.MEDIUM,
            )
            row["run_after"] = row["created_at"] = row["updated_at"] = at
            rows.append(row)
        with db.session() as session:
            session.execute(insert(Job), rows)


def claim_ms(db: Database, claims: int = 21) -> float:
    """The median milliseconds of ``claims`` claims of 8 analyses, as a worker makes them
    (the group of the first due job, then its batch: urgent ones first)."""
    took = []
    for _ in range(claims):
        started = time.perf_counter()
        with db.session() as session:
            group = q.next_group(session, q.JobKind.INFER)
            q.claim(session, q.JobKind.INFER, "bench", 600, 8, group)
        took.append(time.perf_counter() - started)
    return 1000.0 * sorted(took)[len(took) // 2]


def lookup_ms(db: Database, jobs: int, lookups: int = 21) -> float:
    """The median milliseconds of finding a result object's send jobs by its SOP Instance UID
    (was it sent, and where: ``withdraw``, rejection notes, storage commitment)."""
    sends = [i for i in range(0, jobs, max(1, jobs // lookups)) if KINDS[i % len(KINDS)] == "send"]
    took = []
    for i in sends or [0]:
        started = time.perf_counter()
        with db.reading() as session:
            session.execute(
                select(Job.peer).where(
                    Job.sop_instance_uid == _object_uid(i), Job.kind == q.JobKind.SEND
                )
            ).all()
        took.append(time.perf_counter() - started)
    return 1000.0 * sorted(took)[len(took) // 2]


def _object_uid(i: int) -> str:
    return f"{UID_ROOT}.1.{i}"


def _row(i: int, jobs: int, now: Any) -> dict[str, Any]:
    kind = KINDS[i % len(KINDS)]
    at = now - timedelta(seconds=jobs - i)
    return {
        "kind": kind,
        "dedupe_key": f"bench:{i}",
        "state": "done",
        "group_key": "PACS" if kind == "send" else "knee-kl:2",
        "peer": "PACS" if kind == "send" else None,
        "sop_instance_uid": _object_uid(i),
        "attempts": 1,
        "max_attempts": 3,
        "run_after": at,
        "last_error": "",
        "created_at": at,
        "updated_at": at,
        "finished_at": at,
    }


def _second_of_two(action: Callable[[], object]) -> float:
    action()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started
