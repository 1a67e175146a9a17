"""The SCP records an association's end even when the database is briefly unavailable."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import pytest
from pynetdicom import _config, dimse_messages

from dicomnode.config import Settings
from dicomnode.db.session import Database
from dicomnode.receive import scp
from dicomnode.testing.peers import pynetdicom_receive_globals_restored

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


def test_the_end_of_an_association_is_recorded_after_transient_errors(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def flaky(_db: Database, association_id: str) -> None:
        calls.append(association_id)
        if len(calls) < 3:
            raise OSError("database is locked")

    monkeypatch.setattr(scp, "release_association", flaky)
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # the module scp sleeps with
    scp.StoreHandlers(settings, db)._release("assoc-1")
    assert calls == ["assoc-1"] * 3


def test_an_end_that_cannot_be_recorded_is_logged(
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def down(_db: Database, _association_id: str) -> None:
        raise OSError("database is gone")

    monkeypatch.setattr(scp, "release_association", down)
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # the module scp sleeps with
    caplog.set_level(logging.ERROR)
    scp.StoreHandlers(settings, db)._release("assoc-2", attempts=3)
    assert "assoc-2: its end could not be recorded (OSError)" in caplog.text


def test_what_receive_into_sets_in_pynetdicom_is_restored(tmp_path: Path) -> None:
    """The tests' autouse fixture undoes the node's process-wide pynetdicom settings."""
    with pynetdicom_receive_globals_restored():
        scp.receive_into(tmp_path / "incoming")
        assert _config.STORE_RECV_CHUNKED_DATASET is True
        with dimse_messages.NamedTemporaryFile() as handle:  # type: ignore[attr-defined]
            assert Path(handle.name).parent == tmp_path / "incoming"
    assert _config.STORE_RECV_CHUNKED_DATASET is False
    assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile  # type: ignore[attr-defined]


def test_a_stop_does_not_wait_for_an_idle_association(settings: Settings, db: Database) -> None:
    """A PACS keeps idle associations open for reuse: stopping aborts them at once."""
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.service import stop_receiving
    from dicomnode.testing.peers import LOOPBACK, free_port

    node = settings.node.model_copy(update={"port": free_port(), "allow_unknown_callers": True})
    local = settings.model_copy(update={"node": node})
    handlers = scp.StoreHandlers(local, db)
    server = scp.start_scp(local, db, handlers)
    sender = AE(ae_title="PACS")
    sender.add_requested_context(Verification)
    assoc = sender.associate(LOOPBACK, node.port, ae_title=node.ae_title)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    (held,) = server.active_associations
    assert handlers.idle_seconds(held) < 1.0  # its echo was seen
    time.sleep(0.3)
    started = time.monotonic()
    stop_receiving([server], handlers, drain_seconds=20, idle_seconds=0.2)
    assert time.monotonic() - started < 10  # not the 20 s drain
    time.sleep(0.5)
    assert assoc.is_aborted and not assoc.is_established


def test_stored_images_and_results_are_readable_by_the_group_as_the_umask_says(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """Temporary files are 0600 whatever the umask: received images and written results
    kept that mode, though `storage.umask` 027 promises 0640 (a backup agent in the group)."""
    import os
    import stat

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    from dicomnode.store.files import write_durably
    from dicomnode.testing.images import make_radiograph
    from dicomnode.testing.peers import LOOPBACK, free_port

    os.umask(0o027)  # as the CLI sets it; the fixture restores the test process's mask
    node = settings.node.model_copy(update={"port": free_port(), "allow_unknown_callers": True})
    local = settings.model_copy(update={"node": node})
    server = scp.start_scp(local, db)
    try:
        image = make_radiograph(body_part="HANDX")
        sender = AE(ae_title="PACS")
        sender.add_requested_context(image.SOPClassUID, ExplicitVRLittleEndian)
        assoc = sender.associate(LOOPBACK, node.port, ae_title=node.ae_title)
        assert assoc.send_c_store(image).Status == 0
        assoc.release()
    finally:
        server.shutdown()
    (stored,) = (Path(local.storage.data_dir) / "instances").rglob("*.dcm")
    assert stat.S_IMODE(stored.stat().st_mode) == 0o640
    written = tmp_path / "outputs" / "result.dcm"
    write_durably(written, b"result")
    assert stat.S_IMODE(written.stat().st_mode) == 0o640
    os.umask(0o077)
    write_durably(written, b"result")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_a_header_holding_a_nul_byte_is_stored(settings: Settings, db: Database) -> None:
    """A broken sender's NUL inside a description: PostgreSQL refuses NUL in text, so the
    image was refused (0xA700) at every attempt; the text is kept with a space for it."""
    from dicomnode.db.schema import Instance
    from dicomnode.store.instances import facts_from_dataset, read_received, store_instance
    from dicomnode.testing.images import make_radiograph, write_dataset

    image = make_radiograph(body_part="KNEE")
    image.SeriesDescription = "KNEE AP\x00LAT"
    incoming = Path(settings.storage.data_dir) / "incoming"
    incoming.mkdir(parents=True)
    received = write_dataset(image, incoming / ".receiving")
    facts = facts_from_dataset(read_received(received), str(image.file_meta.TransferSyntaxUID))
    data = Path(settings.storage.data_dir)
    store_instance(db, data, facts, received, calling_ae="MOD", association_id="a1")
    with db.session() as session:
        stored = session.get(Instance, str(image.SOPInstanceUID))
        assert stored is not None and stored.descriptions == "KNEE AP LAT"


def test_the_priority_of_an_image_comes_from_its_caller_then_its_c_store_request() -> None:
    from dicomnode.config import RoutingSettings
    from dicomnode.values import Priority

    routing = RoutingSettings(urgent_callers=("ED_DR1 ",), background_callers=("PREFETCH",))
    assert scp.priority_of(routing, "ED_DR1", 0x0002) is Priority.HIGH  # the caller wins
    assert scp.priority_of(routing, "PREFETCH", 0x0001) is Priority.LOW
    assert scp.priority_of(routing, "CR1", 0x0001) is Priority.HIGH
    assert scp.priority_of(routing, "CR1", 0x0002) is Priority.LOW
    assert scp.priority_of(routing, "CR1", 0x0000) is Priority.MEDIUM
    assert scp.priority_of(routing, "CR1", 7) is Priority.MEDIUM  # not a Priority value
    assert scp.priority_of(routing, "CR1", None) is Priority.MEDIUM
    ignoring = RoutingSettings(store_priority=False)
    assert scp.priority_of(ignoring, "CR1", 0x0001) is Priority.MEDIUM
    with pytest.raises(ValueError, match="ED_DR1 are in both"):
        RoutingSettings(urgent_callers=("ED_DR1",), background_callers=("ED_DR1",))
