"""The identity HTTP API: ``/auth`` (sign-in, MFA, sessions) and ``/admin`` (users, organisations).

The login contract (later work and external checks rely on it):

* ``POST /auth/login`` ``{"username", "password"}`` → 200 ``{"mfa_required": true, "mfa_token"}`` for
  users with an authenticator, else ``{"access_token", "token_type": "bearer", "expires_in"}``; 401
  with one generic message for any wrong username or password; 429 with ``Retry-After`` when
  throttled or locked.
* ``POST /auth/mfa`` ``{"mfa_token", "code"}`` (TOTP or recovery code) → 200 with the token.
* ``GET /auth/me``, ``POST /auth/logout``, ``POST /auth/mfa/enroll``, ``POST /auth/mfa/confirm``.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from medcollab.api.deps import (
    SESSION_COOKIE,
    Auth,
    Client,
    CurrentActor,
    Users,
    permitted,
    require_json,
)
from medcollab.identity import schemas as s
from medcollab.identity.models import FhirLinkKind, SessionKind
from medcollab.identity.services import (
    IssuedSession,
    MfaRequired,
    UserView,
    agent_for,
    require,
)
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission, Role

auth_router = APIRouter(prefix="/auth", tags=["auth"], dependencies=[Depends(require_json)])
admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_json)])


def _token_response(issued: IssuedSession, response: Response) -> s.TokenResponse:
    if issued.kind is SessionKind.WEB:
        response.set_cookie(
            SESSION_COOKIE,
            issued.access_token,
            # The browser keeps the cookie for the absolute lifetime; the server enforces the
            # idle timeout (a cookie expiring at the idle timeout would end active sessions).
            max_age=issued.max_age,
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
    return s.TokenResponse(
        access_token=None if issued.kind is SessionKind.WEB else issued.access_token,
        expires_in=issued.expires_in,
        mfa_enrollment_required=issued.enrollment_only,
        csrf_token=issued.csrf_token,
        recovery_codes=list(issued.recovery_codes) or None,
    )


@auth_router.post(
    "/login",
    response_model=s.MfaRequiredResponse | s.TokenResponse,
    response_model_exclude_none=True,
)
def login(
    body: s.LoginRequest, auth: Auth, client: Client, response: Response
) -> s.MfaRequiredResponse | s.TokenResponse:
    kind = SessionKind.WEB if body.cookie else SessionKind.API
    result = auth.login(body.username, body.password, client, kind=kind)
    if isinstance(result, MfaRequired):
        return s.MfaRequiredResponse(mfa_token=result.mfa_token)
    return _token_response(result, response)


@auth_router.post("/mfa", response_model=s.TokenResponse, response_model_exclude_none=True)
def mfa(body: s.MfaRequest, auth: Auth, client: Client, response: Response) -> s.TokenResponse:
    return _token_response(auth.complete_mfa(body.mfa_token, body.code, client), response)


def _user_out(view: UserView) -> s.UserOut:
    return s.UserOut(
        id=view.id,
        username=view.username,
        display_name=view.display_name,
        disabled=view.disabled,
        mfa_enabled=view.mfa_enabled,
        locked_until=view.locked_until,
        memberships=[
            s.GrantOut(org_id=g.org_id, org_code=g.org_code, role=g.role) for g in view.grants
        ],
    )


@auth_router.get("/me", response_model=s.MeResponse)
def me(actor: CurrentActor, auth: Auth, users: Users) -> s.MeResponse:
    """The signed-in user. Allowed in an enrolment-only session, so the client can tell."""
    record = auth.session_info(actor)
    view = users.view(users.user_by_username(actor.username))
    return s.MeResponse(
        user=_user_out(view),
        roles=sorted(actor.roles),
        permissions=sorted(p.value for p in actor.permissions),
        session=s.SessionOut(
            kind=record.kind.value,
            expires_at=record.expires_at,
            idle_timeout_seconds=record.idle_timeout_seconds,
            mfa_verified=record.mfa_verified,
            enrollment_only=record.enrollment_only,
        ),
    )


@auth_router.post("/logout", status_code=204)
def logout(actor: CurrentActor, auth: Auth, response: Response) -> Response:
    auth.logout(actor)
    response.status_code = 204
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@auth_router.post("/mfa/enroll", response_model=s.EnrollResponse)
def enroll(actor: CurrentActor, auth: Auth) -> s.EnrollResponse:
    enrollment = auth.start_enrollment(actor)
    return s.EnrollResponse(
        otpauth_uri=enrollment.otpauth_uri, qr_svg=enrollment.qr_svg, secret=enrollment.secret
    )


@auth_router.post("/mfa/confirm", response_model=s.TokenResponse, response_model_exclude_none=True)
def confirm(
    body: s.ConfirmRequest, actor: CurrentActor, auth: Auth, client: Client, response: Response
) -> s.TokenResponse:
    """Confirm the pending authenticator: recovery codes (shown once) and a new session token;
    the enrolment session ends."""
    codes, issued = auth.confirm_enrollment(actor, body.code, client)
    token = _token_response(issued, response)
    token.recovery_codes = list(codes)
    return token


@auth_router.post("/mfa/recovery-codes", response_model=s.RecoveryCodesResponse)
def regenerate_recovery_codes(actor: CurrentActor, auth: Auth) -> s.RecoveryCodesResponse:
    return s.RecoveryCodesResponse(recovery_codes=list(auth.regenerate_recovery_codes(actor)))


@auth_router.post("/sessions/revoke-all", response_model=s.RevokedResponse)
def revoke_my_sessions(actor: CurrentActor, users: Users) -> s.RevokedResponse:
    """Sign out everywhere, this session included."""
    require(actor, Permission.SELF_SESSIONS_MANAGE)
    return s.RevokedResponse(
        revoked_sessions=users.revoke_sessions(
            actor.user_id, agent=agent_for(actor), reason="revoked-by-user"
        )
    )


# Administration ---------------------------------------------------------------------------------

UserReader = Annotated[Actor, Depends(permitted(Permission.ORG_USER_READ))]
UserManager = Annotated[Actor, Depends(permitted(Permission.ORG_USER_MANAGE))]
SessionRevoker = Annotated[Actor, Depends(permitted(Permission.ORG_SESSION_REVOKE))]
MfaResetter = Annotated[Actor, Depends(permitted(Permission.ORG_MFA_RESET))]
OrgReader = Annotated[Actor, Depends(permitted(Permission.PLATFORM_ORG_READ))]
OrgManager = Annotated[Actor, Depends(permitted(Permission.PLATFORM_ORG_MANAGE))]


def _scope(actor: Actor, permission: Permission) -> frozenset[uuid.UUID] | None:
    """Platform administrators act across organisations; everyone else within their own."""
    if Role.PLATFORM_ADMIN in actor.roles:
        return None
    return require(actor, permission)


@admin_router.get("/users", response_model=list[s.UserOut])
def list_users(actor: UserReader, users: Users) -> list[s.UserOut]:
    return [_user_out(v) for v in users.list_users(_scope(actor, Permission.ORG_USER_READ))]


@admin_router.post("/users", response_model=s.CreatedUserResponse, status_code=201)
def create_user(
    body: s.CreateUserRequest, actor: UserManager, users: Users
) -> s.CreatedUserResponse:
    created = users.create_user(
        username=body.username,
        display_name=body.display_name,
        password=body.password,
        grants=[(g.org, g.role) for g in body.memberships],
        agent=agent_for(actor),
        allowed_orgs=_scope(actor, Permission.ORG_USER_MANAGE),
        provision_mfa=body.provision_mfa,
        links=_links(body),
    )
    return s.CreatedUserResponse(
        user=_user_out(users.view(created.user)), otpauth_uri=created.otpauth_uri
    )


def _links(body: s.CreateUserRequest) -> list[tuple[FhirLinkKind, str]]:
    links = [(FhirLinkKind.GUARDIAN, ward) for ward in body.guardian_of]
    if body.patient:
        links.append((FhirLinkKind.PATIENT, body.patient))
    if body.practitioner:
        links.append((FhirLinkKind.PRACTITIONER, body.practitioner))
    return links


@admin_router.post("/users/{user_id}/links", status_code=204)
def link_user(user_id: uuid.UUID, body: s.LinkIn, actor: UserManager, users: Users) -> Response:
    """Link an account to a FHIR Patient (own or ward) or Practitioner."""
    users.link(
        user_id,
        FhirLinkKind(body.kind),
        body.resource_id,
        agent=agent_for(actor),
        allowed_orgs=_scope(actor, Permission.ORG_USER_MANAGE),
    )
    return Response(status_code=204)


@admin_router.post("/users/{user_id}/disable", response_model=s.UserOut)
def disable_user(user_id: uuid.UUID, actor: UserManager, users: Users) -> s.UserOut:
    user = users.disable_user(
        user_id, agent=agent_for(actor), allowed_orgs=_scope(actor, Permission.ORG_USER_MANAGE)
    )
    return _user_out(users.view(user))


@admin_router.post("/users/{user_id}/reset-mfa", response_model=s.CreatedUserResponse)
def reset_mfa(user_id: uuid.UUID, actor: MfaResetter, users: Users) -> s.CreatedUserResponse:
    reset = users.reset_mfa(
        user_id, agent=agent_for(actor), allowed_orgs=_scope(actor, Permission.ORG_MFA_RESET)
    )
    return s.CreatedUserResponse(
        user=_user_out(users.view(reset.user)), otpauth_uri=reset.otpauth_uri
    )


@admin_router.post("/users/{user_id}/revoke-sessions", response_model=s.RevokedResponse)
def revoke_sessions(user_id: uuid.UUID, actor: SessionRevoker, users: Users) -> s.RevokedResponse:
    revoked = users.revoke_sessions(
        user_id, agent=agent_for(actor), allowed_orgs=_scope(actor, Permission.ORG_SESSION_REVOKE)
    )
    return s.RevokedResponse(revoked_sessions=revoked)


def _org_out(org: object) -> s.OrgOut:
    return s.OrgOut.model_validate(org, from_attributes=True)


@admin_router.get("/orgs", response_model=list[s.OrgOut])
def list_orgs(actor: OrgReader, users: Users) -> list[s.OrgOut]:
    del actor
    return [_org_out(o) for o in users.list_orgs()]


@admin_router.post("/orgs", response_model=s.OrgOut, status_code=201)
def create_org(body: s.OrgIn, actor: OrgManager, users: Users) -> s.OrgOut:
    org = users.create_org(
        code=body.code,
        name=body.name,
        kind=body.kind,
        region=body.region,
        jurisdiction=body.jurisdiction,
        agent=agent_for(actor),
    )
    return _org_out(org)
