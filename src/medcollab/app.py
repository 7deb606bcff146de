"""``create_app``: wires routers and middleware, nothing else."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from medcollab import __version__, web
from medcollab.access.api import router as access_router
from medcollab.api import errors, middleware
from medcollab.api.health import router as health_router
from medcollab.audit.api import fhir_router as audit_fhir_router
from medcollab.audit.api import public_router as audit_public_router
from medcollab.audit.api import router as audit_router
from medcollab.audit.integrator import integrator_lifespan
from medcollab.collaboration.api import router as collaboration_router
from medcollab.identity.api import admin_router, auth_router
from medcollab.imaging.api import router as imaging_router
from medcollab.records.api import public_router as fhir_public_router
from medcollab.records.api import router as fhir_router
from medcollab.runtime import Runtime

log = logging.getLogger("medcollab")


def create_app(runtime: Runtime) -> FastAPI:
    settings = runtime.settings
    app = FastAPI(
        lifespan=integrator_lifespan(runtime),
        title="medcollab",
        version=__version__,
        debug=settings.debug,
        docs_url="/docs" if settings.relaxed else None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    if settings.unsafe_disable_audit:
        log.warning("UNSAFE: auditing of record access is disabled (benchmark mode)")
    errors.install(app)
    web.install(app)
    middleware.install(app, settings)
    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(admin_router)
    app.include_router(access_router)
    app.include_router(collaboration_router)
    app.include_router(imaging_router)
    app.include_router(audit_public_router)
    app.include_router(audit_router)
    # Before the generic FHIR routes: AuditEvent is the platform's own log, not a stored record.
    app.include_router(audit_fhir_router)
    app.include_router(fhir_public_router)
    app.include_router(fhir_router)
    return app
