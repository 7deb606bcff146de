"""Retention and archives on both databases, inside the test's rolled-back transaction.

The log holds fifteen events: ten recorded in 2018 (heads at sizes 4 and 10) and five in 2025
(head at 15); the clock then stands in 2026, so the 2018 events are past the six-year retention and
the 2025 ones are not. The attacks through the real command on committed databases are in
tests/integration/test_audit_archive.py.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from medcollab.audit.archive import (
    ArchiveExists,
    ArchiveInvalid,
    ArchiveReport,
    ArchiveSignatureInvalid,
    RetentionNotElapsed,
    RetentionPolicy,
    RetentionTooShort,
    archive_before,
    retention_policy,
    verify_archive,
)
from medcollab.audit.checkpoint import key_id
from medcollab.audit.events import Agent, AuditEvent, Entity, EventType, Outcome
from medcollab.audit.merkle import leaf_hash
from medcollab.audit.models import (
    AuditArchive,
    AuditEventPatient,
    AuditEventRecord,
    AuditTreeHead,
    AuditTreeNode,
)
from medcollab.audit.services import AuditLog, AuditLogCorrupted, default_origin
from medcollab.audit.verify import DamageKind, VerificationReport, verify_log
from medcollab.crypto.signing import Ed25519Signer, LogSigner
from medcollab.errors import ConfigurationError, InvalidInput
from medcollab.jurisdiction.profiles import (
    DEFAULT_AUDIT_RETENTION,
    GDPR,
    HIPAA,
    PIPL,
)
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime

SIGNER = Ed25519Signer.generate()
KEY = SIGNER.public_key_bytes()
ORIGIN = default_origin(KEY)
OLD = datetime(2018, 5, 1, 9, 0, tzinfo=UTC)
RECENT = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
RETENTION = retention_policy(None, [PIPL])


def _event(clock: FrozenClock, number: int) -> AuditEvent:
    clock.advance(timedelta(seconds=1))
    return AuditEvent(
        EventType.FHIR_READ,
        Outcome.SUCCESS,
        clock.now(),
        agent=Agent(user_id=uuid.uuid4(), role="physician"),
        reasons=(f"event {number}",),
        entity=Entity(patient_id=f"pt-{number}", resource_type="Observation"),
    )


def _add(session: Session, clock: FrozenClock, batches: tuple[int, ...], first: int = 0) -> None:
    log = AuditLog(session, signer=SIGNER, clock=clock)
    number = first
    for batch in batches:
        for _ in range(batch):
            log.append(_event(clock, number))
            number += 1
        log.integrate()


@pytest.fixture
def session(runtime: Runtime, clock: FrozenClock) -> Iterator[Session]:
    with runtime.database.unit_of_work() as session:
        clock.set(OLD)
        _add(session, clock, (4, 6))
        clock.set(RECENT)
        _add(session, clock, (5,), first=10)
        clock.set(NOW)
        yield session


def archive(
    session: Session,
    clock: FrozenClock,
    out: Path,
    *,
    cutoff: datetime = datetime(2019, 1, 1, tzinfo=UTC),
    signer: LogSigner = SIGNER,
    retention: RetentionPolicy = RETENTION,
    dry_run: bool = False,
    max_events: int | None = None,
) -> ArchiveReport:
    return archive_before(
        session,
        cutoff=cutoff,
        out=out,
        signer=signer,
        clock=clock,
        retention=retention,
        dry_run=dry_run,
        max_events=max_events,
    )


def verify(session: Session) -> VerificationReport:
    return verify_log(session, public_key=KEY)


def leaves_with_events(session: Session) -> list[int]:
    return [
        int(i)
        for i in session.scalars(
            select(AuditEventRecord.leaf_index).order_by(AuditEventRecord.leaf_index)
        )
    ]


# Archiving a prefix -------------------------------------------------------------------------------


def test_archive_a_prefix(session: Session, clock: FrozenClock, tmp_path: Path) -> None:
    patients_before = session.scalar(select(func.count()).select_from(AuditEventPatient))
    seqs = list(session.scalars(select(AuditEventRecord.seq).order_by(AuditEventRecord.seq)))
    out = tmp_path / "2018.mcaudit.gz"

    report = archive(session, clock, out)

    assert (report.first_leaf, report.end_leaf, report.events) == (0, 10, 10)
    assert (report.first_seq, report.last_seq) == (seqs[0], seqs[9])
    assert report.first_recorded is not None
    assert report.first_recorded < datetime(2019, 1, 1, tzinfo=UTC)
    assert report.path == out
    assert report.linked_size == 15
    assert report.describe() == "10 events archived (leaves 0..9) in 2018.mcaudit.gz"
    assert out.stat().st_mode & 0o777 == 0o600
    # The events' rows are gone, with their patient index; every leaf hash and node stays.
    assert leaves_with_events(session) == list(range(10, 15))
    patients_after = session.scalar(select(func.count()).select_from(AuditEventPatient))
    assert patients_after == (patients_before or 0) - 10
    leaves = session.scalar(
        select(func.count()).select_from(AuditTreeNode).where(AuditTreeNode.level == 0)
    )
    assert leaves == 15
    record = session.scalars(select(AuditArchive)).one()
    assert (record.first_leaf, record.end_leaf, record.file_name) == (0, 10, out.name)
    assert record.file_sha256 == verify_archive(out, KEY).file_sha256
    # The head at size 10 existed, so its note is the archive's checkpoint.
    head = session.scalars(select(AuditTreeHead).where(AuditTreeHead.tree_size == 10)).one()
    assert record.checkpoint == head.note == report.checkpoint

    result = verify(session)
    assert result.ok, [d.describe() for d in result.damages]
    assert (result.events, result.integrated, result.archived) == (15, 15, 10)
    assert [a.describe() for a in result.archives] == [
        "10 events archived (leaves 0..9) in 2018.mcaudit.gz"
    ]
    # Proofs of live events are still built from the kept nodes.
    proof = AuditLog(session, signer=SIGNER, clock=clock).event_proof(seqs[12])
    assert proof.leaf_index == 12


def test_the_archive_verifies_on_its_own(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    out = tmp_path / "a.gz"
    written = archive(session, clock, out)
    report = verify_archive(out, KEY)
    assert (report.first_leaf, report.end_leaf) == (0, 10)
    assert report.root_hash == written.root_hash
    assert (report.first_seq, report.last_seq) == (written.first_seq, written.last_seq)
    assert report.first_recorded == written.first_recorded
    assert report.linked_size == 15
    assert report.live_size is None
    linked = verify_archive(out, KEY, live=session)
    assert linked.live_size == 15
    # Standard tools read it: the statement, then the header and one line per event.
    lines = gzip.decompress(out.read_bytes()).decode("utf-8").split("\n")
    assert lines[0] == "medcollab-audit-archive/v1"
    assert lines[1] == ORIGIN
    assert lines[2] == "leaves 0 10"
    events = [line for line in lines if line[:1].isdigit()]
    assert len(events) == 10
    leaf, seq, entry = events[3].split("\t")
    assert (leaf, seq) == ("3", str(written.first_seq + 3 if written.first_seq else ""))
    stored = session.scalar(
        select(AuditTreeNode.hash).where(AuditTreeNode.level == 0, AuditTreeNode.idx == 3)
    )
    assert leaf_hash(entry.encode("utf-8")) == stored


def test_a_cutoff_inside_a_batch_gets_a_freshly_signed_checkpoint(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    # The 2018 events are one second apart from 09:00:01: the first seven are before 09:00:08.
    out = tmp_path / "seven.gz"
    report = archive(session, clock, out, cutoff=datetime(2018, 5, 1, 9, 0, 8, tzinfo=UTC))
    assert report.events == 7
    assert report.checkpoint is not None
    assert report.checkpoint not in set(session.scalars(select(AuditTreeHead.note)))
    assert verify_archive(out, KEY, live=session).end_leaf == 7
    assert verify(session).ok


def test_archiving_twice_continues_from_the_previous_end(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    first = archive(
        session, clock, tmp_path / "1.gz", cutoff=datetime(2018, 5, 1, 9, 0, 4, tzinfo=UTC)
    )
    assert (first.first_leaf, first.end_leaf) == (0, 3)
    second = archive(session, clock, tmp_path / "2.gz")
    assert (second.first_leaf, second.end_leaf) == (3, 10)
    # The second file holds the subtrees left of leaf 3, and still proves its root on its own.
    alone = verify_archive(tmp_path / "2.gz", KEY, live=session)
    assert (alone.first_leaf, alone.end_leaf, alone.events) == (3, 10, 7)
    assert verify_archive(tmp_path / "1.gz", KEY, live=session).live_size == 15
    report = verify(session)
    assert report.ok
    assert [a.describe() for a in report.archives] == [
        "3 events archived (leaves 0..2) in 1.gz",
        "7 events archived (leaves 3..9) in 2.gz",
    ]
    # Nothing old is left; the call succeeds and archives nothing.
    third = archive(session, clock, tmp_path / "3.gz")
    assert (third.events, third.first_leaf, third.path) == (0, 10, None)
    assert third.describe() == "no events archived"
    assert not (tmp_path / "3.gz").exists()


def test_max_events_bounds_one_archive(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    reports = [archive(session, clock, tmp_path / f"{n}.gz", max_events=4) for n in range(4)]
    assert [(r.first_leaf, r.end_leaf) for r in reports] == [(0, 4), (4, 8), (8, 10), (10, 10)]
    assert verify(session).archived == 10
    with pytest.raises(InvalidInput, match="at least one event"):
        archive(session, clock, tmp_path / "x.gz", max_events=0)


def test_the_newest_event_always_stays_live(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    clock.set(datetime(2040, 1, 1, tzinfo=UTC))
    report = archive(session, clock, tmp_path / "all.gz", cutoff=datetime(2030, 1, 1, tzinfo=UTC))
    assert (report.first_leaf, report.end_leaf) == (0, 14)
    assert leaves_with_events(session) == [14]
    # The integrator still finds the tree and the events in agreement, and the log keeps growing.
    _add(session, clock, (2,), first=100)
    assert leaves_with_events(session) == [14, 15, 16]
    assert verify(session).ok


def test_a_dry_run_changes_nothing(session: Session, clock: FrozenClock, tmp_path: Path) -> None:
    out = tmp_path / "dry.gz"
    report = archive(session, clock, out, dry_run=True)
    assert (report.events, report.path, report.file_sha256, report.dry_run) == (
        10,
        None,
        None,
        True,
    )
    assert not out.exists()
    assert leaves_with_events(session) == list(range(15))
    assert session.scalar(select(func.count()).select_from(AuditArchive)) == 0


def test_an_existing_file_is_never_overwritten(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    out = tmp_path / "taken.gz"
    out.write_bytes(b"an older archive")
    with pytest.raises(ArchiveExists, match="never overwrites"):
        archive(session, clock, out)
    assert out.read_bytes() == b"an older archive"
    assert leaves_with_events(session) == list(range(15))


def test_an_unwritable_place_is_a_clear_error(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match="cannot write"):
        archive(session, clock, tmp_path / "absent-dir" / "a.gz")
    assert leaves_with_events(session) == list(range(15))


def test_a_tampered_event_is_never_archived(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    seq = session.scalar(select(AuditEventRecord.seq).where(AuditEventRecord.leaf_index == 6))
    body = session.scalar(select(AuditEventRecord.body).where(AuditEventRecord.seq == seq))
    assert isinstance(body, dict)
    session.execute(
        update(AuditEventRecord)
        .where(AuditEventRecord.seq == seq)
        .values(body={**body, "reasons": ["rewritten"]})
    )
    out = tmp_path / "a.gz"
    with pytest.raises(AuditLogCorrupted, match=f"audit event {seq} \\(leaf 6\\) does not hash"):
        archive(session, clock, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_rebuilt_tree_inconsistent_with_the_signed_head_is_never_archived(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    session.execute(
        update(AuditTreeNode)
        .where(AuditTreeNode.level == 3, AuditTreeNode.idx == 0)
        .values(hash=leaf_hash(b"forged"))
    )
    with pytest.raises(AuditLogCorrupted, match="not consistent with the signed head"):
        archive(session, clock, tmp_path / "a.gz")


# Retention ----------------------------------------------------------------------------------------


def test_a_cutoff_inside_the_retention_period_is_refused(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    with pytest.raises(RetentionNotElapsed) as caught:
        archive(session, clock, tmp_path / "a.gz", cutoff=datetime(2021, 1, 1, tzinfo=UTC))
    message = caught.value.message
    assert "2,192 days" in message
    assert "PIPL Art. 56" in message
    assert "the cutoff may be 2020-11-2" in message
    assert not (tmp_path / "a.gz").exists()


def test_the_default_retention_is_the_profiles() -> None:
    policy = retention_policy(None, [PIPL])
    assert policy.period == DEFAULT_AUDIT_RETENTION == timedelta(days=2192)
    assert "PIPL" in policy.source
    assert policy.minimum == PIPL.audit_log_retention_minimum.value
    assert policy.latest_cutoff(NOW) == NOW - policy.period


def test_a_configured_retention_below_the_legal_minimum_is_refused() -> None:
    with pytest.raises(RetentionTooShort) as caught:
        retention_policy(365, [PIPL])
    assert "below the legal minimum for audit logs of 1,096 days" in caught.value.message
    assert "PIPL Art. 56; Cybersecurity Law Art. 21(3)" in caught.value.message
    assert isinstance(caught.value, ConfigurationError)
    # Longer than the law's minimum, even if shorter than the platform default, is allowed.
    assert retention_policy(1200, [PIPL]).period == timedelta(days=1200)
    assert retention_policy(1200, [PIPL]).source == "audit_retention_days = 1200"


def test_the_strictest_profile_in_use_governs() -> None:
    with pytest.raises(RetentionTooShort, match=r"HIPAA: 45 CFR 164\.316"):
        retention_policy(1200, [PIPL, HIPAA])
    with pytest.raises(
        RetentionTooShort, match=r"GDPR Art\. 5\(1\)\(e\), a deployment-choice default"
    ):
        retention_policy(1200, [GDPR, PIPL])
    with pytest.raises(ConfigurationError, match="no jurisdiction profile"):
        retention_policy(None, [])


# Archive files under attack -----------------------------------------------------------------------


def _members(path: Path) -> tuple[str, bytes]:
    """The statement note and the decompressed payload, as anyone can read them."""
    data = path.read_bytes()
    decompressor = zlib.decompressobj(wbits=31)
    statement = decompressor.decompress(data).decode("utf-8")
    return statement, zlib.decompress(decompressor.unused_data, wbits=31)


def _repack(path: Path, payload: bytes, signer: LogSigner, *, origin: str = ORIGIN) -> None:
    """What an intruder does after editing the payload: recompress, re-hash, re-sign."""
    statement, _ = _members(path)
    compressed = gzip.compress(payload, mtime=0)
    lines = statement[: statement.rindex("\n\n") + 1].split("\n")[:-1]
    lines = [
        f"payload-sha256 {hashlib.sha256(compressed).hexdigest()}"
        if line.startswith("payload-sha256 ")
        else f"payload-bytes {len(compressed)}"
        if line.startswith("payload-bytes ")
        else line
        for line in lines
    ]
    text = "\n".join(lines) + "\n"
    blob = key_id(origin, signer.public_key_bytes()) + signer.sign(text.encode("utf-8"))
    note = f"{text}\n\u2014 {origin} {base64.b64encode(blob).decode()}\n"
    path.write_bytes(gzip.compress(note.encode("utf-8"), mtime=0) + compressed)


def _edit_entry(payload: bytes) -> bytes:
    lines = payload.split(b"\n")
    lines[4] = lines[4].replace(b'"outcome":"0"', b'"outcome":"8"')
    return b"\n".join(lines)


@pytest.fixture
def archived(session: Session, clock: FrozenClock, tmp_path: Path) -> Path:
    out = tmp_path / "archive.gz"
    archive(session, clock, out)
    return out


@pytest.mark.parametrize("where", [0.01, 0.3, 0.5, 0.9, -1])
def test_a_flipped_byte_breaks_the_signature(archived: Path, where: float) -> None:
    data = bytearray(archived.read_bytes())
    position = int(len(data) * where) if where >= 0 else len(data) - 1
    data[position] ^= 0x01
    archived.write_bytes(bytes(data))
    with pytest.raises(ArchiveSignatureInvalid, match=r"archive\.gz: .*(signature|signed)"):
        verify_archive(archived, KEY)


def test_a_payload_changed_after_signing(archived: Path) -> None:
    statement, payload = _members(archived)
    archived.write_bytes(
        gzip.compress(statement.encode(), mtime=0) + gzip.compress(_edit_entry(payload), mtime=0)
    )
    with pytest.raises(ArchiveSignatureInvalid, match="changed after it was signed"):
        verify_archive(archived, KEY)


def test_an_edited_archive_re_signed_with_another_key(archived: Path) -> None:
    _, payload = _members(archived)
    _repack(archived, _edit_entry(payload), Ed25519Signer.generate())
    with pytest.raises(ArchiveSignatureInvalid, match="not signed by the log key"):
        verify_archive(archived, KEY)


def test_an_edited_archive_under_a_valid_signature_still_fails_its_root(archived: Path) -> None:
    # As if the log key itself had signed a wrong file: the entries must still give the root.
    _, payload = _members(archived)
    _repack(archived, _edit_entry(payload), SIGNER)
    with pytest.raises(ArchiveInvalid, match="do not hash to the root of the signed checkpoint"):
        verify_archive(archived, KEY)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: lines[:5] + lines[6:], "leaf 5 is where leaf 4 belongs"),
        (lambda lines: lines[:-2] + lines[-1:], "holds 9 events but its statement says 10"),
        (lambda lines: [b"{}", *lines[1:]], "not a medcollab-audit-archive/v1 header"),
        (lambda lines: [*lines[:3], b"3 x y", *lines[4:]], "is not LEAF TAB SEQ TAB ENTRY"),
        (lambda lines: [*lines[:3], b"2\t1\tnot json", *lines[4:]], "entry of leaf 2 is not JSON"),
        (lambda lines: [*lines[:3], b"2\t99\t{}", *lines[4:]], "not the event with seq 99"),
        (lambda lines: [b"not json", *lines[1:]], "no header line"),
        (lambda lines: [*lines[:-1], b"trailing"], "does not end with a newline"),
    ],
)
def test_a_malformed_payload_under_a_valid_signature(
    archived: Path, edit: object, message: str
) -> None:
    _, payload = _members(archived)
    lines = payload.split(b"\n")
    assert callable(edit)
    _repack(archived, b"\n".join(edit(lines)), SIGNER)
    with pytest.raises(ArchiveInvalid, match=message):
        verify_archive(archived, KEY)


def test_not_an_archive(tmp_path: Path) -> None:
    for name, content in (
        ("empty", b""),
        ("text", b"hello"),
        ("gzip", gzip.compress(b"hello\n")),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ArchiveSignatureInvalid):
            verify_archive(path, KEY)
    with pytest.raises(ArchiveInvalid, match="no such file"):
        verify_archive(tmp_path / "absent", KEY)


def test_against_a_live_log_that_does_not_know_the_archive(
    archived: Path, session: Session
) -> None:
    session.execute(delete(AuditArchive))
    with pytest.raises(
        ArchiveInvalid, match=r"live log has no record of an archive of leaves 0\.\.9"
    ):
        verify_archive(archived, KEY, live=session)


def test_against_a_live_log_that_recorded_another_file(archived: Path, session: Session) -> None:
    session.execute(update(AuditArchive).values(file_sha256=bytes(32)))
    with pytest.raises(ArchiveInvalid, match="recorded a different file"):
        verify_archive(archived, KEY, live=session)


def test_against_a_live_log_rebuilt_on_another_tree(archived: Path, session: Session) -> None:
    # The live log's latest head, re-signed by the log key over another root: a fork.
    head = session.scalars(select(AuditTreeHead).order_by(AuditTreeHead.id.desc())).first()
    assert head is not None
    from medcollab.audit.checkpoint import Checkpoint, sign_checkpoint  # noqa: PLC0415

    forked = sign_checkpoint(
        Checkpoint(ORIGIN, head.tree_size, leaf_hash(b"fork"), head.issued_at), SIGNER
    )
    session.execute(
        update(AuditTreeHead).where(AuditTreeHead.id == head.id).values(note=forked.note)
    )
    with pytest.raises(ArchiveInvalid, match="is not a prefix of the live log"):
        verify_archive(archived, KEY, live=session)
    session.execute(delete(AuditTreeHead).where(AuditTreeHead.tree_size > 4))
    with pytest.raises(ArchiveInvalid, match="rolled back"):
        verify_archive(archived, KEY, live=session)


# The live log after an archive, under attack ------------------------------------------------------


def _first(report: VerificationReport) -> tuple[DamageKind, str]:
    assert report.first is not None, "damage was not detected"
    return report.first.kind, report.first.describe()


def test_a_deleted_archive_record(archived: Path, session: Session) -> None:
    session.execute(delete(AuditArchive))
    kind, text = _first(verify(session))
    assert kind is DamageKind.MISSING
    assert "the live log starts at leaf 10, not 0: 10 event(s) were removed" in text


def test_an_archive_claimed_to_hide_deleted_events(archived: Path, session: Session) -> None:
    # The intruder deletes three live events and records a fake archive of them, signed with a key
    # of their own (the log key is not in the database).
    record = session.scalars(select(AuditArchive)).one()
    session.execute(
        delete(AuditEventRecord).where(
            AuditEventRecord.leaf_index >= 10, AuditEventRecord.leaf_index < 13
        )
    )
    intruder = Ed25519Signer.generate()
    text = f"medcollab-audit-archive/v1\n{ORIGIN}\nleaves 10 13\n"
    blob = key_id(ORIGIN, intruder.public_key_bytes()) + intruder.sign(text.encode())
    session.execute(
        insert(AuditArchive).values(
            first_leaf=10,
            end_leaf=13,
            file_name="fake.gz",
            file_sha256=bytes(32),
            created_at=NOW,
            checkpoint=record.checkpoint,
            statement=f"{text}\n\u2014 {ORIGIN} {base64.b64encode(blob).decode()}\n",
        )
    )
    report = verify(session)
    kind, text = _first(report)
    assert kind is DamageKind.FORGED
    assert "archive record #" in text
    assert "not signed by the log key: the log never made it" in text
    # The events the fake archive claims are then missing from the live log.
    assert any(d.kind is DamageKind.MISSING for d in report.damages)
    assert report.archived == 10


def test_archive_record_columns_changed(archived: Path, session: Session) -> None:
    session.execute(update(AuditArchive).values(end_leaf=12))
    session.execute(
        delete(AuditEventRecord).where(
            AuditEventRecord.leaf_index >= 10, AuditEventRecord.leaf_index < 12
        )
    )
    kind, text = _first(verify(session))
    assert kind is DamageKind.MODIFIED
    assert "differ from its signed statement" in text


def test_an_archive_record_with_a_foreign_checkpoint(archived: Path, session: Session) -> None:
    other = session.scalars(select(AuditTreeHead).where(AuditTreeHead.tree_size == 4)).one()
    session.execute(update(AuditArchive).values(checkpoint=other.note))
    kind, text = _first(verify(session))
    assert (kind, "not the tree its signed statement names" in text) == (DamageKind.MODIFIED, True)
    session.execute(update(AuditArchive).values(checkpoint="garbage"))
    kind, text = _first(verify(session))
    assert kind is DamageKind.BAD_SIGNATURE


def test_a_removed_record_between_two_archives(
    session: Session, clock: FrozenClock, tmp_path: Path
) -> None:
    archive(session, clock, tmp_path / "1.gz", cutoff=datetime(2018, 5, 1, 9, 0, 4, tzinfo=UTC))
    archive(session, clock, tmp_path / "2.gz")
    session.execute(delete(AuditArchive).where(AuditArchive.first_leaf == 0))
    report = verify(session)
    kind, text = _first(report)
    assert kind is DamageKind.MISSING
    assert "covers leaves 3..9, but the archived prefix ends at leaf 0" in text
    assert "the record of the archive in between was removed" in text
    # Nothing after the gap counts as archived, so the events it held are missing too.
    assert report.archived == 0
    assert any("the live log starts at leaf 10, not 0" in d.detail for d in report.damages)


def test_deleted_leaf_hashes_of_an_archived_range(archived: Path, session: Session) -> None:
    session.execute(
        delete(AuditTreeNode).where(AuditTreeNode.level == 0, AuditTreeNode.idx.in_([3, 4]))
    )
    kind, text = _first(verify(session))
    assert kind is DamageKind.MISSING
    assert "stored leaf hash of archived leaf 3 was removed" in text


def test_deleted_interior_nodes_of_an_archived_range(archived: Path, session: Session) -> None:
    session.execute(delete(AuditTreeNode).where(AuditTreeNode.level == 1, AuditTreeNode.idx < 5))
    kind, text = _first(verify(session))
    assert kind is DamageKind.MODIFIED
    assert "node (level 1, index 0) is missing" in text


def test_a_modified_leaf_hash_of_an_archived_range(archived: Path, session: Session) -> None:
    session.execute(
        update(AuditTreeNode)
        .where(AuditTreeNode.level == 0, AuditTreeNode.idx == 6)
        .values(hash=leaf_hash(b"rewritten"))
    )
    report = verify(session)
    assert not report.ok
    kinds = {d.kind for d in report.damages}
    assert kinds == {DamageKind.MODIFIED}
    assert any("node (level 1, index 3) is wrong" in d.detail for d in report.damages)


def test_an_event_put_back_into_an_archived_range(archived: Path, session: Session) -> None:
    row = session.execute(
        select(AuditEventRecord).where(AuditEventRecord.leaf_index == 12)
    ).scalar_one()
    values = {
        c: getattr(row, c)
        for c in ("recorded_at", "type", "action", "outcome", "agent_user_id", "body")
    }
    session.execute(insert(AuditEventRecord).values(**values, leaf_index=4))
    kind, text = _first(verify(session))
    assert kind is DamageKind.FORGED
    assert "leaf 4, whose event was archived to archive.gz" in text


@pytest.mark.parametrize("change", ["modified", "deleted", "forged"])
def test_the_live_part_is_still_checked(archived: Path, session: Session, change: str) -> None:
    seq = session.scalar(select(AuditEventRecord.seq).where(AuditEventRecord.leaf_index == 12))
    assert seq is not None
    if change == "modified":
        session.execute(
            update(AuditEventRecord).where(AuditEventRecord.seq == seq).values(outcome="12")
        )
        expected = (DamageKind.MODIFIED, f"at seq {seq} (leaf 12)")
    elif change == "deleted":
        session.execute(delete(AuditEventRecord).where(AuditEventRecord.seq == seq))
        expected = (DamageKind.MISSING, "at leaf 12")
    else:
        row = session.execute(
            select(AuditEventRecord).where(AuditEventRecord.seq == seq)
        ).scalar_one()
        body = {**row.body, "reasons": ["forged"]}
        session.execute(
            insert(AuditEventRecord).values(
                recorded_at=row.recorded_at,
                type=row.type,
                action=row.action,
                outcome=row.outcome,
                agent_user_id=row.agent_user_id,
                body=body,
                leaf_index=15,
            )
        )
        expected = (DamageKind.FORGED, "(leaf 15)")
    kind, text = _first(verify(session))
    assert kind is expected[0]
    assert expected[1] in text


def test_archives_need_the_public_key(archived: Path, session: Session) -> None:
    session.execute(delete(AuditTreeHead))
    with pytest.raises(ConfigurationError, match="archives but no log public key"):
        verify_log(session, public_key=None)
