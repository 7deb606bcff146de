"""Initialising an embedded deployment: data directory, application secret, certificate, schema.

Everything is idempotent: running ``medcollab init`` (or ``make demo``) again reuses what exists and
never overwrites a key or a certificate.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect

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
        with engine.begin() as connection:
            migrate.upgrade(connection=connection)
        dialect = engine.dialect.name
    finally:
        engine.dispose()
    return InitReport(settings.data_dir, secret_created, certificate_created, dialect)


def schema_is_current(settings: Settings) -> bool:
    """True when the database has medcollab's tables at the newest migration."""
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415
    from alembic.script import ScriptDirectory  # noqa: PLC0415

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
