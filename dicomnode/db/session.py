"""Engines and sessions.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so a
commit is on disk when it returns, and every transaction starts with
``BEGIN IMMEDIATE`` so concurrent writers queue on the busy timeout instead
of failing on a lock upgrade. PostgreSQL needs nothing special.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.dml import Insert

from dicomnode.errors import DatabaseError

SQLITE_BUSY_TIMEOUT_MS = 30_000

READ_ONLY = "dicomnode_read_only"
"""The execution option of :meth:`Database.reading`'s connections (SQLite: a plain ``BEGIN``)."""


def utcnow() -> datetime:
    """Naive UTC now (the database stores naive UTC timestamps)."""
    return datetime.now(UTC).replace(tzinfo=None)


def db_now(session: Session) -> datetime:
    """Now by the database's clock, naive UTC: the clock every host sharing the database reads.

    Leases, retry times and the settle time compare timestamps that different hosts wrote;
    with each host's own clock, a host a minute behind took leases that the others found
    expired at once (its jobs ran twice). PostgreSQL: the server's ``clock_timestamp()``
    (one query). SQLite: a file on this host, so this host's clock.
    """
    if session.get_bind().dialect.name == "postgresql":
        moment = session.execute(text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar_one()
        assert isinstance(moment, datetime)
        return moment
    return utcnow()


def insert_new(
    session: Session, table: type[DeclarativeBase], rows: list[dict[str, Any]], keys: list[str]
) -> Insert:
    """An INSERT of ``rows`` that skips each row whose ``keys`` another row holds already
    (``ON CONFLICT DO NOTHING``: SQLite and PostgreSQL), so that nodes sharing the database
    may insert the same row at once."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    return insert(table).values(rows).on_conflict_do_nothing(index_elements=keys)


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return Path(parsed.database)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        reading = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; creates the SQLite file's folder when needed."""
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, pool_pre_ping=sqlite_file is None)
    except (SQLAlchemyError, ImportError) as exc:
        raise DatabaseError(
            f"cannot use database URL {make_url(url).render_as_string(hide_password=True)}: {exc}"
        ) from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def lock_until_commit(session: Session, key: str) -> None:
    """Make the transactions that name ``key`` take turns, on every node sharing the
    database, from here until this one commits or rolls back.

    PostgreSQL: a transaction-level advisory lock on the key's hash (a second
    transaction waits here, then reads what the first committed). SQLite: nothing to
    do, its writers take turns already (``BEGIN IMMEDIATE``)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})


class Database:
    """An engine and its session factory; ``with db.session() as s:`` commits or rolls back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session that only reads (``status``, metrics scrapes): on SQLite it takes no
        write lock (a plain ``BEGIN``: WAL readers neither wait for writers nor hold them
        up), so a slow read never delays a C-STORE's commit. It is rolled back at the end."""
        session = self._readers()
        try:
            yield session
        finally:
            session.rollback()
            session.close()

    def now(self) -> datetime:
        """:func:`db_now` in a session of its own."""
        with self.session() as session:
            return db_now(session)

    def dispose(self) -> None:
        self.engine.dispose()
