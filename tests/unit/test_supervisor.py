"""The supervisor: a dead worker's jobs count a failed attempt; a worker that dies at once
does not spin; a failed scheduler round does not end the node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomnode import service
from dicomnode.config import Settings
from dicomnode.db.session import Database
from dicomnode.models.registry import ModelRegistry
from dicomnode.queue import jobs as q

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


@dataclass
class FakeProcess:
    pid: int
    alive: bool = True
    exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.alive


class CountingSupervisor(service.Supervisor):
    """Spawns fake processes with increasing pids instead of forking workers."""

    def __init__(self, settings: Settings, db: Database) -> None:
        super().__init__(settings, db, 1)
        self.spawned: list[int] = []
        self.clock = 0.0

    def _spawn(self, index: int) -> None:
        pid = 1000 + len(self.spawned)
        self.spawned.append(pid)
        self.processes[index] = FakeProcess(pid)  # type: ignore[assignment]
        self.started_at[index] = self.clock


@pytest.fixture
def supervisor(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> CountingSupervisor:
    made = CountingSupervisor(settings, db)
    monkeypatch.setattr("dicomnode.service.time.monotonic", lambda: made.clock)
    return made


def test_a_worker_that_dies_at_once_is_restarted_after_a_pause(
    supervisor: CountingSupervisor, db: Database
) -> None:
    supervisor.start()
    with db.session() as s:
        q.enqueue(s, [q.JobSpec(q.JobKind.INFER, "1.1", 3, group_key="m:1")])
        q.claim(s, q.JobKind.INFER, q.worker_id_of(1000), 600)
    supervisor.clock = 2.0
    supervisor.processes[0].alive = False  # type: ignore[attr-defined]
    supervisor.check()
    with db.session() as s:
        assert q.counts_by_state(s) == {("infer", "failed"): 1}  # released, attempt counted
    assert supervisor.spawned == [1000]  # not restarted yet: it died 2 s after its start
    supervisor.clock = 2.0 + service.RESTART_PAUSE - 0.1
    supervisor.check()
    assert supervisor.spawned == [1000]
    supervisor.clock = 2.0 + service.RESTART_PAUSE
    supervisor.check()
    assert supervisor.spawned == [1000, 1001]


def test_a_worker_that_ran_a_while_is_restarted_at_once(supervisor: CountingSupervisor) -> None:
    supervisor.start()
    supervisor.clock = service.QUICK_EXIT_SECONDS + 1
    supervisor.processes[0].alive = False  # type: ignore[attr-defined]
    supervisor.check()
    assert supervisor.spawned == [1000, 1001]


def test_a_failed_scheduler_round_is_logged_not_fatal(
    supervisor: CountingSupervisor,
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def database_gone(*_: object) -> None:
        raise OSError("database restarting")

    monkeypatch.setattr(service, "schedule_ready", database_gone)
    registry = ModelRegistry([])
    assert not service._tick(db, settings, registry, supervisor, with_scp=True)
    assert "scheduler round failed" in caplog.text
    monkeypatch.setattr(service, "schedule_ready", lambda *_: None)
    assert service._tick(db, settings, registry, supervisor, with_scp=True)


def test_the_start_up_line_names_absolute_paths_and_no_password() -> None:
    assert service._safe_url("sqlite:///var/x.db").startswith("sqlite:////")
    assert service._safe_url("postgresql+psycopg://u:secret@h:5432/db") == (
        "postgresql+psycopg://u:***@h:5432/db"
    )


_PARENT = """
import multiprocessing, sys, threading, time
from pathlib import Path

from dicomnode.service import stop_with_parent


def child(flag: str) -> None:
    stop = threading.Event()
    stop_with_parent(stop)
    Path(flag + ".started").touch()
    stop.wait(60)
    Path(flag + ".stopped").touch()


if __name__ == "__main__":
    context = multiprocessing.get_context("forkserver")
    context.Process(target=child, args=(sys.argv[1],)).start()
    time.sleep(120)
"""


def test_a_worker_stops_when_serve_is_killed(tmp_path: Path) -> None:
    """serve killed with SIGKILL left its forkserver workers running as orphans, claiming
    jobs beside the next serve's workers with the old code."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    flag = str(tmp_path / "child")
    parent = subprocess.Popen([sys.executable, str(script), flag])
    try:
        deadline = time.monotonic() + 60
        while not Path(flag + ".started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert Path(flag + ".started").exists(), "the child did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while not Path(flag + ".stopped").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert Path(flag + ".stopped").exists(), "the child outlived its parent"
    finally:
        parent.kill()


def test_a_worker_waits_out_a_database_failure_instead_of_dying(
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PostgreSQL restart or a dropped connection used to end the worker process (a
    restart 10 s later, its models loaded again); it now waits and goes on."""
    from sqlalchemy.exc import OperationalError

    from dicomnode import worker as worker_module

    monkeypatch.setattr(worker_module, "DATABASE_PAUSE", 0.01)
    worker = worker_module.Worker(settings, db, ModelRegistry([]), worker_id="w")
    steps: list[int] = []

    def step() -> bool:
        steps.append(1)
        if len(steps) == 1:
            dropped = ConnectionError("server closed the connection unexpectedly\nhint")
            raise OperationalError("SELECT 1", {}, dropped)
        worker.stop.set()
        return True

    monkeypatch.setattr(worker, "step", step)
    worker.run()
    assert len(steps) == 2
    assert (
        "the database failed (ConnectionError: server closed the connection unexpectedly); "
        "trying again in 0.01 s"
    ) in caplog.text
