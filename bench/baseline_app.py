"""The unsecured baseline for the FHIR read benchmark: the same stack with the security taken out.

Same framework (FastAPI and uvicorn at the project's pinned versions, uvicorn's pure-Python ``h11``
parser as :func:`medcollab.server.build_server` chooses), same database engine (SQLite in WAL mode
through :func:`medcollab.db.session.make_engine`, so the same pragmas and ``BEGIN IMMEDIATE``), the
same JSON payload read by primary key on every request, parsed and rendered the way medcollab's
``FhirResponse`` renders it. No authentication, no encryption, no access policy, no audit, no
security headers, no access log.

Run: ``python -m bench.baseline_app --db FILE --port N`` (the benchmark does this, pinned to one
core); :func:`create_store` writes the table it reads.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from medcollab.db.session import make_engine

FHIR_JSON: Final = "application/fhir+json"
_CREATE = "CREATE TABLE IF NOT EXISTS observation (id TEXT PRIMARY KEY, body TEXT NOT NULL)"
_SELECT = text("SELECT body FROM observation WHERE id = :id")


class FhirResponse(JSONResponse):
    """Renders exactly as :class:`medcollab.records.api.FhirResponse` does, so bodies are identical."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class NotFoundResponse(JSONResponse):
    media_type = FHIR_JSON


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def create_store(path: Path, resource_id: str, body: bytes) -> None:
    """Create the baseline's database holding one Observation (``body`` as served by medcollab)."""
    engine = make_engine(sqlite_url(path))
    try:
        with engine.begin() as connection:
            connection.execute(text(_CREATE))
            connection.execute(
                text("INSERT OR REPLACE INTO observation (id, body) VALUES (:id, :body)"),
                {"id": resource_id, "body": body.decode("utf-8")},
            )
    finally:
        engine.dispose()


def read_observation(engine: Engine, resource_id: str) -> dict[str, Any] | None:
    """One request's work: a primary-key read in its own transaction, then ``json.loads``."""
    with engine.begin() as connection:
        stored = connection.execute(_SELECT, {"id": resource_id}).scalar_one_or_none()
    if stored is None:
        return None
    body: dict[str, Any] = json.loads(stored)
    return body


def create_app(db_path: Path) -> FastAPI:
    engine = make_engine(sqlite_url(db_path))
    app = FastAPI(title="baseline", docs_url=None, redoc_url=None, openapi_url=None)

    # A sync endpoint, as medcollab's read is: FastAPI runs it in its thread pool.
    @app.get("/fhir/R4/Observation/{resource_id}")
    def read(resource_id: str) -> JSONResponse:
        body = read_observation(engine, resource_id)
        if body is None:
            return NotFoundResponse({"resourceType": "OperationOutcome"}, status_code=404)
        return FhirResponse(body)

    app.state.engine = engine
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.db),
        host=args.host,
        port=args.port,
        # The settings of medcollab.server.build_server that shape throughput.
        http="h11",
        server_header=False,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
