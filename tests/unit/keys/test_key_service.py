"""The data-key store on both databases and with both key providers.

Covers the acceptance criteria of encryption at rest: swapped ciphertexts fail closed, KEK rotation
keeps every record readable, data-key rotation keeps old versions readable, and crypto-shredding
makes every version of a patient's data unreadable.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, select, text, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from medcollab.crypto import envelope
from medcollab.crypto.envelope import DataKey, IntegrityError, aad_for
from medcollab.crypto.providers import KeyProvider, KeyProviderUnavailable, WrappedKey
from medcollab.db.session import Database, make_engine
from medcollab.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from medcollab.kernel.clock import FrozenClock
from medcollab.keys.models import BLIND_INDEX_OWNER, DataKeyRecord, OwnerKind, ShreddedOwner
from medcollab.keys.services import KeyDestroyed, KeyService, Tombstone

PATIENT = OwnerKind.PATIENT


@pytest.fixture
def session(database: Database) -> Iterator[Session]:
    with database.session() as db_session:
        yield db_session


@pytest.fixture
def keys(session: Session, key_provider: KeyProvider, clock: FrozenClock) -> KeyService:
    return KeyService(session=session, provider=key_provider, clock=clock)


def fresh(session: Session, provider: KeyProvider, clock: FrozenClock) -> KeyService:
    """A new service, as the next request would have: nothing cached."""
    return KeyService(session=session, provider=provider, clock=clock)


def _rows(session: Session, owner_id: str) -> list[DataKeyRecord]:
    return list(
        session.scalars(
            select(DataKeyRecord)
            .where(DataKeyRecord.owner_id == owner_id)
            .order_by(DataKeyRecord.generation)
            .execution_options(populate_existing=True)
        )
    )


# A table shaped like a record store, created inside the test's rolled-back transaction.
_scratch = MetaData()
RECORDS = Table(
    "test_sealed_record",
    _scratch,
    Column("row", Integer, primary_key=True),
    Column("resource_type", String(64)),
    Column("resource_id", String(64)),
    Column("version", Integer),
    Column("patient", String(64)),
    Column("body", LargeBinary),
)


@pytest.fixture
def records(session: Session) -> Table:
    RECORDS.create(session.connection())
    return RECORDS


def _store(
    session: Session,
    keys: KeyService,
    row: int,
    rtype: str,
    rid: str,
    version: int,
    patient: str,
    body: bytes,
) -> None:
    blob = keys.seal(PATIENT, patient, body, aad=aad_for(rtype, rid, version, patient))
    session.execute(
        RECORDS.insert().values(
            row=row,
            resource_type=rtype,
            resource_id=rid,
            version=version,
            patient=patient,
            body=blob,
        )
    )


def _read(session: Session, keys: KeyService, row: int) -> bytes:
    found = session.execute(select(RECORDS).where(RECORDS.c.row == row)).one()
    aad = aad_for(found.resource_type, found.resource_id, found.version, found.patient)
    return keys.unseal(PATIENT, found.patient, found.body, aad=aad)


def _swap_bodies(session: Session, first: int, second: int) -> None:
    body = {
        r: session.scalar(select(RECORDS.c.body).where(RECORDS.c.row == r)) for r in (first, second)
    }
    session.execute(update(RECORDS).where(RECORDS.c.row == first).values(body=body[second]))
    session.execute(update(RECORDS).where(RECORDS.c.row == second).values(body=body[first]))


# Creating and finding keys ------------------------------------------------------------------------


def test_current_key_is_created_once_and_stored_wrapped(
    keys: KeyService, session: Session, key_provider: KeyProvider, clock: FrozenClock
) -> None:
    first = keys.current_key(PATIENT, "pat-1")
    assert keys.current_key(PATIENT, "pat-1") == first
    again = fresh(session, key_provider, clock)
    assert again.current_key("patient", "pat-1") == first
    assert again.key_by_id(first.id) == first
    (row,) = _rows(session, "pat-1")
    assert row.id == first.id
    assert row.generation == 1
    assert row.kek_id == key_provider.current_kek_id()
    assert row.wrapped is not None
    assert first.material not in row.wrapped
    assert row.retired_at is None
    assert row.destroyed_at is None


def test_owners_have_their_own_keys(keys: KeyService) -> None:
    patient = keys.current_key(PATIENT, "pat-1")
    other = keys.current_key(PATIENT, "pat-2")
    org = keys.current_key(OwnerKind.ORGANIZATION, str(uuid.uuid4()))
    assert len({patient.id, other.id, org.id}) == 3
    assert len({patient.material, other.material, org.material}) == 3


def test_unknown_keys_and_bad_owners(keys: KeyService) -> None:
    with pytest.raises(NotFound):
        keys.key_by_id(uuid.uuid4())
    for kind, owner in (
        ("nobody", "x"),
        (PATIENT, ""),
        (PATIENT, "a" * 65),
        (PATIENT, "has space"),
        (PATIENT, "../etc"),
        (OwnerKind.BLIND_INDEX, "other"),
    ):
        with pytest.raises(InvalidInput):
            keys.current_key(kind, owner)


def test_keys_are_cached_per_service_instance(
    session: Session, key_provider: KeyProvider, clock: FrozenClock
) -> None:
    calls: list[str] = []

    class Counting:
        name = key_provider.name

        def __getattr__(self, attribute: str) -> object:
            return getattr(key_provider, attribute)

        def unwrap(self, wrapped: WrappedKey, *, context: bytes = b"") -> bytes:
            calls.append(wrapped.kek_id)
            return key_provider.unwrap(wrapped, context=context)

    key_id = (
        KeyService(session=session, provider=key_provider, clock=clock)
        .current_key(PATIENT, "pat-1")
        .id
    )
    service = KeyService(session=session, provider=Counting(), clock=clock)  # type: ignore[arg-type]
    for _ in range(3):
        service.key_by_id(key_id)
        service.current_key(PATIENT, "pat-1")
    assert len(calls) == 1


# Rows bound to their ciphertexts ------------------------------------------------------------------


def test_swapped_ciphertexts_fail_closed(
    keys: KeyService,
    session: Session,
    records: Table,
    key_provider: KeyProvider,
    clock: FrozenClock,
) -> None:
    _store(session, keys, 1, "Observation", "obs-1", 1, "pat-1", b"A: HbA1c 6.1%")
    _store(session, keys, 2, "Observation", "obs-2", 1, "pat-1", b"B: HbA1c 9.8%")
    _store(session, keys, 3, "Observation", "obs-1", 2, "pat-1", b"A v2")
    _store(session, keys, 4, "Observation", "obs-9", 1, "pat-2", b"another patient")
    reader = fresh(session, key_provider, clock)
    assert _read(session, reader, 1) == b"A: HbA1c 6.1%"
    assert _read(session, reader, 4) == b"another patient"

    # Same patient, two resources; same resource, two versions; two patients.
    for first, second in ((1, 2), (1, 3), (2, 4)):
        _swap_bodies(session, first, second)
        for row in (first, second):
            with pytest.raises(IntegrityError):
                _read(session, reader, row)
        _swap_bodies(session, first, second)
        assert _read(session, reader, first)
        assert _read(session, reader, second)


def test_tampered_and_orphaned_ciphertexts_fail_closed(
    keys: KeyService, session: Session, records: Table
) -> None:
    _store(session, keys, 1, "Condition", "c-1", 1, "pat-1", b"diagnosis")
    blob = session.scalar(select(RECORDS.c.body).where(RECORDS.c.row == 1))
    assert blob is not None
    aad = aad_for("Condition", "c-1", 1, "pat-1")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(IntegrityError):
        keys.unseal(PATIENT, "pat-1", tampered, aad=aad)
    # A ciphertext naming a key that does not exist was forged or comes from elsewhere.
    orphan = envelope.seal(DataKey.generate(), b"x", aad)
    with pytest.raises(IntegrityError):
        keys.unseal(PATIENT, "pat-1", orphan, aad=aad)
    # The other patient's key does not open this patient's rows, even with matching AAD.
    other = keys.seal(PATIENT, "pat-2", b"y", aad=aad)
    with pytest.raises(IntegrityError):
        keys.unseal(PATIENT, "pat-1", other, aad=aad)


def test_a_wrapped_key_moved_to_another_row_does_not_unwrap(
    keys: KeyService, session: Session, key_provider: KeyProvider, clock: FrozenClock
) -> None:
    victim = keys.current_key(PATIENT, "pat-1")
    attacker = keys.current_key(PATIENT, "pat-2")
    wrapped = session.scalar(select(DataKeyRecord.wrapped).where(DataKeyRecord.id == attacker.id))
    session.execute(
        update(DataKeyRecord).where(DataKeyRecord.id == victim.id).values(wrapped=wrapped)
    )
    with pytest.raises(IntegrityError):
        fresh(session, key_provider, clock).key_by_id(victim.id)


# KEK rotation -------------------------------------------------------------------------------------


def test_kek_rotation_rewraps_every_key_and_keeps_every_record_readable(
    keys: KeyService,
    session: Session,
    records: Table,
    key_provider: KeyProvider,
    clock: FrozenClock,
) -> None:
    for n in range(5):
        _store(session, keys, n, "Observation", f"obs-{n}", 1, f"pat-{n}", f"value {n}".encode())
    keys.rotate_data_key(PATIENT, "pat-0")
    _store(session, keys, 10, "Observation", "obs-0", 2, "pat-0", b"after data-key rotation")
    org_key = keys.current_key(OwnerKind.ORGANIZATION, "org-1")
    index_before = keys.blind_index("Zhang San")
    keys.shred(PATIENT, "pat-4")
    old_kek = key_provider.current_kek_id()
    wrapped_before = dict(session.execute(select(DataKeyRecord.id, DataKeyRecord.wrapped)).all())
    seen: list[tuple[int, int]] = []

    report = keys.rotate_kek(batch_size=2, progress=lambda done, total: seen.append((done, total)))

    assert report.new_kek_id == key_provider.current_kek_id() != old_kek
    assert report.previous_kek_ids == (old_kek,)
    # Five patient keys (one rotated: six), the organisation key and the blind-index key; the
    # shredded patient's key is not re-wrapped.
    assert report.rewrapped == 7
    assert seen[-1] == (7, 7)
    assert len(seen) == 4  # Batches of two.
    rows = session.scalars(select(DataKeyRecord).execution_options(populate_existing=True)).all()
    live = [r for r in rows if r.destroyed_at is None]
    assert {r.kek_id for r in live} == {report.new_kek_id}
    assert all(r.wrapped != wrapped_before[r.id] for r in live)
    assert next(r for r in rows if r.destroyed_at is not None).wrapped is None
    # The old KEK wraps nothing any more, so it could now be destroyed.
    used_by_old = session.scalar(
        select(DataKeyRecord.id).where(DataKeyRecord.kek_id == old_kek).limit(1)
    )
    assert used_by_old is None
    assert old_kek in keys.status().unused_kek_ids

    reader = fresh(session, key_provider, clock)
    for n in range(4):
        assert _read(session, reader, n) == f"value {n}".encode()
    assert _read(session, reader, 10) == b"after data-key rotation"
    assert reader.current_key(OwnerKind.ORGANIZATION, "org-1") == org_key
    assert reader.blind_index("zhang  SAN") == index_before
    with pytest.raises(KeyDestroyed):
        _read(session, reader, 4)


def test_rewrap_only_finishes_without_a_new_kek(
    keys: KeyService, session: Session, key_provider: KeyProvider
) -> None:
    keys.current_key(PATIENT, "pat-1")
    current = key_provider.current_kek_id()
    report = keys.rotate_kek(new_version=False)
    assert report.new_kek_id == current
    assert report.rewrapped == 0
    with pytest.raises(InvalidInput):
        keys.rotate_kek(batch_size=0)


def test_an_old_kek_is_destroyed_only_when_unused(
    keys: KeyService, session: Session, key_provider: KeyProvider, clock: FrozenClock
) -> None:
    key = keys.current_key(PATIENT, "pat-1")
    old_kek = key_provider.current_kek_id()
    with pytest.raises(Conflict):
        keys.destroy_unused_kek(old_kek)  # The current KEK.
    key_provider.new_kek_version()
    with pytest.raises(Conflict, match="still wraps 1"):
        keys.destroy_unused_kek(old_kek)
    keys.rotate_kek(new_version=False)
    keys.destroy_unused_kek(old_kek)
    assert old_kek not in key_provider.kek_ids()
    assert fresh(session, key_provider, clock).key_by_id(key.id) == key


# Data-key rotation --------------------------------------------------------------------------------


def test_data_key_rotation_keeps_old_versions_readable(
    keys: KeyService,
    session: Session,
    records: Table,
    key_provider: KeyProvider,
    clock: FrozenClock,
) -> None:
    _store(session, keys, 1, "Observation", "obs-1", 1, "pat-1", b"version 1")
    old = keys.current_key(PATIENT, "pat-1")
    neighbour = keys.current_key(PATIENT, "pat-2")
    new = keys.rotate_data_key(PATIENT, "pat-1")
    assert new.id != old.id
    assert keys.current_key(PATIENT, "pat-1") == new
    _store(session, keys, 2, "Observation", "obs-1", 2, "pat-1", b"version 2")
    blobs = session.scalars(select(RECORDS.c.body).order_by(RECORDS.c.row)).all()
    assert [envelope.key_id_of(b) for b in blobs] == [old.id, new.id]

    reader = fresh(session, key_provider, clock)
    assert _read(session, reader, 1) == b"version 1"
    assert _read(session, reader, 2) == b"version 2"
    first, second = _rows(session, "pat-1")
    assert (first.generation, second.generation) == (1, 2)
    assert first.retired_at == clock.now()
    assert second.retired_at is None
    assert reader.current_key(PATIENT, "pat-2") == neighbour


# Crypto-shredding ---------------------------------------------------------------------------------


def test_shredding_makes_every_version_unreadable(
    keys: KeyService,
    session: Session,
    records: Table,
    key_provider: KeyProvider,
    clock: FrozenClock,
) -> None:
    _store(session, keys, 1, "Patient", "pat-1", 1, "pat-1", b"name, birth date")
    _store(session, keys, 2, "Observation", "obs-1", 1, "pat-1", b"result")
    keys.rotate_data_key(PATIENT, "pat-1")
    _store(session, keys, 3, "Observation", "obs-1", 2, "pat-1", b"corrected result")
    _store(session, keys, 4, "Observation", "obs-2", 1, "pat-2", b"someone else")
    key_ids = [r.id for r in _rows(session, "pat-1")]

    assert keys.shred(PATIENT, "pat-1") == 2

    # On the raw database: no key material is left for the patient.
    raw = session.execute(
        text("SELECT wrapped, kek_id, destroyed_at FROM data_key WHERE owner_id = :o"),
        {"o": "pat-1"},
    ).all()
    assert len(raw) == 2
    assert all(w is None and k is None and d is not None for w, k, d in raw)
    tombstone = session.get(ShreddedOwner, (PATIENT, "pat-1"))
    assert tombstone is not None
    assert tombstone.keys_destroyed == 2

    # Through the service, in this request and the next.
    for reader in (keys, fresh(session, key_provider, clock)):
        for key_id in key_ids:
            with pytest.raises(KeyDestroyed) as caught:
                reader.key_by_id(key_id)
            assert caught.value.code == "key_destroyed"
        for row in (1, 2, 3):
            with pytest.raises(KeyDestroyed):
                _read(session, reader, row)
        with pytest.raises(KeyDestroyed):
            reader.current_key(PATIENT, "pat-1")  # Nothing new is sealed for them.
        with pytest.raises(KeyDestroyed):
            reader.rotate_data_key(PATIENT, "pat-1")
        assert _read(session, reader, 4) == b"someone else"

    assert keys.shred(PATIENT, "pat-1") == 0
    assert keys.tombstones() == [Tombstone(PATIENT, "pat-1")]


def test_tombstones_shred_again_after_a_restore(
    keys: KeyService, session: Session, key_provider: KeyProvider, clock: FrozenClock
) -> None:
    # A restored older backup still holds the patient's keys; the tombstones kept outside the
    # backup destroy them again.
    restored = keys.current_key(PATIENT, "pat-1")
    keys.current_key(PATIENT, "pat-2")
    assert keys.apply_tombstones([Tombstone(PATIENT, "pat-1")]) == 1
    reader = fresh(session, key_provider, clock)
    with pytest.raises(KeyDestroyed):
        reader.key_by_id(restored.id)
    assert reader.current_key(PATIENT, "pat-2")


# The blind-index key ------------------------------------------------------------------------------


def test_blind_index_key_is_a_dedicated_stable_data_key(
    keys: KeyService, session: Session, key_provider: KeyProvider, clock: FrozenClock
) -> None:
    key = keys.blind_index_key()
    assert len(key) == 32
    assert fresh(session, key_provider, clock).blind_index_key() == key
    (row,) = _rows(session, BLIND_INDEX_OWNER)
    assert row.owner_kind is OwnerKind.BLIND_INDEX
    assert keys.blind_index("１３８ 0013 8000") == envelope.blind_index(key, "138 0013 8000")
    with pytest.raises(Conflict):
        keys.rotate_data_key(OwnerKind.BLIND_INDEX, BLIND_INDEX_OWNER)
    with pytest.raises(Conflict):
        keys.shred(OwnerKind.BLIND_INDEX, BLIND_INDEX_OWNER)


# Failing closed -----------------------------------------------------------------------------------


class _BrokenProvider:
    """A provider whose every unwrap fails the way a lost HSM connection or a bug might."""

    def __init__(self, inner: KeyProvider, error: Exception) -> None:
        self._inner = inner
        self._error = error
        self.name = inner.name

    def __getattr__(self, attribute: str) -> object:
        return getattr(self._inner, attribute)

    def unwrap(self, wrapped: WrappedKey, *, context: bytes = b"") -> bytes:
        del wrapped, context
        raise self._error


@pytest.mark.parametrize(
    "error",
    [OSError("connection reset"), RuntimeError("driver bug"), KeyProviderUnavailable("down")],
    ids=["oserror", "bug", "unavailable"],
)
def test_provider_failures_fail_closed(
    keys: KeyService,
    session: Session,
    key_provider: KeyProvider,
    clock: FrozenClock,
    error: Exception,
) -> None:
    blob = keys.seal(PATIENT, "pat-1", b"secret", aad=aad_for("Patient", "pat-1", 1, "pat-1"))
    broken = KeyService(
        session=session,
        provider=_BrokenProvider(key_provider, error),  # type: ignore[arg-type]
        clock=clock,
    )
    with pytest.raises(ServiceUnavailable) as caught:
        broken.unseal(PATIENT, "pat-1", blob, aad=aad_for("Patient", "pat-1", 1, "pat-1"))
    assert "connection reset" not in caught.value.diagnostics()
    assert "driver bug" not in caught.value.diagnostics()


def test_a_missing_kek_fails_closed(
    keys: KeyService, session: Session, key_provider: KeyProvider, clock: FrozenClock
) -> None:
    key = keys.current_key(PATIENT, "pat-1")
    old_kek = key_provider.current_kek_id()
    key_provider.new_kek_version()
    key_provider.destroy_kek(old_kek)  # Behind the service's back: the key is still wrapped by it.
    with pytest.raises(KeyProviderUnavailable):
        fresh(session, key_provider, clock).key_by_id(key.id)


# Status and the command line ----------------------------------------------------------------------


def test_status_counts_keys(keys: KeyService, key_provider: KeyProvider) -> None:
    keys.current_key(PATIENT, "pat-1")
    keys.rotate_data_key(PATIENT, "pat-1")
    keys.current_key(PATIENT, "pat-2")
    keys.shred(PATIENT, "pat-2")
    keys.blind_index_key()
    status = keys.status()
    assert status.provider == key_provider.name
    assert status.current_kek_id == key_provider.current_kek_id()
    assert status.kek_ids[-1] == status.current_kek_id
    assert status.keys_per_kek == {status.current_kek_id: 3}
    assert status.keys_per_kind == {
        "patient": {"current": 1, "retired": 1, "destroyed": 1},
        "blind_index": {"current": 1},
    }
    assert status.shredded_owners == 1


def test_cli_rotate_rotate_patient_and_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medcollab.cli.main import load_settings  # noqa: PLC0415 - after the environment is set.
    from medcollab.deployment import initialise  # noqa: PLC0415
    from medcollab.keys.cli import keys_app  # noqa: PLC0415

    monkeypatch.setenv("MEDCOLLAB_MODE", "dev")
    monkeypatch.setenv("MEDCOLLAB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MEDCOLLAB_SECRET_KEY", secrets.token_urlsafe(32))
    monkeypatch.setenv("MEDCOLLAB_TLS", "false")
    monkeypatch.setenv("MEDCOLLAB_CONFIG", str(tmp_path / "absent.toml"))
    initialise(load_settings())
    runner = CliRunner()

    result = runner.invoke(keys_app, ["rotate-patient", "--patient", "pat-1"])
    assert result.exit_code == 0, result.output
    assert "new data key" in result.output
    result = runner.invoke(keys_app, ["rotate"])
    assert result.exit_code == 0, result.output
    assert "file:v2" in result.output
    assert "re-wrapped 1" in result.output
    result = runner.invoke(keys_app, ["status"])
    assert result.exit_code == 0, result.output
    assert "file:v1" in result.output
    assert "unused" in result.output
    result = runner.invoke(keys_app, ["destroy-kek", "file:v1"])
    assert result.exit_code != 0
    assert (tmp_path / "keys" / "kek-v1.key").exists()
    result = runner.invoke(keys_app, ["destroy-kek", "file:v1", "--yes"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "keys" / "kek-v1.key").exists()

    engine = make_engine(load_settings().sqlalchemy_url)
    try:
        with engine.connect() as connection:
            audited = connection.execute(
                text("SELECT body FROM audit_event WHERE type = 'security:keys:rotated'")
            ).all()
    finally:
        engine.dispose()
    assert len(audited) == 3  # The patient's data key, the KEK, the destroyed KEK.
