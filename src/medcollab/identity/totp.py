"""Time-based one-time passwords (RFC 6238) with replay protection.

pyotp computes the codes; this module adds what a verifier needs around it: the accepted window
(the current 30-second step and one step either side, RFC 6238 §5.2), the step that matched, so the
caller can refuse any code for that step or an earlier one (§5.2: "the verifier MUST NOT accept the
second attempt of the same OTP"), and enrolment artefacts (the otpauth:// URI and an SVG QR code).
"""

from __future__ import annotations

import base64
import hmac
import io
from dataclasses import dataclass
from datetime import datetime

import pyotp
import segno

STEP_SECONDS = 30
DIGITS = 6
DRIFT_STEPS = 1


@dataclass(frozen=True, slots=True)
class Authenticator:
    """A TOTP seed and how to present it to an authenticator app."""

    seed: bytes
    digits: int = DIGITS
    digest: str = "sha1"

    @property
    def secret_base32(self) -> str:
        return base64.b32encode(self.seed).decode("ascii").rstrip("=")

    def _otp(self) -> pyotp.TOTP:
        import hashlib  # noqa: PLC0415 - only to name the digest for pyotp.

        return pyotp.TOTP(
            self.secret_base32,
            digits=self.digits,
            digest=getattr(hashlib, self.digest),
            interval=STEP_SECONDS,
        )

    def code_at_step(self, step: int) -> str:
        return self._otp().generate_otp(step)

    def code_at(self, moment: datetime) -> str:
        return self.code_at_step(step_of(moment))

    def matching_step(self, code: str, moment: datetime) -> int | None:
        """The time step within the drift window whose code equals ``code``, else None.

        Every candidate is compared in constant time, and all of them are always computed.
        """
        code = code.strip().replace(" ", "")
        current = step_of(moment)
        found: int | None = None
        for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
            if hmac.compare_digest(self.code_at_step(step).encode(), code.encode()):
                found = step if found is None else found
        return found

    def provisioning_uri(self, account: str, issuer: str) -> str:
        return self._otp().provisioning_uri(name=account, issuer_name=issuer)


def step_of(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("TOTP needs a timezone-aware time")
    return int(moment.timestamp()) // STEP_SECONDS


def qr_svg(uri: str) -> str:
    """An SVG QR code of ``uri`` with a title for screen readers."""
    buffer = io.BytesIO()
    segno.make(uri, error="m").save(
        buffer, kind="svg", scale=4, border=4, title="Authenticator enrolment QR code"
    )
    return buffer.getvalue().decode("utf-8")
