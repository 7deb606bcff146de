"""An ASGI application factory for process managers (``uvicorn --factory --workers N``).

Each worker builds its own runtime from the environment (``MEDCOLLAB_*``, ``medcollab.toml``). The
audit log stays in one total order across workers: each worker's integrator takes the log's lock.
"""

from __future__ import annotations

from fastapi import FastAPI

from medcollab.app import create_app
from medcollab.config import Settings
from medcollab.runtime import Runtime


def create() -> FastAPI:
    settings = Settings()
    settings.check_safe_to_serve()
    return create_app(Runtime.from_settings(settings))
