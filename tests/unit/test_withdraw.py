"""`dicomnode withdraw`: what a withdrawal lists (by study and model version, only what was
sent), when it is refused, the rounds it closes, and where its note goes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import Settings
from dicomnode.db.schema import Job, Output, Report
from dicomnode.db.session import Database, utcnow
from dicomnode.queue import jobs as q
from dicomnode.testing.images import make_radiograph, make_rejection_note
from dicomnode.testing.rows import output_row
from dicomnode.withdraw import (
    WithdrawError,
    Withdrawn,
    last_withdrawal,
    targets,
    withdraw,
    withdraw_in_batches,
)
from dicomnode.worker import _peers_of

pytestmark = pytest.mark.both_databases


def _round(db: Database, study: str, version: str, sequence: int = 1, state: str = "done") -> int:
    with db.session() as s:
        report = Report(
            study_instance_uid=study,
            model_name="knee-kl",
            model_version=version,
            sequence=sequence,
            calling_ae="MOD",
            state=state,
            created_at=utcnow(),
        )
        s.add(report)
        s.flush()
        return report.id


def _sent(db: Database, report_id: int, uid: str, kind: str = "SC", peer: str = "PACS") -> None:
    with db.session() as s:
        if s.get(Output, uid) is None:
            s.add(output_row(uid, report_id, kind))
        spec = q.JobSpec(q.JobKind.SEND, f"{uid}>{peer}", 5, sop_instance_uid=uid, peer=peer)
        q.enqueue(s, [spec])


def _report_job(db: Database, report_id: int, state: str) -> None:
    with db.session() as s:
        q.enqueue(s, [q.JobSpec(q.JobKind.REPORT, f"report:{report_id}", 5, report_id=report_id)])
        job = s.execute(select(Job).where(Job.report_id == report_id)).scalar_one()
        job.state = state


def test_a_recall_lists_every_study_the_version_sent_results_of(
    db: Database, settings: Settings
) -> None:
    first = _round(db, "1.2.1", "2")
    _sent(db, first, "5.1")
    _sent(db, first, "5.2", kind="SR")
    _sent(db, _round(db, "1.2.2", "2"), "5.3")
    _sent(db, _round(db, "1.2.3", "3"), "5.4")  # another version
    _round(db, "1.2.4", "2")  # nothing sent (kept here, or no destination)
    with db.session() as s:
        found = targets(s, [], "knee-kl", "2")
        assert [(t.study_instance_uid, t.sent, t.busy) for t in found] == [
            ("1.2.1", 2, False),
            ("1.2.2", 1, False),
        ]
        assert [t.model_version for t in targets(s, ["1.2.3"])] == ["3"]
        made = withdraw(s, found, "113037", "field safety notice 7", settings)
    with db.session() as s:
        rounds = [s.get(Report, w.round_id) for w in made]
        jobs = s.execute(select(Job.report_id).where(Job.kind == "report")).scalars().all()
        assert [(r.study_instance_uid, r.sequence, r.state) for r in rounds if r] == [
            ("1.2.1", 2, "pending"),
            ("1.2.2", 2, "pending"),
        ]
        assert {(r.withdrawal_code, r.withdrawal_note) for r in rounds if r} == {
            ("113037", "field safety notice 7")
        }
        # the worker reports each: a note
        assert sorted(j for j in jobs if j) == sorted(w.round_id for w in made)
    said = "knee-kl 2 results withdrawn, Rejected for Patient Safety Reasons: field safety notice 7"
    assert [(w.target.paths, w.description) for w in made] == [
        (("/results/5.1.dcm", "/results/5.2.dcm"), said),
        (("/results/5.3.dcm",), said),
    ]
    with db.session() as s:  # their notes are not made yet: what they list is not again
        assert targets(s, [], "knee-kl", "2") == []
    later = _round(db, "1.2.1", "2", sequence=3)
    _sent(db, later, "5.5")  # an image after the withdrawal: its own result is listed
    with db.session() as s:
        report = s.get(Report, later)
        assert report is not None and last_withdrawal(s, report) == 2
        (again,) = targets(s, ["1.2.1"])
        assert again.paths == ("/results/5.5.dcm",) and again.last_round == later


def test_a_study_being_analysed_or_with_nothing_sent_is_refused(
    db: Database, settings: Settings
) -> None:
    _round(db, "1.2.1", "2", state="open")
    waiting = _round(db, "1.2.2", "2", state="pending")
    _report_job(db, waiting, "queued")
    dead = _round(db, "1.2.3", "2", state="pending")  # its report died: nothing holds it
    _report_job(db, dead, "dead")
    _sent(db, _round(db, "1.2.3", "2", sequence=2), "5.1")
    with db.session() as s:
        found = {t.study_instance_uid: t for t in targets(s, [], "knee-kl", "2")}
        assert {k: t.busy for k, t in found.items()} == {
            "1.2.1": True,
            "1.2.2": True,
            "1.2.3": False,
        }
        with pytest.raises(WithdrawError, match="2 study"):
            withdraw(s, list(found.values()), "113001", "", settings)
        with pytest.raises(WithdrawError, match="not the title"):
            withdraw(s, [found["1.2.3"]], "113000", "", settings)
        assert withdraw(s, [found["1.2.3"]], "113001", "", settings)
    with db.session() as s:
        assert targets(s, ["1.2.9"]) == []


def test_a_rejection_note_goes_to_every_peer_that_was_sent_what_it_lists(
    db: Database, tmp_path: Path
) -> None:
    overlay = make_radiograph(body_part="KNEE", seed=2)
    note = make_rejection_note([overlay], "113001")
    path = tmp_path / "ko.dcm"
    note.save_as(path, enforce_file_format=True)
    report = _round(db, "1.2.1", "2")
    _sent(db, report, str(overlay.SOPInstanceUID))
    _sent(db, report, str(overlay.SOPInstanceUID), peer="ARCHIVE")  # a resend
    with db.session() as s:
        ko = output_row(str(note.SOPInstanceUID), report, "KO")
        ko.path = str(path)
        sc = output_row("5.9", report, "SC")
        assert _peers_of(s, ko, ["PACS"]) == ["PACS", "ARCHIVE"]
        assert _peers_of(s, sc, ["PACS"]) == ["PACS"]


def test_a_recall_is_withdrawn_in_batches_and_leaves_out_a_study_that_became_busy(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch committed by itself (the audit trail hears of it then); a study whose
    analysis began after the list was read is left out and named, the rest withdrawn; the
    recall ordered again goes on with it alone."""
    monkeypatch.setattr("dicomnode.withdraw.BATCH", 2)
    for i in range(5):
        _sent(db, _round(db, f"1.2.{i}", "2"), f"5.{i}")
    _sent(db, _round(db, "1.2.0", "3", sequence=2), "6.0")  # another version of a listed study
    with db.reading() as s:
        listed = targets(s, [], "knee-kl", "2")
    assert len(listed) == 5 and not any(t.busy for t in listed)
    batches: list[list[str]] = []

    def committed(made: list[Withdrawn]) -> None:
        batches.append([w.target.study_instance_uid for w in made])
        if len(batches) == 1:  # an image of study 1.2.4 arrives while the recall runs
            _round(db, "1.2.4", "2", sequence=2, state="open")

    done = withdraw_in_batches(db, listed, "113037", "notice 9", settings, committed)
    assert batches == [["1.2.0", "1.2.1"], ["1.2.2", "1.2.3"], []]
    assert done.late == ("1.2.4",) and len(done.made) == 4
    with db.session() as s:
        versions = s.execute(
            select(Report.model_version).where(Report.withdrawal_code != "")
        ).scalars()
        assert set(versions) == {"2"}  # 1.2.0's version 3 was not in the recall
        (waiting,) = targets(s, [], "knee-kl", "2")  # a withdrawal waiting for its note is
        assert waiting.study_instance_uid == "1.2.4" and waiting.busy  # no analysis
        s.execute(update(Report).where(Report.state == "open").values(state="done"))
    with db.reading() as s:
        listed = targets(s, [], "knee-kl", "2")
    again = withdraw_in_batches(db, listed, "113037", "notice 9", settings)
    assert [w.target.study_instance_uid for w in again.made] == ["1.2.4"] and not again.late
    with pytest.raises(WithdrawError, match="nothing was sent"):
        withdraw_in_batches(db, [replace(again.made[0].target, paths=())], "113037", "", settings)


def test_the_command_lists_refuses_and_withdraws(
    db: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sent(db, _round(db, "1.2.1", "2"), "5.1")
    config = tmp_path / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "storage": {"data_dir": str(settings.storage.data_dir)},
                "database": {"url": settings.database.url},
            }
        ),
        encoding="utf-8",
    )
    run = CliRunner().invoke
    base = ["withdraw", "--config", str(config)]
    assert run(app, base).exit_code == 2  # neither studies nor --model --version
    assert run(app, [*base, "1.2.1", "--title", "bad"]).exit_code == 2
    assert run(app, [*base, "1.2.9", "--yes"]).exit_code == 1  # nothing sent there
    listed = run(app, [*base, "--model", "knee-kl", "--version", "2", "--dry-run"])
    assert listed.exit_code == 0 and "1.2.1" in listed.stdout and "to withdraw" in listed.stdout
    monkeypatch.setattr("dicomnode.cli.LISTED", 0)  # a recall of thousands: a count
    counted = run(app, [*base, "--model", "knee-kl", "--version", "2", "--dry-run"])
    assert "1.2.1" not in counted.stdout
    assert "and 1 more: 1 study(ies) and model versions, 1 result objects, 0 being analysed" in (
        counted.stdout
    )
    with db.session() as s:
        assert s.execute(select(Report).where(Report.withdrawal_code != "")).first() is None
    done = run(app, [*base, "1.2.1", "--title", "safety", "--reason", "wrong model", "--yes"])
    assert done.exit_code == 0, done.output
    with db.session() as s:
        (code,) = s.execute(select(Report.withdrawal_code).where(Report.sequence == 2)).one()
    assert code == "113037"
