"""The audit log on both databases: appending, integrating, tree heads and proofs.

Every test runs in the suite's rolled-back transaction, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from medcollab.audit.checkpoint import Checkpoint, parse_checkpoint, sign_checkpoint
from medcollab.audit.events import Agent, AuditEvent, Entity, EventType, Outcome
from medcollab.audit.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    ProofOutOfRange,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from medcollab.audit.models import AuditEventRecord, AuditTreeHead, AuditTreeNode
from medcollab.audit.services import (
    AuditLog,
    AuditLogCorrupted,
    default_origin,
    event_leaf_hash,
    leaf_entry,
)
from medcollab.audit.verify import verify_log
from medcollab.crypto.signing import Ed25519Signer
from medcollab.errors import Conflict, InvalidInput, NotFound
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate()


@pytest.fixture
def session(runtime: Runtime) -> Iterator[Session]:
    with runtime.database.unit_of_work() as session:
        yield session


@pytest.fixture
def log(session: Session, signer: Ed25519Signer, clock: FrozenClock) -> AuditLog:
    return AuditLog(session, signer=signer, clock=clock)


def event(clock: FrozenClock, number: int = 0, **kwargs: object) -> AuditEvent:
    clock.advance(timedelta(milliseconds=250))
    return AuditEvent(
        type=EventType.LOGIN_FAILURE,
        outcome=Outcome.MINOR_FAILURE,
        recorded_at=clock.now(),
        agent=Agent(user_id=uuid.uuid4(), client_address=f"h{number}"),
        reasons=(f"attempt {number}",),
        **kwargs,  # type: ignore[arg-type]
    )


def recomputed_tree(session: Session) -> MemoryTree:
    rows = session.execute(
        select(AuditEventRecord.seq, AuditEventRecord.body)
        .where(AuditEventRecord.leaf_index.is_not(None))
        .order_by(AuditEventRecord.leaf_index)
    )
    return MemoryTree(event_leaf_hash(seq, body) for seq, body in rows)


def test_an_event_of_unknown_type_cannot_be_built(clock: FrozenClock) -> None:
    with pytest.raises(TypeError, match="unknown audit event type"):
        AuditEvent("auth:login:bogus", Outcome.SUCCESS, clock.now())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown audit outcome"):
        AuditEvent(EventType.LOGIN_SUCCESS, "0", clock.now())  # type: ignore[arg-type]


def test_append_keeps_its_signature_and_defers_the_leaf(log: AuditLog, clock: FrozenClock) -> None:
    record = log.append(event(clock))
    assert record.seq is not None
    assert record.leaf_index is None
    assert record.body["type"] == "auth:login:failure"
    assert log.tree_size() == 0
    assert log.root_hash() == EMPTY_ROOT


def test_integrate_assigns_gapless_leaves_in_order_and_signs_a_head(
    log: AuditLog, session: Session, clock: FrozenClock, signer: Ed25519Signer
) -> None:
    records = [log.append(event(clock, i)) for i in range(7)]
    result = log.integrate()
    assert (result.integrated, result.tree_size) == (7, 7)
    # The session's own objects learn their index without being expired.
    assert [r.leaf_index for r in records] == list(range(7))
    assert session.scalar(select(func.count()).select_from(AuditTreeNode)) == 7 + 3 + 1 + 0
    tree = recomputed_tree(session)
    assert log.root_hash() == tree.root()
    assert result.head is not None
    assert (result.head.size, result.head.root_hash) == (7, tree.root())
    checkpoint = parse_checkpoint(result.head.note).verify(
        key_name=default_origin(signer.public_key_bytes()), public_key=signer.public_key_bytes()
    )
    assert checkpoint.size == 7
    assert checkpoint.timestamp == result.head.issued_at


def test_heads_are_issued_only_when_the_tree_grew_or_on_demand(
    log: AuditLog, clock: FrozenClock
) -> None:
    log.append(event(clock))
    assert log.integrate().head is not None
    assert log.integrate().head is None  # Nothing new.
    on_demand = log.issue_tree_head()
    assert on_demand.size == 1
    assert log.latest_tree_head() == on_demand


def test_integration_without_a_signer_issues_no_head(session: Session, clock: FrozenClock) -> None:
    log = AuditLog(session, clock=clock)
    log.append(event(clock))
    result = log.integrate()
    assert (result.integrated, result.head) == (1, None)
    with pytest.raises(Exception, match="needed to sign"):
        log.issue_tree_head()


def test_heads_stay_ordered_when_the_clock_steps_back(log: AuditLog, clock: FrozenClock) -> None:
    log.append(event(clock))
    first = log.integrate().head
    assert first is not None
    clock.advance(timedelta(minutes=-10))
    log.append(event(clock))
    second = log.integrate().head
    assert second is not None
    assert second.issued_at >= first.issued_at


def test_appending_in_batches_is_consistent_with_one_big_tree(
    log: AuditLog, session: Session, clock: FrozenClock, signer: Ed25519Signer
) -> None:
    rng = random.Random(7)
    heads = []
    for batch in range(12):
        for i in range(rng.randint(0, 23)):
            log.append(event(clock, batch * 100 + i))
        heads.append(log.integrate().head or log.issue_tree_head())
    tree = recomputed_tree(session)
    assert log.tree_size() == tree.tree_size()
    for head in heads:
        assert head.root_hash == tree.root(head.size)
    for earlier, later in itertools.pairwise(heads):
        if earlier.size:
            proof = log.consistency_proof(earlier.size, later.size)
            verify_consistency(earlier.size, later.size, proof, earlier.root_hash, later.root_hash)
    size = tree.tree_size()
    for index in range(0, size, 7):
        proof = log.inclusion_proof(index, size)
        assert proof == tree.inclusion_proof(index, size)
        verify_inclusion(tree.leaf(index), index, size, proof, tree.root())
    report = verify_log(session, public_key=signer.public_key_bytes())
    assert report.ok, report.damages
    assert (report.integrated, report.tree_heads) == (size, len(heads))


def test_proof_requests_out_of_range_are_clear_4xx_errors(
    log: AuditLog, clock: FrozenClock
) -> None:
    for i in range(3):
        log.append(event(clock, i))
    log.integrate()
    with pytest.raises(ProofOutOfRange, match="leaf index 3 is out of range for a tree of size 3"):
        log.inclusion_proof(3)
    with pytest.raises(ProofOutOfRange, match="tree size 4 is out of range"):
        log.inclusion_proof(0, 4)
    with pytest.raises(ProofOutOfRange, match="from the empty tree"):
        log.consistency_proof(0, 3)
    with pytest.raises(ProofOutOfRange, match="tree size 9 is out of range"):
        log.consistency_proof(1, 9)
    with pytest.raises(InvalidInput):
        log.root_hash(4)


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "verify_proof", ROOT / "tools" / "verify_proof.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_event_proof_checks_with_the_standalone_tool(log: AuditLog, clock: FrozenClock) -> None:
    records = [
        log.append(event(clock, i, entity=Entity(patient_id="p1", resource_type="Observation")))
        for i in range(6)
    ]
    log.integrate()
    tool = _load_tool()
    for record in records:
        proof = log.event_proof(record.seq)
        assert proof.entry == leaf_entry(record.seq, record.body)
        document = json.loads(proof.dumps())
        summary = tool.check(document, None)
        assert f"seq {record.seq} is leaf {record.leaf_index} of the 6-event tree" in summary
    forged = dict(document, entry=document["entry"].replace("attempt", "Attempt"))
    with pytest.raises(tool.ProofError, match="leaf hash"):
        tool.check(forged, None)
    wrong_place = dict(document, leaf_index=0)
    with pytest.raises(tool.ProofError):
        tool.check(wrong_place, None)


def test_event_proof_errors(log: AuditLog, clock: FrozenClock) -> None:
    with pytest.raises(NotFound, match="no audit event with sequence number 999999"):
        log.event_proof(999_999)
    record = log.append(event(clock))
    with pytest.raises(Conflict, match="not in the Merkle tree yet"):
        log.event_proof(record.seq)
    log.integrate(issue_head=False)
    with pytest.raises(Conflict, match="no signed tree head covers"):
        log.event_proof(record.seq)


@pytest.mark.parametrize(("level", "idx"), [(0, 4), (2, 0)])
def test_the_log_refuses_to_sign_over_a_damaged_tree(
    log: AuditLog, session: Session, clock: FrozenClock, level: int, idx: int
) -> None:
    # The damaged nodes are the ones the next head's consistency proof reads: the right edge of
    # the five-leaf tree, (2, 0) for leaves 0-3 and (0, 4) for leaf 4.
    for i in range(5):
        log.append(event(clock, i))
    log.integrate()
    session.execute(
        update(AuditTreeNode)
        .where(AuditTreeNode.level == level, AuditTreeNode.idx == idx)
        .values(hash=leaf_hash(b"forged"))
    )
    log.append(event(clock, 9))
    with pytest.raises(AuditLogCorrupted, match="not consistent with the signed head"):
        log.integrate()


def test_a_proof_is_never_served_from_a_damaged_tree(
    log: AuditLog, session: Session, clock: FrozenClock
) -> None:
    records = [log.append(event(clock, i)) for i in range(5)]
    log.integrate()
    session.execute(
        update(AuditTreeNode)
        .where(AuditTreeNode.level == 0, AuditTreeNode.idx == 3)
        .values(hash=leaf_hash(b"forged"))
    )
    with pytest.raises(AuditLogCorrupted, match="does not verify against the signed head"):
        log.event_proof(records[2].seq)


def test_the_log_refuses_to_sign_after_a_foreign_head(
    log: AuditLog, session: Session, clock: FrozenClock, signer: Ed25519Signer
) -> None:
    log.append(event(clock))
    head = log.integrate().head
    assert head is not None
    intruder = Ed25519Signer.generate()
    origin = default_origin(signer.public_key_bytes())
    forged = sign_checkpoint(Checkpoint(origin, 1, head.root_hash, head.issued_at), intruder)
    session.execute(update(AuditTreeHead).values(note=forged.note))
    with pytest.raises(AuditLogCorrupted, match="does not verify with the log key"):
        log.issue_tree_head()


def test_the_integrator_refuses_when_events_and_tree_disagree(
    log: AuditLog, session: Session, clock: FrozenClock
) -> None:
    for i in range(3):
        log.append(event(clock, i))
    log.integrate()
    session.execute(
        update(AuditEventRecord).where(AuditEventRecord.leaf_index == 2).values(leaf_index=7)
    )
    with pytest.raises(AuditLogCorrupted, match="events claim 8 leaves"):
        log.integrate()


def test_events_carry_what_was_accessed(log: AuditLog, clock: FrozenClock) -> None:
    entity = Entity(
        patient_id="pt-1",
        resource_type="Observation",
        resource_id="obs-9",
        version=3,
        query=(("code", "1234-5"),),
        patients=("pt-1",),
    )
    record = log.append(event(clock, entity=entity, purpose="TREAT", break_glass=True))
    assert record.body["entity"] == {
        "patient": "pt-1",
        "type": "Observation",
        "id": "obs-9",
        "version": 3,
        "query": [["code", "1234-5"]],
        "patients": ["pt-1"],
    }
    assert (record.body["purpose"], record.body["break_glass"]) == ("TREAT", True)
