"""Prometheus metrics (`metrics.port`, `dicomnode metrics`): the database's figures as the
queue, the images, the rounds and the destinations hold them; the database down is a figure."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from dicomnode.cards import keep_card
from dicomnode.cli import app
from dicomnode.config import MetricsSettings, Settings
from dicomnode.db.schema import Association, Job
from dicomnode.db.session import Database, db_now, utcnow
from dicomnode.errors import ConfigError
from dicomnode.metrics import exposition, start_metrics_server
from dicomnode.models.card import load_card
from dicomnode.status import node_status
from dicomnode.testing.peers import LOOPBACK, free_port
from dicomnode.testing.rows import (
    fill_known_state,
    instance_row,
    metrics_without_a_database,
    output_row,
    rejection_row,
    result_row,
    round_row,
    send_row,
)

ROOT = Path(__file__).parents[2]
Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _figures(text: bytes | str) -> Figures:
    """Each sample by its name and sorted labels, as Prometheus would parse the text."""
    decoded = text.decode() if isinstance(text, bytes) else text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(decoded)
        for sample in family.samples
    }


@pytest.mark.both_databases
def test_figures_are_the_databases(db: Database, settings: Settings) -> None:
    fill_known_state(db)
    text, database_up = exposition(db, settings)
    figures = _figures(text)
    assert database_up and figures[("dicomnode_database_up", ())] == 1

    def job(kind: str, state: str) -> float:
        return figures[("dicomnode_jobs", (("kind", kind), ("state", state)))]

    assert (job("infer", "queued"), job("send", "done"), job("send", "failed")) == (2, 1, 1)
    assert (job("send", "dead"), job("report", "queued")) == (1, 0)  # every series, zeros too
    due = figures[("dicomnode_jobs_oldest_due_age_seconds", (("kind", "infer"),))]
    assert 299 <= due < 400
    assert figures[("dicomnode_jobs_oldest_due_age_seconds", (("kind", "report"),))] == 0
    urgent = ("dicomnode_jobs_oldest_urgent_due_age_seconds", (("kind", "infer"),))
    assert figures[urgent] == 0  # the waiting analyses are routine
    with db.session() as s:
        s.execute(update(Job).where(Job.dedupe_key == "infer:0").values(priority=2))
    assert 299 <= _figures(exposition(db, settings)[0])[urgent] < 400

    def images(state: str) -> float:
        return figures[("dicomnode_images", (("state", state),))]

    assert (images("done"), images("skipped"), images("purged")) == (1, 1, 1)
    assert figures[("dicomnode_stored_bytes", ())] == 5  # the purged image's 7 are gone
    assert figures[("dicomnode_reports", (("model", "knee-kl"), ("state", "done")))] == 1

    def sends(peer: str, state: str) -> float:
        return figures[("dicomnode_sends", (("peer", peer), ("state", state)))]

    assert (sends("PACS", "done"), sends("PACS", "failed"), sends("ARCH", "dead")) == (1, 1, 1)
    now = utcnow().timestamp()
    for name, labels in (
        ("dicomnode_destination_last_delivery_timestamp_seconds", (("peer", "PACS"),)),
        ("dicomnode_last_report_timestamp_seconds", (("model", "knee-kl"),)),
        ("dicomnode_last_image_received_timestamp_seconds", ()),
    ):
        assert abs(figures[(name, labels)] - now) < 120, name  # UTC, not local time
    assert ("dicomnode_destination_last_delivery_timestamp_seconds", (("peer", "ARCH"),)) not in (
        figures
    )
    assert figures[("dicomnode_storage_min_free_bytes", ())] == settings.storage.min_free_mb * 2**20


def test_a_database_that_is_down_is_a_figure(tmp_path: Path) -> None:
    """No table to read: ``dicomnode_database_up 0``, the disk still measured, no queue
    figures (rather than zeros that look healthy)."""
    text, database_up = metrics_without_a_database(tmp_path)
    figures = _figures(text)
    assert not database_up and figures[("dicomnode_database_up", ())] == 0
    assert figures[("dicomnode_storage_free_bytes", ())] > 0
    assert not any(name == "dicomnode_jobs" for name, _ in figures)


def test_serves_get_metrics_until_stopped(db: Database, settings: Settings) -> None:
    fill_known_state(db)
    port = free_port()
    server = start_metrics_server(
        db, settings.model_copy(update={"metrics": MetricsSettings(port=port)})
    )
    assert server is not None and server.port == port
    url = f"http://{LOOPBACK}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain")
            figures = _figures(answer.read())
    finally:
        server.stop()
    assert figures[("dicomnode_sends", (("peer", "ARCH"), ("state", "dead")))] == 1
    assert figures[("process_resident_memory_bytes", ())] > 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_port_zero_is_off_and_a_taken_port_is_a_clear_error(
    db: Database, settings: Settings
) -> None:
    assert start_metrics_server(db, settings) is None  # metrics.port 0, the default
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = settings.model_copy(update={"metrics": MetricsSettings(port=port)})
        with pytest.raises(ConfigError, match=rf"metrics on 127\.0\.0\.1:{port}.*metrics\.port"):
            start_metrics_server(db, busy)


def test_cli_writes_a_textfile_and_fails_when_the_database_is_down(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """``dicomnode metrics --out FILE`` for node_exporter's textfile collector: the file is
    replaced whole (no partial file left beside it); exit status 1 with the database down."""
    fill_known_state(db)
    config = tmp_path / "node.yaml"
    config.write_text(
        f"storage: {{data_dir: {settings.storage.data_dir}}}\n"
        f"database: {{url: '{settings.database.url}'}}\n"
    )
    out = tmp_path / "prom" / "dicomnode.prom"
    out.parent.mkdir()
    out.write_text("stale\n")
    runner = CliRunner()
    result = runner.invoke(app, ["metrics", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        _figures(out.read_text())[("dicomnode_sends", (("peer", "PACS"), ("state", "done")))] == 1
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["dicomnode.prom"]
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path}/none/x.db'}}\n")
    down = runner.invoke(app, ["metrics", "--config", str(config)])
    assert down.exit_code == 1
    assert _figures(down.stdout)[("dicomnode_database_up", ())] == 0


@pytest.mark.both_databases
def test_turnaround_figures_are_the_status_ones(db: Database, settings: Settings) -> None:
    """The quantiles that ``dicomnode status`` shows (tested there), under their labels."""
    with db.session() as s:
        start = db_now(s) - timedelta(minutes=10)
    for key, seconds in (("1", 12.0), ("2", 30.0), ("3", 45.0)):
        round_id = round_row(db, key, image_at=start, made_at=start + timedelta(seconds=5))
        send_row(db, round_id, f"sr{key}>PACS", done_at=start + timedelta(seconds=seconds))
    figures = _figures(exposition(db, settings)[0])

    def quantile(q: str) -> float:
        return figures[("dicomnode_turnaround_last_hour_seconds", (("quantile", q),))]

    assert figures[("dicomnode_turnaround_last_hour_rounds", ())] == 3
    assert (quantile("0.5"), quantile("0.95"), quantile("1")) == (30, 45, 45)


def test_a_scrape_neither_waits_for_nor_holds_up_a_writer(db: Database, settings: Settings) -> None:
    """SQLite: a scrape reads without the write lock (WAL), so a C-STORE's commit that
    holds it does not make the scrape wait its busy timeout (30 s) and fail, and a writer
    can start while a scrape reads."""
    fill_known_state(db)
    with db.session() as writing:  # BEGIN IMMEDIATE: the write lock, held until the end
        writing.add(Association(id="a2", calling_ae="MOD", receiver="n", started_at=utcnow()))
        writing.flush()
        started = time.monotonic()
        text, database_up = exposition(db, settings)
        assert database_up and time.monotonic() - started < 10
    assert _figures(text)[("dicomnode_images", (("state", "done"),))] == 1
    with db.reading() as reading:
        reading.execute(select(func.count()).select_from(Job)).scalar_one()
        with db.session() as writer:  # would wait 30 s behind a reader holding the lock
            writer.add(Association(id="a3", calling_ae="MOD", receiver="n", started_at=utcnow()))


@pytest.mark.both_databases
def test_rejections_are_counted_by_title_and_the_nodes_own_results_by_model(
    db: Database, settings: Settings
) -> None:
    """A reader who hides an AI result in the PACS sends the node a rejection note that lists
    it: a figure worth watching beside the images withdrawn."""
    made = round_row(db, "7", image_at=utcnow(), made_at=utcnow())
    with db.session() as s:
        s.add(output_row("9.1", made, "SR"))
        for uid, code in (("1.1", "113037"), ("1.2", "113037"), ("1.3", "113001")):
            s.add(rejection_row(uid, "1.2.7", code))
        s.add(rejection_row("9.1", "1.2.7", "113001"))  # the node's SR, hidden by a reader
    figures = _figures(exposition(db, settings)[0])
    assert figures[("dicomnode_rejected_images", (("code", "113037"),))] == 2
    assert figures[("dicomnode_rejected_images", (("code", "113001"),))] == 1  # not the SR
    assert figures[("dicomnode_rejected_results", (("model", "knee-kl"),))] == 1
    assert figures[("dicomnode_rejected_images", (("code", "113039"),))] == 0  # zeros too


@pytest.mark.both_databases
def test_what_the_models_found_in_the_last_day(db: Database, settings: Settings) -> None:
    """The last day's rounds: knee-kl 2 (its card kept, so its classes are named) graded a
    bilateral film KL2 and KL4 (that joint's localisation uncertain), another film KL2, and
    could not assess a third image; a model without a kept card is named by class index.
    A round reported two days ago does not count."""
    card = load_card(ROOT / "models" / "knee-kl").model_copy(update={"version": "2"})
    with db.session() as s:
        keep_card(s, card)
    today = round_row(db, "1", image_at=utcnow(), made_at=utcnow())
    earlier = utcnow() - timedelta(days=2)
    old = round_row(db, "2", image_at=earlier, made_at=earlier)
    with db.session() as s:
        s.add_all([instance_row(uid, "a1", report_id=today) for uid in ("1.8.1", "1.8.2")])
        s.flush()
        s.add_all(
            [
                result_row("1.9.1", today, "knee-kl", "2", (2, False), (4, True)),
                result_row("1.8.1", today, "knee-kl", "2", (2, False)),
                result_row("1.8.2", today, "knee-kl", "2"),
                result_row("1.9.2", old, "knee-kl", "2", (0, False)),
                result_row("1.8.1", today, "hand-ra", "9", (1, False)),
            ]
        )
        odd = result_row("1.8.2", today, "hand-ra", "9", (0, False))
        odd.findings = [{"class": 0}]  # not as the worker writes findings: left out
        s.add(odd)
    figures = _figures(exposition(db, settings)[0])

    def found(model: str, version: str, name: str) -> float:
        labels = (("class", name), ("model", model), ("version", version))
        return figures[("dicomnode_findings_last_day", labels)]

    knee = [found("knee-kl", "2", f"KL{grade}") for grade in range(5)]
    assert knee == [0, 0, 2, 0, 1]  # every class, zeros too; not the round of two days ago
    assert found("hand-ra", "9", "1") == 1
    per_version = (("model", "knee-kl"), ("version", "2"))
    assert figures[("dicomnode_findings_uncertain_last_day", per_version)] == 1
    assert figures[("dicomnode_images_not_assessed_last_day", per_version)] == 1
    with db.reading() as s:
        status = node_status(s)
    (hand, knee_row) = status.findings
    assert (knee_row.findings, knee_row.uncertain, knee_row.not_assessed) == (3, 1, 1)
    assert hand.classes == (("1", 1),)  # no card kept: the classes it found, by index
