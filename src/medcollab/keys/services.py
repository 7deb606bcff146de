"""The data-key service: one data key per owner, wrapped by the key provider, rotated and shredded.

Rules it keeps:

* **One key per owner and generation.** A patient's (or organisation's) current key is the newest live
  generation; it is created on first use. Rotating the data key adds a generation and retires the old
  one, which still opens everything it sealed.
* **Keys are stored wrapped, and bound to their row.** The wrap's associated data holds the key id and
  owner, so a wrapped key copied into another row does not unwrap.
* **KEK rotation touches keys, never data.** :meth:`KeyService.rotate_kek` creates a KEK version and
  re-wraps every live key under it, in batches, with conditional updates: a key shredded meanwhile
  stays shredded.
* **Shredding is final.** :meth:`KeyService.shred` removes the wrapped material of every key of an
  owner and leaves a tombstone that refuses new keys for that owner and, after a restore, destroys
  keys that an older backup brought back (:meth:`KeyService.apply_tombstones`). Old wrapped copies
  (backups, database pages, replicas) become useless for good when the KEK versions that wrapped them
  are destroyed (:meth:`KeyService.destroy_unused_kek`); ``docs/security/crypto.md`` describes the
  schedule.
* **Fail closed.** A provider that cannot unwrap raises
  :class:`~medcollab.crypto.providers.KeyProviderUnavailable` (503); a wrapped key or ciphertext that
  does not authenticate raises :class:`~medcollab.crypto.envelope.IntegrityError`.

Unwrapped keys are cached per service instance, which lives for one request or job, and nowhere
else: a process-wide cache would keep key material in memory after a shred or rotation in another
process, and unwrapping is cheap (microseconds with the file provider, tens of microseconds in
SoftHSM2).
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

from sqlalchemy import CursorResult, func, select, text, update
from sqlalchemy.exc import IntegrityError as DatabaseIntegrityError
from sqlalchemy.orm import Session

from medcollab.crypto import envelope
from medcollab.crypto.envelope import DataKey, IntegrityError
from medcollab.crypto.providers import KeyProvider, KeyProviderUnavailable, WrappedKey
from medcollab.errors import Conflict, InvalidInput, MedcollabError, NotFound
from medcollab.kernel.clock import Clock
from medcollab.keys.models import (
    BLIND_INDEX_OWNER,
    OWNER_ID_LENGTH,
    DataKeyRecord,
    OwnerKind,
    ShreddedOwner,
)

log = logging.getLogger("medcollab.keys")
_T = TypeVar("_T")

#: Keys re-wrapped per batch during KEK rotation; bounds memory, not the transaction.
REWRAP_BATCH: Final = 500
_OWNER_ID = re.compile(rf"^[A-Za-z0-9\-.]{{1,{OWNER_ID_LENGTH}}}$")
_CREATE_ATTEMPTS: Final = 3
#: The PostgreSQL advisory lock that serialises KEK rotations (an arbitrary fixed number).
_ROTATION_LOCK: Final = 0x6D63_6B65_6B72_6F74


class KeyDestroyed(MedcollabError):
    """The data key was crypto-shredded: what it sealed is gone for good."""

    code = "key_destroyed"


@dataclass(frozen=True, slots=True)
class RotationReport:
    """The outcome of a KEK rotation: the new version, and how many keys moved to it."""

    new_kek_id: str
    previous_kek_ids: tuple[str, ...]
    rewrapped: int


@dataclass(frozen=True, slots=True)
class Tombstone:
    """An owner whose keys were shredded; carried across a restore by the backup flow."""

    owner_kind: OwnerKind
    owner_id: str


@dataclass(frozen=True, slots=True)
class KeyStatus:
    provider: str
    current_kek_id: str
    #: Every KEK version the provider holds, oldest first.
    kek_ids: tuple[str, ...]
    #: Live (not destroyed) data keys per KEK version that wraps them.
    keys_per_kek: dict[str, int]
    #: ``{owner kind: {"current" | "retired" | "destroyed": count}}``.
    keys_per_kind: dict[str, dict[str, int]]
    shredded_owners: int

    @property
    def unused_kek_ids(self) -> tuple[str, ...]:
        """Old KEK versions that wrap no live key and could be destroyed."""
        return tuple(
            k for k in self.kek_ids if k != self.current_kek_id and not self.keys_per_kek.get(k)
        )


def _owner(owner_kind: OwnerKind | str, owner_id: str) -> tuple[OwnerKind, str]:
    try:
        kind = OwnerKind(owner_kind)
    except ValueError:
        raise InvalidInput(f"unknown key owner kind {owner_kind!r}") from None
    if not _OWNER_ID.fullmatch(owner_id):
        raise InvalidInput(
            "a key owner id is 1-64 characters of letters, digits, '-' and '.' (a FHIR id)"
        )
    if kind is OwnerKind.BLIND_INDEX and owner_id != BLIND_INDEX_OWNER:
        raise InvalidInput(f"the blind-index key's owner is {BLIND_INDEX_OWNER!r}")
    return kind, owner_id


def _wrap_context(key_id: uuid.UUID, kind: OwnerKind, owner_id: str) -> bytes:
    return envelope.length_prefixed(
        b"medcollab/data-key/v1", key_id.bytes, kind.value.encode(), owner_id.encode()
    )


def _advisory_key(kind: OwnerKind, owner_id: str) -> int:
    digest = hashlib.sha256(f"medcollab/key-owner/{kind.value}/{owner_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class KeyService:
    """Data keys for one request or job. Never commits; the unit of work does."""

    def __init__(self, *, session: Session, provider: KeyProvider, clock: Clock) -> None:
        self._session = session
        self._provider = provider
        self._clock = clock
        self._cache: dict[uuid.UUID, tuple[DataKey, OwnerKind, str]] = {}
        # The current key per owner, for this unit of work only: an import seals hundreds of
        # resources of one patient, and the answer cannot change within the transaction except
        # through this service's own rotate/shred, which clear it.
        self._current: dict[tuple[OwnerKind, str], DataKey] = {}

    # Finding keys ---------------------------------------------------------------------------------

    def current_key(self, owner_kind: OwnerKind | str, owner_id: str) -> DataKey:
        """The owner's current data key, created (and wrapped) on first use.

        Raises :class:`KeyDestroyed` for a shredded owner: nothing new is sealed for them.
        """
        kind, owner = _owner(owner_kind, owner_id)
        memo = self._current.get((kind, owner))
        if memo is not None:
            return memo
        for _ in range(_CREATE_ATTEMPTS):
            record = self._current_record(kind, owner)
            if record is not None:
                key = self._open_record(record)
                self._current[(kind, owner)] = key
                return key
            self._lock_owner(kind, owner)
            if self._current_record(kind, owner) is None:
                self._refuse_if_shredded(kind, owner)
                created = self._create(kind, owner, self._next_generation(kind, owner))
                if created is not None:
                    return created
        raise Conflict("the data key could not be created because of concurrent changes; retry")

    def key_by_id(self, key_id: uuid.UUID) -> DataKey:
        """The data key ``key_id``, unwrapped.

        Raises :class:`~medcollab.errors.NotFound` if there is no such key and :class:`KeyDestroyed`
        if it was shredded.
        """
        return self._key(key_id)[0]

    def key_for(self, blob: bytes, owner_kind: OwnerKind | str, owner_id: str) -> DataKey:
        """The key that sealed ``blob``, which must belong to the given owner.

        A ciphertext naming a key of another owner, or no existing key, was moved or forged: both
        raise :class:`~medcollab.crypto.envelope.IntegrityError`.
        """
        kind, owner = _owner(owner_kind, owner_id)
        key_id = envelope.key_id_of(blob)
        try:
            key, key_kind, key_owner = self._key(key_id)
        except NotFound:
            raise IntegrityError("the stored value failed its integrity check") from None
        if (key_kind, key_owner) != (kind, owner):
            raise IntegrityError("the stored value failed its integrity check")
        return key

    def seal(
        self, owner_kind: OwnerKind | str, owner_id: str, plaintext: bytes, *, aad: bytes
    ) -> bytes:
        """Seal ``plaintext`` with the owner's current key (see :func:`envelope.aad_for`)."""
        return envelope.seal(self.current_key(owner_kind, owner_id), plaintext, aad)

    def unseal(
        self, owner_kind: OwnerKind | str, owner_id: str, blob: bytes, *, aad: bytes
    ) -> bytes:
        """Open ``blob`` for the owner; fails closed with IntegrityError or KeyDestroyed."""
        return envelope.unseal(self.key_for(blob, owner_kind, owner_id), blob, aad)

    def blind_index_key(self) -> bytes:
        """The key of every blind index: a data key of its own, so indexes survive KEK rotation."""
        return self.current_key(OwnerKind.BLIND_INDEX, BLIND_INDEX_OWNER).material

    def blind_index(self, value: str, *, context: str = "") -> str:
        """The blind index of ``value`` (see :func:`envelope.blind_index`)."""
        return envelope.blind_index(self.blind_index_key(), value, context=context)

    # Rotation -------------------------------------------------------------------------------------

    def rotate_data_key(self, owner_kind: OwnerKind | str, owner_id: str) -> DataKey:
        """Give the owner a new current key; the old one is retired and still opens its data."""
        kind, owner = _owner(owner_kind, owner_id)
        self._current.pop((kind, owner), None)
        if kind is OwnerKind.BLIND_INDEX:
            raise Conflict(
                "the blind-index key cannot be rotated in place: every stored index would stop "
                "matching",
                hint="re-index with a new key instead",
            )
        self._lock_owner(kind, owner)
        self._refuse_if_shredded(kind, owner)
        now = self._clock.now()
        created = self._create(kind, owner, self._next_generation(kind, owner))
        if created is None:
            raise Conflict("another rotation of this key ran at the same time; retry")
        self._session.execute(
            update(DataKeyRecord)
            .where(
                DataKeyRecord.owner_kind == kind,
                DataKeyRecord.owner_id == owner,
                DataKeyRecord.id != created.id,
                DataKeyRecord.retired_at.is_(None),
                DataKeyRecord.destroyed_at.is_(None),
            )
            .values(retired_at=now)
        )
        log.info("data key rotated", extra={"owner_kind": kind.value, "key_id": str(created.id)})
        return created

    def rotate_kek(
        self,
        *,
        new_version: bool = True,
        batch_size: int = REWRAP_BATCH,
        progress: Callable[[int, int], None] | None = None,
    ) -> RotationReport:
        """Create a KEK version and re-wrap every live data key under it; data is not touched.

        ``new_version=False`` only re-wraps keys that are not yet under the current version (to
        finish a rotation that raced with key creation). ``progress(done, total)`` is called after
        each batch. Rotations are serialised across processes.
        """
        if batch_size < 1:
            raise InvalidInput("the batch size is at least 1")
        self._lock_rotation()
        previous = self._session.scalars(
            select(DataKeyRecord.kek_id)
            .where(DataKeyRecord.destroyed_at.is_(None))
            .distinct()
            .order_by(DataKeyRecord.kek_id)
        ).all()
        new_kek = self._provider_call(
            self._provider.new_kek_version if new_version else self._provider.current_kek_id
        )
        stale = (DataKeyRecord.destroyed_at.is_(None), DataKeyRecord.kek_id != new_kek)
        total = (
            self._session.scalar(select(func.count()).select_from(DataKeyRecord).where(*stale)) or 0
        )
        done = 0
        last: uuid.UUID | None = None
        while True:
            query = select(
                DataKeyRecord.id,
                DataKeyRecord.owner_kind,
                DataKeyRecord.owner_id,
                DataKeyRecord.wrapped,
                DataKeyRecord.kek_id,
            ).where(*stale)
            if last is not None:
                query = query.where(DataKeyRecord.id > last)
            rows = self._session.execute(query.order_by(DataKeyRecord.id).limit(batch_size)).all()
            if not rows:
                break
            for key_id, kind, owner, wrapped, kek_id in rows:
                if wrapped is None or kek_id is None:
                    continue  # The check constraint rules this out; a destroyed key has nothing.
                context = _wrap_context(key_id, kind, owner)
                material = self._unwrap(key_id, WrappedKey(kek_id, wrapped), context)
                rewrapped = self._wrap(material, context)
                if rewrapped.kek_id != new_kek:
                    raise Conflict("the key-encryption key changed during rotation; run it again")
                # Conditional on the row being unchanged: a key shredded meanwhile stays shredded.
                done += self._rowcount(
                    update(DataKeyRecord)
                    .where(
                        DataKeyRecord.id == key_id,
                        DataKeyRecord.kek_id == kek_id,
                        DataKeyRecord.destroyed_at.is_(None),
                    )
                    .values(wrapped=rewrapped.blob, kek_id=rewrapped.kek_id)
                )
            last = rows[-1][0]
            if progress is not None:
                progress(done, total)
        self._cache.clear()
        log.info("key-encryption key rotated", extra={"kek_id": new_kek, "rewrapped": done})
        return RotationReport(
            new_kek_id=new_kek,
            previous_kek_ids=tuple(k for k in previous if k is not None and k != new_kek),
            rewrapped=done,
        )

    def destroy_unused_kek(self, kek_id: str) -> None:
        """Destroy an old KEK version that wraps no live data key.

        Every copy of a key wrapped by it — in backups older than the last rotation, in free database
        pages, on replicas — becomes unreadable, which is what makes shredding final.
        """
        self._lock_rotation()
        if kek_id == self._provider_call(self._provider.current_kek_id):
            raise Conflict(
                f"{kek_id} is the current key-encryption key", hint="rotate first, then destroy"
            )
        in_use = self._session.scalar(
            select(func.count())
            .select_from(DataKeyRecord)
            .where(DataKeyRecord.kek_id == kek_id, DataKeyRecord.destroyed_at.is_(None))
        )
        if in_use:
            raise Conflict(
                f"{kek_id} still wraps {in_use} data keys",
                hint="run `medcollab keys rotate --rewrap-only` first",
            )
        self._provider_call(lambda: self._provider.destroy_kek(kek_id))

    # Shredding ------------------------------------------------------------------------------------

    def shred(self, owner_kind: OwnerKind | str, owner_id: str) -> int:
        """Destroy every key of the owner, so every version of their data is unreadable.

        Returns how many keys were destroyed. The owner is tombstoned: no new key will be made for
        them, and :meth:`apply_tombstones` destroys their keys again in a restored backup.
        """
        kind, owner = _owner(owner_kind, owner_id)
        self._current.pop((kind, owner), None)
        if kind is OwnerKind.BLIND_INDEX:
            raise Conflict("the blind-index key is not personal data and is never shredded")
        self._lock_owner(kind, owner)
        destroyed = self._destroy_keys(kind, owner)
        tombstone = self._session.get(ShreddedOwner, (kind, owner))
        if tombstone is None:
            self._session.add(
                ShreddedOwner(
                    owner_kind=kind,
                    owner_id=owner,
                    shredded_at=self._clock.now(),
                    keys_destroyed=destroyed,
                )
            )
        else:
            tombstone.keys_destroyed += destroyed
        self._session.flush()
        log.info("data keys shredded", extra={"owner_kind": kind.value, "keys": destroyed})
        return destroyed

    def tombstones(self) -> list[Tombstone]:
        """Every shredded owner, for the backup flow to keep outside the database backup."""
        rows = self._session.execute(
            select(ShreddedOwner.owner_kind, ShreddedOwner.owner_id).order_by(
                ShreddedOwner.shredded_at, ShreddedOwner.owner_kind, ShreddedOwner.owner_id
            )
        ).all()
        return [Tombstone(OwnerKind(kind), owner) for kind, owner in rows]

    def apply_tombstones(self, tombstones: Iterable[Tombstone]) -> int:
        """Shred again every owner in ``tombstones`` (after restoring an older backup).

        Returns how many keys the restored database had brought back and are now destroyed.
        """
        return sum(self.shred(t.owner_kind, t.owner_id) for t in tombstones)

    # Status ---------------------------------------------------------------------------------------

    def status(self) -> KeyStatus:
        per_kek = self._session.execute(
            select(DataKeyRecord.kek_id, func.count())
            .where(DataKeyRecord.destroyed_at.is_(None))
            .group_by(DataKeyRecord.kek_id)
        ).all()
        state = (
            select(
                DataKeyRecord.owner_kind,
                DataKeyRecord.destroyed_at.is_not(None).label("destroyed"),
                DataKeyRecord.retired_at.is_not(None).label("retired"),
                func.count(),
            )
            .group_by(DataKeyRecord.owner_kind, "destroyed", "retired")
            .order_by(DataKeyRecord.owner_kind)
        )
        per_kind: dict[str, dict[str, int]] = {}
        for kind, destroyed, retired, count in self._session.execute(state).all():
            label = "destroyed" if destroyed else ("retired" if retired else "current")
            bucket = per_kind.setdefault(OwnerKind(kind).value, {})
            bucket[label] = bucket.get(label, 0) + count
        return KeyStatus(
            provider=self._provider.name,
            current_kek_id=self._provider_call(self._provider.current_kek_id),
            kek_ids=tuple(self._provider_call(self._provider.kek_ids)),
            keys_per_kek={kek: count for kek, count in per_kek if kek is not None},
            keys_per_kind=per_kind,
            shredded_owners=self._session.scalar(select(func.count(ShreddedOwner.owner_id))) or 0,
        )

    # Internals ------------------------------------------------------------------------------------

    def _current_record(self, kind: OwnerKind, owner: str) -> DataKeyRecord | None:
        return self._session.scalars(
            select(DataKeyRecord)
            .where(
                DataKeyRecord.owner_kind == kind,
                DataKeyRecord.owner_id == owner,
                DataKeyRecord.retired_at.is_(None),
                DataKeyRecord.destroyed_at.is_(None),
            )
            .order_by(DataKeyRecord.generation.desc())
            .limit(1)
            .execution_options(populate_existing=True)
        ).first()

    def _next_generation(self, kind: OwnerKind, owner: str) -> int:
        newest = self._session.scalar(
            select(func.max(DataKeyRecord.generation)).where(
                DataKeyRecord.owner_kind == kind, DataKeyRecord.owner_id == owner
            )
        )
        return (newest or 0) + 1

    def _refuse_if_shredded(self, kind: OwnerKind, owner: str) -> None:
        if self._session.get(ShreddedOwner, (kind, owner)) is not None:
            raise KeyDestroyed(
                "this owner's data keys were destroyed (crypto-shredded); nothing new is sealed "
                "for them"
            )

    def _create(self, kind: OwnerKind, owner: str, generation: int) -> DataKey | None:
        """Create, wrap and store a key; None if another writer took the generation first."""
        key = DataKey.generate()
        context = _wrap_context(key.id, kind, owner)
        wrapped = self._wrap(key.material, context)
        record = DataKeyRecord(
            id=key.id,
            owner_kind=kind,
            owner_id=owner,
            generation=generation,
            wrapped=wrapped.blob,
            kek_id=wrapped.kek_id,
            created_at=self._clock.now(),
        )
        try:
            with self._session.begin_nested():
                self._session.add(record)
                self._session.flush()
        except DatabaseIntegrityError:
            return None
        self._cache[key.id] = (key, kind, owner)
        return key

    def _key(self, key_id: uuid.UUID) -> tuple[DataKey, OwnerKind, str]:
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        record = self._session.scalars(
            select(DataKeyRecord)
            .where(DataKeyRecord.id == key_id)
            .execution_options(populate_existing=True)
        ).first()
        if record is None:
            raise NotFound("no data key with this id")
        key = self._open_record(record)
        return key, record.owner_kind, record.owner_id

    def _open_record(self, record: DataKeyRecord) -> DataKey:
        cached = self._cache.get(record.id)
        if cached is not None:
            return cached[0]
        if record.destroyed_at is not None or record.wrapped is None or record.kek_id is None:
            raise KeyDestroyed(
                "the data key was destroyed (crypto-shredded); what it sealed is gone for good"
            )
        kind = OwnerKind(record.owner_kind)
        material = self._unwrap(
            record.id,
            WrappedKey(record.kek_id, record.wrapped),
            _wrap_context(record.id, kind, record.owner_id),
        )
        key = DataKey(id=record.id, material=material)
        self._cache[record.id] = (key, kind, record.owner_id)
        return key

    def _wrap(self, material: bytes, context: bytes) -> WrappedKey:
        return self._provider_call(lambda: self._provider.wrap(material, context=context))

    def _unwrap(self, key_id: uuid.UUID, wrapped: WrappedKey, context: bytes) -> bytes:
        try:
            return self._provider_call(lambda: self._provider.unwrap(wrapped, context=context))
        except IntegrityError:
            # Ids only: the wrapped bytes are useless to a reader of the log, but noise to it.
            log.error(  # noqa: TRY400 - the traceback adds nothing; the ids name the problem.
                "a wrapped data key failed its integrity check",
                extra={"key_id": str(key_id), "kek_id": wrapped.kek_id},
            )
            raise

    def _provider_call(self, call: Callable[[], _T]) -> _T:
        """Call the provider; an unexpected failure becomes KeyProviderUnavailable (fail closed)."""
        try:
            return call()
        except MedcollabError:
            raise
        except Exception as exc:  # noqa: BLE001 - any provider fault must fail closed, never leak.
            log.error(  # noqa: TRY400 - an exception's text may quote key material.
                "the key provider failed", extra={"error_type": type(exc).__name__}
            )
            raise KeyProviderUnavailable(
                "the key provider failed; no protected data was returned",
                hint="check the key provider (key directory or HSM)",
            ) from None

    def _destroy_keys(self, kind: OwnerKind, owner: str) -> int:
        destroyed = self._rowcount(
            update(DataKeyRecord)
            .where(
                DataKeyRecord.owner_kind == kind,
                DataKeyRecord.owner_id == owner,
                DataKeyRecord.destroyed_at.is_(None),
            )
            .values(wrapped=None, kek_id=None, destroyed_at=self._clock.now())
            .execution_options(synchronize_session="fetch")
        )
        for key_id in [
            k
            for k, (_, c_kind, c_owner) in self._cache.items()
            if (c_kind, c_owner) == (kind, owner)
        ]:
            del self._cache[key_id]
        return destroyed

    def _rowcount(self, statement: Any) -> int:
        result = cast("CursorResult[Any]", self._session.execute(statement))
        return int(result.rowcount)

    def _lock_owner(self, kind: OwnerKind, owner: str) -> None:
        # SQLite transactions take the write lock when they begin (BEGIN IMMEDIATE), so they are
        # serialised already; PostgreSQL needs a lock per owner so that creating a key and shredding
        # the owner cannot interleave.
        if self._session.get_bind().dialect.name == "postgresql":
            self._session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key(kind, owner)}
            )

    def _lock_rotation(self) -> None:
        if self._session.get_bind().dialect.name == "postgresql":
            self._session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ROTATION_LOCK}
            )


__all__ = [
    "BLIND_INDEX_OWNER",
    "KeyDestroyed",
    "KeyService",
    "KeyStatus",
    "OwnerKind",
    "RotationReport",
    "Tombstone",
]
