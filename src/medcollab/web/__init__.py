"""The server-rendered web app: Jinja2 pages with a little HTMX, in Simplified Chinese and English.

:func:`install` adds it to an application built by :func:`medcollab.app.create_app`: the static
files, the page routes and HTML error pages for the web paths. The pages are a front door like
the API: they authenticate, call services and the records repository, and render.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

STATIC_DIR: Final = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add the web pages to ``app`` (once; a second call changes nothing).

    Call it after ``medcollab.api.errors.install`` (``create_app`` runs that first) and before the
    application serves its first request: the pages' error handling wraps the API's handlers, and
    Starlette reads the handlers when it builds its middleware stack.
    """
    # Imported here so that ``python -m medcollab.web.i18n`` (catalogue upkeep) does not load the
    # whole application first.
    from medcollab.web import errors  # noqa: PLC0415
    from medcollab.web.collab import router as collab_router  # noqa: PLC0415
    from medcollab.web.imaging import router as imaging_router  # noqa: PLC0415
    from medcollab.web.routes import router  # noqa: PLC0415

    if getattr(app.state, "web_installed", False):
        return
    app.state.web_installed = True
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    app.include_router(collab_router)
    app.include_router(imaging_router)
    errors.install(app)
