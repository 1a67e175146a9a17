"""The whole node in one process: real SCP, database, scheduler and a worker thread.

Integration tests use it with SQLite (default) or PostgreSQL (``database_url``);
results go to a real :class:`~dicomnode.testing.peers.CollectingSCP` named PACS.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from dicomnode.audit.trail import AuditTrail
from dicomnode.config import Settings
from dicomnode.db.migrate import upgrade
from dicomnode.db.schema import Instance
from dicomnode.db.session import Database
from dicomnode.models.registry import ModelRegistry
from dicomnode.peers import sync_config_peers
from dicomnode.receive.scp import StoreHandlers, start_scp
from dicomnode.studies import schedule_ready
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.node import make_settings
from dicomnode.testing.peers import LOOPBACK, CollectingSCP, free_port
from dicomnode.worker import Worker

SENDER = "MODALITY"


@dataclass
class InProcessNode:
    settings: Settings
    db: Database
    collector: CollectingSCP
    worker: Worker
    server: Any
    registry: ModelRegistry
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @classmethod
    def start(
        cls,
        tmp_path: Path,
        database_url: str | None = None,
        overlay_max_size: int | None = None,
        *,
        localiser: bool = False,
        commitment: bool = False,
        audit_file: Path | None = None,
        presentation_state: bool = False,
    ) -> InProcessNode:
        """A node with a tiny 5-class knee model (with a knee localiser when ``localiser``)
        that sends results to its collector (asking it for storage commitment when
        ``commitment``; a presentation state per image too when ``presentation_state``),
        writing its audit trail to ``audit_file`` when given."""
        collector = CollectingSCP(ae_title="PACS").start()
        sections: dict[str, dict[str, Any]] = {
            "node": {"port": free_port(), "host": LOOPBACK},
            "peers": {
                "PACS": {
                    "ae_title": "PACS",
                    "host": LOOPBACK,
                    "port": collector.port,
                    "commitment": commitment,
                },
                "MOD": {"ae_title": SENDER, "host": LOOPBACK, "port": 1},
            },
            "results": {"destinations": ["PACS"], "presentation_state": presentation_state},
        }
        if overlay_max_size is not None:
            sections["results"]["overlay_max_size"] = overlay_max_size
        if database_url:
            sections["database"] = {"url": database_url}
        if audit_file is not None:
            sections["audit"] = {"transport": "file", "file": str(audit_file)}
        settings = make_settings(tmp_path, **sections)
        make_tiny_model(Path(settings.models.dir) / "tiny-knee", num_classes=5, localiser=localiser)
        upgrade(settings.database.url)
        db = Database(settings.database.url)
        with db.session() as session:
            sync_config_peers(session, dict(settings.peers))
        registry = ModelRegistry.load(settings.models.dir)
        audit = AuditTrail.from_settings(settings)
        worker = Worker(settings, db, registry, worker_id="test-worker", audit=audit)
        server = start_scp(settings, db, StoreHandlers(settings, db, audit))
        node = cls(settings, db, collector, worker, server, registry)
        node.resume()
        return node

    def pause(self) -> None:
        """Stop the scheduler and the worker (the SCP goes on receiving): a backlog builds."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)
            self.thread = None

    def resume(self) -> None:
        """Start the scheduler and the worker (again)."""
        self.stop.clear()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            schedule_ready(self.db, self.settings, self.registry)
            if not self.worker.step():
                self.stop.wait(0.05)

    def reload_models(self) -> None:
        """Load ``models.dir`` again, as a restart after a model update does (the scheduler
        and the worker take the new registry at their next step)."""
        registry = ModelRegistry.load(self.settings.models.dir)
        self.registry = self.worker.registry = registry

    def close(self) -> None:
        self.pause()
        self.server.shutdown()
        self.collector.stop()
        self.db.dispose()
        self.worker.audit.close()

    def associate(self, *datasets: pydicom.Dataset, calling_ae: str = SENDER) -> Association:
        """An established association that can C-STORE ``datasets`` (release it when done)."""
        ae = AE(ae_title=calling_ae)
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate(
            LOOPBACK, self.settings.node.port, ae_title=self.settings.node.ae_title
        )
        assert assoc.is_established, "association was not accepted"
        return assoc

    def send(
        self, *datasets: pydicom.Dataset, calling_ae: str = SENDER, priority: int = 0
    ) -> list[int]:
        """C-STORE ``datasets`` over one association (request Priority ``priority``: 0
        MEDIUM, 1 HIGH, 2 LOW); the statuses."""
        assoc = self.associate(*datasets, calling_ae=calling_ae)
        codes = [int(assoc.send_c_store(ds, priority=priority).Status) for ds in datasets]
        assoc.release()
        return codes

    def instance(self, sop_uid: object) -> Instance:
        """The database's record of a received instance (detached: read its fields)."""
        with self.db.session() as session:
            row = session.get(Instance, str(sop_uid))
            assert row is not None, f"instance {sop_uid} is not recorded"
            session.expunge(row)
            return row

    def count(self, model: type, **where: object) -> int:
        """Rows of ``model`` matching ``where`` (column=value)."""
        with self.db.session() as session:
            statement = select(func.count()).select_from(model)
            for key, value in where.items():
                statement = statement.where(getattr(model, key) == value)
            return int(session.execute(statement).scalar_one())
