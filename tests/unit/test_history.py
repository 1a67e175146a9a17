"""`dicomnode study UID`: where each result of a study went, and why one did not arrive."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from dicomnode.db.schema import Output
from dicomnode.db.session import Database, utcnow
from dicomnode.history import class_names, render_history, study_history
from dicomnode.queue import jobs as q
from dicomnode.queue.retry import RetryPolicy
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.queue import add_report

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


REFUSAL = "association rejected: [b]called AE title not recognised[/b]"


def _outputs(db: Database, report_id: int, *uids: str) -> None:
    with db.session() as s:
        for uid in uids:
            s.add(
                Output(
                    sop_instance_uid=uid,
                    series_instance_uid="1.2.9",
                    report_id=report_id,
                    kind="SR",
                    path=f"/data/{uid}.dcm",
                    created_at=utcnow(),
                )
            )


def test_each_result_says_where_it_went_and_why_it_did_not_arrive(db: Database) -> None:
    report_id = add_report(db, "1.2")
    _outputs(db, report_id, "1.2.9.1", "1.2.9.2")
    sends = [
        q.JobSpec(
            q.JobKind.SEND,
            f"{uid}>{peer}",
            5,
            group_key=peer,
            peer=peer,
            report_id=report_id,
            sop_instance_uid=uid,
        )
        for uid, peer in (("1.2.9.1", "PACS"), ("1.2.9.1", "ARCH"), ("1.2.9.2", "PACS"))
    ]
    with db.session() as s:
        q.enqueue(s, sends)
    with db.session() as s:  # ARCH refuses, once: retried later; PACS takes the SR
        for job in q.claim(s, q.JobKind.SEND, "w", 30, limit=10):
            if job.peer == "ARCH":
                q.fail(
                    s,
                    job,
                    "w",
                    REFUSAL,
                    RetryPolicy(5, 60, 600),
                )
            elif job.sop_instance_uid == "1.2.9.1":
                assert q.complete(s, job.id, "w")
    with db.session() as s:
        history = study_history(s, "1.2")
    assert history is not None and history.images == ()
    shown = {(x.output_uid, x.peer): x.sending for x in history.sends}
    assert shown[("1.2.9.1", "PACS")].state == "done"
    retrying = shown[("1.2.9.1", "ARCH")]
    assert retrying.state == "retrying"
    assert retrying.detail.startswith("attempt 2 of 5 at ")
    assert retrying.detail.endswith(f": {REFUSAL}")
    assert shown[("1.2.9.2", "PACS")].state == "running"
    console = Console(width=250, record=True)
    for table in render_history(history):
        console.print(table)
    assert REFUSAL in console.export_text()  # error text is never read as markup


def test_findings_are_named_by_the_models_card_when_it_is_at_hand(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "knee", name="knee", version="2.1.0", num_classes=5)
    (tmp_path / "broken").mkdir()  # a card that cannot be read leaves its findings unnamed
    (tmp_path / "broken" / "model.yaml").write_text("name: [")
    assert class_names(tmp_path) == {"knee 2.1.0": ("KL0", "KL1", "KL2", "KL3", "KL4")}
