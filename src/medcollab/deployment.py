"""Initialising an embedded deployment: data directory, application secret, certificate, schema.

Everything is idempotent: running ``medcollab init`` (or ``make demo``) again reuses what exists and
never overwrites a key or a certificate.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, inspect, make_url

from medcollab import migrate
from medcollab.config import Settings
from medcollab.crypto.tls import ensure_certificate
from medcollab.db.session import make_engine
from medcollab.errors import ConfigurationError

SECRET_BYTES = 48


@dataclass(frozen=True, slots=True)
class InitReport:
    data_dir: Path
    secret_created: bool
    certificate_created: bool
    database: str


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _write_private(path: Path, content: str) -> bool:
    """Create ``path`` with mode 0600 unless it exists; True if it was created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
    return True


def initialise(settings: Settings) -> InitReport:
    _private_dir(settings.data_dir)
    secret_created = False
    if not settings.secret_key.get_secret_value():
        key_file = settings.resolved_secret_key_file
        _private_dir(key_file.parent)
        secret_created = _write_private(key_file, secrets.token_urlsafe(SECRET_BYTES) + "\n")
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigurationError(
                f"{key_file} is readable by other users (mode {mode:o})",
                hint=f"chmod 600 {key_file}",
            )
    certificate_created = False
    if settings.tls and settings.tls_cert_file is None and settings.tls_key_file is None:
        cert, key = settings.resolved_tls_cert_file, settings.resolved_tls_key_file
        _private_dir(cert.parent)
        certificate_created = ensure_certificate(cert, key)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # Batch migrations on SQLite rebuild a table by copying it, dropping the original
                # and renaming the copy; with foreign keys enforced, the drop cascades and deletes
                # every row that references it (memberships, sessions, ...). The pragma only
                # takes effect outside a transaction, hence the driver's own cursor.
                _sqlite_pragma(connection, "PRAGMA foreign_keys=OFF")
            with connection.begin():
                migrate.upgrade(connection=connection)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise ConfigurationError(
                        "the schema upgrade would leave rows whose foreign keys point nowhere, "
                        "so it was rolled back and the database is unchanged",
                        hint="report the failing migration; keep running the previous version",
                    )
            if sqlite:
                _sqlite_pragma(connection, "PRAGMA foreign_keys=ON")
        dialect = engine.dialect.name
    finally:
        engine.dispose()
    return InitReport(settings.data_dir, secret_created, certificate_created, dialect)


def _sqlite_pragma(connection: Connection, pragma: str) -> None:
    cursor = connection.connection.cursor()
    try:
        cursor.execute(pragma)
    finally:
        cursor.close()


def schema_is_current(settings: Settings) -> bool:
    """True when the database has medcollab's tables at the newest migration."""
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    url = make_url(settings.sqlalchemy_url)
    if (
        url.get_backend_name() == "sqlite"
        and url.database not in (None, "", ":memory:")
        and not Path(url.database).is_file()
    ):
        # Opening a missing SQLite file would create it (or fail if its directory is missing too):
        # a command run before `medcollab init` must change nothing and say what to do.
        return False
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return False
            current = MigrationContext.configure(connection).get_current_heads()
        head = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
        return set(current) == set(head)
    finally:
        engine.dispose()
