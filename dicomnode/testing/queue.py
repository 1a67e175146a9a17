"""Drive the job queue: a report round to hang jobs on, and claims from several threads at
once (SQLite and PostgreSQL tests)."""

from __future__ import annotations

import threading

from dicomnode.db.schema import Report
from dicomnode.db.session import Database, utcnow
from dicomnode.queue import jobs as q


def add_report(db: Database, study_uid: str = "1.2", sequence: int = 1) -> int:
    """A pending report round (number ``sequence``) of ``study_uid``; its id."""
    with db.session() as session:
        report = Report(
            study_instance_uid=study_uid,
            model_name="m",
            model_version="1",
            sequence=sequence,
            calling_ae="X",
            state="pending",
            created_at=utcnow(),
        )
        session.add(report)
        session.flush()
        return report.id


def claim_concurrently(
    db: Database, kind: q.JobKind, workers: int, limit: int, group_key: str | None = None
) -> list[int]:
    """Every job id claimed by ``workers`` threads that claim until the queue is empty."""
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while True:
            with db.session() as session:
                got = q.claim(session, kind, name, 30, limit=limit, group_key=group_key)
            if not got:
                return
            with lock:
                claimed.extend(job.id for job in got)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return claimed
