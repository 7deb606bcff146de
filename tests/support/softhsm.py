"""A throwaway SoftHSM2 token for the PKCS#11 key-provider tests.

SoftHSM2 comes from Debian's ``softhsm2`` package; when its library is missing and the run is root,
it is installed (``apt-get install``, after ``apt-get update`` if the first try fails). If it cannot
be had, :func:`token` raises :class:`SoftHsmUnavailable` and the tests that need it fail; they are
never skipped.

The token lives in a temporary directory with its own ``SOFTHSM2_CONF``, which is set in the
environment before the PKCS#11 library is first loaded (SoftHSM2 reads it once, in
``C_Initialize``). The library stays loaded for the whole process, so the token is made once per
process and shared; it is deleted at exit.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from medcollab.crypto.providers import FileKeyProvider, KeyProvider, Pkcs11KeyProvider

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
LABEL = "medcollab-test"
#: A second token that no test ever logs in to successfully, for wrong-PIN tests: PKCS#11 login
#: state belongs to the process, so a wrong PIN is only reported by a token not yet logged in.
OTHER_LABEL = "medcollab-test-other"
_INSTALL_TIMEOUT = 600


class SoftHsmUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class SoftHsmToken:
    module: Path
    label: str
    pin: str
    other_label: str
    other_pin: str
    conf: Path


_lock = threading.Lock()
_token: SoftHsmToken | None = None


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        timeout=_INSTALL_TIMEOUT,
        check=False,
        env=env,
    )


def ensure_installed() -> Path:
    """The SoftHSM2 PKCS#11 library, installed from Debian's packages when missing."""
    if MODULE.is_file() and shutil.which("softhsm2-util"):
        return MODULE
    if os.geteuid() != 0:
        raise SoftHsmUnavailable(
            f"{MODULE} is missing and this run is not root: run `apt-get install softhsm2`"
        )
    result = _apt("install", "-y", "softhsm2")
    if result.returncode != 0:
        _apt("update")
        result = _apt("install", "-y", "softhsm2")
    if result.returncode != 0 or not MODULE.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SoftHsmUnavailable(f"installing softhsm2 failed: {' / '.join(tail)}")
    return MODULE


def _init_token(label: str, pin: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            secrets.token_hex(8),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        raise SoftHsmUnavailable(f"softhsm2-util --init-token failed: {result.stderr.strip()}")


def token() -> SoftHsmToken:
    """The process's test token, made on first use (SOFTHSM2_CONF is set before any library load)."""
    global _token  # noqa: PLW0603 - one token per process, because the library is loaded once.
    with _lock:
        if _token is not None:
            return _token
        module = ensure_installed()
        root = Path(tempfile.mkdtemp(prefix="medcollab-softhsm-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        tokens = root / "tokens"
        tokens.mkdir(mode=0o700)
        conf = root / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n",
            encoding="utf-8",
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        env = {**os.environ}
        pin, other_pin = secrets.token_hex(8), secrets.token_hex(8)
        _init_token(LABEL, pin, env)
        _init_token(OTHER_LABEL, other_pin, env)
        _token = SoftHsmToken(module, LABEL, pin, OTHER_LABEL, other_pin, conf)
        return _token


def provider(kind: str, key_dir: Path) -> KeyProvider:
    """A key provider of ``kind`` for a test: a fresh key directory, or the shared SoftHSM2 token."""
    if kind == "file":
        return FileKeyProvider(key_dir)
    hsm = token()
    return Pkcs11KeyProvider(hsm.module, hsm.label, hsm.pin)
