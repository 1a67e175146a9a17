"""Retention: finished, delivered studies lose their pixel data after the retention period."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from dicomnode.config import Settings
from dicomnode.db.schema import Association, Instance, Job, Output, Report
from dicomnode.db.session import Database, utcnow
from dicomnode.queue.jobs import JobKind, JobState
from dicomnode.retention import expired_studies, purge_expired, purge_study
from dicomnode.store.instances import PURGED
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.rows import instance_row

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL

DAYS = 30.0
LATER = timedelta(days=DAYS + 1)


def _study(
    db: Database,
    data: Path,
    *,
    instance_state: str = "done",
    report_state: str = "done",
    send_state: JobState | None = JobState.DONE,
) -> tuple[str, Path, Path, Path]:
    """One image analysed into a round with an SC and an SR; (study, image, SC, SR paths)."""
    source = make_radiograph(body_part="KNEE")
    study = str(source.StudyInstanceUID)
    overlay = make_radiograph(rows=64, columns=64, study_uid=study)  # stands in for the SC
    image = write_dataset(source, data / f"{uuid.uuid4()}.dcm")
    sc = write_dataset(overlay, data / f"{uuid.uuid4()}.dcm")
    sr_dataset = make_radiograph(rows=16, columns=16, study_uid=study)
    del sr_dataset.PixelData
    sr = write_dataset(sr_dataset, data / f"{uuid.uuid4()}.dcm")
    with db.session() as session:
        association = Association(
            id=str(uuid.uuid4()), calling_ae="MOD", started_at=utcnow(), released_at=utcnow()
        )
        report = Report(
            study_instance_uid=study,
            model_name="m",
            model_version="1",
            sequence=1,
            calling_ae="MOD",
            state=report_state,
            created_at=utcnow(),
        )
        session.add_all([association, report])
        session.flush()
        session.add(
            _instance(
                source,
                image,
                association.id,
                instance_state,
                modality="DX",
                body_part="KNEE",
                report_id=report.id,
            )
        )
        for kind, dataset, path in (("SC", overlay, sc), ("SR", sr_dataset, sr)):
            uid = str(dataset.SOPInstanceUID)
            session.add(
                Output(
                    sop_instance_uid=uid,
                    series_instance_uid=str(dataset.SeriesInstanceUID),
                    report_id=report.id,
                    kind=kind,
                    source_sop_instance_uid=str(source.SOPInstanceUID) if kind == "SC" else None,
                    path=str(path),
                    created_at=utcnow(),
                )
            )
            if send_state is not None:
                session.add(
                    Job(
                        kind=JobKind.SEND,
                        dedupe_key=f"{uid}>PACS",
                        state=send_state,
                        group_key="PACS",
                        report_id=report.id,
                        sop_instance_uid=uid,
                        peer="PACS",
                        max_attempts=5,
                        run_after=utcnow(),
                        created_at=utcnow(),
                        updated_at=utcnow(),
                    )
                )
    return study, image, sc, sr


def _instance(
    dataset: pydicom.Dataset, path: Path, association_id: str, state: str, **columns: object
) -> Instance:
    """The row of ``dataset`` stored at ``path``, received over ``association_id``."""
    return instance_row(
        str(dataset.SOPInstanceUID),
        association_id,
        study_instance_uid=str(dataset.StudyInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
        path=str(path),
        size=path.stat().st_size,
        state=state,
        **columns,
    )


def _has_pixels(path: Path) -> bool:
    return "PixelData" in pydicom.dcmread(path)


def test_a_finished_delivered_study_keeps_its_headers_only(db: Database, tmp_path: Path) -> None:
    study, image, sc, sr = _study(db, tmp_path)
    sizes = {p: p.stat().st_size for p in (image, sc, sr)}
    uid = pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID
    assert purge_expired(db, DAYS).studies == ()  # not old enough yet
    summary = purge_expired(db, DAYS, now=utcnow() + LATER)
    assert summary.studies == (study,)
    assert summary.files == 2
    assert summary.bytes_freed == sum(sizes[p] - p.stat().st_size for p in (image, sc)) > 400_000
    assert not _has_pixels(image) and not _has_pixels(sc)
    assert pydicom.dcmread(image).SOPInstanceUID == uid  # the header is whole
    assert sr.stat().st_size == sizes[sr]  # SRs stay as they are
    with db.session() as session:
        assert session.execute(select(Instance.state)).scalar_one() == PURGED
    again = purge_expired(db, DAYS, now=utcnow() + LATER)
    assert (again.studies, again.files) == ((), 0)


def test_objects_that_are_not_images_lose_their_content_too(db: Database, tmp_path: Path) -> None:
    """A PDF (a referral letter) and another system's SR, stored and skipped with the study,
    keep their headers only: their content is patient data like the pixels."""
    from pydicom.sequence import Sequence

    study, *_ = _study(db, tmp_path)
    pdf = make_radiograph(study_uid=study)
    del pdf.PixelData
    pdf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    pdf.EncapsulatedDocument = b"%PDF-1.4 referral letter for DOE^JOHN" + b"\0" * 200_000
    report = make_radiograph(study_uid=study)
    del report.PixelData
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    item = pydicom.Dataset()
    item.ValueType, item.TextValue = "TEXT", "Prior report: " + "x" * 10_000
    report.ContentSequence = Sequence([item])
    paths = []
    with db.session() as session:
        association_id = session.execute(select(Association.id)).scalar_one()
        for dataset in (pdf, report):
            path = write_dataset(dataset, tmp_path / f"{dataset.SOPInstanceUID}.dcm")
            paths.append(path)
            session.add(_instance(dataset, path, association_id, "skipped", reason="not an image"))
    summary = purge_expired(db, DAYS, now=utcnow() + LATER)
    assert summary.studies == (study,) and summary.files == 4
    kept = [pydicom.dcmread(path) for path in paths]
    assert "EncapsulatedDocument" not in kept[0] and "ContentSequence" not in kept[1]
    assert [str(k.SOPInstanceUID) for k in kept] == [pdf.SOPInstanceUID, report.SOPInstanceUID]
    assert all(path.stat().st_size < 5_000 for path in paths)


def test_a_dry_run_lists_and_changes_nothing(db: Database, tmp_path: Path) -> None:
    study, image, sc, _ = _study(db, tmp_path)
    summary = purge_expired(db, DAYS, now=utcnow() + LATER, dry_run=True)
    assert (summary.studies, summary.files, summary.dry_run) == ((study,), 2, True)
    assert summary.bytes_freed > 400_000
    assert _has_pixels(image) and _has_pixels(sc)
    with db.session() as session:
        assert session.execute(select(Instance.state)).scalar_one() == "done"


@pytest.mark.parametrize(
    "unfinished",
    [
        {"send_state": JobState.DEAD},  # waits for `dicomnode retry`
        {"send_state": JobState.FAILED},  # retrying with backoff
        {"send_state": None},  # never sent: no destination configured
        {"report_state": "open"},
        {"report_state": "pending"},
        {"instance_state": "queued"},
    ],
    ids=["dead-send", "retrying-send", "never-sent", "open-round", "pending-report", "queued"],
)
def test_unfinished_or_undelivered_studies_are_kept(
    db: Database, tmp_path: Path, unfinished: dict[str, object]
) -> None:
    _, image, sc, _ = _study(db, tmp_path, **unfinished)  # type: ignore[arg-type]
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == ()
    assert _has_pixels(image) and _has_pixels(sc)


def test_a_shadow_mode_study_is_purged_though_its_results_were_never_sent(
    db: Database, tmp_path: Path
) -> None:
    """A round whose model's route sends its results nowhere ends ``kept``: nothing is
    waiting to be delivered, unlike a round that found no destination ("never-sent" above)."""
    from dicomnode.studies import KEPT

    study, image, sc, _ = _study(db, tmp_path, report_state=KEPT, send_state=None)
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == (study,)
    assert not _has_pixels(image) and not _has_pixels(sc)


def test_retention_zero_keeps_everything(db: Database, tmp_path: Path, settings: Settings) -> None:
    assert settings.storage.retention_days == DAYS  # the default
    _, image, _, _ = _study(db, tmp_path)
    assert purge_expired(db, 0, now=utcnow() + timedelta(days=3650)).studies == ()
    assert _has_pixels(image)


def test_an_image_arriving_after_the_listing_saves_its_study(db: Database, tmp_path: Path) -> None:
    """``purge_study`` checks the study again: a follow-up on its way keeps every file whole."""
    study, image, sc, _ = _study(db, tmp_path)
    with db.session() as session:
        assert expired_studies(session, utcnow() + LATER) == [study]
        follow_up = session.execute(select(Instance)).scalar_one()
        session.expunge(follow_up)
    with db.session() as session:
        arriving = instance_row(
            pydicom.uid.generate_uid(),
            follow_up.association_id,
            **{
                column: getattr(follow_up, column)
                for column in ("study_instance_uid", "series_instance_uid", "sop_class_uid")
            },
            path=str(tmp_path / "follow-up.dcm"),
            state="received",
        )
        session.add(arriving)
    with db.session() as session:
        assert purge_study(session, study) is None
    assert _has_pixels(image) and _has_pixels(sc)


def test_an_unreadable_file_stops_its_study_only(db: Database, tmp_path: Path) -> None:
    broken, image, _, _ = _study(db, tmp_path)
    image.write_bytes(b"not DICOM at all")
    healthy, other, _, _ = _study(db, tmp_path)
    summary = purge_expired(db, DAYS, now=utcnow() + LATER)
    assert summary.studies == (healthy,)
    assert not _has_pixels(other)
    with db.session() as session:
        states = dict(session.execute(select(Instance.study_instance_uid, Instance.state)).all())
    assert states == {broken: "done", healthy: PURGED}


def test_a_discarded_dead_send_lets_its_study_be_purged(db: Database, tmp_path: Path) -> None:
    from dicomnode.studies import discard_dead_jobs

    study, image, _, _ = _study(db, tmp_path, send_state=JobState.DEAD)
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == ()
    with db.session() as session:
        dead = session.execute(select(Job.id).where(Job.state == JobState.DEAD)).scalars().all()
        assert discard_dead_jobs(session, [dead[0]]) == 1
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == ()  # one still dead
    with db.session() as session:
        assert discard_dead_jobs(session) == 1
        assert discard_dead_jobs(session) == 0
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == (study,)
    assert not _has_pixels(image)


def test_a_discarded_analysis_skips_its_image_and_a_discarded_report_ends_its_round(
    db: Database, tmp_path: Path
) -> None:
    from dicomnode.studies import DISCARDED, discard_dead_jobs

    study, _, _, _ = _study(db, tmp_path, instance_state="queued", report_state="pending")
    with db.session() as session:
        report_id = session.execute(select(Report.id)).scalar_one()
        uid = session.execute(select(Instance.sop_instance_uid)).scalar_one()
        for kind, key in ((JobKind.INFER, uid), (JobKind.REPORT, f"report-{report_id}")):
            session.add(
                Job(
                    kind=kind,
                    dedupe_key=key,
                    state=JobState.DEAD,
                    group_key="m:1",
                    report_id=report_id,
                    sop_instance_uid=uid if kind == JobKind.INFER else None,
                    max_attempts=3,
                    attempts=3,
                    last_error="ModelError: weights do not match",
                    run_after=utcnow(),
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == ()
    with db.session() as session:
        assert discard_dead_jobs(session) == 2
    with db.session() as session:
        instance = session.execute(select(Instance)).scalar_one()
        assert instance.state == "skipped"
        assert (
            instance.reason == "analysis discarded after failing: ModelError: weights do not match"
        )
        assert session.execute(select(Report.state)).scalar_one() == DISCARDED
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == (study,)


def test_a_forgotten_study_leaves_no_file_and_no_record(db: Database, tmp_path: Path) -> None:
    """An erasure request, or a study routed here by mistake: its images, overlays, SR and
    every record of it go; another study stays whole."""
    from dicomnode.db.schema import Rejection, Result
    from dicomnode.retention import forget_study, remove_files
    from dicomnode.testing.rows import rejection_row

    study, image, sc, sr = _study(db, tmp_path / "data" / "instances" / "s1" / "x")
    other, *kept = _study(db, tmp_path / "data" / "instances" / "s2")
    with db.session() as session:
        report = session.execute(select(Report).where(Report.study_instance_uid == study))
        report_id = report.scalar_one().id
        uid = str(pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID)
        session.add(
            Result(
                sop_instance_uid=uid,
                report_id=report_id,
                model_name="m",
                model_version="1",
                outcome="done",
                created_at=utcnow(),
            )
        )
        session.add(rejection_row(uid, study, "113037"))  # a rejection note withdrew it
    with db.session() as session:
        dry = forget_study(session, study, dry_run=True)
    assert (dry.instances, dry.outputs, set(dry.files)) == (1, 2, {image, sc, sr})
    assert image.exists()
    with db.session() as session:
        forgotten = forget_study(session, study)
    assert remove_files(tmp_path / "data", forgotten.files) == []
    assert not any(path.exists() for path in (image, sc, sr))
    assert not (tmp_path / "data" / "instances" / "s1").exists()  # emptied folders go
    assert (tmp_path / "data" / "instances").is_dir()
    assert all(path.exists() for path in kept)
    with db.session() as session:
        for table in (Instance, Report, Output, Job, Result, Rejection):
            rows = session.execute(select(table)).scalars().all()
            assert all(study not in str(vars(row)) for row in rows), table.__name__
        studies = session.execute(select(Instance.study_instance_uid)).scalars().all()
        assert studies == [other]


def test_a_study_with_work_still_to_do_is_not_forgotten(db: Database, tmp_path: Path) -> None:
    """A worker would write results for a study that is gone."""
    from dicomnode.retention import StudyBusyError, forget_study

    study, image, _, _ = _study(db, tmp_path, send_state=JobState.QUEUED)
    with db.session() as session, pytest.raises(StudyBusyError, match="2 job"):
        forget_study(session, study)
    with db.session() as session:
        assert session.execute(select(Instance.path)).scalar_one() == str(image)


def test_a_purge_drops_the_thumbnail_of_an_image_too(db: Database, tmp_path: Path) -> None:
    """Icon Image Sequence: the image in small, kept whole by a purge before."""
    study, image, _, _ = _study(db, tmp_path)
    dataset = pydicom.dcmread(image)
    icon = pydicom.Dataset()
    icon.Rows = icon.Columns = 64
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = b"\x01" * 64 * 64
    dataset.IconImageSequence = [icon]
    dataset.save_as(image)
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == (study,)
    assert "IconImageSequence" not in pydicom.dcmread(image)


RECORDS_DAYS = 365.0
A_YEAR_ON = timedelta(days=RECORDS_DAYS + 1)


def _records(db: Database, study: str) -> dict[str, int]:
    """How many rows of each table name ``study`` (its instances, rounds, outputs, jobs)."""
    from dicomnode.db.schema import Result

    with db.session() as session:
        reports = select(Report.id).where(Report.study_instance_uid == study)
        return {
            "instances": len(
                session.execute(select(Instance).where(Instance.study_instance_uid == study)).all()
            ),
            "reports": len(session.execute(reports).all()),
            "outputs": len(
                session.execute(select(Output).where(Output.report_id.in_(reports))).all()
            ),
            "jobs": len(session.execute(select(Job).where(Job.report_id.in_(reports))).all()),
            "results": len(
                session.execute(select(Result).where(Result.report_id.in_(reports))).all()
            ),
        }


def test_a_purged_study_is_forgotten_after_records_days(db: Database, tmp_path: Path) -> None:
    """`storage.records_days`: a purged study's headers, SR and records go a year on; a
    study purged later stays, and so do the association records its images name."""
    from dicomnode.retention import forget_expired

    data = tmp_path / "data"
    study, image, sc, sr = _study(db, data / "instances" / "old")
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == (study,)
    young, *young_files = _study(db, data / "instances" / "young")  # not purged
    assert forget_expired(db, RECORDS_DAYS, data, now=utcnow() + LATER).studies == ()
    dry = forget_expired(db, RECORDS_DAYS, data, now=utcnow() + A_YEAR_ON, dry_run=True)
    assert (dry.studies, dry.files, dry.associations) == ((study,), 3, 0)
    assert image.exists() and _records(db, study)["instances"] == 1
    done = forget_expired(db, RECORDS_DAYS, data, now=utcnow() + A_YEAR_ON)
    assert (done.studies, done.files, done.left) == ((study,), 3, ())
    assert not any(path.exists() for path in (image, sc, sr))
    assert not (data / "instances" / "old").exists()
    assert set(_records(db, study).values()) == {0}
    assert _records(db, young) == {
        "instances": 1,
        "reports": 1,
        "outputs": 2,
        "jobs": 2,
        "results": 0,
    }
    assert all(path.exists() for path in young_files)
    with db.session() as session:  # the forgotten study's association went with it
        assert len(session.execute(select(Association)).all()) == 1


@pytest.mark.parametrize("dead_send", [True, False], ids=["dead-send", "purge-failed"])
def test_a_study_that_is_not_purged_keeps_its_records(
    db: Database, tmp_path: Path, dead_send: bool
) -> None:
    """A dead send keeps the study's pixels (it waits for `dicomnode retry`), and its records;
    so does a finished study that no purge stripped (its file could not be read)."""
    from dicomnode.retention import forget_expired

    study, image, _, _ = _study(
        db, tmp_path, send_state=JobState.DEAD if dead_send else JobState.DONE
    )
    ages = utcnow() + A_YEAR_ON
    if dead_send:
        assert purge_expired(db, DAYS, now=ages).studies == ()
    assert forget_expired(db, RECORDS_DAYS, tmp_path, now=ages).studies == ()
    assert image.exists() and _records(db, study)["jobs"] == 2


def test_an_image_arriving_while_its_study_is_forgotten_stays(db: Database, tmp_path: Path) -> None:
    """On PostgreSQL an image of the study may be stored between the check and the delete:
    only purged instances go, the new one stays (out of the deleted round) to be routed."""
    from dicomnode.retention import forget_study

    study, image, _, _ = _study(db, tmp_path)
    assert purge_expired(db, DAYS, now=utcnow() + LATER).studies == (study,)
    arrived = make_radiograph(study_uid=study)
    path = write_dataset(arrived, tmp_path / "arrived.dcm")
    with db.session() as session:
        association_id = session.execute(select(Association.id)).scalar_one()
        session.add(_instance(arrived, path, association_id, "received"))
    with db.session() as session:
        forgotten = forget_study(session, study, purged_only=True)
    assert image in forgotten.files and path not in forgotten.files
    with db.session() as session:
        left = session.execute(select(Instance)).scalar_one()
        assert (left.sop_instance_uid, left.state) == (arrived.SOPInstanceUID, "received")
        assert session.execute(select(Report)).first() is None


def test_association_records_that_name_no_image_go_after_records_days(
    db: Database, tmp_path: Path
) -> None:
    """A C-ECHO, or copies all rejected: nothing else would ever delete their records."""
    from dicomnode.retention import forget_expired

    _study(db, tmp_path)  # its association names its image: stays
    with db.session() as session:
        for days_ago in (400, 10):
            ended = utcnow() - timedelta(days=days_ago)
            session.add(
                Association(
                    id=f"echo-{days_ago}", calling_ae="MOD", started_at=ended, released_at=ended
                )
            )
    summary = forget_expired(db, RECORDS_DAYS, tmp_path)
    assert (summary.studies, summary.associations) == ((), 1)
    with db.session() as session:
        ids = set(session.execute(select(Association.id)).scalars())
    assert "echo-400" not in ids and "echo-10" in ids and len(ids) == 2


def test_records_days_zero_keeps_every_record(db: Database, tmp_path: Path) -> None:
    from dicomnode.retention import forget_expired

    study, image, _, _ = _study(db, tmp_path)
    purge_expired(db, DAYS, now=utcnow() + LATER)
    assert forget_expired(db, 0, tmp_path, now=utcnow() + A_YEAR_ON * 10).studies == ()
    assert image.exists() and _records(db, study)["instances"] == 1


@pytest.mark.parametrize("records_days", [RECORDS_DAYS, 0.0], ids=["records-days", "kept"])
def test_the_hourly_pass_purges_then_forgets(
    db: Database, tmp_path: Path, records_days: float
) -> None:
    """What `serve` runs hourly: a study received 400 days ago is purged and, with
    `storage.records_days` 365, forgotten in the same pass; with 0 it keeps its records."""
    from dicomnode.audit.messages import AuditSource
    from dicomnode.audit.syslog import FileTransport
    from dicomnode.audit.trail import AuditTrail
    from dicomnode.config import StorageSettings
    from dicomnode.retention import FORGET_REASON, PURGE_REASON, apply_retention
    from dicomnode.testing.audit import read_audit_file

    study, image, sc, sr = _study(db, tmp_path)
    with db.session() as session:
        session.execute(update(Instance).values(received_at=utcnow() - timedelta(days=400)))
    storage = StorageSettings(data_dir=tmp_path, retention_days=DAYS, records_days=records_days)
    audit_file = tmp_path / "audit.log"
    audit = AuditTrail(FileTransport(audit_file), AuditSource("NODE"), "DICOMNODE", 100)
    apply_retention(db, storage, audit)
    assert audit.close()
    deleted = read_audit_file(audit_file)  # DICOM Study Deleted, by the node
    assert [r.study_uids for r in deleted] == [[study]] * (2 if records_days else 1)
    reasons = [r.identification.findtext("EventOutcomeDescription") for r in deleted]
    assert reasons == [PURGE_REASON, FORGET_REASON][: len(deleted)]
    if records_days:
        assert not any(path.exists() for path in (image, sc, sr))
        assert set(_records(db, study).values()) == {0}
    else:
        assert not _has_pixels(image) and sr.exists()
        with db.session() as session:
            assert session.execute(select(Instance.state)).scalar_one() == PURGED
