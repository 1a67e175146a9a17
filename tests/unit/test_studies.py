"""Body-part routing rules, and the rounds the scheduler opens and closes."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from threading import Event, Thread, current_thread

import pytest
from sqlalchemy import select

from dicomnode import studies
from dicomnode.config import RoutingSettings, Settings
from dicomnode.db.schema import Association, Instance, Job, Report
from dicomnode.db.session import Database, utcnow
from dicomnode.models.registry import ModelRegistry
from dicomnode.studies import OPEN, queue_new_instances, ready_rounds, route, schedule_ready
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.node import make_settings
from dicomnode.testing.rows import instance_row
from dicomnode.values import BodyPart

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
RULES = RoutingSettings()


@pytest.mark.parametrize(
    ("body_part", "descriptions", "expected"),
    [
        ("KNEE", "", BodyPart.KNEE),
        ("HAND", "", BodyPart.HAND),
        ("LSPINE", "", BodyPart.SPINE),
        ("CSPINE", "", BodyPart.SPINE),
        ("TSPINE", "", BodyPart.SPINE),
        ("", "XR KNEE BOTH AP", BodyPart.KNEE),
        ("", "Hand PA | right", BodyPart.HAND),
        ("", "lumbar spine lat", BodyPart.SPINE),
        ("EXTREMITY", "knee standing", BodyPart.KNEE),
    ],
)
def test_body_part_from_tag_or_descriptions(
    body_part: str, descriptions: str, expected: BodyPart
) -> None:
    assert route(DX, "DX", body_part, descriptions, RULES).body_part is expected


def test_keyword_must_be_a_whole_word() -> None:
    decision = route(DX, "DX", "", "KNEECAP PROTOCOL XYZ", RULES)
    assert decision.body_part is None and "unknown body part" in decision.reason


def test_unknown_body_part_and_modality_and_sop_class_give_reasons() -> None:
    assert "unknown body part" in route(DX, "DX", "CHEST", "", RULES).reason
    assert "modality MG" in route(DX, "MG", "KNEE", "", RULES).reason
    assert "not a radiograph SOP class" in route(CT, "CT", "KNEE", "", RULES).reason


def test_a_dx_for_processing_image_is_not_analysed_its_for_presentation_twin_is() -> None:
    """The raw detector image looks nothing like the images the models learnt from."""
    raw = route("1.2.840.10008.5.1.4.1.1.1.1.1", "DX", "KNEE", "", RULES)
    assert raw.body_part is None and "For Processing" in raw.reason
    assert route(DX, "DX", "KNEE", "", RULES).body_part is BodyPart.KNEE


def test_rules_are_configurable() -> None:
    rules = RoutingSettings(modalities=("CR",), body_part_aliases={"KNEE": ("KNIE",)})
    assert route(CR, "CR", "KNIE", "", rules).body_part is BodyPart.KNEE
    assert route(CR, "CR", "KNEE", "", rules).body_part is None
    assert route(DX, "DX", "KNIE", "", rules).body_part is None


# --- rounds: inference at once, the report when the study settles --------------------------


@pytest.fixture
def registry(settings: Settings) -> ModelRegistry:
    make_tiny_model(Path(settings.models.dir) / "tiny-knee", num_classes=5)
    return ModelRegistry.load(settings.models.dir)


def _association(db: Database, released: bool) -> str:
    with db.session() as session:
        association = Association(
            id=str(uuid.uuid4()),
            calling_ae="MOD",
            started_at=utcnow(),
            released_at=utcnow() if released else None,
        )
        session.add(association)
        return association.id


def _store(db: Database, association: str, sop: str, ago: float, body_part: str = "KNEE") -> None:
    with db.session() as session:
        session.add(
            instance_row(
                sop,
                association,
                modality="DX",
                body_part=body_part,
                received_at=utcnow() - timedelta(seconds=ago),
            )
        )


def _release(db: Database, association: str) -> None:
    with db.session() as session:
        row = session.get(Association, association)
        assert row is not None
        row.released_at = utcnow()


def _jobs(db: Database) -> list[tuple[str, str | None, int | None]]:
    with db.session() as session:
        rows = session.execute(
            select(Job.kind, Job.sop_instance_uid, Job.report_id).order_by(Job.id)
        )
        return [(str(kind), sop, report) for kind, sop, report in rows]


def test_images_are_queued_at_once_and_the_round_closes_when_the_study_settles(
    db: Database, registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A settle time no loaded machine outlasts between two statements; the scheduler's
    # clock is moved past it instead of waiting (same database and models: same tmp_path).
    settings = make_settings(tmp_path, study={"settle_seconds": 60})
    settle = settings.study.settle_seconds
    sending = _association(db, released=False)
    _store(db, sending, "1.2.3.1.1", ago=10 * settle)
    _store(db, sending, "1.2.3.1.2", ago=10 * settle, body_part="CHEST")
    assert schedule_ready(db, settings, registry) == []  # the association is still open
    assert _jobs(db) == [("infer", "1.2.3.1.1", 1)]
    with db.session() as session:
        states = dict(session.execute(select(Instance.sop_instance_uid, Instance.state)).all())
        assert states == {"1.2.3.1.1": "queued", "1.2.3.1.2": "skipped"}
        assert session.execute(select(Report.state)).scalar_one() == OPEN
    # A later image of the same association joins the open round.
    _store(db, sending, "1.2.3.1.3", ago=0.0)
    _release(db, sending)
    assert schedule_ready(db, settings, registry) == []  # released, but not quiet long enough
    assert [job[2] for job in _jobs(db)] == [1, 1]
    later = utcnow() + timedelta(seconds=settle + 1)
    monkeypatch.setattr(studies, "db_now", lambda session: later)
    assert schedule_ready(db, settings, registry) == [1]
    assert _jobs(db)[-1] == ("report", None, 1)
    # An image after the round closed opens the next one (its SR supersedes the first).
    _store(db, _association(db, released=True), "1.2.3.1.4", ago=10 * settle)
    assert schedule_ready(db, settings, registry) == [2]
    with db.session() as session:
        rounds = session.execute(select(Report.sequence, Report.state).order_by(Report.id)).all()
    assert [tuple(r) for r in rounds] == [(1, "pending"), (2, "pending")]


def test_a_study_with_an_image_not_yet_routed_keeps_its_round_open(
    db: Database, settings: Settings, registry: ModelRegistry
) -> None:
    _store(db, _association(db, released=True), "1.2.3.1.1", ago=100.0)
    with db.session() as session:
        queue_new_instances(session, "1.2.3", settings, registry)
    # Stored after the pass routed the new images, before it looked for ready rounds.
    _store(db, _association(db, released=True), "1.2.3.1.2", ago=100.0)
    with db.session() as session:
        assert ready_rounds(session, settings.study.settle_seconds) == []
        queue_new_instances(session, "1.2.3", settings, registry)
    with db.session() as session:
        assert ready_rounds(session, settings.study.settle_seconds) == [1]


def test_a_new_model_versions_sr_replaces_no_sr_of_the_old_version(
    db: Database, tmp_path: Path
) -> None:
    """After an upgrade the new version's SR lists only its own results: no predecessor."""
    from pydicom import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomnode.db.schema import Output
    from dicomnode.worker import _predecessor

    def report(version: str, sequence: int, with_sr: bool) -> Report:
        with db.session() as s:
            row = Report(
                study_instance_uid="1.2",
                model_name="knee-kl",
                model_version=version,
                sequence=sequence,
                calling_ae="MOD",
                state="done",
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            if with_sr:
                sr = Dataset()
                sr.SOPInstanceUID = f"1.2.9.{sequence}"
                sr.file_meta = FileMetaDataset()
                sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                path = tmp_path / f"sr{sequence}.dcm"
                sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
                sr.save_as(path, enforce_file_format=True)
                s.add(
                    Output(
                        sop_instance_uid=sr.SOPInstanceUID,
                        series_instance_uid="1.2.9",
                        report_id=row.id,
                        kind="SR",
                        path=str(path),
                        created_at=utcnow(),
                    )
                )
            s.expunge(row)
            return row

    report("2.0.1", 1, with_sr=True)
    upgraded = report("2.0.2", 2, with_sr=True)
    follow_up = report("2.0.2", 3, with_sr=False)
    with db.session() as s:
        assert _predecessor(s, upgraded) is None
        previous = _predecessor(s, follow_up)
    assert previous is not None and previous.SOPInstanceUID == "1.2.9.2"


def _paused_in_thread_b(monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[Event, Event]:
    """``studies.<name>`` waits, in the thread named B, until A has finished (or 2 s: A
    cannot finish while B holds the study); returns (B is waiting, A has finished)."""
    waiting, finished = Event(), Event()
    original = getattr(studies, name)

    def paused(*args: object) -> object:
        if current_thread().name == "B":
            waiting.set()
            finished.wait(2)
        return original(*args)

    monkeypatch.setattr(studies, name, paused)
    return waiting, finished


def test_two_nodes_scheduling_one_study_at_once_open_one_round(
    db: Database, settings: Settings, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``serve`` nodes on one database route the same new image at the same moment.
    Node B has found no open round and is numbering a new one when node A tries to route
    the image: A must wait for B (on PostgreSQL both opened a round, and the image left
    the round that held its inference job, so its overlay was never sent)."""
    _store(db, _association(db, released=True), "1.2.3.1.1", ago=100.0)
    b_waiting, a_finished = _paused_in_thread_b(monkeypatch, "_next_sequence")
    node_b = Thread(target=schedule_ready, args=(db, settings, registry), name="B")
    node_b.start()
    assert b_waiting.wait(30)
    schedule_ready(db, settings, registry)  # node A
    a_finished.set()
    node_b.join(30)
    with db.session() as session:
        (round_id,) = session.execute(select(Report.id)).scalars().all()
        instance = session.get(Instance, "1.2.3.1.1")
        assert instance is not None and instance.report_id == round_id
    assert _jobs(db) == [("infer", "1.2.3.1.1", round_id), ("report", None, round_id)]


def test_a_round_another_node_closed_and_reported_is_not_set_back_to_pending(
    db: Database, settings: Settings, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node B is closing a round when node A closes it too and a worker makes its report:
    B must not set it back to pending afterwards (nothing would ever finish it)."""
    _store(db, _association(db, released=True), "1.2.3.1.1", ago=100.0)
    with db.session() as session:
        (round_id,) = queue_new_instances(session, "1.2.3", settings, registry)

    def close() -> None:
        with db.session() as session:
            studies.close_round(session, round_id, settings)

    b_waiting, a_finished = _paused_in_thread_b(monkeypatch, "enqueue")
    node_b = Thread(target=close, name="B")
    node_b.start()
    assert b_waiting.wait(30)
    close()  # node A
    with db.session() as session:  # the worker made the report
        report = session.get(Report, round_id)
        assert report is not None and report.state == "pending"
        report.state = "done"
    a_finished.set()
    node_b.join(30)
    with db.session() as session:
        assert session.execute(select(Report.state)).scalar_one() == "done"


def test_images_waiting_for_a_removed_version_go_to_the_version_installed_now(
    db: Database, settings: Settings, registry: ModelRegistry
) -> None:
    """A restart after a model update: images still waiting for the version that left
    models/ are routed to the one installed now; what was analysed stays in its round."""
    sending = _association(db, released=True)
    _store(db, sending, "1.2.3.1.1", ago=0.0)  # waits
    _store(db, sending, "1.2.3.1.2", ago=0.0)  # being analysed
    with db.session() as session:
        session.add(
            instance_row(
                "1.2.4.1.1", sending, study_instance_uid="1.2.4", modality="DX", body_part="KNEE"
            )
        )  # waits, alone in its study
    schedule_ready(db, settings, registry)
    with db.session() as session:
        queued = {j.sop_instance_uid: j for j in session.execute(select(Job)).scalars()}
        queued["1.2.3.1.2"].state = "running"
        queued["1.2.3.1.1"].state = "failed"  # tried once, waits to try again
    models = Path(settings.models.dir)
    for card in models.iterdir():
        for file in card.iterdir():
            file.unlink()
        card.rmdir()
    make_tiny_model(models / "tiny-knee-2", num_classes=5, version="0.0.2")
    updated = ModelRegistry.load(models)

    with db.session() as session:
        assert studies.route_again_after_update(session, updated) == 2
    with db.session() as session:
        rounds = {r.study_instance_uid: r.model_version for r in session.scalars(select(Report))}
        assert rounds == {"1.2.3": "0.0.1"}  # the other study's round was left empty: deleted
        kept = session.scalars(select(Job)).all()
        assert [(j.sop_instance_uid, j.group_key) for j in kept] == [
            ("1.2.3.1.2", "tiny-knee:0.0.1")
        ]
    schedule_ready(db, settings, updated)
    with db.session() as session:
        jobs = {
            j.sop_instance_uid: j.group_key
            for j in session.scalars(select(Job).where(Job.kind == "infer"))
        }
        states = dict(session.execute(select(Instance.sop_instance_uid, Instance.state)).all())
    assert jobs == {
        "1.2.3.1.1": "tiny-knee:0.0.2",
        "1.2.3.1.2": "tiny-knee:0.0.1",
        "1.2.4.1.1": "tiny-knee:0.0.2",
    }
    assert set(states.values()) == {"queued"}
    with db.session() as session:  # nothing is waiting for a removed version: a no-op
        assert studies.route_again_after_update(session, updated) == 0
        assert studies.route_again_after_update(session, ModelRegistry()) == 0  # none installed
    with db.session() as session:
        assert len(session.scalars(select(Job).where(Job.kind == "infer")).all()) == 3


def test_an_urgent_image_makes_its_rounds_report_urgent(
    db: Database, settings: Settings, registry: ModelRegistry
) -> None:
    """The report (and the sends after it) take the priority of the round's most urgent image;
    the other images keep their own."""
    sending = _association(db, released=True)
    with db.session() as session:
        for sop, priority in (("1.2.3.1.1", 1), ("1.2.3.1.2", 2), ("1.2.4.1.1", 0)):
            study = sop.rsplit(".", 2)[0]
            session.add(
                instance_row(
                    sop,
                    sending,
                    study_instance_uid=study,
                    modality="DX",
                    body_part="KNEE",
                    priority=priority,
                    received_at=utcnow() - timedelta(hours=1),
                )
            )
    schedule_ready(db, settings, registry)
    with db.session() as session:
        jobs = session.execute(
            select(Job.kind, Job.sop_instance_uid, Job.priority, Report.study_instance_uid)
            .join(Report, Report.id == Job.report_id)
            .order_by(Job.id)
        ).all()
    assert {(k, sop, p) for k, sop, p, _ in jobs if k == "infer"} == {
        ("infer", "1.2.3.1.1", 1),
        ("infer", "1.2.3.1.2", 2),
        ("infer", "1.2.4.1.1", 0),
    }
    assert {(study, p) for k, _, p, study in jobs if k == "report"} == {("1.2.3", 2), ("1.2.4", 0)}
