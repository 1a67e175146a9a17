"""`dicomnode status`: an admin sees per destination what waits, retries (and why) and died."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console
from sqlalchemy import update

from dicomnode.db.schema import Job
from dicomnode.db.session import Database, db_now
from dicomnode.queue import jobs as q
from dicomnode.queue.retry import RetryPolicy
from dicomnode.status import TurnaroundState, node_status, render_status, turnaround
from dicomnode.testing.rows import instance_row, round_row, send_row
from dicomnode.values import Priority

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


def _render(db: Database) -> str:
    console = Console(width=250, record=True)
    with db.session() as s:
        state = node_status(s)
    for table in render_status(state):
        console.print(table)
    return console.export_text()


def _sends_retrying_and_dead(db: Database) -> None:
    """Three sends to PACS (one failed, retrying) and one to ARCH, dead."""
    specs = [
        q.JobSpec(q.JobKind.SEND, f"{i}>PACS", 5, group_key="PACS", peer="PACS") for i in range(3)
    ]
    with db.session() as s:
        q.enqueue(
            s, [*specs, q.JobSpec(q.JobKind.SEND, "9>ARCH", 1, group_key="ARCH", peer="ARCH")]
        )
    with db.session() as s:
        (job,) = q.claim(s, q.JobKind.SEND, "w", 30, group_key="PACS")
        q.fail(s, job, "w", "no association with PACS", RetryPolicy(5, 60, 600))
        (dead,) = q.claim(s, q.JobKind.SEND, "w", 30, group_key="ARCH")
        q.fail(s, dead, "w", "peer returned status 0xA700", RetryPolicy(1, 1, 1))


def test_destinations_show_waiting_retrying_with_the_reason_and_dead(db: Database) -> None:
    _sends_retrying_and_dead(db)
    text = _render(db)
    assert "Destinations (result sends)" in text
    pacs = next(line for line in text.splitlines() if line.strip("│ ").startswith("PACS"))
    assert "no association with PACS" in pacs and "never" in pacs
    assert [cell.strip() for cell in pacs.split("│")[1:4]] == ["PACS", "2", "1"]
    arch = next(line for line in text.splitlines() if line.strip("│ ").startswith("ARCH"))
    assert [cell.strip() for cell in arch.split("│")[1:4]] == ["ARCH", "0", "0"]
    assert "peer returned status 0xA700" in text  # in the dead jobs table


def test_a_destination_shows_the_rounds_awaiting_its_storage_commitment(db: Database) -> None:
    """A commit job queued or waiting for the report counts; a done one does not."""
    _sends_retrying_and_dead(db)
    with db.session() as s:
        q.enqueue(
            s,
            [
                q.JobSpec(q.JobKind.COMMIT, f"commit:{n}>PACS", 5, group_key="PACS", peer="PACS")
                for n in range(3)
            ],
        )
        s.execute(
            update(Job).where(Job.dedupe_key == "commit:2>PACS").values(state=q.JobState.DONE)
        )
    with db.session() as s:
        state = node_status(s)
    assert {d.peer: d.awaiting_commitment for d in state.destinations} == {"ARCH": 0, "PACS": 2}
    pacs = next(line for line in _render(db).splitlines() if line.strip("│ ").startswith("PACS"))
    assert pacs.split("│")[-2].strip() == "2 round(s)"


def test_status_as_json_holds_what_the_tables_show(db: Database) -> None:
    """`dicomnode status --json`: the same figures as numbers and ISO 8601 times."""
    from dicomnode.cli import _iso

    _sends_retrying_and_dead(db)
    with db.session() as s:
        state = node_status(s)
    data = json.loads(json.dumps(asdict(state), default=_iso))
    assert data["jobs"] == {"send": {"dead": 1, "failed": 1, "queued": 2}}
    arch, pacs = data["destinations"]
    assert (pacs["peer"], pacs["waiting"], pacs["retrying"], pacs["dead"]) == ("PACS", 2, 1, 0)
    assert (arch["peer"], arch["waiting"], arch["retrying"], arch["dead"]) == ("ARCH", 0, 0, 1)
    assert pacs["last_error"] == "no association with PACS" and pacs["last_delivered"] is None
    next_attempt = datetime.fromisoformat(pacs["next_attempt"])  # UTC, and says so
    assert next_attempt.utcoffset() == timedelta(0) and next_attempt > datetime.now(UTC)
    assert data["dead_total"] == 1
    assert [(d["kind"], d["attempts"], d["reason"]) for d in data["dead"]] == [
        ("send", 1, "peer returned status 0xA700")
    ]
    assert data["dead"][0]["target"].endswith(" -> ARCH")
    assert data["studies"] == [] and data["skipped"] == [] and data["storage"] is None
    assert data["turnaround"] == {
        "rounds": 0,
        "median_seconds": 0,
        "p95_seconds": 0,
        "longest_seconds": 0,
    }


def test_urgent_work_waiting_is_counted_by_kind_and_shown_only_when_there_is_some(
    db: Database,
) -> None:
    _sends_retrying_and_dead(db)  # routine work: no table of urgent work
    assert "Urgent work waiting" not in _render(db)
    with db.session() as s:
        assert node_status(s).urgent_waiting == {}
        urgent = [
            q.JobSpec(q.JobKind.INFER, f"infer:{n}", 3, group_key="m:1", priority=Priority.HIGH)
            for n in range(3)
        ]
        q.enqueue(s, urgent)
        s.execute(update(Job).where(Job.dedupe_key == "infer:2").values(state=q.JobState.DONE))
        s.execute(
            update(Job).where(Job.dedupe_key == "0>PACS").values(priority=Priority.HIGH)
        )  # a failed send of an urgent study, waiting to be tried again
    with db.session() as s:
        assert node_status(s).urgent_waiting == {"infer": 2, "send": 1}
    shown = _render(db)
    assert "Urgent work waiting (claimed first)" in shown
    table = shown.split("Urgent work waiting (claimed first)")[1]
    infer = next(line for line in table.splitlines() if line.strip("│ ").startswith("infer "))
    assert [cell.strip() for cell in infer.split("│")[1:3]] == ["infer", "2"]


def test_where_each_models_results_go(db: Database) -> None:
    """The routes as `serve` applies them: a route, shadow mode, and every other model."""
    from dicomnode.config import ResultsSettings
    from dicomnode.status import RouteState

    routed = ResultsSettings(
        destinations=("PACS",), routes={"knee-kl": ("PACS", "ORTHO"), "hand-ra": ()}
    )
    with db.session() as s:
        state = node_status(s, results=routed)
        bare = node_status(s, results=ResultsSettings())
    assert state.routing == (
        RouteState("hand-ra", (), "shadow"),
        RouteState("knee-kl", ("PACS", "ORTHO"), "route"),
        RouteState("*", ("PACS",), "destinations"),
    )
    assert bare.routing == (RouteState("*", (), "caller"),)
    console = Console(width=250, record=True)
    for table in render_status(state):
        console.print(table)
    lines = console.export_text().splitlines()

    def row(model: str) -> list[str]:
        line = next(line for line in lines if line.strip("│ ").startswith(model))
        return [cell.strip() for cell in line.split("│")[1:4]]

    assert row("hand-ra") == ["hand-ra", "none: kept here (shadow mode)", "results.routes"]
    assert row("knee-kl") == ["knee-kl", "PACS, ORTHO", "results.routes"]
    assert row("every other model") == ["every other model", "PACS", "results.destinations"]
    assert json.loads(json.dumps(asdict(bare)))["routing"] == [
        {"model": "*", "peers": [], "rule": "caller"}
    ]


def test_text_from_headers_and_errors_is_printed_as_it_is_never_as_markup(db: Database) -> None:
    """A skip reason quotes the header's Body Part Examined, and job errors quote peers:
    rich must not read ``[/]`` or ``[bold]`` in them as markup (it raised, and hid status)."""
    from datetime import UTC, datetime

    from dicomnode.db.schema import Association

    now = datetime.now(UTC).replace(tzinfo=None)
    with db.session() as s:
        s.add(Association(id="a1", calling_ae="MOD", started_at=now))
        s.add(
            instance_row(
                "1.2.3.4",
                "a1",
                received_at=now,
                state="skipped",
                reason="body part '[/]' is not routed to a model",
            )
        )
        q.enqueue(s, [q.JobSpec(q.JobKind.SEND, "1>PACS", 5, group_key="PACS", peer="PACS")])
    with db.session() as s:
        (job,) = q.claim(s, q.JobKind.SEND, "w", 30, group_key="PACS")
        q.fail(s, job, "w", "peer said [bold]no[/bold] [/]", RetryPolicy(5, 60, 600))
    text = _render(db)
    assert "body part '[/]' is not routed to a model" in text
    assert "peer said [bold]no[/bold] [/]" in text


def test_a_study_whose_analysis_or_report_died_shows_dead_not_waiting(db: Database) -> None:
    """An image whose analysis died stayed `queued`, and a round whose report died
    `pending`: the study looked as if it were still being worked on."""
    from datetime import UTC, datetime

    from dicomnode.db.schema import Association
    from dicomnode.testing.queue import add_report

    now = datetime.now(UTC).replace(tzinfo=None)
    report_id = add_report(db, "1.2.3")
    with db.session() as s:
        s.add(Association(id="a1", calling_ae="MOD", started_at=now))
        for uid in ("1.2.3.4", "1.2.3.5"):
            s.add(instance_row(uid, "a1", received_at=now, state="queued", report_id=report_id))
        q.enqueue(
            s,
            [
                q.JobSpec(
                    q.JobKind.INFER, f"{uid}:m:1", 1, report_id=report_id, sop_instance_uid=uid
                )
                for uid in ("1.2.3.4", "1.2.3.5")
            ]
            + [q.JobSpec(q.JobKind.REPORT, "r", 1, report_id=report_id)],
        )
    with db.session() as s:
        job = next(
            j
            for j in q.claim(s, q.JobKind.INFER, "w", 30, limit=8)
            if j.sop_instance_uid == "1.2.3.4"
        )
        q.fail(s, job, "w", "cannot decode", RetryPolicy(1, 1, 1))
    study = next(line for line in _render(db).splitlines() if "1.2.3 " in line)
    assert "dead=1" in study and "queued=1" in study
    assert "m#1:pending" in study
    with db.session() as s:
        s.execute(update(Job).where(Job.kind == q.JobKind.REPORT).values(state=q.JobState.DEAD))
    study = next(line for line in _render(db).splitlines() if "1.2.3 " in line)
    assert "m#1:dead" in study


def test_turnaround_is_from_the_last_image_to_the_last_delivery(db: Database) -> None:
    """Over the rounds whose results arrived in the last hour: delivered 40 s after the
    image; kept here (no sends), its SR made 10 s after; reported 70 minutes ago but held up
    by a PACS outage, delivered 5 minutes ago (65 minutes). Left out: one whose SR is still
    to be sent, and one delivered two hours ago."""
    with db.session() as s:
        now = db_now(s)
    t = now - timedelta(minutes=10)
    delivered = round_row(db, "1", image_at=t, made_at=t + timedelta(seconds=30))
    send_row(db, delivered, "sc>PACS", done_at=t + timedelta(seconds=35))
    send_row(db, delivered, "sr>PACS", done_at=t + timedelta(seconds=40))
    kept = round_row(db, "2", image_at=t, made_at=t + timedelta(seconds=10))
    with db.session() as s:  # its analysis and report jobs: no send among them
        q.enqueue(s, [q.JobSpec(q.JobKind.REPORT, "report:kept", 1, report_id=kept)])
        s.execute(update(Job).where(Job.report_id == kept).values(state=q.JobState.DONE))
    sending = round_row(db, "3", image_at=t, made_at=t + timedelta(seconds=5))
    send_row(db, sending, "sc3>PACS", done_at=t + timedelta(seconds=6))  # its SR not yet
    send_row(db, sending, "sr3>PACS", done_at=None)
    old = now - timedelta(hours=2)
    send_row(db, round_row(db, "4", image_at=old, made_at=old), "sr4>PACS", done_at=old)
    outage = now - timedelta(minutes=70)
    held_up = round_row(db, "5", image_at=outage, made_at=outage + timedelta(seconds=9))
    send_row(db, held_up, "sr5>PACS", done_at=now - timedelta(minutes=5))
    with db.session() as s:
        assert turnaround(s) == TurnaroundState(3, 40, 3900, 3900)
    row = next(line for line in _render(db).splitlines() if "40.0 s" in line)
    cells = [cell.strip() for cell in row.split("│")[1:5]]
    assert cells == ["3", "40.0 s", "3,900.0 s", "3,900.0 s"]


def test_turnaround_of_no_round_says_so(db: Database) -> None:
    with db.session() as s:
        assert turnaround(s) == TurnaroundState(0, 0, 0, 0)
    assert "no results arrived" in _render(db)
