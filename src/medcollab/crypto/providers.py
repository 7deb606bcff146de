"""Key providers: where key-encryption keys (KEKs) live and how data keys are wrapped under them.

A provider holds numbered KEK versions and wraps and unwraps data keys (DEKs) with them; the newest
version wraps, every version that still exists unwraps. Two providers exist:

* :class:`FileKeyProvider` (the embedded default): each version is a file ``kek-v{N}.key`` of 32
  random bytes in the key directory, mode 0600 in a 0700 directory.
* :class:`Pkcs11KeyProvider`: each version is an AES-256 secret-key object generated inside a PKCS#11
  token (an HSM; tested with SoftHSM2), labelled ``medcollab-kek-v{N}``, sensitive and
  non-extractable. Wrapping and unwrapping are done by the token; the KEK never leaves it.

Both wrap with AES-256-GCM, not AES key wrap (RFC 3394): SoftHSM2 and many HSMs offer AES key wrap
only through ``C_WrapKey``, which wraps a key object that already lives in the token, while our DEKs
are used by the application; ``C_Encrypt`` with ``CKM_AES_GCM`` is widely available. GCM also takes
associated data, which binds each wrapped key to its KEK version and to the data-key row it belongs
to (its id and owner), so a wrapped key copied into another row does not unwrap. The wrapped format
is the same for both providers::

    format (1 byte, 0x01) || nonce (12) || ciphertext of the 32-byte DEK (32) || tag (16)

KEK ids are ``"<provider>:v<N>"`` (``file:v1``, ``pkcs11:v3``), so a key wrapped by one provider is
never handed to another.

Failing closed: an unwrap that cannot be done because the provider is unreachable, a KEK is missing
or the token reports an error raises :class:`KeyProviderUnavailable` (a
:class:`~medcollab.errors.ServiceUnavailable`, so requests answer 503 and return no data); a wrapped
key whose authentication tag does not verify raises :class:`~medcollab.crypto.envelope.IntegrityError`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medcollab.crypto.envelope import KEY_BYTES, NONCE_BYTES, TAG_BYTES, IntegrityError
from medcollab.crypto.envelope import length_prefixed as _length_prefixed
from medcollab.errors import ConfigurationError, ServiceUnavailable

if TYPE_CHECKING:
    from medcollab.config import Settings

log = logging.getLogger("medcollab.crypto.providers")

WRAP_FORMAT: Final = 1
WRAPPED_BYTES: Final = 1 + NONCE_BYTES + KEY_BYTES + TAG_BYTES
KEK_LABEL_PREFIX: Final = "medcollab-kek-v"
_WRAP_LABEL: Final = b"medcollab/dek-wrap/v1"
_KEK_FILE = re.compile(r"^kek-v([1-9][0-9]{0,8})\.key$")
_KEK_LABEL = re.compile(r"^medcollab-kek-v([1-9][0-9]{0,8})$")


class KeyProviderUnavailable(ServiceUnavailable):
    """The key provider cannot do its part; the request fails and no protected data leaves."""

    code = "key_provider_unavailable"


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key encrypted under the KEK version ``kek_id``; safe to store."""

    kek_id: str
    blob: bytes

    def __repr__(self) -> str:
        return f"WrappedKey(kek_id={self.kek_id!r}, bytes={len(self.blob)})"


class KeyProvider(Protocol):
    """Holds versioned KEKs; wraps data keys with the newest and unwraps with any that exists."""

    @property
    def name(self) -> str:
        """``"file"`` or ``"pkcs11"``; the prefix of every KEK id of this provider."""
        ...

    def current_kek_id(self) -> str:
        """The KEK version that wraps new keys; creates version 1 when none exists yet."""
        ...

    def kek_ids(self) -> list[str]:
        """Every KEK version this provider holds, oldest first."""
        ...

    def wrap(self, dek: bytes, *, context: bytes = b"") -> WrappedKey:
        """Wrap ``dek`` under the current KEK, bound to ``context`` (the data key's row)."""
        ...

    def unwrap(self, wrapped: WrappedKey, *, context: bytes = b"") -> bytes:
        """The data key in ``wrapped``; ``context`` must equal the one given to :meth:`wrap`."""
        ...

    def new_kek_version(self) -> str:
        """Create a new KEK version, which becomes current; older versions still unwrap."""
        ...

    def destroy_kek(self, kek_id: str) -> None:
        """Destroy an old KEK version for good; every key still wrapped by it becomes unreadable."""
        ...

    def close(self) -> None:
        """Release sessions and forget cached KEKs."""
        ...


def _wrap_aad(kek_id: str, context: bytes) -> bytes:
    return _length_prefixed(_WRAP_LABEL, kek_id.encode("ascii"), context)


def _check_dek(dek: bytes) -> None:
    if len(dek) != KEY_BYTES:
        raise ValueError("a data key is exactly 32 bytes")


def _split_wrapped(wrapped: WrappedKey) -> tuple[bytes, bytes]:
    blob = wrapped.blob
    if len(blob) != WRAPPED_BYTES or blob[0] != WRAP_FORMAT:
        raise IntegrityError("a wrapped data key is malformed or of an unknown format")
    return blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]


def _version_of(kek_id: str, provider: str) -> int:
    prefix = f"{provider}:v"
    if not kek_id.startswith(prefix) or not kek_id[len(prefix) :].isdigit():
        raise KeyProviderUnavailable(
            f"key-encryption key {kek_id!r} does not belong to the {provider} key provider",
            hint="the data keys were wrapped by another provider; configure that provider",
        )
    return int(kek_id[len(prefix) :])


# The file provider --------------------------------------------------------------------------------


class FileKeyProvider:
    """KEK versions as files ``kek-v{N}.key`` (32 random bytes, mode 0600) in a 0700 directory.

    The embedded default. The key directory must not be in the same backup as the database: a backup
    that holds both the wrapped data keys and the KEK holds the data in the clear, in effect.
    """

    name: Final = "file"

    def __init__(self, key_dir: Path) -> None:
        self._dir = key_dir
        self._keks: dict[int, bytes] = {}
        self._lock = threading.Lock()

    # Reading and creating KEK files.

    def _ensure_dir(self) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            mode = stat.S_IMODE(self._dir.stat().st_mode)
        except OSError as exc:
            raise KeyProviderUnavailable(
                f"the key directory {self._dir} cannot be used ({type(exc).__name__})"
            ) from None
        if mode & 0o077:
            raise ConfigurationError(
                f"the key directory {self._dir} is accessible to other users (mode {mode:o})",
                hint=f"chmod 700 {self._dir}",
            )

    def _versions(self) -> list[int]:
        self._ensure_dir()
        try:
            names = [entry.name for entry in self._dir.iterdir()]
        except OSError as exc:
            raise KeyProviderUnavailable(
                f"the key directory {self._dir} cannot be read ({type(exc).__name__})"
            ) from None
        return sorted(int(m[1]) for m in map(_KEK_FILE.match, names) if m)

    def _path(self, version: int) -> Path:
        return self._dir / f"kek-v{version}.key"

    def _kek(self, version: int) -> bytes:
        cached = self._keks.get(version)
        if cached is not None:
            return cached
        path = self._path(version)
        try:
            with path.open("rb") as handle:
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
                material = handle.read(KEY_BYTES + 1)
        except FileNotFoundError:
            raise KeyProviderUnavailable(
                f"key-encryption key file:v{version} is missing ({path})",
                hint="restore the key directory from its own backup",
            ) from None
        except OSError as exc:
            raise KeyProviderUnavailable(
                f"key-encryption key file {path} cannot be read ({type(exc).__name__})"
            ) from None
        if mode & 0o077:
            raise ConfigurationError(
                f"{path} is readable by other users (mode {mode:o})", hint=f"chmod 600 {path}"
            )
        if len(material) != KEY_BYTES:
            raise KeyProviderUnavailable(f"{path} is damaged: it must hold exactly 32 bytes")
        self._keks[version] = material
        return material

    def _create(self, version: int) -> bool:
        """Write version ``version``; False if it already exists (another process made it)."""
        path = self._path(version)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        except OSError as exc:
            raise KeyProviderUnavailable(f"cannot create {path} ({type(exc).__name__})") from None
        try:
            os.write(fd, AESGCM.generate_key(bit_length=KEY_BYTES * 8))
            os.fsync(fd)
        finally:
            os.close(fd)
        # The new name must survive a power cut, or data keys wrapped under it would be orphaned.
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

    # The KeyProvider interface.

    def kek_ids(self) -> list[str]:
        return [f"file:v{v}" for v in self._versions()]

    def current_kek_id(self) -> str:
        with self._lock:
            versions = self._versions()
            if versions:
                return f"file:v{versions[-1]}"
            self._create(1)
            return f"file:v{self._versions()[-1]}"

    def new_kek_version(self) -> str:
        with self._lock:
            version = (self._versions() or [0])[-1] + 1
            # O_EXCL makes creation atomic across processes; whoever loses a race takes the next.
            while not self._create(version):
                version += 1
            log.info("key-encryption key created", extra={"kek_id": f"file:v{version}"})
            return f"file:v{version}"

    def wrap(self, dek: bytes, *, context: bytes = b"") -> WrappedKey:
        _check_dek(dek)
        kek_id = self.current_kek_id()
        kek = self._kek(_version_of(kek_id, self.name))
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(kek).encrypt(nonce, dek, _wrap_aad(kek_id, context))
        return WrappedKey(kek_id, bytes([WRAP_FORMAT]) + nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, *, context: bytes = b"") -> bytes:
        nonce, sealed = _split_wrapped(wrapped)
        kek = self._kek(_version_of(wrapped.kek_id, self.name))
        try:
            return AESGCM(kek).decrypt(nonce, sealed, _wrap_aad(wrapped.kek_id, context))
        except InvalidTag:
            raise IntegrityError("a wrapped data key failed its integrity check") from None

    def destroy_kek(self, kek_id: str) -> None:
        version = _version_of(kek_id, self.name)
        with self._lock:
            versions = self._versions()
            if version not in versions:
                return
            if version == versions[-1]:
                raise ConfigurationError(
                    f"{kek_id} is the current key-encryption key and cannot be destroyed",
                    hint="rotate first (`medcollab keys rotate`)",
                )
            path = self._path(version)
            # Overwriting first is best effort: copy-on-write file systems and SSDs may keep the
            # old blocks, which is why the key directory must live on storage that is not snapshotted
            # beyond the key-retention period (docs/security/crypto.md).
            with path.open("r+b") as handle:
                handle.write(bytes(KEY_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
            path.unlink()
            self._keks.pop(version, None)
        log.info("key-encryption key destroyed", extra={"kek_id": kek_id})

    def close(self) -> None:
        self._keks.clear()


# The PKCS#11 provider -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Login:
    """The process's login to one token: PKCS#11 login state belongs to the application, not to a
    session, and python-pkcs11 logs the whole application out when the session that logged in
    closes. So one anchor session per token holds the login while any provider uses the token, and
    providers work in sessions of their own that share it."""

    pin_digest: bytes
    anchor: Any
    providers: int


_logins: dict[tuple[str, bytes], _Login] = {}
_logins_lock = threading.Lock()


def _pin_digest(pin: str) -> bytes:
    return sha256(b"medcollab/pkcs11-pin:" + pin.encode("utf-8")).digest()


class Pkcs11KeyProvider:
    """KEK versions as non-extractable AES-256 keys inside a PKCS#11 token.

    Every call into the token is serialised by a lock: a PKCS#11 session runs one operation at a time.
    The library itself is loaded once per process (python-pkcs11 caches it); SoftHSM2 reads
    ``SOFTHSM2_CONF`` when it is loaded, so that variable must be set before.
    """

    name: Final = "pkcs11"

    def __init__(self, module: Path, token_label: str, pin: str) -> None:
        # python-pkcs11 is imported here, not at the top of the module, so deployments with the file
        # provider never load a native PKCS#11 binding.
        import pkcs11  # noqa: PLC0415
        from pkcs11 import exceptions as p11e  # noqa: PLC0415

        self._p11: Any = pkcs11
        self._errors: Any = p11e
        self._lock = threading.Lock()
        self._keys: dict[int, Any] = {}
        if not module.is_file():
            raise ConfigurationError(
                f"the PKCS#11 module {module} does not exist",
                hint="set MEDCOLLAB_PKCS11_MODULE to the HSM vendor's library, "
                "e.g. /usr/lib/softhsm/libsofthsm2.so",
            )
        try:
            lib = pkcs11.lib(str(module))
        except p11e.PKCS11Error:
            raise ConfigurationError(
                f"the PKCS#11 module {module} could not be loaded",
                hint="check that it is a PKCS#11 library for this platform",
            ) from None
        try:
            token = lib.get_token(token_label=token_label)
        except p11e.NoSuchToken:
            raise ConfigurationError(
                f"no PKCS#11 token labelled {token_label!r} in {module}",
                hint="set MEDCOLLAB_PKCS11_TOKEN_LABEL to an initialised token's label",
            ) from None
        except p11e.MultipleTokensReturned:
            raise ConfigurationError(
                f"more than one PKCS#11 token is labelled {token_label!r}",
                hint="give each token a unique label",
            ) from None
        except p11e.PKCS11Error as exc:
            raise KeyProviderUnavailable(
                f"the PKCS#11 module {module} cannot list its tokens ({type(exc).__name__})"
            ) from None
        self._login_key = (str(module), bytes(token.serial))
        self._closed = False
        self._session: Any = self._open(token, pin)

    def _open(self, token: Any, pin: str) -> Any:
        p11e = self._errors
        with _logins_lock:
            login = _logins.get(self._login_key)
            if login is not None and not hmac.compare_digest(login.pin_digest, _pin_digest(pin)):
                # A second provider cannot log in again; its PIN is compared with the one that did.
                raise ConfigurationError(
                    "the PKCS#11 user PIN is wrong", hint="check MEDCOLLAB_PKCS11_PIN"
                )
            if login is None:
                try:
                    anchor = token.open(user_pin=pin)
                except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
                    # The PIN itself is never echoed, not even its length.
                    raise ConfigurationError(
                        "the PKCS#11 user PIN is wrong", hint="check MEDCOLLAB_PKCS11_PIN"
                    ) from None
                except p11e.PinLocked:
                    raise ConfigurationError(
                        "the PKCS#11 user PIN is locked after too many wrong attempts",
                        hint="the token's security officer must unlock or reset it",
                    ) from None
                except p11e.UserPinNotInitialized:
                    raise ConfigurationError(
                        "the PKCS#11 token has no user PIN", hint="initialise the token's user PIN"
                    ) from None
                except p11e.UserAlreadyLoggedIn:
                    raise ConfigurationError(
                        "the PKCS#11 token is already logged in by other code in this process"
                    ) from None
                except p11e.PKCS11Error as exc:
                    raise KeyProviderUnavailable(
                        f"cannot log in to the PKCS#11 token ({type(exc).__name__})"
                    ) from None
                login = _Login(pin_digest=_pin_digest(pin), anchor=anchor, providers=0)
                _logins[self._login_key] = login
            try:
                session = self._call(lambda: token.open(rw=True), "open a session")
            except KeyProviderUnavailable:
                if login.providers == 0:
                    _logins.pop(self._login_key, None)
                    with contextlib.suppress(p11e.PKCS11Error):
                        login.anchor.close()
                raise
            login.providers += 1
            return session

    def _call(self, operation: Any, what: str) -> Any:
        """Run ``operation`` against the token; any PKCS#11 error becomes a fail-closed error."""
        self._ensure_open()
        try:
            return operation()
        except self._errors.PKCS11Error as exc:
            raise KeyProviderUnavailable(
                f"the PKCS#11 token failed to {what} ({type(exc).__name__})",
                hint="check the HSM and its connection; no data was returned",
            ) from None

    def _ensure_open(self) -> None:
        if self._closed:
            raise KeyProviderUnavailable("the PKCS#11 key provider was closed")

    def _labels(self) -> dict[int, Any]:
        attribute, object_class = self._p11.Attribute, self._p11.ObjectClass

        def scan() -> dict[int, Any]:
            found: dict[int, Any] = {}
            for obj in self._session.get_objects({attribute.CLASS: object_class.SECRET_KEY}):
                match = _KEK_LABEL.match(str(obj[attribute.LABEL]))
                if match:
                    found[int(match[1])] = obj
            return found

        return cast("dict[int, Any]", self._call(scan, "list its keys"))

    def _key(self, version: int) -> Any:
        key = self._keys.get(version)
        if key is None:
            key = self._labels().get(version)
            if key is None:
                raise KeyProviderUnavailable(
                    f"key-encryption key pkcs11:v{version} is not in the token",
                    hint="the token must hold every KEK version still used by a data key",
                )
            self._keys[version] = key
        return key

    def _generate(self, version: int) -> None:
        p11 = self._p11
        template = {
            p11.Attribute.TOKEN: True,
            p11.Attribute.PRIVATE: True,
            p11.Attribute.SENSITIVE: True,
            p11.Attribute.EXTRACTABLE: False,
            p11.Attribute.MODIFIABLE: False,
        }
        self._call(
            lambda: self._session.generate_key(
                p11.KeyType.AES,
                KEY_BYTES * 8,
                label=f"{KEK_LABEL_PREFIX}{version}",
                store=True,
                capabilities=p11.MechanismFlag.ENCRYPT | p11.MechanismFlag.DECRYPT,
                template=template,
            ),
            "generate a key-encryption key",
        )

    def kek_ids(self) -> list[str]:
        with self._lock:
            return [f"pkcs11:v{v}" for v in sorted(self._labels())]

    def current_kek_id(self) -> str:
        with self._lock:
            versions = sorted(self._labels())
            if not versions:
                self._generate(1)
                versions = [1]
            return f"pkcs11:v{versions[-1]}"

    def new_kek_version(self) -> str:
        # Two processes rotating at once would create two keys with one label; the key service
        # serialises rotations through the database, so only one runs at a time.
        with self._lock:
            version = max(self._labels(), default=0) + 1
            self._generate(version)
        log.info("key-encryption key created", extra={"kek_id": f"pkcs11:v{version}"})
        return f"pkcs11:v{version}"

    def _gcm(self, nonce: bytes, aad: bytes) -> Any:
        return self._p11.mechanisms.GCMParams(nonce, aad, TAG_BYTES * 8)

    def wrap(self, dek: bytes, *, context: bytes = b"") -> WrappedKey:
        _check_dek(dek)
        kek_id = self.current_kek_id()
        with self._lock:
            key = self._key(_version_of(kek_id, self.name))
            nonce = os.urandom(NONCE_BYTES)
            params = self._gcm(nonce, _wrap_aad(kek_id, context))
            sealed = self._call(
                lambda: key.encrypt(
                    dek, mechanism=self._p11.Mechanism.AES_GCM, mechanism_param=params
                ),
                "wrap a data key",
            )
        return WrappedKey(kek_id, bytes([WRAP_FORMAT]) + nonce + bytes(sealed))

    def unwrap(self, wrapped: WrappedKey, *, context: bytes = b"") -> bytes:
        nonce, sealed = _split_wrapped(wrapped)
        version = _version_of(wrapped.kek_id, self.name)
        p11e = self._errors
        with self._lock:
            self._ensure_open()
            key = self._key(version)
            params = self._gcm(nonce, _wrap_aad(wrapped.kek_id, context))
            try:
                dek = key.decrypt(
                    sealed, mechanism=self._p11.Mechanism.AES_GCM, mechanism_param=params
                )
            except (p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange):
                raise IntegrityError("a wrapped data key failed its integrity check") from None
            except (p11e.GeneralError, p11e.FunctionFailed):
                # SoftHSM2 reports a GCM tag mismatch as a general error. If the token still
                # answers, the wrapped key was at fault, not the token.
                self._call(lambda: self._session.generate_random(64), "unwrap a data key")
                raise IntegrityError("a wrapped data key failed its integrity check") from None
            except p11e.PKCS11Error as exc:
                raise KeyProviderUnavailable(
                    f"the PKCS#11 token failed to unwrap a data key ({type(exc).__name__})",
                    hint="check the HSM and its connection; no data was returned",
                ) from None
        dek = bytes(dek)
        if len(dek) != KEY_BYTES:
            raise IntegrityError("a wrapped data key failed its integrity check")
        return dek

    def destroy_kek(self, kek_id: str) -> None:
        version = _version_of(kek_id, self.name)
        with self._lock:
            labels = self._labels()
            if version not in labels:
                return
            if version == max(labels):
                raise ConfigurationError(
                    f"{kek_id} is the current key-encryption key and cannot be destroyed",
                    hint="rotate first (`medcollab keys rotate`)",
                )
            self._call(labels[version].destroy, "destroy a key-encryption key")
            self._keys.pop(version, None)
        log.info("key-encryption key destroyed", extra={"kek_id": kek_id})

    def key_object(self, kek_id: str) -> Any:
        """The token's object for ``kek_id`` (a handle, never the key), for inspection in tests."""
        with self._lock:
            return self._key(_version_of(kek_id, self.name))

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(self._errors.PKCS11Error):
                self._session.close()
            with _logins_lock:
                login = _logins.get(self._login_key)
                if login is None:
                    return
                login.providers -= 1
                if login.providers <= 0:
                    # The last provider on this token: closing the anchor logs the process out.
                    del _logins[self._login_key]
                    with contextlib.suppress(self._errors.PKCS11Error):
                        login.anchor.close()


# Choosing a provider ------------------------------------------------------------------------------


def provider_from_settings(settings: Settings) -> KeyProvider:
    """The provider the deployment configures; raises ConfigurationError naming what is wrong."""
    if settings.key_provider == "file":
        return FileKeyProvider(settings.key_dir)
    if settings.pkcs11_module is None:
        raise ConfigurationError(
            "the pkcs11 key provider needs a module",
            hint="set MEDCOLLAB_PKCS11_MODULE to the HSM's PKCS#11 library",
        )
    pin = settings.pkcs11_pin.get_secret_value()
    if not pin:
        raise ConfigurationError(
            "the pkcs11 key provider needs the token's user PIN",
            hint="set MEDCOLLAB_PKCS11_PIN",
        )
    return Pkcs11KeyProvider(settings.pkcs11_module, settings.pkcs11_token_label, pin)


__all__ = [
    "KEK_LABEL_PREFIX",
    "FileKeyProvider",
    "KeyProvider",
    "KeyProviderUnavailable",
    "Pkcs11KeyProvider",
    "WrappedKey",
    "provider_from_settings",
]
