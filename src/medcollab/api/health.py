"""``GET /healthz``: public, says only that the process answers."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/healthz", include_in_schema=True)
def healthz() -> dict[str, str]:
    """Liveness only: no version, no dependency details (nothing an attacker could use)."""
    return {"status": "ok"}
