"""Deployment settings.

Values come, highest priority first, from keyword arguments, ``MEDCOLLAB_*`` environment variables, an
optional TOML file (``MEDCOLLAB_CONFIG``, else ``./medcollab.toml``), and the defaults below. Secrets are
:class:`~pydantic.SecretStr`, so they never appear in a repr, a log line or a traceback.

The defaults are those of a production deployment; ``mode = "demo"`` or ``"dev"`` relaxes exactly the
checks in :meth:`Settings.check_safe_to_serve` and nothing else.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from medcollab.errors import ConfigurationError

#: Values that people paste from examples. Any secret equal to one of these (case-insensitive) or
#: shorter than :data:`MIN_SECRET_LENGTH` is refused outside dev/demo mode.
PLACEHOLDER_SECRETS = frozenset(
    {"", "change-me", "changeme", "change_me", "secret", "password", "placeholder", "todo", "xxx"}
)
MIN_SECRET_LENGTH = 32
#: The shortest secret :class:`medcollab.crypto.keys.KeyRing` derives keys from, in any mode.
KEYRING_MIN_SECRET_BYTES = 16


class Mode(StrEnum):
    PRODUCTION = "production"
    DEMO = "demo"
    DEV = "dev"


PositiveSeconds = Annotated[int, Field(gt=0)]


def _config_file() -> Path:
    return Path(os.environ.get("MEDCOLLAB_CONFIG", "medcollab.toml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEDCOLLAB_",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    mode: Mode = Mode.PRODUCTION
    debug: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Where an embedded deployment keeps its database, keys and certificate.
    data_dir: Path = Path("var")
    #: SQLAlchemy URL; empty means SQLite in ``data_dir``. A secret because it may hold a password.
    database_url: SecretStr = SecretStr("")

    # Serving.
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8443
    tls: bool = True
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    hsts_max_age: PositiveSeconds = 63_072_000
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    #: File uploads (consultation attachments, imaging) get their own, larger limit.
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 32 * 1_048_576
    #: Address headers are only trusted from these proxies; none by default.
    trusted_proxies: tuple[str, ...] = ()

    #: Keys HMACs of session tokens, recovery codes and throttle keys. Empty: read ``secret_key_file``
    #: (default ``data_dir/keys/app.secret``, written by ``medcollab init``).
    secret_key: SecretStr = SecretStr("")
    secret_key_file: Path | None = None

    # Authentication policy (NIST SP 800-63B-4, OWASP ASVS 5.0 V6/V7).
    lockout_threshold: Annotated[int, Field(ge=3, le=100)] = 10
    lockout_seconds: PositiveSeconds = 15 * 60
    backoff_free_attempts: Annotated[int, Field(ge=1)] = 3
    backoff_base_seconds: PositiveSeconds = 1
    backoff_max_seconds: PositiveSeconds = 5 * 60
    address_free_attempts: Annotated[int, Field(ge=1)] = 20
    address_block_threshold: Annotated[int, Field(ge=10)] = 100
    staff_idle_seconds: PositiveSeconds = 15 * 60
    patient_idle_seconds: PositiveSeconds = 60 * 60
    session_absolute_seconds: PositiveSeconds = 12 * 60 * 60
    mfa_challenge_seconds: PositiveSeconds = 5 * 60
    totp_issuer: str = "medcollab"

    # Keys (DESIGN.md section 4). The file provider keeps key-encryption keys in ``key_dir``; the
    # PKCS#11 provider keeps them in an HSM token and they never leave it.
    key_provider: Literal["file", "pkcs11"] = "file"
    pkcs11_module: Path | None = None
    pkcs11_token_label: str = "medcollab"  # noqa: S105 - names the HSM token; not a secret.
    pkcs11_pin: SecretStr = SecretStr("")

    # Records and access (the records chokepoint).
    #: How long registering a patient at an organisation counts as a care relationship.
    registration_relationship_days: Annotated[int, Field(ge=1, le=3650)] = 30
    break_glass_minutes: Annotated[int, Field(ge=1, le=24 * 60)] = 60
    fhir_max_page_size: Annotated[int, Field(ge=1, le=1000)] = 100
    fhir_default_page_size: Annotated[int, Field(ge=1, le=1000)] = 20
    fhir_max_bundle_bytes: Annotated[int, Field(ge=1024)] = 16 * 1_048_576

    # Audit log.
    #: UNSAFE, benchmarks only: skip audit events of record access so the cost of auditing can be
    #: measured. Refused outside dev mode; every server start with it logs a warning.
    unsafe_disable_audit: bool = False
    #: How often the server integrates new audit events into the Merkle tree and signs a tree head
    #: (while events arrive). 0 disables the background integrator (tests drive it explicitly).
    audit_integrate_seconds: Annotated[float, Field(ge=0, le=60)] = 1.0
    #: How long audit events stay in the live log before `medcollab audit archive` may move them to a
    #: signed file. None: the jurisdiction profile's retention (6 years, or longer if the law asks).
    #: A shorter value than the law's minimum is refused when archiving, not here, because the
    #: minimum also depends on the organisations' own profiles, which live in the database.
    audit_retention_days: int | None = None

    #: The deployment's jurisdiction profile; organisations may override it.
    jurisdiction: Literal["PIPL", "GDPR", "HIPAA"] = "PIPL"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env files and no secrets directory: configuration comes from the environment or TOML.
        del dotenv_settings, file_secret_settings
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file())
        return (init_settings, env_settings, toml)

    @field_validator("totp_issuer")
    @classmethod
    def _issuer_is_plain(cls, value: str) -> str:
        if not value or ":" in value or len(value) > 64:
            raise ValueError("totp_issuer must be 1-64 characters without ':'")
        return value

    # Derived locations -----------------------------------------------------------------------

    @property
    def relaxed(self) -> bool:
        """Dev and demo deployments may run with generated secrets and debug."""
        return self.mode in (Mode.DEMO, Mode.DEV)

    @property
    def sqlalchemy_url(self) -> str:
        url = self.database_url.get_secret_value()
        return url or f"sqlite:///{(self.data_dir / 'medcollab.db').resolve()}"

    @property
    def key_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def resolved_secret_key_file(self) -> Path:
        return self.secret_key_file or self.key_dir / "app.secret"

    @property
    def resolved_tls_cert_file(self) -> Path:
        return self.tls_cert_file or self.data_dir / "tls" / "cert.pem"

    @property
    def resolved_tls_key_file(self) -> Path:
        return self.tls_key_file or self.data_dir / "tls" / "key.pem"

    def app_secret(self) -> bytes:
        """The application secret, from the setting or its file; raises if neither is usable."""
        secret = self._secret_text().encode("utf-8")
        if len(secret) < KEYRING_MIN_SECRET_BYTES:
            # Said here, as a configuration error, rather than by the key ring as a ValueError
            # that every command would report as an unexpected failure.
            raise ConfigurationError(
                f"the application secret is shorter than {KEYRING_MIN_SECRET_BYTES} bytes, "
                "too short to derive keys from",
                hint=f"set MEDCOLLAB_SECRET_KEY, or the contents of "
                f"{self.resolved_secret_key_file}, to a random value of at least "
                f"{MIN_SECRET_LENGTH} characters",
            )
        return secret

    def _secret_text(self) -> str:
        value = self.secret_key.get_secret_value()
        if not value:
            path = self.resolved_secret_key_file
            try:
                value = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                raise ConfigurationError(
                    f"no application secret: {path} does not exist",
                    hint="run `medcollab init` or set MEDCOLLAB_SECRET_KEY",
                ) from None
        return value

    def check_safe_to_serve(self) -> None:
        """Refuse an unsafe production deployment, naming every problem and its fix."""
        if self.relaxed:
            return
        problems: list[str] = []
        try:
            secret = self._secret_text()
        except ConfigurationError as exc:
            problems.append(exc.diagnostics())
        else:
            if secret.strip().lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH:
                problems.append(
                    "the application secret is a placeholder or shorter than "
                    f"{MIN_SECRET_LENGTH} characters: set MEDCOLLAB_SECRET_KEY to a random value, "
                    "e.g. the output of `python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
                )
        if not self.tls:
            problems.append(
                "TLS is off: set MEDCOLLAB_TLS=true (and MEDCOLLAB_TLS_CERT_FILE / "
                "MEDCOLLAB_TLS_KEY_FILE for your certificate); medcollab never serves PHI over plain HTTP"
            )
        if self.debug:
            problems.append("debug is on: set MEDCOLLAB_DEBUG=false")
        if self.unsafe_disable_audit:
            problems.append("auditing is off: unset MEDCOLLAB_UNSAFE_DISABLE_AUDIT")
        if self.key_provider == "pkcs11":
            pin = self.pkcs11_pin.get_secret_value()
            if not self.pkcs11_module:
                problems.append("MEDCOLLAB_PKCS11_MODULE must name the HSM's PKCS#11 library")
            if pin.strip().lower() in PLACEHOLDER_SECRETS or pin in ("1234", "0000", "123456"):
                problems.append(
                    "MEDCOLLAB_PKCS11_PIN is empty or a placeholder: set the token's user PIN"
                )
        if problems:
            raise ConfigurationError(
                "refusing to start in production mode: " + "; ".join(problems),
                hint="set MEDCOLLAB_MODE=dev only on a development machine",
            )
