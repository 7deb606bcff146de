"""Who is acting: the authenticated :class:`Actor` handed to services by the front doors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from medcollab.kernel.permissions import Permission, Role, permissions_for


@dataclass(frozen=True, slots=True)
class RoleGrant:
    org_id: uuid.UUID
    org_code: str
    role: Role


@dataclass(frozen=True, slots=True)
class Actor:
    """An authenticated principal with its grants. Built per request; never cached across requests."""

    user_id: uuid.UUID
    username: str
    grants: tuple[RoleGrant, ...]
    session_id: uuid.UUID | None = None
    #: Keyed hash of the session id, the only form in which a session appears in audit events.
    session_ref: str | None = None
    mfa_verified: bool = False
    enrollment_only: bool = False
    client_address: str | None = None
    user_agent: str | None = None
    permissions: frozenset[Permission] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "permissions", permissions_for({g.role for g in self.grants}))

    @property
    def roles(self) -> frozenset[Role]:
        return frozenset(g.role for g in self.grants)

    def orgs_with(self, permission: Permission) -> frozenset[uuid.UUID]:
        """Organisations in which one of the actor's roles grants ``permission``."""
        return frozenset(g.org_id for g in self.grants if permission in permissions_for({g.role}))

    def has(self, permission: Permission) -> bool:
        return permission in self.permissions


@dataclass(frozen=True, slots=True)
class SystemActor:
    """A visibly named non-human actor (the operator CLI, a scheduled job); audited like any other."""

    name: str
