"""Verification edge cases on both databases, damaged within the test's own transaction.

The attacks an intruder makes from outside (a separate connection on a committed database, through
the real command) are in tests/integration/test_audit_tamper.py; these cover the remaining branches.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from medcollab.audit.checkpoint import Checkpoint, sign_checkpoint
from medcollab.audit.events import Agent, AuditEvent, EventType, Outcome
from medcollab.audit.merkle import leaf_hash
from medcollab.audit.models import AuditEventRecord, AuditTreeHead, AuditTreeNode
from medcollab.audit.services import AuditLog, default_origin
from medcollab.audit.verify import (
    AuditLogDamaged,
    CheckpointRejected,
    DamageKind,
    OutsideCheckpoint,
    VerificationReport,
    read_checkpoint,
    verify_log,
)
from medcollab.crypto.signing import Ed25519Signer
from medcollab.errors import ConfigurationError
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime

SIGNER = Ed25519Signer.generate()
KEY = SIGNER.public_key_bytes()


@pytest.fixture
def session(runtime: Runtime, clock: FrozenClock) -> Iterator[Session]:
    """Ten events with heads at sizes 4 and 10."""
    with runtime.database.unit_of_work() as session:
        log = AuditLog(session, signer=SIGNER, clock=clock)
        for batch in (4, 6):
            for i in range(batch):
                clock.advance(timedelta(seconds=1))
                log.append(
                    AuditEvent(
                        EventType.ROLE_GRANTED,
                        Outcome.SUCCESS,
                        clock.now(),
                        agent=Agent(user_id=uuid.uuid4()),
                        subject_user_id=uuid.uuid4(),
                        reasons=(f"grant {i}",),
                    )
                )
            log.integrate()
        yield session


def verify(session: Session, **kwargs: object) -> VerificationReport:
    return verify_log(session, public_key=kwargs.pop("public_key", KEY), **kwargs)  # type: ignore[arg-type]


def first(report: VerificationReport) -> tuple[DamageKind, int | None, int | None]:
    damage = report.first
    assert damage is not None
    return damage.kind, damage.seq, damage.leaf_index


def seq_at(session: Session, leaf: int) -> int:
    seq = session.scalar(select(AuditEventRecord.seq).where(AuditEventRecord.leaf_index == leaf))
    assert seq is not None
    return seq


def test_intact(session: Session) -> None:
    report = verify(session)
    assert report.ok
    assert (report.events, report.integrated, report.pending, report.tree_heads) == (10, 10, 0, 2)
    assert report.latest_head_size == 10


def test_pending_events_are_counted_not_blamed(session: Session, clock: FrozenClock) -> None:
    AuditLog(session).append(AuditEvent(EventType.LOGOUT, Outcome.SUCCESS, clock.now()))
    report = verify(session)
    assert report.ok
    assert (report.events, report.pending) == (11, 1)


def test_a_stored_interior_node_rewritten(session: Session) -> None:
    session.execute(
        update(AuditTreeNode)
        .where(AuditTreeNode.level == 1, AuditTreeNode.idx == 3)
        .values(hash=leaf_hash(b"x"))
    )
    report = verify(session)
    damage = report.first
    assert damage is not None
    assert (damage.kind, damage.leaf_index) == (DamageKind.MODIFIED, 6)
    assert "node (level 1, index 3) is wrong" in damage.detail


def test_a_stored_interior_node_deleted(session: Session) -> None:
    session.execute(delete(AuditTreeNode).where(AuditTreeNode.level == 2, AuditTreeNode.idx == 0))
    damage = verify(session).first
    assert damage is not None
    assert "node (level 2, index 0) is missing" in damage.detail


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (["not", "an", "object"], "not a JSON object"),
        ("a string", "not a JSON object"),
    ],
)
def test_a_body_replaced_by_something_else(session: Session, body: object, problem: str) -> None:
    seq = seq_at(session, 2)
    session.execute(update(AuditEventRecord).where(AuditEventRecord.seq == seq).values(body=body))
    report = verify(session)
    assert first(report) == (DamageKind.MODIFIED, seq, 2)
    assert report.first is not None
    assert problem in report.first.detail


def test_a_body_that_cannot_be_canonicalised(session: Session) -> None:
    seq = seq_at(session, 1)
    body = session.scalar(select(AuditEventRecord.body).where(AuditEventRecord.seq == seq))
    assert isinstance(body, dict)
    session.execute(
        update(AuditEventRecord)
        .where(AuditEventRecord.seq == seq)
        .values(body={**body, "weight": 1.5})
    )
    report = verify(session)
    assert first(report) == (DamageKind.MODIFIED, seq, 1)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("recorded_at", None),
        ("agent_user_id", uuid.uuid4()),
        ("subject_user_id", None),
        ("type", "auth:login:success"),
    ],
)
def test_a_column_that_disagrees_with_the_body(
    session: Session, clock: FrozenClock, column: str, value: object
) -> None:
    seq = seq_at(session, 3)
    if column == "recorded_at":
        value = clock.now() - timedelta(days=1)
    session.execute(
        update(AuditEventRecord).where(AuditEventRecord.seq == seq).values({column: value})
    )
    report = verify(session)
    assert first(report) == (DamageKind.MODIFIED, seq, 3)
    assert report.first is not None
    assert column in report.first.detail


def test_events_deleted_from_a_log_without_heads(runtime: Runtime, clock: FrozenClock) -> None:
    with runtime.database.unit_of_work() as session:
        log = AuditLog(session, clock=clock)
        for _ in range(3):
            log.append(AuditEvent(EventType.LOGOUT, Outcome.SUCCESS, clock.now()))
        log.integrate()
        session.execute(delete(AuditEventRecord).where(AuditEventRecord.leaf_index == 2))
        report = verify_log(session, public_key=None)
        assert first(report) == (DamageKind.TRUNCATED, None, 2)
        assert report.first is not None
        assert "stored tree has 3 leaves but only 2 events remain" in report.first.detail


def test_heads_swapped_in_issue_order(session: Session) -> None:
    heads = session.scalars(select(AuditTreeHead).order_by(AuditTreeHead.id)).all()
    notes = [h.note for h in heads]
    columns = [(h.tree_size, h.root_hash, h.issued_at) for h in heads]
    for head, note, (size, root, issued) in zip(
        heads, reversed(notes), reversed(columns), strict=True
    ):
        session.execute(
            update(AuditTreeHead)
            .where(AuditTreeHead.id == head.id)
            .values(note=note, tree_size=size, root_hash=root, issued_at=issued)
        )
    report = verify(session)
    assert report.first is not None
    assert report.first.kind is DamageKind.REORDERED
    assert report.first.head_id == heads[1].id


def test_a_head_whose_note_is_not_a_checkpoint(session: Session) -> None:
    session.execute(update(AuditTreeHead).values(note="garbage"))
    report = verify(session)
    assert report.first is not None
    assert report.first.kind is DamageKind.BAD_SIGNATURE
    assert "not a checkpoint" in report.first.detail


def test_a_head_without_a_timestamp(session: Session) -> None:
    head = session.scalars(select(AuditTreeHead).order_by(AuditTreeHead.id)).first()
    assert head is not None
    note = sign_checkpoint(
        Checkpoint(default_origin(KEY), head.tree_size, head.root_hash), SIGNER
    ).note
    session.execute(update(AuditTreeHead).where(AuditTreeHead.id == head.id).values(note=note))
    report = verify(session)
    assert report.first is not None
    assert report.first.detail == "the signed head has no timestamp"


def test_heads_need_the_public_key(session: Session) -> None:
    with pytest.raises(ConfigurationError, match="no log public key"):
        verify_log(session, public_key=None)


def test_outside_checkpoints(session: Session) -> None:
    origin = default_origin(KEY)
    head = session.scalars(select(AuditTreeHead).order_by(AuditTreeHead.id)).first()
    assert head is not None
    good = read_checkpoint("good.cp", head.note.encode())
    assert verify(session, checkpoints=[good]).ok
    wrong_root = sign_checkpoint(Checkpoint(origin, 4, leaf_hash(b"other"), head.issued_at), SIGNER)
    report = verify(session, checkpoints=[OutsideCheckpoint("fork.cp", wrong_root)])
    assert first(report) == (DamageKind.INCONSISTENT, seq_at(session, 0), 0)
    assert report.first is not None
    assert "fork.cp" in report.first.detail
    foreign = sign_checkpoint(Checkpoint(origin, 4, head.root_hash), Ed25519Signer.generate())
    with pytest.raises(CheckpointRejected, match="not signed by this log's key"):
        verify(session, checkpoints=[OutsideCheckpoint("foreign.cp", foreign)])
    with pytest.raises(ConfigurationError, match="needs the log public key"):
        verify_log(session, public_key=None, checkpoints=[good])
    with pytest.raises(CheckpointRejected, match=r"bad\.cp is not a valid checkpoint"):
        read_checkpoint("bad.cp", b"nonsense")


def test_the_error_names_the_first_problem(session: Session) -> None:
    seq = seq_at(session, 5)
    session.execute(
        update(AuditEventRecord).where(AuditEventRecord.seq == seq).values(outcome="12")
    )
    session.execute(delete(AuditEventRecord).where(AuditEventRecord.leaf_index == 8))
    report = verify(session)
    error = AuditLogDamaged(report)
    assert error.message.startswith(f"the audit log is damaged: modified at seq {seq} (leaf 5)")
    assert error.hint == "1 problem found; the first is named"
