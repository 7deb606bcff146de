"""The web pages: thin handlers that authenticate, call a service or the repository, and render.

Every page needs a web session (``deps.WebActor``) except the sign-in forms and the language
switch. Every unsafe request needs the session's CSRF token (or, before a session exists, the
pre-session token). Clinical data is reached only through ``RecordRepository``, built with the
same ``AccessContext`` logic as the FHIR API (``records.api.access_context``), so a page can never
show more than the API would, and every look is audited the same way.

A successful form post answers 303 to the page that shows its result (post/redirect/get). An HTMX
form gets ``HX-Redirect`` to that page instead (a full load, so the menu, the notification badge
and the CSRF ``<meta>`` stay current); an error page's ``<main>`` is swapped into the page.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import select

from medcollab.access.models import BreakGlassGrant
from medcollab.api.deps import SESSION_COOKIE, Auth, Client, DbSession, RuntimeDep, Users
from medcollab.audit import api as audit_api
from medcollab.audit.events import EventType, Outcome
from medcollab.errors import (
    AuthenticationFailed,
    InvalidInput,
    MedcollabError,
    NotFound,
    TooManyAttempts,
)
from medcollab.identity.models import Organization, SessionKind
from medcollab.identity.services import IssuedSession, MfaRequired, agent_for, require
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission, Role
from medcollab.records.api import access_context, record_repository
from medcollab.records.repository import MIN_BREAK_GLASS_REASON, RecordNotFound, RecordRepository
from medcollab.runtime import Runtime
from medcollab.web import i18n, oversight, patients, summaries
from medcollab.web.deps import (
    CSRF_COOKIE,
    AnyViewer,
    Language,
    PageViewer,
    Viewer,
    WebActor,
    WebForm,
    check_pre_session,
    check_same_origin,
    pre_session_token,
    web_actor,
)
from medcollab.web.i18n import N_
from medcollab.web.render import (
    anonymous_page,
    clear_session_cookies,
    home_for,
    page,
    redirect,
    safe_next,
    set_session_cookies,
)

router = APIRouter(include_in_schema=False)

_ID: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_REASON: Final = 500
HISTORY_PAGE: Final = 20
AUDIT_PAGE: Final = 50
PURPOSES: Final = {
    "TREAT": N_("Treatment"),
    "ETREAT": N_("Emergency treatment"),
    "HPAYMT": N_("Payment"),
    "HOPERAT": N_("Healthcare operations"),
    "HRESCH": N_("Research"),
    "PUBHLTH": N_("Public health"),
    "PATRQT": N_("Your own request"),
}
ACTIONS: Final = {
    "read": N_("viewed"),
    "search": N_("searched"),
    "export": N_("exported"),
    "create": N_("added"),
    "update": N_("changed"),
    "delete": N_("deleted"),
    "emergency access granted": N_("was granted emergency access"),
    # Collaboration steps (referrals, consultations, appointments) that concern the patient.
    "created": N_("created"),
    "accepted": N_("accepted"),
    "declined": N_("declined"),
    "revoked": N_("revoked"),
    "listed": N_("listed"),
    "invited": N_("invited a colleague to"),
    "invitation-refused": N_("could not invite a colleague to"),
    "joined": N_("joined"),
    "message-posted": N_("posted a message in"),
    "attachment-added": N_("added an attachment to"),
    "attachment-read": N_("opened an attachment of"),
    "closed": N_("closed"),
    "archived": N_("archived"),
    "access-denied": N_("was refused access to"),
    "booked": N_("booked"),
    "booking-refused": N_("could not book"),
    "cancelled": N_("cancelled"),
    # Imaging (DICOM studies) steps.
    "uploaded": N_("uploaded"),
    "downloaded": N_("downloaded"),
    "shared": N_("shared (into a consultation)"),
    "deidentified-download": N_("downloaded a de-identified copy of"),
}
#: What a patient reads for the resource types in their access history.
RESOURCE_NAMES: Final = {
    "Patient": N_("your record"),
    "Observation": N_("observations"),
    "Condition": N_("conditions"),
    "MedicationRequest": N_("medications"),
    "MedicationStatement": N_("medications"),
    "AllergyIntolerance": N_("allergies"),
    "Consent": N_("your consents"),
    "Encounter": N_("visits"),
    "DiagnosticReport": N_("reports"),
    "DocumentReference": N_("documents"),
    "Immunization": N_("immunisations"),
    "Procedure": N_("procedures"),
    "CarePlan": N_("care plans"),
    "CareTeam": N_("care team"),
    "ImagingStudy": N_("imaging"),
    "ServiceRequest": N_("a referral"),
    "Consultation": N_("a remote consultation"),
    "Binary": N_("a consultation attachment"),
    "Appointment": N_("an appointment"),
}
ROLES: Final = {
    Role.PATIENT.value: N_("patient"),
    Role.GUARDIAN.value: N_("guardian"),
    Role.PHYSICIAN.value: N_("physician"),
    Role.NURSE.value: N_("nurse"),
    Role.PHARMACIST.value: N_("pharmacist"),
    Role.TECHNICIAN.value: N_("technician"),
    Role.ORG_ADMIN.value: N_("organisation administrator"),
    Role.SECURITY_OFFICER.value: N_("security officer"),
    Role.PRIVACY_OFFICER.value: N_("privacy officer"),
    Role.AUDITOR.value: N_("auditor"),
    Role.RESEARCHER.value: N_("researcher"),
    Role.PLATFORM_ADMIN.value: N_("platform administrator"),
}
OUTCOMES: Final = {
    Outcome.SUCCESS.value: N_("success"),
    Outcome.MINOR_FAILURE.value: N_("refused or failed"),
    Outcome.SERIOUS_FAILURE.value: N_("serious failure"),
    Outcome.MAJOR_FAILURE.value: N_("major failure"),
}
REVIEW_STATUSES: Final = {
    "open": N_("open"),
    "approved": N_("approved"),
    "flagged": N_("flagged"),
}
COMMON: Final[dict[str, Any]] = {
    "purposes": PURPOSES,
    "actions": ACTIONS,
    "resource_names": RESOURCE_NAMES,
    "roles": ROLES,
    "outcomes": OUTCOMES,
    "code_labels": summaries.CODE_LABELS,
    "categories": patients.SENSITIVE_CATEGORIES,
    "review_statuses": REVIEW_STATUSES,
}


def _page(
    request: Request,
    template: str,
    view: Viewer,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **values: Any,
) -> HTMLResponse:
    return page(request, template, view, status=status, headers=headers, **COMMON, **values)


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise NotFound("no such patient")
    return value


# Entry and sign-in -------------------------------------------------------------------------------


@router.get("/")
def root(*, request: Request, auth: Auth, client: Client) -> Response:
    """The site's front door: the signed-in user's home, else the sign-in page."""
    try:
        actor = web_actor(request, auth, client, None)
    except MedcollabError:
        return redirect("/login")
    return redirect(home_for(actor))


def _login_page(
    request: Request,
    lang: str,
    *,
    status: int = 200,
    error: str | None = None,
    next_path: str = "",
    headers: dict[str, str] | None = None,
    notice: str | None = None,
) -> HTMLResponse:
    return anonymous_page(
        request,
        "login.html",
        lang,
        pre_token=pre_session_token(request),
        status=status,
        headers=headers,
        error=error,
        next_path=next_path,
        notice=notice,
    )


@router.get("/login")
def login_form(
    *,
    request: Request,
    lang: Language,
    next: Annotated[str, Query(max_length=300)] = "",  # noqa: A002 - the parameter's URL name.
    expired: Annotated[bool, Query()] = False,
    signed_out: Annotated[bool, Query()] = False,
) -> HTMLResponse:
    notice = None
    if expired:
        notice = N_("Your session ended. Please sign in again.")
    elif signed_out:
        notice = N_("You have signed out.")
    return _login_page(request, lang, next_path=safe_next(next, ""), notice=notice)


def _throttled(exc: TooManyAttempts) -> tuple[str, dict[str, str]]:
    return (
        N_("Too many attempts. Please wait a while and try again."),
        {"Retry-After": str(exc.retry_after)},
    )


def _signed_in(
    request: Request,
    issued: IssuedSession,
    *,
    auth: Auth,
    client: Client,
    next_path: str,
    lang: str,
) -> Response:
    """The answer to a completed sign-in: recovery codes (once), enrolment, or the home page."""
    actor = auth.authenticate(issued.access_token, client)
    if issued.recovery_codes:
        view = Viewer(
            actor=actor,
            display_name="",
            csrf_token=issued.csrf_token or "",
            idle_seconds=issued.expires_in,
            mfa_enrolled=True,
            language=lang,
        )
        response: Response = _page(
            request,
            "recovery_codes.html",
            view,
            codes=issued.recovery_codes,
            continue_to=safe_next(next_path, home_for(actor)),
        )
    elif issued.enrollment_only:
        response = redirect("/account/enrol")
    else:
        response = redirect(safe_next(next_path, home_for(actor)))
    set_session_cookies(response, issued)
    return response


@router.post("/login")
def login(
    *, request: Request, form: WebForm, auth: Auth, client: Client, lang: Language
) -> Response:
    check_pre_session(request, form)
    next_path = safe_next(form.get("next"), "")
    try:
        result = auth.login(
            form.get("username", ""), form.get("password", ""), client, kind=SessionKind.WEB
        )
    except AuthenticationFailed:
        return _login_page(
            request,
            lang,
            status=401,
            error=N_("The username or password is not correct."),
            next_path=next_path,
        )
    except TooManyAttempts as exc:
        message, headers = _throttled(exc)
        return _login_page(
            request, lang, status=429, error=message, next_path=next_path, headers=headers
        )
    if isinstance(result, MfaRequired):
        return _mfa_page(request, lang, result.mfa_token, next_path)
    return _signed_in(request, result, auth=auth, client=client, next_path=next_path, lang=lang)


def _mfa_page(
    request: Request,
    lang: str,
    mfa_token: str,
    next_path: str,
    *,
    status: int = 200,
    error: str | None = None,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    return anonymous_page(
        request,
        "login_mfa.html",
        lang,
        pre_token=pre_session_token(request),
        status=status,
        headers=headers,
        mfa_token=mfa_token,
        next_path=next_path,
        error=error,
    )


@router.post("/login/mfa")
def login_mfa(
    *, request: Request, form: WebForm, auth: Auth, client: Client, lang: Language
) -> Response:
    check_pre_session(request, form)
    next_path = safe_next(form.get("next"), "")
    mfa_token = form.get("mfa_token", "")
    try:
        issued = auth.complete_mfa(mfa_token, form.get("code", ""), client)
    except AuthenticationFailed:
        # A wrong code leaves the challenge usable, so the same form can be tried again.
        return _mfa_page(
            request,
            lang,
            mfa_token,
            next_path,
            status=401,
            error=N_("That code is not valid or has expired. Enter the current code."),
        )
    except TooManyAttempts as exc:
        message, headers = _throttled(exc)
        return _login_page(request, lang, status=429, error=message, headers=headers)
    return _signed_in(request, issued, auth=auth, client=client, next_path=next_path, lang=lang)


@router.post("/lang")
def switch_language(*, request: Request, form: WebForm, auth: Auth, client: Client) -> Response:
    """The language switch: a cookie, then back to the page it was used on."""
    check_same_origin(request)
    if request.cookies.get(SESSION_COOKIE) and request.cookies.get(CSRF_COOKIE):
        web_actor(request, auth, client, form.get("csrf_token"))
    else:
        check_pre_session(request, form)
    chosen = form.get("lang", "")
    if chosen not in i18n.LANGUAGES:
        raise InvalidInput("unknown language")
    response = redirect(safe_next(form.get("next"), "/login"))
    response.set_cookie(
        i18n.LANG_COOKIE,
        chosen,
        max_age=365 * 24 * 3600,
        path="/",
        secure=True,
        httponly=True,
        samesite="lax",
    )
    return response


@router.get("/session/ping", status_code=204)
def ping(*, actor: WebActor) -> Response:
    """Keeps an active session alive (the idle-timeout warning's "stay signed in")."""
    del actor
    return Response(status_code=204)


@router.post("/logout")
def logout(*, actor: WebActor, auth: Auth) -> Response:
    auth.logout(actor)
    response = redirect("/login?signed_out=1")
    clear_session_cookies(response)
    return response


# Account and enrolment ---------------------------------------------------------------------------


@router.get("/account")
def account(*, request: Request, view: AnyViewer, auth: Auth, users: Users) -> HTMLResponse:
    record = auth.session_info(view.actor)
    user_view = users.view(users.user_by_username(view.actor.username))
    return _page(request, "account.html", view, user=user_view, session=record)


@router.get("/account/enrol")
def enrol_intro(*, request: Request, view: AnyViewer) -> HTMLResponse:
    return _page(request, "enrol.html", view, step="intro")


@router.post("/account/enrol/start")
def enrol_start(*, request: Request, view: AnyViewer, auth: Auth) -> HTMLResponse:
    enrollment = auth.start_enrollment(view.actor)
    qr = base64.b64encode(enrollment.qr_svg.encode("utf-8")).decode("ascii")
    secret = enrollment.secret
    return _page(
        request,
        "enrol.html",
        view,
        step="scan",
        qr_data_uri="data:image/svg+xml;base64," + qr,
        secret=secret,
        secret_groups=[secret[i : i + 4] for i in range(0, len(secret), 4)],
    )


@router.post("/account/enrol/confirm")
def enrol_confirm(
    *, request: Request, view: AnyViewer, form: WebForm, auth: Auth, client: Client
) -> Response:
    try:
        codes, issued = auth.confirm_enrollment(view.actor, form.get("code", ""), client)
    except AuthenticationFailed:
        return _page(
            request,
            "enrol.html",
            view,
            status=401,
            step="retry",
            error=N_("That code did not work. Check the time on your device and try again."),
        )
    except TooManyAttempts as exc:
        message, headers = _throttled(exc)
        return _page(
            request, "enrol.html", view, status=429, step="retry", error=message, headers=headers
        )
    actor = auth.authenticate(issued.access_token, client)
    response = _page(
        request,
        "recovery_codes.html",
        Viewer(
            actor=actor,
            display_name=view.display_name,
            csrf_token=issued.csrf_token or "",
            idle_seconds=issued.expires_in,
            mfa_enrolled=True,
            language=view.language,
        ),
        codes=codes,
        continue_to=home_for(actor),
    )
    set_session_cookies(response, issued)
    return response


@router.post("/account/recovery-codes")
def new_recovery_codes(*, request: Request, view: PageViewer, auth: Auth) -> HTMLResponse:
    codes = auth.regenerate_recovery_codes(view.actor)
    return _page(request, "recovery_codes.html", view, codes=codes, continue_to="/account")


@router.post("/account/sessions/revoke-all")
def revoke_my_sessions(*, view: PageViewer, users: Users) -> Response:
    require(view.actor, Permission.SELF_SESSIONS_MANAGE)
    users.revoke_sessions(view.actor.user_id, agent=agent_for(view.actor), reason="revoked-by-user")
    response = redirect("/login?signed_out=1")
    clear_session_cookies(response)
    return response


# Patients ----------------------------------------------------------------------------------------


def _patient_repository(actor: Actor, db: DbSession, runtime: Runtime) -> RecordRepository:
    require(actor, Permission.OWN_RECORD_READ)
    return record_repository(access_context(actor), db, runtime)


def _ward_choices(users: Users, actor: Actor) -> list[str]:
    choices = patients.patients_of(users, actor)
    return choices if len(choices) > 1 else []


PatientParam = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9\-.]+$")]


@router.get("/my/record")
def my_record(
    *,
    request: Request,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
    patient: PatientParam = None,
) -> HTMLResponse:
    repo = _patient_repository(view.actor, db, runtime)
    patient_id = patients.chosen_patient(users, view.actor, patient)
    try:
        resources = repo.everything(patient_id)
    except RecordNotFound:
        record = None
    else:
        record = summaries.record_view(
            patient_id, [r.body for r in resources if r.body is not None]
        )
    return _page(
        request,
        "my_record.html",
        view,
        record=record,
        patient_id=patient_id,
        wards=_ward_choices(users, view.actor),
    )


@router.get("/my/access")
def my_access(
    *,
    request: Request,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
    patient: PatientParam = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> HTMLResponse:
    require(view.actor, Permission.OWN_ACCESS_HISTORY_READ)
    patient_id = patients.chosen_patient(users, view.actor, patient)
    history = audit_api.access_history(
        actor=view.actor,
        db=db,
        runtime=runtime,
        patient=patient_id,
        offset=offset,
        count=HISTORY_PAGE,
    )
    return _page(
        request,
        "my_access.html",
        view,
        history=history,
        patient_id=patient_id,
        wards=_ward_choices(users, view.actor),
        page_size=HISTORY_PAGE,
    )


@router.get("/my/access/{seq}/proof")
def my_access_proof(
    *,
    seq: int,
    view: PageViewer,
    db: DbSession,
    users: Users,
    size: Annotated[int, Query(ge=1, le=2**53)],
    patient: PatientParam = None,
) -> JSONResponse:
    """One entry's inclusion proof at a published tree size, for the page's "verify" button."""
    require(view.actor, Permission.OWN_ACCESS_HISTORY_READ)
    patient_id = patients.chosen_patient(users, view.actor, patient)
    return JSONResponse(patients.history_proof(db, view.actor, patient_id, seq, size))


def _consents_page(
    request: Request,
    view: Viewer,
    *,
    db: DbSession,
    runtime: Runtime,
    users: Users,
    patient_id: str,
    repo: RecordRepository,
) -> HTMLResponse:
    state = patients.sharing_state(repo, db, patient_id, runtime.clock.now())
    orgs = db.scalars(select(Organization).order_by(Organization.name)).all()
    return _page(
        request,
        "my_consents.html",
        view,
        patient_id=patient_id,
        orgs=orgs,
        denied_orgs=state.directives.denied_orgs,
        denied_labels=state.directives.denied_labels,
        wards=_ward_choices(users, view.actor),
    )


@router.get("/my/consents")
def my_consents(
    *,
    request: Request,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
    patient: PatientParam = None,
) -> HTMLResponse:
    require(view.actor, Permission.OWN_CONSENT_MANAGE)
    repo = _patient_repository(view.actor, db, runtime)
    patient_id = patients.chosen_patient(users, view.actor, patient)
    return _consents_page(
        request, view, db=db, runtime=runtime, users=users, patient_id=patient_id, repo=repo
    )


@router.post("/my/consents")
def change_consent(
    *,
    request: Request,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
) -> Response:
    require(view.actor, Permission.OWN_CONSENT_MANAGE)
    repo = _patient_repository(view.actor, db, runtime)
    requested = form.get("patient") or None
    patient_id = patients.chosen_patient(users, view.actor, requested)
    share = form.get("share") == "yes"
    patients.change_sharing(
        repo,
        db,
        patient_id,
        runtime.clock.now(),
        org_id=form.get("org") or None,
        label=form.get("category") or None,
        share=share,
    )
    suffix = f"?patient={patient_id}" if requested else ""
    return redirect("/my/consents" + suffix, request)


@router.get("/my/notifications")
def my_notifications(
    *,
    request: Request,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
    patient: PatientParam = None,
) -> HTMLResponse:
    require(view.actor, Permission.OWN_RECORD_READ)
    patient_id = patients.chosen_patient(users, view.actor, patient)
    items = patients.notifications(db, users, runtime.keyring, patient_id)
    return _page(
        request,
        "my_notifications.html",
        view,
        items=items,
        patient_id=patient_id,
        wards=_ward_choices(users, view.actor),
    )


@router.post("/my/notifications/read")
def read_notifications(
    *,
    request: Request,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
) -> Response:
    require(view.actor, Permission.OWN_RECORD_READ)
    patient_id = patients.chosen_patient(users, view.actor, form.get("patient") or None)
    patients.mark_read(db, runtime.clock, patient_id)
    return redirect("/my/notifications", request)


# Clinicians --------------------------------------------------------------------------------------


def _clinician(view: Viewer) -> Actor:
    require(view.actor, Permission.CLINICAL_RECORD_READ)
    return view.actor


@router.get("/clinic/patients")
def my_patients(
    *, request: Request, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> HTMLResponse:
    actor = _clinician(view)
    repo = record_repository(access_context(actor), db, runtime)
    found = repo.search("Patient", {}, count=100)
    rows = [
        (s.resource_id, summaries.human_name(s.body), s.body or {})
        for s in found.entries
        if s.body is not None
    ]
    grants = db.scalars(
        select(BreakGlassGrant)
        .where(
            BreakGlassGrant.user_id == actor.user_id,
            BreakGlassGrant.expires_at > runtime.clock.now(),
        )
        .order_by(BreakGlassGrant.expires_at.desc())
    ).all()
    return _page(request, "clinic_patients.html", view, rows=rows, total=found.total, grants=grants)


@router.get("/clinic/patients/open")
def open_chart(*, view: PageViewer, id: Annotated[str, Query(max_length=64)] = "") -> Response:  # noqa: A002
    _clinician(view)
    return redirect(f"/clinic/patients/{_check_id(id.strip())}")


def chart_purpose(
    actor: Actor, db: DbSession, runtime: Runtime, patient_id: str
) -> tuple[str | None, BreakGlassGrant | None]:
    """ETREAT while the clinician holds a live break-glass grant for the patient (even with a
    care relationship: the grant may be what overrides a consent denial), else the default."""
    grant = db.scalars(
        select(BreakGlassGrant)
        .where(
            BreakGlassGrant.user_id == actor.user_id,
            BreakGlassGrant.patient_id == patient_id,
            BreakGlassGrant.expires_at > runtime.clock.now(),
        )
        .order_by(BreakGlassGrant.expires_at.desc())
    ).first()
    if grant is not None:
        return "ETREAT", grant
    return None, None


@router.get("/clinic/patients/{patient_id}")
def chart(
    *, request: Request, patient_id: str, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> HTMLResponse:
    actor = _clinician(view)
    _check_id(patient_id)
    purpose, grant = chart_purpose(actor, db, runtime, patient_id)
    repo = record_repository(access_context(actor, purpose_header=purpose), db, runtime)
    try:
        resources = repo.everything(patient_id)
    except RecordNotFound:
        # Absent and not visible look the same, as in the API. The audit event of the refusal is
        # committed: catching the error here still ends the unit of work normally.
        return _page(
            request,
            "clinic_no_access.html",
            view,
            status=404,
            patient_id=patient_id,
            can_break_glass=actor.has(Permission.CLINICAL_BREAKGLASS_USE),
            reason="",
            error=None,
            min_reason=MIN_BREAK_GLASS_REASON,
            max_reason=_MAX_REASON,
        )
    bodies = [r.body for r in resources if r.body is not None]
    return _page(
        request,
        "clinic_chart.html",
        view,
        record=summaries.record_view(patient_id, bodies),
        grant=grant,
        # The imaging section (its upload form posts to web.imaging).
        studies=summaries.imaging_rows(bodies),
        max_upload_megabytes=max(1, runtime.settings.max_upload_bytes // (1024 * 1024)),
    )


def _break_glass_form(
    request: Request, view: Viewer, patient_id: str, *, reason: str = "", error: str | None = None
) -> HTMLResponse:
    return _page(
        request,
        "clinic_no_access.html",
        view,
        status=400 if error else 200,
        patient_id=patient_id,
        can_break_glass=True,
        reason=reason,
        error=error,
        min_reason=MIN_BREAK_GLASS_REASON,
        max_reason=_MAX_REASON,
        standalone=True,
    )


@router.get("/clinic/patients/{patient_id}/break-glass")
def break_glass_form(*, request: Request, patient_id: str, view: PageViewer) -> HTMLResponse:
    """The emergency-access form, for browsers without script (app.js opens it as a dialog)."""
    require(_clinician(view), Permission.CLINICAL_BREAKGLASS_USE)
    return _break_glass_form(request, view, _check_id(patient_id))


@router.post("/clinic/patients/{patient_id}/break-glass")
def break_glass(
    *,
    request: Request,
    patient_id: str,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    require(actor, Permission.CLINICAL_BREAKGLASS_USE)
    _check_id(patient_id)
    reason = " ".join(form.get("reason", "").split())
    if not MIN_BREAK_GLASS_REASON <= len(reason) <= _MAX_REASON:
        return _break_glass_form(
            request,
            view,
            patient_id,
            reason=reason,
            error=N_("Describe the emergency in at least 10 and at most 500 characters."),
        )
    ctx = access_context(actor, purpose_header="ETREAT", reason_header=reason)
    repo = record_repository(ctx, db, runtime)
    try:
        # The first emergency read creates the grant (reviewed, and the patient notified) and
        # is audited as break-glass; a patient that does not exist gets no grant.
        repo.everything(patient_id)
    except RecordNotFound:
        return _page(
            request,
            "clinic_no_access.html",
            view,
            status=404,
            patient_id=patient_id,
            can_break_glass=False,
            reason="",
            error=None,
            min_reason=MIN_BREAK_GLASS_REASON,
            max_reason=_MAX_REASON,
        )
    return redirect(f"/clinic/patients/{patient_id}", request)


# Organisation: users, audit, reviews -------------------------------------------------------------


@router.get("/org/users")
def org_users(
    *,
    request: Request,
    view: PageViewer,
    users: Users,
    done: Annotated[str, Query(max_length=20)] = "",
    count: Annotated[int, Query(ge=0, le=100_000)] = 0,
) -> HTMLResponse:
    scope = oversight.user_scope(view.actor, Permission.ORG_USER_READ)
    views = users.list_users(scope)
    return _page(
        request,
        "org_users.html",
        view,
        users=views,
        coverage=oversight.coverage(views),
        can_revoke=view.actor.has(Permission.ORG_SESSION_REVOKE),
        revoked=count if done == "revoked" else None,
    )


@router.post("/org/users/{user_id}/revoke-sessions")
def org_revoke_sessions(
    *, request: Request, user_id: uuid.UUID, view: PageViewer, users: Users
) -> Response:
    scope = oversight.user_scope(view.actor, Permission.ORG_SESSION_REVOKE)
    revoked = users.revoke_sessions(user_id, agent=agent_for(view.actor), allowed_orgs=scope)
    return redirect(f"/org/users?done=revoked&count={revoked}", request)


def _audit_rows(bundle: dict[str, Any], users: Users, db: DbSession) -> list[dict[str, Any]]:
    """The FHIR AuditEvents of a search as table rows, agents shown by name."""
    from medcollab.identity.models import User  # noqa: PLC0415 - one lookup per distinct agent.

    names: dict[str, str] = {}
    rows = []
    for entry in bundle.get("entry") or []:
        event = entry.get("resource") or {}
        agent = (event.get("agent") or [{}])[0]
        who = (agent.get("who") or {}).get("reference", "")
        name = ""
        if who.startswith("urn:medcollab:user:"):
            user_id = who.rsplit(":", 1)[-1]
            if user_id not in names:
                user = db.get(User, uuid.UUID(user_id))
                names[user_id] = users.display_name(user) if user else user_id
            name = names[user_id]
        else:
            name = (agent.get("who") or {}).get("display", "")
        purpose = ""
        for use in agent.get("purposeOfUse") or []:
            for coding in use.get("coding") or []:
                purpose = coding.get("code", "")
        subtype = (event.get("subtype") or [{}])[0].get("code", "")
        rows.append(
            {
                "seq": event.get("id"),
                "recorded": summaries.parse_time(event.get("recorded")),
                "type": subtype,
                "outcome": event.get("outcome", ""),
                "who": name,
                "role": ",".join(r.get("text", "") for r in agent.get("role") or []),
                "purpose": purpose,
                "break_glass": bool(event.get("purposeOfEvent")),
                "entities": [
                    (e.get("what") or {}).get("reference", "")
                    for e in event.get("entity") or []
                    if e.get("what")
                ],
                "reasons": event.get("outcomeDesc", ""),
            }
        )
    return rows


@router.get("/org/audit")
def org_audit(
    *,
    request: Request,
    view: PageViewer,
    db: DbSession,
    users: Users,
    patient: Annotated[str, Query(max_length=64)] = "",
    user: Annotated[str, Query(max_length=64)] = "",
    type: Annotated[str, Query(max_length=64)] = "",  # noqa: A002 - the search field's name.
    outcome: Annotated[str, Query(max_length=4)] = "",
    date_from: Annotated[str, Query(max_length=10)] = "",
    date_to: Annotated[str, Query(max_length=10)] = "",
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> HTMLResponse:
    require(view.actor, Permission.AUDIT_LOG_READ)
    error = None
    agent = None
    if user.strip():
        try:
            agent = str(users.user_by_username(user).id)
        except (NotFound, InvalidInput):
            error = N_("No user has that username.")
    if patient.strip() and not _ID.match(patient.strip()):
        error = N_("A patient ID has only letters, digits, '-' and '.'.")
    dates = [f"ge{date_from}"] if date_from else []
    dates += [f"le{date_to}"] if date_to else []
    rows: list[dict[str, Any]] = []
    total = 0
    if error is None:
        try:
            answer = audit_api.search_audit_events(
                actor=view.actor,
                db=db,
                patient=patient.strip() or None,
                agent=agent,
                date=dates or None,
                outcome=outcome or None,
                type=type or None,
                _count=AUDIT_PAGE,
                _offset=offset,
            )
        except InvalidInput:
            error = N_("Dates are written as YYYY-MM-DD.")
        else:
            bundle = json.loads(bytes(answer.body))
            total = int(bundle.get("total", 0))
            rows = _audit_rows(bundle, users, db)
    query = {
        "patient": patient,
        "user": user,
        "type": type,
        "outcome": outcome,
        "date_from": date_from,
        "date_to": date_to,
    }
    return _page(
        request,
        "org_audit.html",
        view,
        rows=rows,
        total=total,
        offset=offset,
        page_size=AUDIT_PAGE,
        query=query,
        event_types=[t.value for t in EventType],
        error=error,
    )


@router.get("/org/audit/status")
def org_audit_status(*, request: Request, view: PageViewer, db: DbSession) -> HTMLResponse:
    require(view.actor, Permission.AUDIT_LOG_READ)
    audit = oversight.audit_status(db)
    return _page(
        request,
        "org_audit_status.html",
        view,
        audit=audit,
        root_b64=base64.b64encode(audit.head.root_hash).decode("ascii") if audit.head else "",
        can_verify=view.actor.has(Permission.AUDIT_LOG_VERIFY),
    )


@router.post("/org/audit/verify")
def org_audit_verify(
    *, request: Request, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> Response:
    oversight.verify_now(db, runtime, view.actor)
    return redirect("/org/audit/status", request)


@router.get("/org/reviews")
def org_reviews(
    *, request: Request, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> HTMLResponse:
    items = oversight.review_queue(db, runtime, view.actor)
    return _page(request, "org_reviews.html", view, items=items)


@router.post("/org/reviews/{task_id}")
def org_review_decide(
    *,
    request: Request,
    task_id: uuid.UUID,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    try:
        oversight.decide_review(db, runtime, view.actor, task_id, form.get("decision", ""))
    except oversight.SelfReview:
        items = oversight.review_queue(db, runtime, view.actor)
        return _page(
            request,
            "org_reviews.html",
            view,
            items=items,
            error=N_("You cannot review your own emergency access."),
        )
    return redirect("/org/reviews", request)
