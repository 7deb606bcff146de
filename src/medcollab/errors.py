"""The medcollab error hierarchy.

Every error the platform raises on purpose derives from :class:`MedcollabError`, carries a stable
machine-readable ``code`` and a ``diagnostics()`` text a person can act on, and never contains a
secret or personal data. Front doors map these to HTTP statuses in one place
(:mod:`medcollab.api.errors`) and to CLI exit codes in :mod:`medcollab.cli.main`::

    MedcollabError
    ├── ConfigurationError            the deployment is not safe or not complete
    ├── InvalidInput                  the request is malformed or violates a rule
    │   ├── PasswordPolicyViolation
    │   ├── UnsupportedMediaType
    │   └── PayloadTooLarge
    ├── AuthenticationFailed          wrong credentials, token or code (one generic message)
    │   └── SessionExpired
    ├── TooManyAttempts               throttled or locked out (carries retry_after seconds)
    ├── MfaEnrollmentRequired         staff account without confirmed MFA
    ├── PermissionDenied              authenticated, but the action is not allowed
    ├── NotFound                      absent, or present but not visible to the caller
    ├── Conflict                      the change collides with existing state
    └── ServiceUnavailable            a dependency (audit, keys, database) cannot do its part
"""

from __future__ import annotations

from typing import ClassVar


class MedcollabError(Exception):
    """Base error. ``message`` is safe to show to a client; ``diagnostics()`` adds operator advice."""

    code: ClassVar[str] = "error"
    #: Writes made before the error are committed instead of rolled back. Only errors that exist to
    #: record a refusal (failed logins, lockouts) set this, so a refusal is never silently forgotten.
    keeps_writes: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """What went wrong and, when known, what to do about it."""
        return self.message if self.hint is None else f"{self.message} ({self.hint})"


class ConfigurationError(MedcollabError):
    code = "configuration_error"


class InvalidInput(MedcollabError):
    code = "invalid_input"


class PasswordPolicyViolation(InvalidInput):
    code = "password_policy"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class AuthenticationFailed(MedcollabError):
    code = "authentication_failed"
    keeps_writes = True


class SessionExpired(AuthenticationFailed):
    code = "session_expired"


class TooManyAttempts(MedcollabError):
    code = "too_many_attempts"
    keeps_writes = True

    def __init__(self, message: str, *, retry_after: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = max(1, retry_after)


class MfaEnrollmentRequired(MedcollabError):
    code = "mfa_enrollment_required"


class PermissionDenied(MedcollabError):
    code = "permission_denied"


class NotFound(MedcollabError):
    code = "not_found"


class Conflict(MedcollabError):
    code = "conflict"


class ServiceUnavailable(MedcollabError):
    code = "service_unavailable"
