"""Four uvicorn workers on PostgreSQL append audit events concurrently; the log gets one total
order (gapless leaf indexes in commit order) and ``medcollab audit verify`` accepts it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
from sqlalchemy import text

from medcollab.db.session import make_engine
from tests.support import postgres

WORKERS = 4
REQUESTS = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_four_workers_give_one_verifiable_order(
    postgres_server: postgres.PostgresServer, tmp_path: Path
) -> None:
    name = f"multiworker_{os.getpid()}"
    admin = make_engine(postgres_server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = postgres_server.url(name)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MEDCOLLAB_")},
        "MEDCOLLAB_MODE": "dev",
        "MEDCOLLAB_TLS": "false",
        "MEDCOLLAB_DATA_DIR": str(tmp_path / "data"),
        "MEDCOLLAB_DATABASE_URL": url,
        "MEDCOLLAB_AUDIT_INTEGRATE_SECONDS": "0.2",
        "MEDCOLLAB_CONFIG": str(tmp_path / "absent.toml"),
        # Many failures from one address: keep them evaluated (and audited) rather than blocked.
        "MEDCOLLAB_ADDRESS_FREE_ATTEMPTS": "100000",
        "MEDCOLLAB_ADDRESS_BLOCK_THRESHOLD": "100000",
    }
    medcollab = [sys.executable, "-m", "medcollab.cli.main"]
    subprocess.run([*medcollab, "init"], env=env, check=True, capture_output=True, timeout=120)
    port = _free_port()
    log = (tmp_path / "uvicorn.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "medcollab.asgi:create",
            "--factory",
            "--workers",
            str(WORKERS),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-server-header",
            "--no-access-log",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)

        def attempt(n: int) -> int:
            with httpx.Client(timeout=30) as client:
                return client.post(
                    f"{base}/auth/login", json={"username": f"user{n}", "password": "x" * 16}
                ).status_code

        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(attempt, range(REQUESTS)))
        assert set(statuses) <= {401, 429}

        engine = make_engine(url)
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as conn:
                pending = conn.execute(
                    text("SELECT count(*) FROM audit_event WHERE leaf_index IS NULL")
                ).scalar_one()
            if pending == 0:
                break
            assert time.monotonic() < deadline, f"{pending} events never integrated"
            time.sleep(0.3)
        with engine.connect() as conn:
            leaves = [
                r[0]
                for r in conn.execute(
                    text("SELECT leaf_index FROM audit_event ORDER BY leaf_index")
                )
            ]
            heads = conn.execute(text("SELECT count(*) FROM audit_tree_head")).scalar_one()
        engine.dispose()
        assert len(leaves) >= REQUESTS
        assert leaves == list(range(len(leaves)))  # One gapless order.
        assert heads >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    started = (tmp_path / "uvicorn.log").read_text().count("Started server process")
    assert started == WORKERS
    verified = subprocess.run(
        [*medcollab, "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    lines = dict(line.split(None, 1) for line in verified.stdout.splitlines() if line.strip())
    assert lines["result"].strip() == "intact"
    assert lines["events"].startswith(f"{len(leaves)} ({len(leaves)} in the tree)")
