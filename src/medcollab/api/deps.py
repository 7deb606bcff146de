"""Request-scoped collaborators, injected through named aliases.

``DbSession`` is the request's unit of work: it commits after the endpoint returns and *before* the
response is sent (``scope="function"``), so nothing is reported as done that is not durable, and it
rolls back when the endpoint raises. ``CurrentActor`` authenticates the bearer token or the session
cookie (with its CSRF token on unsafe methods).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from medcollab.errors import AuthenticationFailed, UnsupportedMediaType
from medcollab.identity.services import AuthService, ClientInfo, UserService, require
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission
from medcollab.runtime import Runtime

SESSION_COOKIE = "__Host-medcollab_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_JSON_TYPES = frozenset({"application/json", "application/fhir+json"})


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_db(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.database.unit_of_work() as session:
        yield session


DbSession = Annotated[Session, Depends(get_db, scope="function")]


def client_info(request: Request) -> ClientInfo:
    return ClientInfo(
        address=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
    )


Client = Annotated[ClientInfo, Depends(client_info)]


def auth_service(db: DbSession, runtime: RuntimeDep) -> AuthService:
    return AuthService(session=db, runtime=runtime)


def user_service(db: DbSession, runtime: RuntimeDep) -> UserService:
    return UserService(session=db, runtime=runtime)


Auth = Annotated[AuthService, Depends(auth_service)]
Users = Annotated[UserService, Depends(user_service)]


def current_actor(request: Request, auth: Auth, client: Client) -> Actor:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("invalid or expired session")
        return auth.authenticate(token.strip(), client)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        # A cookie travels with cross-site requests; a header the attacker's page cannot read
        # (the CSRF token) proves the request came from our own page.
        return auth.authenticate(
            cookie,
            client,
            csrf_token=request.headers.get(CSRF_HEADER),
            needs_csrf=request.method not in _SAFE_METHODS,
        )
    raise AuthenticationFailed("authentication required")


CurrentActor = Annotated[Actor, Depends(current_actor)]


def permitted(permission: Permission) -> Callable[[Actor], Actor]:
    """A dependency that lets the request through only if the actor holds ``permission``."""

    def _check(actor: CurrentActor) -> Actor:
        require(actor, permission)
        return actor

    _check.__name__ = f"requires_{permission.name.lower()}"
    return _check


def require_json(request: Request) -> None:
    """Refuse bodies that do not declare JSON, instead of guessing."""
    if request.method in _SAFE_METHODS:
        return
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )
    if not has_body:
        return  # Bodiless actions (logout, enrol) need no content type.
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in _JSON_TYPES:
        raise UnsupportedMediaType(
            "request body must be JSON", hint="send Content-Type: application/json"
        )
