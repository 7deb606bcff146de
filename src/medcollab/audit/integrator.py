"""The background integrator: new audit events join the Merkle tree and a signed head is issued at
least every ``audit_integrate_seconds`` while events arrive.

Every worker runs one; the integration itself takes the log's lock (an advisory lock on PostgreSQL,
the write lock on SQLite), so several workers never integrate at once and events get one order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

import anyio
from fastapi import FastAPI

from medcollab.audit.services import AuditLog
from medcollab.runtime import Runtime

log = logging.getLogger("medcollab.audit")


def integrate_once(runtime: Runtime) -> int:
    """One integration in its own short transaction; returns how many events joined the tree."""
    with runtime.database.unit_of_work() as session:
        result = AuditLog(session, signer=runtime.log_signer, clock=runtime.clock).integrate()
    return result.integrated


async def _loop(runtime: Runtime, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(integrate_once, runtime)
        except Exception as exc:  # noqa: BLE001 - keep integrating; the failure is reported.
            # Events stay durable (they were committed with their requests); only the tree lags,
            # and `medcollab audit verify` reports it. The type is enough: no text, no data.
            log.warning("audit integration failed", extra={"error_type": type(exc).__name__})


def integrator_lifespan(
    runtime: Runtime,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    interval = runtime.settings.audit_integrate_seconds

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if interval <= 0:
            yield
            return
        task = asyncio.create_task(_loop(runtime, interval))
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            # A last integration, so a clean shutdown leaves every event in a signed head.
            with suppress(Exception):
                await anyio.to_thread.run_sync(integrate_once, runtime)

    return lifespan
