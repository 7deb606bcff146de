"""A throwaway PostgreSQL server for the test run.

The run starts its own server in a temporary directory (``initdb`` + ``pg_ctl``), listening on
127.0.0.1 on a free port with SCRAM password authentication, and stops and deletes it afterwards.
PostgreSQL refuses to run as root, so under root the cluster belongs to an unprivileged user
(``nobody`` unless ``MEDCOLLAB_TEST_PG_USER`` names another).

If the server cannot start, :func:`start` raises :class:`PostgresUnavailable` and the tests that need
it fail; they are never skipped.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


@dataclass
class PostgresServer:
    root: Path
    port: int
    password: str
    run_as: str | None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, args: Sequence[str]) -> list[str]:
        if self.run_as is None:
            return list(args)
        return ["runuser", "-u", self.run_as, "--", *args]

    def run(self, args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(args), capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop(self) -> None:
        if self.data_dir.exists():
            self.run(["pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise PostgresUnavailable(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin")


def start() -> PostgresServer:
    run_as = None
    if os.geteuid() == 0:
        run_as = os.environ.get("MEDCOLLAB_TEST_PG_USER", "nobody")
        try:
            account = pwd.getpwnam(run_as)
        except KeyError:
            raise PostgresUnavailable(f"unprivileged user {run_as!r} does not exist") from None
    root = Path(tempfile.mkdtemp(prefix="medcollab-pg-"))
    root.chmod(0o755)
    if run_as is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    password = secrets.token_urlsafe(24)
    server = PostgresServer(root=root, port=_free_port(), password=password, run_as=run_as)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n", encoding="utf-8")
    pwfile.chmod(0o600)
    if run_as is not None:
        os.chown(pwfile, account.pw_uid, account.pw_gid)
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    result = server.run(
        [
            initdb,
            "-D",
            str(server.data_dir),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
        ],
        timeout=120,
    )
    if result.returncode != 0:
        server.stop()
        raise PostgresUnavailable(f"initdb failed: {result.stderr.strip()[-500:]}")
    # Durability settings are off: this server holds only throwaway test data.
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
    )
    result = server.run(
        [
            pg_ctl,
            "-D",
            str(server.data_dir),
            "-o",
            options,
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        ],
        timeout=90,
    )
    if result.returncode != 0:
        log = (
            (root / "server.log").read_text(errors="replace")[-800:]
            if (root / "server.log").exists()
            else ""
        )
        server.stop()
        raise PostgresUnavailable(f"pg_ctl start failed: {result.stderr.strip()} {log}")
    return server
