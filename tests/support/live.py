"""A real HTTP server over a committed database, for tests that race concurrent requests.

The usual fixtures run each test inside one rolled-back transaction on one connection, which
serialises everything and so cannot show a race. :func:`live_server` instead migrates a fresh
database (a new SQLite file, or a new database on the test run's PostgreSQL server, dropped
afterwards), builds a :class:`~medcollab.runtime.Runtime` over it with a
:class:`~medcollab.kernel.clock.FrozenClock`, and serves ``app_factory(runtime)`` with uvicorn in a
thread of this process. Requests sent to ``Live.base`` (with httpx, from several threads) are then
handled concurrently, each in its own transaction, exactly as in production.

Use it from a fixture::

    @pytest.fixture
    def live(db_kind: str, tmp_path: Path, hasher: PasswordHasher,
             request: pytest.FixtureRequest) -> Iterator[Live]:
        with live_server(create_app, db_kind=db_kind, tmp_path=tmp_path, hasher=hasher,
                         request=request) as server:
            yield server
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text

from medcollab import migrate
from medcollab.config import Settings
from medcollab.crypto.keys import KeyRing
from medcollab.crypto.passwords import PasswordHasher
from medcollab.db.session import Database, make_engine
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime

START_TIMEOUT_SECONDS = 30


@dataclass
class Live:
    """A running server: its base URL and the runtime (database, clock) it serves."""

    base: str
    runtime: Runtime

    @property
    def clock(self) -> FrozenClock:
        clock = self.runtime.clock
        assert isinstance(clock, FrozenClock)
        return clock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def live_server(
    app_factory: Callable[[Runtime], FastAPI],
    *,
    db_kind: str,
    tmp_path: Path,
    hasher: PasswordHasher,
    request: pytest.FixtureRequest,
    name: str = "live",
    **settings: Any,
) -> Iterator[Live]:
    """Serve ``app_factory(runtime)`` over a fresh, committed ``db_kind`` database.

    ``request`` fetches the session's ``postgres_server`` fixture, only when ``db_kind`` is
    ``postgresql``. ``settings`` override :class:`~medcollab.config.Settings` fields. ``name``
    prefixes the PostgreSQL database and names the server thread.
    """
    admin_url = None
    db_name = f"{name}_{uuid.uuid4().hex[:12]}"
    if db_kind == "sqlite":
        url = f"sqlite:///{tmp_path / f'{name}.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        admin_url = server.url()
        admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        admin.dispose()
        url = server.url(db_name)
    engine = make_engine(url)
    runtime = None
    try:
        with engine.begin() as conn:
            migrate.upgrade(connection=conn)
        config = Settings(
            **{
                "mode": "dev",
                "secret_key": secrets.token_urlsafe(32),
                "data_dir": tmp_path / "data",
                # No background integrator: the tests integrate (or not) explicitly.
                "audit_integrate_seconds": 0,
                **settings,
            }
        )
        runtime = Runtime(
            settings=config,
            database=Database(engine),
            keyring=KeyRing(config.app_secret()),
            clock=FrozenClock(),
            hasher=hasher,
        )
        port = free_port()
        # log_config=None: the test process keeps its own logging configuration.
        uvicorn_server = uvicorn.Server(
            uvicorn.Config(
                app_factory(runtime),
                host="127.0.0.1",
                port=port,
                log_config=None,
                access_log=False,
                lifespan="on",
            )
        )
        thread = threading.Thread(target=uvicorn_server.run, name=f"{name}-uvicorn", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while not uvicorn_server.started:
                assert thread.is_alive(), "the server stopped during start-up"
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
            yield Live(f"http://127.0.0.1:{port}", runtime)
        finally:
            uvicorn_server.should_exit = True
            thread.join(timeout=START_TIMEOUT_SECONDS)
    finally:
        if runtime is not None:
            runtime.close()
        else:
            engine.dispose()
        if admin_url is not None:
            admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()
