"""The process-wide collaborators, built once from :class:`~medcollab.config.Settings`.

The web app, the CLI and background jobs all start from a :class:`Runtime`; tests build one with a
frozen clock and a database bound to a rolled-back transaction (the real password hashing and key
providers run in tests too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from medcollab.config import Settings
from medcollab.crypto.keys import KeyRing
from medcollab.crypto.passwords import PasswordHasher
from medcollab.crypto.providers import KeyProvider, provider_from_settings
from medcollab.crypto.signing import LogSigner, load_or_create_log_key, log_key_path
from medcollab.db.session import Database, make_engine
from medcollab.kernel.clock import Clock, SystemClock

if TYPE_CHECKING:
    from medcollab.keys.services import KeyService


@dataclass(slots=True)
class Runtime:
    settings: Settings
    database: Database
    keyring: KeyRing
    clock: Clock = field(default_factory=SystemClock)
    hasher: PasswordHasher = field(default_factory=PasswordHasher)
    #: The key-encryption-key provider, opened on first use (a PKCS#11 login is not free).
    provider: KeyProvider | None = None
    #: The audit log's signing key (Ed25519), loaded on first use.
    signer: LogSigner | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock | None = None) -> Runtime:
        database = Database(make_engine(settings.sqlalchemy_url))
        return cls(
            settings=settings,
            database=database,
            keyring=KeyRing(settings.app_secret()),
            clock=clock or SystemClock(),
        )

    @property
    def key_provider(self) -> KeyProvider:
        if self.provider is None:
            self.provider = provider_from_settings(self.settings)
        return self.provider

    @property
    def log_signer(self) -> LogSigner:
        if self.signer is None:
            self.signer = load_or_create_log_key(log_key_path(self.settings.key_dir))
        return self.signer

    def key_service(self, session: Session) -> KeyService:
        """Data keys for one unit of work (unwrapped keys are cached per service only)."""
        from medcollab.keys.services import KeyService  # noqa: PLC0415 - domain over crypto.

        return KeyService(session=session, provider=self.key_provider, clock=self.clock)

    def close(self) -> None:
        if self.provider is not None:
            self.provider.close()
            self.provider = None
        self.database.engine.dispose()
