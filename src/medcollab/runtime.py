"""The process-wide collaborators, built once from :class:`~medcollab.config.Settings`.

The web app, the CLI and background jobs all start from a :class:`Runtime`; tests build one with a
frozen clock, cheaper password hashing parameters never (the real ones are tested), and a database
bound to a rolled-back transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medcollab.config import Settings
from medcollab.crypto.keys import KeyRing
from medcollab.crypto.passwords import PasswordHasher
from medcollab.db.session import Database, make_engine
from medcollab.kernel.clock import Clock, SystemClock


@dataclass(slots=True)
class Runtime:
    settings: Settings
    database: Database
    keyring: KeyRing
    clock: Clock = field(default_factory=SystemClock)
    hasher: PasswordHasher = field(default_factory=PasswordHasher)

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock | None = None) -> Runtime:
        database = Database(make_engine(settings.sqlalchemy_url))
        return cls(
            settings=settings,
            database=database,
            keyring=KeyRing(settings.app_secret()),
            clock=clock or SystemClock(),
        )
