"""Engines and the unit of work.

One transaction per request or job: :meth:`Database.unit_of_work` commits when its block succeeds and
rolls back on any exception, except :class:`~medcollab.errors.MedcollabError` subclasses that exist to
record a refusal (``keeps_writes``), whose writes are committed before the error propagates. Services
may ``flush()``; they never ``commit()``.

SQLite runs in WAL mode with foreign keys on and ``synchronous=FULL`` (an audit record must survive a
power cut). Its transactions start with ``BEGIN IMMEDIATE``, taking the write lock up front: deferred
transactions that read and then write fail with ``SQLITE_BUSY`` under concurrency instead of waiting,
and a hospital's login burst must queue, not fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from medcollab.errors import MedcollabError

SQLITE_BUSY_TIMEOUT_MS = 10_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with medcollab's connection settings for the URL's dialect."""
    if url.startswith("postgresql") and "+psycopg" not in url.split("://", 1)[0]:
        # psycopg 3 is the one supported driver; accept plain postgresql:// URLs for convenience.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so SAVEPOINT and BEGIN IMMEDIATE work.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            # Deleted content is overwritten, not left in free pages: crypto-shredding removes
            # wrapped keys, and their bytes must not linger in the file.
            cursor.execute("PRAGMA secure_delete=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Owns the engine and hands out sessions and units of work.

    ``bind`` lets the test-suite run each test inside one outer transaction that it rolls back; the
    application's commits then become savepoint releases and nothing persists between tests.
    """

    def __init__(self, engine: Engine, *, bind: Connection | None = None) -> None:
        self.engine = engine
        self._sessions = sessionmaker(
            bind=bind if bind is not None else engine,
            expire_on_commit=False,
            autoflush=True,
            join_transaction_mode="create_savepoint",
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def session(self) -> Session:
        return self._sessions()

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
        except MedcollabError as exc:
            if exc.keeps_writes:
                session.commit()
            else:
                session.rollback()
            raise
        except BaseException:
            session.rollback()
            raise
        else:
            session.commit()
        finally:
            session.close()
