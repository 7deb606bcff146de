"""Identity services: organisations and users, sign-in with MFA, sessions and throttling.

The rules come from NIST SP 800-63B-4 and OWASP ASVS 5.0 (V6 authentication, V7 sessions):

* A wrong username and a wrong password are indistinguishable, in message and in time (an unknown
  username still costs one Argon2id verification).
* Failures are counted per username (whether or not it exists, so a lockout reveals nothing) and per
  client address, with exponential backoff; the ``lockout_threshold``-th consecutive failure,
  password or MFA, locks the username for ``lockout_seconds``. Every failure and lockout is audited.
* A TOTP code is accepted once: the matched time step must be later than the last accepted one.
* Session, MFA-challenge and recovery-code secrets are stored only as keyed HMACs.
* Staff must use MFA. A staff account without an authenticator gets an enrolment-only session.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Select, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from medcollab.audit.events import Agent, AuditEvent, EventType, Outcome
from medcollab.audit.services import AuditLog
from medcollab.crypto.keys import Purpose
from medcollab.crypto.tokens import new_recovery_code, new_token, new_totp_seed
from medcollab.crypto.tokens import normalise_recovery_code as _normalise_recovery_code
from medcollab.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidInput,
    MfaEnrollmentRequired,
    NotFound,
    PermissionDenied,
    SessionExpired,
    TooManyAttempts,
)
from medcollab.identity.models import (
    AuthSession,
    FhirLinkKind,
    Membership,
    MfaChallenge,
    Organization,
    OrgKind,
    RecoveryCode,
    SessionKind,
    Throttle,
    User,
    UserFhirLink,
)
from medcollab.identity.passwords import check_password
from medcollab.identity.totp import Authenticator, qr_svg
from medcollab.kernel.context import Actor, RoleGrant
from medcollab.kernel.permissions import CLINICAL_ROLES, Permission, Role, requires_mfa
from medcollab.runtime import Runtime

RECOVERY_CODE_COUNT = 10
GENERIC_LOGIN_FAILURE = "invalid username or password"
GENERIC_MFA_FAILURE = "invalid or expired code"
GENERIC_SESSION_FAILURE = "invalid or expired session"
USERNAME_MAX = 64
_USERNAME_EXTRA = frozenset("._-@")
_SESSION_TOUCH_INTERVAL = timedelta(seconds=5)


# Values -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Where a request came from. The address is as seen by the server (proxies are not trusted)."""

    address: str | None = None
    user_agent: str | None = None

    def agent(self, user_id: uuid.UUID | None = None, session_ref: str | None = None) -> Agent:
        return Agent(
            user_id=user_id,
            session_hash=session_ref,
            client_address=self.address,
            user_agent=(self.user_agent or "")[:200] or None,
        )


@dataclass(frozen=True, slots=True)
class MfaRequired:
    mfa_token: str


@dataclass(frozen=True, slots=True)
class IssuedSession:
    access_token: str
    expires_in: int
    kind: SessionKind
    enrollment_only: bool = False
    csrf_token: str | None = None
    #: Shown once, on the first confirmation of an authenticator provisioned by an administrator.
    recovery_codes: tuple[str, ...] = ()
    #: Seconds until the absolute end of the session (the cookie's lifetime).
    max_age: int = 0


@dataclass(frozen=True, slots=True)
class Enrollment:
    otpauth_uri: str
    qr_svg: str
    secret: str


@dataclass(frozen=True, slots=True)
class NewUser:
    user: User
    #: For staff: the otpauth:// URI of the authenticator provisioned at creation.
    otpauth_uri: str | None = None


@dataclass(frozen=True, slots=True)
class UserView:
    """A user as an administrator sees it: no hashes, no secrets."""

    id: uuid.UUID
    username: str
    display_name: str
    disabled: bool
    mfa_enabled: bool
    locked_until: datetime | None
    grants: tuple[RoleGrant, ...] = field(default=())


def normalise_username(raw: str) -> str:
    """NFKC, case-folded, trimmed; letters, digits and ``. _ - @`` only."""
    name = unicodedata.normalize("NFKC", raw).strip().casefold()
    if not name or len(name) > USERNAME_MAX:
        raise InvalidInput(f"username must be 1-{USERNAME_MAX} characters")
    if any(not (ch.isalnum() or ch in _USERNAME_EXTRA) for ch in name):
        raise InvalidInput("username may contain only letters, digits and . _ - @")
    return name


# Services ---------------------------------------------------------------------------------------


class _Base:
    def __init__(self, *, session: Session, runtime: Runtime) -> None:
        self._db = session
        self._rt = runtime
        self._settings = runtime.settings
        self._keys = runtime.keyring
        self._audit = AuditLog(session)

    def _now(self) -> datetime:
        return self._rt.clock.now()

    def _event(
        self,
        event_type: EventType,
        outcome: Outcome,
        agent: Agent,
        *,
        subject_user_id: uuid.UUID | None = None,
        subject_org_id: uuid.UUID | None = None,
        reasons: tuple[str, ...] = (),
    ) -> None:
        self._audit.append(
            AuditEvent(
                type=event_type,
                outcome=outcome,
                recorded_at=self._now(),
                agent=agent,
                subject_user_id=subject_user_id,
                subject_org_id=subject_org_id,
                reasons=reasons,
            )
        )

    def _session_ref(self, session_id: uuid.UUID) -> str:
        return self._keys.keyed_hash(Purpose.AUDIT_PSEUDONYM, session_id.bytes)[:32]

    def _seal_name(self, user_id: uuid.UUID, name: str) -> bytes:
        return self._keys.box(Purpose.PROFILE_FIELD).seal(
            name.encode("utf-8"), associated_data=b"display_name:" + user_id.bytes
        )

    def display_name(self, user: User) -> str:
        return (
            self._keys.box(Purpose.PROFILE_FIELD)
            .open(user.display_name_enc, associated_data=b"display_name:" + user.id.bytes)
            .decode("utf-8")
        )

    def _authenticator(self, user: User) -> Authenticator | None:
        if user.totp_secret_enc is None:
            return None
        seed = self._keys.box(Purpose.TOTP_SEED).open(
            user.totp_secret_enc, associated_data=b"totp:" + user.id.bytes
        )
        return Authenticator(seed)

    def _provision_authenticator(self, user: User) -> Authenticator:
        authenticator = Authenticator(new_totp_seed())
        user.totp_secret_enc = self._keys.box(Purpose.TOTP_SEED).seal(
            authenticator.seed, associated_data=b"totp:" + user.id.bytes
        )
        user.mfa_confirmed_at = None
        user.totp_last_step = 0
        return authenticator

    def _new_recovery_codes(self, user: User) -> tuple[str, ...]:
        self._db.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
        codes = tuple(new_recovery_code() for _ in range(RECOVERY_CODE_COUNT))
        now = self._now()
        for code in codes:
            self._db.add(
                RecoveryCode(
                    user_id=user.id, code_hash=self._recovery_hash(user.id, code), created_at=now
                )
            )
        return codes

    def _recovery_hash(self, user_id: uuid.UUID, code: str) -> str:
        normalised = _normalise_recovery_code(code)
        return self._keys.keyed_hash(Purpose.RECOVERY_CODE, f"{user_id}:{normalised}")

    def _revoke_sessions(self, user_id: uuid.UUID, reason: str) -> int:
        result = self._db.execute(
            update(AuthSession)
            .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
            .values(revoked_at=self._now(), revoked_reason=reason)
        )
        return int(getattr(result, "rowcount", 0) or 0)


class AuthService(_Base):
    """Sign-in, second factor, sessions and authenticator enrolment."""

    # Sign-in ------------------------------------------------------------------------------------

    def login(
        self,
        username: str,
        password: str,
        client: ClientInfo,
        *,
        kind: SessionKind = SessionKind.API,
    ) -> MfaRequired | IssuedSession:
        """Check a username and password: a session, an MFA challenge, or one generic failure."""
        try:
            name = normalise_username(username)
        except InvalidInput:
            # A malformed name cannot exist; answer exactly as for a wrong password.
            name = None
        throttle = _Throttle(self, name or username, client)
        throttle.check()
        user = self._db.scalar(select(User).where(User.username == name)) if name else None

        if user is None:
            self._rt.hasher.burn(password)
            self._fail_login(throttle, client, None, "unknown-username")
        assert user is not None  # noqa: S101 - _fail_login always raises.
        try:
            self._rt.hasher.verify(user.password_hash, password)
        except AuthenticationFailed:
            self._fail_login(throttle, client, user.id, "wrong-password")
        if user.disabled:
            self._fail_login(throttle, client, user.id, "account-disabled")

        if self._rt.hasher.needs_rehash(user.password_hash):
            user.password_hash = self._rt.hasher.hash(password)

        if user.totp_secret_enc is not None:
            token = new_token("mcm")
            now = self._now()
            self._db.add(
                MfaChallenge(
                    token_hash=self._keys.keyed_hash(Purpose.MFA_CHALLENGE, token),
                    user_id=user.id,
                    kind=kind,
                    created_at=now,
                    expires_at=now + timedelta(seconds=self._settings.mfa_challenge_seconds),
                )
            )
            # The password step passed; the account's failure count is only reset by a full login.
            self._event(
                EventType.LOGIN_SUCCESS,
                Outcome.SUCCESS,
                client.agent(user.id),
                reasons=("password-verified", "mfa-pending"),
            )
            return MfaRequired(mfa_token=token)

        throttle.succeed()
        staff = requires_mfa(user.roles)
        issued = self._issue_session(user, client, kind, mfa_verified=False, enrollment_only=staff)
        self._event(
            EventType.LOGIN_SUCCESS,
            Outcome.SUCCESS,
            client.agent(user.id),
            reasons=("password-verified",) + (("mfa-enrollment-required",) if staff else ()),
        )
        return issued

    def _fail_login(
        self, throttle: _Throttle, client: ClientInfo, user_id: uuid.UUID | None, reason: str
    ) -> None:
        self._event(
            EventType.LOGIN_FAILURE,
            Outcome.MINOR_FAILURE,
            client.agent(user_id),
            subject_user_id=user_id,
            reasons=(reason,),
        )
        throttle.fail(user_id)
        raise AuthenticationFailed(GENERIC_LOGIN_FAILURE)

    def complete_mfa(self, mfa_token: str, code: str, client: ClientInfo) -> IssuedSession:
        """Second step: a TOTP code or a recovery code for a pending challenge."""
        now = self._now()
        # Lock the challenge and the user (PostgreSQL): two concurrent submissions of one code
        # must not both pass the "unused challenge" and "newer time step" checks. SQLite's
        # BEGIN IMMEDIATE already serialises them.
        challenge = self._db.scalar(
            select(MfaChallenge)
            .where(
                MfaChallenge.token_hash == self._keys.keyed_hash(Purpose.MFA_CHALLENGE, mfa_token)
            )
            .with_for_update()
        )
        if challenge is None or challenge.used_at is not None or challenge.expires_at <= now:
            address_only = _Throttle(self, None, client)
            address_only.check()
            self._event(
                EventType.MFA_FAILURE,
                Outcome.MINOR_FAILURE,
                client.agent(),
                reasons=("invalid-or-expired-challenge",),
            )
            address_only.fail(None)
            raise AuthenticationFailed(GENERIC_MFA_FAILURE)

        user = self._db.get(User, challenge.user_id, with_for_update=True, populate_existing=True)
        assert user is not None  # noqa: S101 - foreign key.
        throttle = _Throttle(self, user.username, client)
        try:
            throttle.check()
        except TooManyAttempts:
            challenge.used_at = now  # A locked account's pending challenge is void.
            raise
        if user.disabled:
            challenge.used_at = now
            self._fail_mfa(throttle, client, user, "account-disabled")

        recovery_codes: tuple[str, ...] = ()
        compact = "".join(code.split())
        if compact.isdigit():
            authenticator = self._authenticator(user)
            step = authenticator.matching_step(compact, now) if authenticator else None
            if step is None:
                self._fail_mfa(throttle, client, user, "wrong-code")
            assert step is not None  # noqa: S101 - _fail_mfa raises.
            if step <= user.totp_last_step:
                self._event(
                    EventType.MFA_REPLAY,
                    Outcome.SERIOUS_FAILURE,
                    client.agent(user.id),
                    subject_user_id=user.id,
                    reasons=("code-already-used",),
                )
                self._fail_mfa(throttle, client, user, "replayed-code")
            user.totp_last_step = step
            if user.mfa_confirmed_at is None:
                user.mfa_confirmed_at = now
                recovery_codes = self._new_recovery_codes(user)
                self._event(
                    EventType.MFA_ENROLLED,
                    Outcome.SUCCESS,
                    client.agent(user.id),
                    subject_user_id=user.id,
                    reasons=("provisioned-authenticator",),
                )
        else:
            self._use_recovery_code(user, code, throttle, client)

        challenge.used_at = now
        throttle.succeed()
        issued = self._issue_session(
            user, client, challenge.kind, mfa_verified=True, enrollment_only=False
        )
        self._event(
            EventType.MFA_SUCCESS, Outcome.SUCCESS, client.agent(user.id), subject_user_id=user.id
        )
        return IssuedSession(
            access_token=issued.access_token,
            expires_in=issued.expires_in,
            kind=issued.kind,
            csrf_token=issued.csrf_token,
            recovery_codes=recovery_codes,
            max_age=issued.max_age,
        )

    def _use_recovery_code(
        self, user: User, code: str, throttle: _Throttle, client: ClientInfo
    ) -> None:
        if user.mfa_confirmed_at is None:
            self._fail_mfa(throttle, client, user, "no-recovery-codes")
        record = self._db.scalar(
            select(RecoveryCode)
            .where(
                RecoveryCode.user_id == user.id,
                RecoveryCode.code_hash == self._recovery_hash(user.id, code),
                RecoveryCode.used_at.is_(None),
            )
            .with_for_update()
        )
        if record is None:
            self._fail_mfa(throttle, client, user, "wrong-recovery-code")
        assert record is not None  # noqa: S101 - _fail_mfa raises.
        record.used_at = self._now()
        self._event(
            EventType.MFA_RECOVERY_CODE_USED,
            Outcome.SUCCESS,
            client.agent(user.id),
            subject_user_id=user.id,
        )

    def _fail_mfa(self, throttle: _Throttle, client: ClientInfo, user: User, reason: str) -> None:
        self._event(
            EventType.MFA_FAILURE,
            Outcome.MINOR_FAILURE,
            client.agent(user.id),
            subject_user_id=user.id,
            reasons=(reason,),
        )
        throttle.fail(user.id)
        raise AuthenticationFailed(GENERIC_MFA_FAILURE)

    # Sessions -----------------------------------------------------------------------------------

    def _issue_session(
        self,
        user: User,
        client: ClientInfo,
        kind: SessionKind,
        *,
        mfa_verified: bool,
        enrollment_only: bool,
    ) -> IssuedSession:
        now = self._now()
        token = new_token("mcs")
        csrf = new_token("mcx") if kind is SessionKind.WEB else None
        idle = (
            self._settings.staff_idle_seconds
            if requires_mfa(user.roles)
            else self._settings.patient_idle_seconds
        )
        self._db.add(
            AuthSession(
                token_hash=self._keys.keyed_hash(Purpose.SESSION_TOKEN, token),
                user_id=user.id,
                kind=kind,
                enrollment_only=enrollment_only,
                mfa_verified=mfa_verified,
                created_at=now,
                last_seen_at=now,
                idle_timeout_seconds=idle,
                expires_at=now + timedelta(seconds=self._settings.session_absolute_seconds),
                csrf_hash=self._keys.keyed_hash(Purpose.CSRF_TOKEN, csrf) if csrf else None,
                client_hash=(
                    self._keys.keyed_hash(Purpose.THROTTLE_KEY, client.address)
                    if client.address
                    else None
                ),
            )
        )
        self._db.flush()
        return IssuedSession(
            access_token=token,
            expires_in=idle,
            kind=kind,
            enrollment_only=enrollment_only,
            csrf_token=csrf,
            max_age=self._settings.session_absolute_seconds,
        )

    def authenticate(
        self,
        token: str,
        client: ClientInfo,
        *,
        csrf_token: str | None = None,
        needs_csrf: bool = False,
    ) -> Actor:
        """The actor behind a session token; raises one opaque error for anything wrong."""
        now = self._now()
        record = self._db.scalar(
            select(AuthSession).where(
                AuthSession.token_hash == self._keys.keyed_hash(Purpose.SESSION_TOKEN, token)
            )
        )
        if record is None or record.revoked_at is not None:
            raise AuthenticationFailed(GENERIC_SESSION_FAILURE)
        expired = None
        if now >= record.expires_at:
            expired = "absolute-timeout"
        elif now - record.last_seen_at >= timedelta(seconds=record.idle_timeout_seconds):
            expired = "idle-timeout"
        if expired:
            record.revoked_at = now
            record.revoked_reason = expired
            self._event(
                EventType.SESSION_EXPIRED,
                Outcome.SUCCESS,
                client.agent(record.user_id, self._session_ref(record.id)),
                subject_user_id=record.user_id,
                reasons=(expired,),
            )
            raise SessionExpired(GENERIC_SESSION_FAILURE)
        if needs_csrf and (
            record.csrf_hash is None
            or csrf_token is None
            or self._keys.keyed_hash(Purpose.CSRF_TOKEN, csrf_token) != record.csrf_hash
        ):
            raise PermissionDenied("missing or invalid CSRF token")
        user = self._db.get(User, record.user_id)
        if user is None or user.disabled:
            raise AuthenticationFailed(GENERIC_SESSION_FAILURE)
        if now - record.last_seen_at >= _SESSION_TOUCH_INTERVAL:
            record.last_seen_at = now
        return Actor(
            user_id=user.id,
            username=user.username,
            grants=_grants(user),
            session_id=record.id,
            session_ref=self._session_ref(record.id),
            mfa_verified=record.mfa_verified,
            enrollment_only=record.enrollment_only,
            client_address=client.address,
            user_agent=client.user_agent,
        )

    def session_info(self, actor: Actor) -> AuthSession:
        record = self._db.get(AuthSession, actor.session_id)
        if record is None:
            raise AuthenticationFailed(GENERIC_SESSION_FAILURE)
        return record

    def logout(self, actor: Actor) -> None:
        record = self.session_info(actor)
        record.revoked_at = self._now()
        record.revoked_reason = "logout"
        self._event(EventType.LOGOUT, Outcome.SUCCESS, _agent(actor), subject_user_id=actor.user_id)

    # Enrolment ----------------------------------------------------------------------------------

    def start_enrollment(self, actor: Actor) -> Enrollment:
        """Begin self-service enrolment: a pending authenticator that becomes the account's only
        when confirmed with a code (an abandoned enrolment changes nothing)."""
        user = self._user(actor)
        if user.mfa_confirmed_at is not None:
            raise Conflict(
                "an authenticator is already enrolled",
                hint="ask an administrator to reset MFA before enrolling a new device",
            )
        authenticator = Authenticator(new_totp_seed())
        user.totp_pending_enc = self._keys.box(Purpose.TOTP_SEED).seal(
            authenticator.seed, associated_data=b"totp-pending:" + user.id.bytes
        )
        uri = authenticator.provisioning_uri(user.username, self._settings.totp_issuer)
        self._event(
            EventType.MFA_ENROLL_STARTED, Outcome.SUCCESS, _agent(actor), subject_user_id=user.id
        )
        return Enrollment(otpauth_uri=uri, qr_svg=qr_svg(uri), secret=authenticator.secret_base32)

    def confirm_enrollment(
        self, actor: Actor, code: str, client: ClientInfo
    ) -> tuple[tuple[str, ...], IssuedSession]:
        """Prove the pending authenticator with one code.

        Returns the recovery codes (shown once) and a *new* session: the privilege change from
        enrolment-only to full access gets a fresh token (ASVS 5.0 V7.2.4), and the old one ends.
        """
        user = self._user(actor)
        if user.totp_pending_enc is None or user.mfa_confirmed_at is not None:
            raise Conflict("no enrolment in progress", hint="start with POST /auth/mfa/enroll")
        seed = self._keys.box(Purpose.TOTP_SEED).open(
            user.totp_pending_enc, associated_data=b"totp-pending:" + user.id.bytes
        )
        authenticator = Authenticator(seed)
        now = self._now()
        throttle = _Throttle(self, user.username, client)
        throttle.check()
        step = authenticator.matching_step(code, now)
        if step is None:
            self._event(
                EventType.MFA_FAILURE,
                Outcome.MINOR_FAILURE,
                _agent(actor),
                subject_user_id=user.id,
                reasons=("enrolment-code-wrong",),
            )
            throttle.fail(user.id)
            raise AuthenticationFailed(GENERIC_MFA_FAILURE)
        throttle.succeed()
        user.totp_secret_enc = self._keys.box(Purpose.TOTP_SEED).seal(
            seed, associated_data=b"totp:" + user.id.bytes
        )
        user.totp_pending_enc = None
        user.totp_last_step = step
        user.mfa_confirmed_at = now
        codes = self._new_recovery_codes(user)
        record = self.session_info(actor)
        record.revoked_at = now
        record.revoked_reason = "mfa-enrolled"
        issued = self._issue_session(
            user, client, record.kind, mfa_verified=True, enrollment_only=False
        )
        self._event(EventType.MFA_ENROLLED, Outcome.SUCCESS, _agent(actor), subject_user_id=user.id)
        return codes, issued

    def regenerate_recovery_codes(self, actor: Actor) -> tuple[str, ...]:
        user = self._user(actor)
        if user.mfa_confirmed_at is None or not actor.mfa_verified:
            raise MfaEnrollmentRequired("enrol an authenticator first")
        codes = self._new_recovery_codes(user)
        self._event(
            EventType.MFA_ENROLLED,
            Outcome.SUCCESS,
            _agent(actor),
            subject_user_id=user.id,
            reasons=("recovery-codes-regenerated",),
        )
        return codes

    def _user(self, actor: Actor) -> User:
        user = self._db.get(User, actor.user_id)
        if user is None:
            raise AuthenticationFailed(GENERIC_SESSION_FAILURE)
        return user


class _Throttle:
    """Failure counters for one username and one client address within an auth attempt."""

    def __init__(self, service: _Base, username: str | None, client: ClientInfo) -> None:
        self._svc = service
        self._settings = service._settings
        self._now = service._now()
        keys = service._keys
        self._user_key = (
            "user:" + keys.keyed_hash(Purpose.THROTTLE_KEY, username)[:64] if username else None
        )
        self._addr_key = (
            "addr:" + keys.keyed_hash(Purpose.THROTTLE_KEY, client.address)[:64]
            if client.address
            else None
        )
        self._client = client

    def _row(self, key: str) -> Throttle:
        db = self._svc._db
        dialect = db.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        db.execute(insert(Throttle).values(key=key, failures=0).on_conflict_do_nothing())
        query: Select[Throttle] = select(Throttle).where(Throttle.key == key)
        if dialect == "postgresql":
            query = query.with_for_update()
        row = db.scalar(query.execution_options(populate_existing=True))
        assert row is not None  # noqa: S101 - inserted above.
        return row

    def _rows(self) -> list[Throttle]:
        return [self._row(k) for k in (self._user_key, self._addr_key) if k]

    def check(self) -> None:
        """Raise :class:`TooManyAttempts` while the username is locked or either key backs off."""
        window = timedelta(seconds=self._settings.lockout_seconds)
        for row in self._rows():
            if row.locked_until is not None and row.locked_until <= self._now:
                # A served lockout starts the count afresh.
                row.locked_until = None
                row.failures = 0
            elif row.last_failure_at is not None and self._now - row.last_failure_at >= window:
                row.failures = 0  # Failures far apart are not "consecutive" attempts at guessing.
            wait_until = max(
                (
                    t
                    for t in (row.locked_until, row.blocked_until)
                    if t is not None and t > self._now
                ),
                default=None,
            )
            if wait_until is not None:
                retry = int((wait_until - self._now).total_seconds() + 0.999)
                self._svc._event(
                    EventType.LOGIN_THROTTLED,
                    Outcome.MINOR_FAILURE,
                    self._client.agent(),
                    reasons=(row.key.split(":", 1)[0],),
                )
                raise TooManyAttempts("too many attempts; try again later", retry_after=retry)

    def fail(self, user_id: uuid.UUID | None) -> None:
        """Count a failure; raise :class:`TooManyAttempts` if it locks the account."""
        settings = self._settings
        locked = False
        for row in self._rows():
            row.failures += 1
            row.last_failure_at = self._now
            is_user = row.key.startswith("user:")
            free = settings.backoff_free_attempts if is_user else settings.address_free_attempts
            limit = settings.lockout_threshold if is_user else settings.address_block_threshold
            if row.failures >= limit:
                row.locked_until = self._now + timedelta(seconds=settings.lockout_seconds)
                row.blocked_until = None
                locked = locked or is_user
                if is_user and user_id is not None:
                    user = self._svc._db.get(User, user_id)
                    if user is not None:
                        user.locked_until = row.locked_until
                self._svc._event(
                    EventType.ACCOUNT_LOCKED,
                    Outcome.SERIOUS_FAILURE,
                    self._client.agent(user_id),
                    subject_user_id=user_id,
                    reasons=(
                        "username" if is_user else "client-address",
                        f"failures={row.failures}",
                    ),
                )
            elif row.failures >= free:
                delay = settings.backoff_base_seconds * 2 ** (row.failures - free)
                row.blocked_until = self._now + timedelta(
                    seconds=min(delay, settings.backoff_max_seconds)
                )
        if locked:
            raise TooManyAttempts(
                "too many failed attempts; the account is locked",
                retry_after=settings.lockout_seconds,
            )

    def succeed(self) -> None:
        if self._user_key:
            row = self._row(self._user_key)
            row.failures = 0
            row.blocked_until = None


class UserService(_Base):
    """Organisations, users and role grants. Authorisation of the caller happens in the front door
    (permission) and here (scope: which organisations an administrator may touch)."""

    def create_org(
        self,
        *,
        code: str,
        name: str,
        kind: OrgKind,
        region: str,
        jurisdiction: str | None = None,
        agent: Agent,
    ) -> Organization:
        code = code.strip().upper()
        if not code or len(code) > 32 or not all(ch.isalnum() or ch in "-_" for ch in code):
            raise InvalidInput("organisation code must be 1-32 letters, digits, '-' or '_'")
        region = region.strip().upper()
        if not (2 <= len(region) <= 8 and region.isalpha() and region.isascii()):
            raise InvalidInput("region must be a 2-8 letter code such as CN, HK, US or EU")
        if not name.strip() or len(name) > 200:
            raise InvalidInput("organisation name must be 1-200 characters")
        if self._db.scalar(select(Organization).where(Organization.code == code)):
            raise Conflict(f"organisation {code} already exists")
        if jurisdiction is not None:
            from medcollab.jurisdiction.profiles import get_profile  # noqa: PLC0415

            jurisdiction = get_profile(jurisdiction).code.value
        org = Organization(
            code=code,
            name=name.strip(),
            kind=kind,
            region=region,
            jurisdiction=jurisdiction,
            created_at=self._now(),
        )
        self._db.add(org)
        self._db.flush()
        self._event(EventType.ORG_CREATED, Outcome.SUCCESS, agent, subject_org_id=org.id)
        return org

    def org_by_code(self, code: str) -> Organization:
        org = self._db.scalar(select(Organization).where(Organization.code == code.strip().upper()))
        if org is None:
            raise NotFound(f"no organisation with code {code.strip().upper()!r}")
        return org

    def list_orgs(self) -> list[Organization]:
        return list(self._db.scalars(select(Organization).order_by(Organization.code)))

    def create_user(
        self,
        *,
        username: str,
        display_name: str,
        password: str,
        grants: list[tuple[str, Role]],
        agent: Agent,
        allowed_orgs: frozenset[uuid.UUID] | None = None,
        provision_mfa: bool = True,
        links: list[tuple[FhirLinkKind, str]] | None = None,
    ) -> NewUser:
        """Create a user with roles.

        Staff get an authenticator provisioned (confirmed by its first code) unless
        ``provision_mfa`` is false, in which case their first sign-in can only enrol one.

        ``allowed_orgs`` limits which organisations the caller may grant roles in (None: any, for
        the operator CLI and platform administrators).
        """
        name = normalise_username(username)
        if not grants:
            raise InvalidInput("a user needs at least one role in an organisation")
        display_name = display_name.strip()
        if not display_name or len(display_name) > 200:
            raise InvalidInput("display name must be 1-200 characters")
        roles = {role for _, role in grants}
        staff = requires_mfa(roles)
        check_password(password, has_mfa=staff, username=name, display_name=display_name)
        orgs = []
        for code, role in grants:
            org = self.org_by_code(code)
            if allowed_orgs is not None and org.id not in allowed_orgs:
                raise NotFound(f"no organisation with code {code.strip().upper()!r}")
            if role is Role.PLATFORM_ADMIN and allowed_orgs is not None:
                raise PermissionDenied("only the operator can grant platform_admin")
            orgs.append((org, role))
        if self._db.scalar(select(User.id).where(User.username == name)):
            raise Conflict(f"username {name!r} is taken")

        now = self._now()
        user = User(
            id=uuid.uuid4(),
            username=name,
            password_hash=self._rt.hasher.hash(password),
            password_changed_at=now,
            created_at=now,
            disabled=False,
            totp_last_step=0,
        )
        user.display_name_enc = self._seal_name(user.id, display_name)
        for org, role in {(o.id, r): (o, r) for o, r in orgs}.values():
            user.memberships.append(Membership(org_id=org.id, role=role, created_at=now))
        self._db.add(user)
        for kind, resource_id in links or []:
            self._check_link(kind, roles, resource_id)
            user_links = UserFhirLink(
                user_id=user.id, kind=kind, resource_id=resource_id, created_at=now
            )
            self._db.add(user_links)
        uri = None
        if staff and provision_mfa:
            uri = self._provision_authenticator(user).provisioning_uri(
                name, self._settings.totp_issuer
            )
        self._db.flush()
        self._event(
            EventType.USER_CREATED,
            Outcome.SUCCESS,
            agent,
            subject_user_id=user.id,
            reasons=tuple(sorted(f"role={r.value}" for r in roles)),
        )
        return NewUser(user=user, otpauth_uri=uri)

    @staticmethod
    def _check_link(
        kind: FhirLinkKind, roles: set[Role] | frozenset[Role], resource_id: str
    ) -> None:
        """A link must match a role: a patient account to its Patient, a guardian to a ward, a
        clinician to its Practitioner."""
        needed = {
            FhirLinkKind.PATIENT: {Role.PATIENT},
            FhirLinkKind.GUARDIAN: {Role.GUARDIAN},
            FhirLinkKind.PRACTITIONER: set(CLINICAL_ROLES),
        }[kind]
        if not roles & needed:
            raise InvalidInput(f"a {kind.value} link needs one of the roles {sorted(needed)}")
        if (
            not resource_id
            or len(resource_id) > 64
            or not all(ch.isalnum() or ch in "-." for ch in resource_id)
        ):
            raise InvalidInput("a linked FHIR id is 1-64 letters, digits, '-' or '.'")

    def link(
        self,
        user_id: uuid.UUID,
        kind: FhirLinkKind,
        resource_id: str,
        *,
        agent: Agent,
        allowed_orgs: frozenset[uuid.UUID] | None = None,
    ) -> None:
        """Link an existing account to a FHIR Patient (own or ward) or Practitioner."""
        user = self._visible_user(user_id, allowed_orgs)
        self._check_link(kind, user.roles, resource_id)
        exists = self._db.scalar(
            select(UserFhirLink.id).where(
                UserFhirLink.user_id == user.id,
                UserFhirLink.kind == kind,
                UserFhirLink.resource_id == resource_id,
            )
        )
        if exists is None:
            self._db.add(
                UserFhirLink(
                    user_id=user.id, kind=kind, resource_id=resource_id, created_at=self._now()
                )
            )
            self._event(
                EventType.ROLE_GRANTED,
                Outcome.SUCCESS,
                agent,
                subject_user_id=user.id,
                reasons=(f"fhir-link={kind.value}",),
            )

    def links_of(self, user_id: uuid.UUID) -> list[tuple[FhirLinkKind, str]]:
        rows = self._db.scalars(select(UserFhirLink).where(UserFhirLink.user_id == user_id))
        return sorted((row.kind, row.resource_id) for row in rows)

    def _visible_user(self, user_id: uuid.UUID, allowed_orgs: frozenset[uuid.UUID] | None) -> User:
        user = self._db.get(User, user_id)
        if user is None or (
            allowed_orgs is not None and not any(m.org_id in allowed_orgs for m in user.memberships)
        ):
            raise NotFound("no such user")
        return user

    def user_by_username(self, username: str) -> User:
        user = self._db.scalar(select(User).where(User.username == normalise_username(username)))
        if user is None:
            raise NotFound("no such user")
        return user

    def view(self, user: User) -> UserView:
        return UserView(
            id=user.id,
            username=user.username,
            display_name=self.display_name(user),
            disabled=user.disabled,
            mfa_enabled=user.mfa_confirmed_at is not None,
            locked_until=user.locked_until
            if user.locked_until and user.locked_until > self._now()
            else None,
            grants=_grants(user),
        )

    def list_users(self, allowed_orgs: frozenset[uuid.UUID] | None = None) -> list[UserView]:
        query = select(User).order_by(User.username)
        if allowed_orgs is not None:
            query = query.where(
                User.id.in_(select(Membership.user_id).where(Membership.org_id.in_(allowed_orgs)))
            )
        return [self.view(u) for u in self._db.scalars(query)]

    def disable_user(
        self, user_id: uuid.UUID, *, agent: Agent, allowed_orgs: frozenset[uuid.UUID] | None = None
    ) -> User:
        user = self._visible_user(user_id, allowed_orgs)
        user.disabled = True
        revoked = self._revoke_sessions(user.id, "account-disabled")
        self._event(
            EventType.USER_DISABLED,
            Outcome.SUCCESS,
            agent,
            subject_user_id=user.id,
            reasons=(f"sessions-revoked={revoked}",),
        )
        return user

    def reset_mfa(
        self, user_id: uuid.UUID, *, agent: Agent, allowed_orgs: frozenset[uuid.UUID] | None = None
    ) -> NewUser:
        """Forget the authenticator and recovery codes, end all sessions, provision a new one."""
        user = self._visible_user(user_id, allowed_orgs)
        self._db.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
        uri = self._provision_authenticator(user).provisioning_uri(
            user.username, self._settings.totp_issuer
        )
        revoked = self._revoke_sessions(user.id, "mfa-reset")
        self._event(
            EventType.MFA_RESET,
            Outcome.SUCCESS,
            agent,
            subject_user_id=user.id,
            reasons=(f"sessions-revoked={revoked}",),
        )
        return NewUser(user=user, otpauth_uri=uri)

    def revoke_sessions(
        self,
        user_id: uuid.UUID,
        *,
        agent: Agent,
        allowed_orgs: frozenset[uuid.UUID] | None = None,
        reason: str = "revoked-by-admin",
    ) -> int:
        user = self._visible_user(user_id, allowed_orgs)
        revoked = self._revoke_sessions(user.id, reason)
        self._event(
            EventType.SESSIONS_REVOKED,
            Outcome.SUCCESS,
            agent,
            subject_user_id=user.id,
            reasons=(f"sessions-revoked={revoked}",),
        )
        return revoked


def _grants(user: User) -> tuple[RoleGrant, ...]:
    return tuple(
        RoleGrant(org_id=m.org_id, org_code=m.organization.code, role=m.role)
        for m in sorted(user.memberships, key=lambda m: (m.organization.code, m.role.value))
    )


def _agent(actor: Actor) -> Agent:
    return Agent(
        user_id=actor.user_id,
        session_hash=actor.session_ref,
        client_address=actor.client_address,
        user_agent=(actor.user_agent or "")[:200] or None,
    )


def agent_for(actor: Actor) -> Agent:
    """The audit agent of an authenticated actor."""
    return _agent(actor)


def operator_agent(name: str = "cli") -> Agent:
    """The audit agent of the operator CLI: a visibly named system context."""
    return Agent(role=f"system:{name}")


def require(actor: Actor, permission: Permission) -> frozenset[uuid.UUID]:
    """The organisations where ``actor`` holds ``permission``; raises if none."""
    if actor.enrollment_only:
        raise MfaEnrollmentRequired(
            "multi-factor authentication is required for this account",
            hint="enrol an authenticator with POST /auth/mfa/enroll and /auth/mfa/confirm",
        )
    orgs = actor.orgs_with(permission)
    if not orgs:
        raise PermissionDenied("not permitted")
    return orgs
