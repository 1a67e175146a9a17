"""``dicomnode serve``: the SCP, the study scheduler and supervised worker processes.

The main process receives (SCP threads), decides when studies are ready, and
restarts any worker process that dies (its running jobs are released at once
so they run again). SIGTERM or SIGINT stops everything cleanly: no new
association is accepted, busy ones may end for :data:`DRAIN_SECONDS` (idle ones
are aborted), and each worker finishes the images at hand and gives back the rest. The main
process never imports torch: models live in the worker processes only.

Workers are forked from a fork server that imported torch, timm and the worker
code once and froze the objects they made (:data:`WORKER_PRELOAD`,
:mod:`dicomnode.preload`): the ~800 MB those imports initialise are shared
copy-on-write by every worker instead of being built in each.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import ssl
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session

from dicomnode import logs
from dicomnode.audit.events import application_activity
from dicomnode.audit.trail import AuditTrail
from dicomnode.cards import changed_weights
from dicomnode.config import Settings
from dicomnode.db import migrate
from dicomnode.db.session import Database
from dicomnode.errors import ConfigError, DatabaseError
from dicomnode.metrics import start_metrics_server
from dicomnode.models.registry import ModelRegistry
from dicomnode.notify import Watchdog, notify
from dicomnode.peers import list_peers, sync_config_peers
from dicomnode.queue.jobs import release_worker, running_workers, worker_id_of
from dicomnode.receive.scp import StoreHandlers, remove_stale_incoming, start_scp
from dicomnode.retention import apply_retention
from dicomnode.store.instances import release_all_open
from dicomnode.studies import route_again_after_update, schedule_ready
from dicomnode.tls import server_context

log = logging.getLogger(__name__)
SCHEDULER_INTERVAL = 0.1
ERROR_PAUSE = 5.0
"""Seconds the scheduler waits after a failed round."""
QUICK_EXIT_SECONDS = 30.0
"""A worker that exits sooner than this after its start is restarted after RESTART_PAUSE."""
RESTART_PAUSE = 10.0
"""Seconds before a worker that exited quickly is started again."""
PURGE_INTERVAL = 3600.0
"""Seconds between purge passes (the first runs at start-up)."""
WORKER_STOP_SECONDS = 25.0
"""On stop, how long the workers have, all together, to finish the images at hand."""
DRAIN_SECONDS = 30.0
"""On stop, how long open associations may go on before they are aborted."""
ORPHAN_INTERVAL = 60.0
"""Seconds between looks for associations whose end could not be recorded."""
STALE_INCOMING_SECONDS = 3600.0
"""A partial received file not written to for this long belongs to no live transfer."""


def open_database(settings: Settings) -> Database:
    """The database, refusing to run on a schema other than this version's (see
    :func:`dicomnode.db.migrate.schema_problem`)."""
    problem = migrate.schema_problem(settings.database.url)
    if problem:
        raise DatabaseError(problem)
    return Database(settings.database.url)


def load_registry(settings: Settings) -> ModelRegistry:
    registry = ModelRegistry.load(settings.models.dir)
    if not registry.cards:
        log.warning(
            "no model found in %s: every study will be recorded as skipped", settings.models.dir
        )
    for loaded in registry.cards:
        log.info("model %s", loaded.describe())
    return registry


def worker_main(settings: Settings, index: int) -> None:
    """Entry point of a worker process (torch is imported here, never in the receiving process)."""
    from dicomnode.worker import Worker

    logs.configure(settings.logging.level, settings.logging.json_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _apply_threads(settings)
    db = Database(settings.database.url)
    worker = Worker(settings, db, ModelRegistry.load(settings.models.dir))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    stop_with_parent(worker.stop)
    try:
        worker.run()
    finally:
        worker.audit.close()


def stop_with_parent(stop: threading.Event) -> None:
    """Set ``stop`` when the process that started this one dies.

    ``serve`` stops its workers when it is stopped; killed (SIGKILL, the OOM killer) it
    cannot, and its workers went on as orphans: claiming jobs beside the next ``serve``'s
    workers, with the old code and models, logging to the old run's log. A worker now
    finishes its current job and exits once ``serve`` is gone.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the sentinel pipe closes
        if not stop.is_set():
            log.error("the serve process is gone: this worker stops after its current job")
            stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _apply_threads(settings: Settings) -> None:
    import torch

    torch.set_num_threads(torch_threads(settings.workers.threads, settings.workers.count))


def torch_threads(configured: int, workers: int) -> int:
    """``configured``, or with 0 the CPU cores shared out among the workers (at least 1).

    Two workers of two threads each on two cores would fight over them; one
    thread each lets one worker run the network while the other decodes,
    renders, encodes and sends.
    """
    if configured:
        return configured
    return max(1, (os.cpu_count() or 1) // max(1, workers))


WORKER_PRELOAD = ("dicomnode.preload",)
"""Modules the fork server imports before it forks any worker."""


class Supervisor:
    """Keeps ``count`` worker processes alive."""

    def __init__(self, settings: Settings, db: Database, count: int) -> None:
        self.settings = settings
        self.db = db
        self.count = count
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(WORKER_PRELOAD))
        self.processes: dict[int, BaseProcess] = {}
        self.started_at: dict[int, float] = {}
        self.restart_at: dict[int, float] = {}

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        process = self.context.Process(
            target=worker_main, args=(self.settings, index), name=f"worker-{index}"
        )
        process.start()
        self.processes[index] = process
        self.started_at[index] = time.monotonic()

    def check(self) -> None:
        """Release the jobs of dead workers and restart them.

        The jobs count a failed attempt (:func:`release_worker`). A worker that died within
        :data:`QUICK_EXIT_SECONDS` of its start is restarted after :data:`RESTART_PAUSE`,
        so a worker that cannot start does not spin.
        """
        now = time.monotonic()
        for index, process in list(self.processes.items()):
            if process.is_alive():
                continue
            if index not in self.restart_at:
                self.restart_at[index] = now + self._released(index, process, now)
            if now >= self.restart_at[index]:
                del self.restart_at[index]
                self._spawn(index)

    def _released(self, index: int, process: BaseProcess, now: float) -> float:
        """Release a dead worker's jobs and log it; the seconds to wait before its restart."""
        assert process.pid is not None  # it was started
        with self.db.session() as session:
            released = release_worker(session, worker_id_of(process.pid))
        pause = RESTART_PAUSE if now - self.started_at[index] < QUICK_EXIT_SECONDS else 0.0
        log.warning(
            "worker-%s (pid %s) exited with %s; %d job(s) released; restarting in %s s",
            index,
            process.pid,
            process.exitcode,
            released,
            pause,
        )
        return pause

    def stop(self, timeout: float = WORKER_STOP_SECONDS) -> None:
        """SIGTERM every worker (each finishes the images at hand and gives back the rest of
        its batch), then kill the ones still running ``timeout`` seconds later (their jobs
        run again, the attempt counted)."""
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %s did not stop within %.0f s: killed", process.name, timeout)
                process.kill()
                process.join()


def _release_dead_local_workers(db: Database) -> None:
    """Jobs of this host's stopped workers become claimable now, not after their lease."""

    prefix = worker_id_of(0).removesuffix("0")
    with db.session() as session:
        for worker_id in running_workers(session):
            pid = worker_id.removeprefix(prefix)
            if worker_id.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
                released = release_worker(session, worker_id)
                log.info("released %d job(s) of stopped worker %s", released, worker_id)


def _alive(pid: int) -> bool:
    """True when ``pid`` runs (a zombie left by a killed parent does not count)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def serve(settings: Settings, *, with_scp: bool = True, workers: int | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    log.info(
        "data folder %s, database %s, models %s",
        Path(settings.storage.data_dir).resolve(),
        _safe_url(settings.database.url),
        Path(settings.models.dir).resolve(),
    )
    db = open_database(settings)
    with db.session() as session:
        if with_scp:  # the receiving node's file is the peers' source (workers read them)
            sync_config_peers(session, dict(settings.peers))
        _check_destinations(session, settings, with_scp)
    registry = load_registry(settings)
    _check_routes(settings, registry)
    with db.reading() as session:
        for line in changed_weights(session, registry):
            log.warning(line)
    _release_dead_local_workers(db)
    if with_scp:
        with db.session() as session:
            moved = route_again_after_update(session, registry)
        if moved:
            log.info(
                "%d image(s) waiting for a model version no longer installed: routed again", moved
            )
    stop = threading.Event()
    _install_signals(stop)
    audit = AuditTrail.from_settings(settings)
    servers: list[ThreadedAssociationServer] = []
    handlers = None
    if with_scp:
        handlers = StoreHandlers(settings, db, audit)
        reopened = release_all_open(db, handlers.receiver)
        if reopened:
            log.info("%d association(s) left open by the previous run are closed", reopened)
        servers = start_listeners(settings, db, handlers)
    try:
        metrics = start_metrics_server(db, settings)
    except ConfigError:  # its port is taken: stop listening before saying so
        for server in servers:
            server.shutdown()
        raise
    supervisor = Supervisor(settings, db, settings.workers.count if workers is None else workers)
    supervisor.start()
    if handlers is not None:
        _start_housekeeping(db, settings, stop, handlers)
    notify("READY=1")
    audit.record(application_activity(settings.node.ae_title, started=True))
    watchdog = Watchdog()
    try:
        while not stop.wait(SCHEDULER_INTERVAL):
            watchdog.ping()
            if not _tick(db, settings, registry, supervisor, with_scp=with_scp):
                stop.wait(ERROR_PAUSE)
    finally:
        log.info("stopping")
        notify("STOPPING=1")
        if handlers is not None:
            stop_receiving(servers, handlers)
        supervisor.stop()
        if metrics is not None:
            metrics.stop()
        db.dispose()
        audit.record(application_activity(settings.node.ae_title, started=False))
        audit.close()


def start_listeners(
    settings: Settings, db: Database, handlers: StoreHandlers
) -> list[ThreadedAssociationServer]:
    """The SCP on ``node.port`` (unless 0: DICOM TLS only), and on ``tls.port`` over DICOM
    TLS when that is set."""
    tls = server_context(settings.tls) if settings.tls.port else None
    servers = [_listen(settings, db, handlers, None, "node.port")] if settings.node.port else []
    if tls is not None:
        try:
            servers.append(_listen(settings, db, handlers, tls, "tls.port"))
        except ConfigError:
            for server in servers:
                server.shutdown()
            raise
    return servers


def _listen(
    settings: Settings,
    db: Database,
    handlers: StoreHandlers,
    tls: ssl.SSLContext | None,
    key: str,
) -> ThreadedAssociationServer:
    try:
        return start_scp(settings, db, handlers, tls)
    except OSError as exc:
        port = settings.tls.port if tls is not None else settings.node.port
        raise ConfigError(
            f"cannot listen on {settings.node.host}:{port}: {exc.strerror} "
            f"(is another node or PACS using this port? change {key})"
        ) from exc


def stop_receiving(
    servers: list[ThreadedAssociationServer],
    handlers: StoreHandlers,
    drain_seconds: float = DRAIN_SECONDS,
    idle_seconds: float = 5.0,
) -> None:
    """Stop accepting associations; let the busy ones go on for up to ``drain_seconds`` (a
    modality sending a series finishes it), then abort the rest. An association that has
    sent nothing for ``idle_seconds`` is not waited for (a PACS keeps idle associations open
    for reuse). Nothing is lost by an abort: an unacknowledged image is sent again."""
    for server in servers:
        server.shutdown()

    def still_open() -> list[Association]:
        return [assoc for server in servers for assoc in server.active_associations]

    deadline = time.monotonic() + drain_seconds
    open_now = still_open()
    if open_now:
        log.info(
            "waiting up to %.0f s for %d open association(s) to end", drain_seconds, len(open_now)
        )
    while time.monotonic() < deadline:
        if all(handlers.idle_seconds(assoc) >= idle_seconds for assoc in still_open()):
            break
        time.sleep(0.1)
    for assoc in still_open():
        if handlers.idle_seconds(assoc) >= idle_seconds:
            log.info("aborting an idle association (nothing received for %.0f s)", idle_seconds)
        else:
            log.warning("aborting an association still busy after %.0f s", drain_seconds)
        assoc.abort()


def _safe_url(url: str) -> str:
    """The database URL without its password; a relative SQLite path made absolute."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return f"sqlite:///{Path(parsed.database).resolve()}"
    return parsed.render_as_string(hide_password=True)


def _check_destinations(session: Session, settings: Settings, with_scp: bool = True) -> None:
    """Refuse to start when a result destination (``results.destinations`` or a route) is
    not a peer: its results would die."""
    known = {peer.name for peer in list_peers(session)}
    unknown = [name for name in settings.results.receiving_peers() if name not in known]
    if unknown:
        how = "add one with `dicomnode ae add`"
        if not with_scp:
            how += ", or start the receiving node (`dicomnode serve`), which registers its file's"
        raise ConfigError(
            f"results.destinations or results.routes names {', '.join(unknown)}, not a peer "
            f"(peers: {', '.join(sorted(known)) or 'none'}; {how})"
        )


def _check_routes(settings: Settings, registry: ModelRegistry) -> None:
    """Refuse to start when ``results.routes`` names a model that is not loaded: a mistyped
    name would send that model's results to ``results.destinations`` instead."""
    loaded = {entry.card.name for entry in registry.cards}
    unknown = sorted(set(settings.results.routes) - loaded)
    if unknown:
        raise ConfigError(
            f"results.routes names {', '.join(unknown)}, not a model in "
            f"{settings.models.dir} (models: {', '.join(sorted(loaded)) or 'none'})"
        )


def _tick(
    db: Database,
    settings: Settings,
    registry: ModelRegistry,
    supervisor: Supervisor,
    *,
    with_scp: bool,
) -> bool:
    """One scheduler round; False when it failed.

    A database error (a restart, a lock held too long) is logged and a later round tries
    again after :data:`ERROR_PAUSE`: the node keeps receiving meanwhile.
    """
    try:
        if with_scp:
            schedule_ready(db, settings, registry)
        supervisor.check()
    except Exception:
        log.exception("scheduler round failed; trying again in %s s", ERROR_PAUSE)
        return False
    return True


def _start_housekeeping(
    db: Database, settings: Settings, stop: threading.Event, handlers: StoreHandlers
) -> None:
    """In a thread of its own: every :data:`ORPHAN_INTERVAL`, close the associations whose
    end could not be recorded; now and every :data:`PURGE_INTERVAL`, remove the partial
    files of aborted transfers, purge expired studies (when retention is on) and forget
    purged studies whose records expired (``storage.records_days``)."""
    days = settings.storage.retention_days
    if days <= 0:
        log.info("retention: off (storage.retention_days is 0); nothing is purged")
    incoming = Path(settings.storage.data_dir) / "incoming"

    def purge_pass() -> None:
        removed = remove_stale_incoming(incoming, STALE_INCOMING_SECONDS)
        if removed:
            log.info("removed %d partial file(s) of aborted transfers", removed)
        apply_retention(db, settings.storage, handlers.audit)

    def loop() -> None:
        next_purge = 0.0
        while True:
            try:
                closed = handlers.release_orphaned()
                if closed:
                    log.info("%d association(s) whose end was not recorded are closed", closed)
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_INTERVAL
                    purge_pass()
            except Exception as exc:  # the thread must outlive one bad pass
                log.error("housekeeping pass failed (next in %.0f s): %s", ORPHAN_INTERVAL, exc)
            if stop.wait(ORPHAN_INTERVAL):
                return

    threading.Thread(target=loop, name="housekeeping", daemon=True).start()


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
