"""The AccessContext: everything the records chokepoint needs to know about who is asking and why."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from medcollab.access.policy import Purpose
from medcollab.kernel.permissions import Role


@dataclass(frozen=True, slots=True)
class AccessContext:
    """Built once per request from the authenticated actor and the request headers.

    ``system_name`` is set only for the visibly named system contexts of jobs (import, export,
    key rotation); such contexts are permitted by the policy and audited like any user.
    """

    user_id: uuid.UUID | None
    org_id: uuid.UUID | None
    roles: frozenset[Role]
    purpose: Purpose
    #: The clinician's stated reason when declaring an emergency (X-Break-Glass-Reason).
    break_glass_reason: str | None = None
    session_ref: str | None = None
    client_address: str | None = None
    user_agent: str | None = None
    system_name: str | None = None

    @property
    def is_system(self) -> bool:
        return self.system_name is not None

    @classmethod
    def system(cls, name: str, org_id: uuid.UUID | None = None) -> AccessContext:
        """A named system context, e.g. ``system:import``. Never built from a request."""
        if not name or ":" in name:
            raise ValueError("system context names are plain words such as 'import'")
        return cls(
            user_id=None,
            org_id=org_id,
            roles=frozenset(),
            purpose=Purpose.HOPERAT,
            system_name=name,
        )
