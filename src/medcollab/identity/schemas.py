"""Request and response bodies of the identity API. Unknown fields are refused."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from medcollab.identity.models import OrgKind
from medcollab.identity.passwords import MAX_LENGTH as PASSWORD_MAX
from medcollab.identity.services import USERNAME_MAX
from medcollab.kernel.permissions import Role

Username = Annotated[str, StringConstraints(min_length=1, max_length=USERNAME_MAX)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=PASSWORD_MAX)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Code = Annotated[str, StringConstraints(min_length=1, max_length=32)]
FhirId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class LoginRequest(Strict):
    username: Username
    password: Password
    #: Web clients ask for an HttpOnly session cookie plus a CSRF token instead of a bearer token.
    cookie: bool = False


class MfaRequest(Strict):
    mfa_token: Token
    code: Code


class ConfirmRequest(Strict):
    code: Code


class MfaRequiredResponse(BaseModel):
    mfa_required: Literal[True] = True
    mfa_token: str


class TokenResponse(BaseModel):
    access_token: str | None = Field(
        default=None, description="Absent when the session travels in the cookie."
    )
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth token type name.
    expires_in: int
    mfa_enrollment_required: bool = False
    csrf_token: str | None = None
    recovery_codes: list[str] | None = None


class EnrollResponse(BaseModel):
    otpauth_uri: str
    qr_svg: str
    secret: str


class RecoveryCodesResponse(BaseModel):
    recovery_codes: list[str]


class GrantOut(BaseModel):
    org_id: uuid.UUID
    org_code: str
    role: Role


class UserOut(BaseModel):
    id: uuid.UUID
    username: str
    display_name: str
    disabled: bool
    mfa_enabled: bool
    locked_until: datetime | None
    memberships: list[GrantOut]


class SessionOut(BaseModel):
    kind: str
    expires_at: datetime
    idle_timeout_seconds: int
    mfa_verified: bool
    enrollment_only: bool


class MeResponse(BaseModel):
    user: UserOut
    roles: list[Role]
    permissions: list[str]
    session: SessionOut


class GrantIn(Strict):
    org: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    role: Role


class CreateUserRequest(Strict):
    username: Username
    display_name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    password: Password
    memberships: Annotated[list[GrantIn], Field(min_length=1, max_length=20)]
    provision_mfa: bool = True
    #: FHIR links: the account's own Patient, its wards' Patients, its Practitioner.
    patient: FhirId | None = None
    guardian_of: Annotated[list[FhirId], Field(max_length=20)] = []
    practitioner: FhirId | None = None


class LinkIn(Strict):
    kind: Literal["patient", "guardian", "practitioner"]
    resource_id: FhirId


class CreatedUserResponse(BaseModel):
    user: UserOut
    otpauth_uri: str | None


class OrgIn(Strict):
    code: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    kind: OrgKind
    region: Annotated[str, StringConstraints(min_length=2, max_length=8)]
    jurisdiction: Literal["PIPL", "GDPR", "HIPAA"] | None = None


class OrgOut(BaseModel):
    id: uuid.UUID
    code: str
    name: str
    kind: OrgKind
    region: str
    jurisdiction: str | None


class RevokedResponse(BaseModel):
    revoked_sessions: int
