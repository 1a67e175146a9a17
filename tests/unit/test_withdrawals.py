"""What a round's report withdraws after a rejection note: the objects that earlier rounds
made from the rejected images and sent, under the title that rejected each image."""

from __future__ import annotations

import pytest

from dicomnode.db.schema import Report
from dicomnode.db.session import Database
from dicomnode.queue import jobs as q
from dicomnode.testing.queue import add_report
from dicomnode.testing.rows import output_row, rejection_row
from dicomnode.worker import _withdrawals

pytestmark = pytest.mark.both_databases


def _output(db: Database, report_id: int, uid: str, source: str, *, sent: bool) -> None:
    with db.session() as s:
        s.add(output_row(uid, report_id, "SC", source))
        if sent:
            q.enqueue(s, [q.JobSpec(q.JobKind.SEND, f"{uid}>PACS", 5, sop_instance_uid=uid)])


def _reject(db: Database, uid: str, code: str, note: str) -> None:
    with db.session() as s:
        s.add(rejection_row(uid, "1.2", code, note))


def test_only_what_was_sent_is_withdrawn_under_the_title_that_rejected_its_image(
    db: Database,
) -> None:
    first, second, third = (add_report(db, "1.2", n) for n in (1, 2, 3))
    _output(db, first, "5.1", "1.1", sent=True)  # its image rejected for safety
    _output(db, first, "5.2", "1.2", sent=True)  # its image rejected for quality
    _output(db, second, "5.3", "1.1", sent=False)  # rejected before its round's report
    _output(db, second, "5.4", "1.3", sent=True)  # its image stands
    _reject(db, "1.1", "113037", "8.1")
    _reject(db, "1.2", "113001", "8.2")
    with db.session() as s:
        report = s.get(Report, third)
        assert report is not None
        found = {w.code: (w.paths, w.note_uids) for w in _withdrawals(s, report)}
    assert found == {
        "113037": (("/results/5.1.dcm",), ("8.1",)),
        "113001": (("/results/5.2.dcm",), ("8.2",)),
    }
    with db.session() as s:
        report = s.get(Report, first)
        assert report is not None and _withdrawals(s, report) == []  # nothing before round 1


def test_nothing_is_withdrawn_without_a_rejection(db: Database) -> None:
    first, second = add_report(db, "1.2", 1), add_report(db, "1.2", 2)
    _output(db, first, "5.1", "1.1", sent=True)
    with db.session() as s:
        report = s.get(Report, second)
        assert report is not None and _withdrawals(s, report) == []
