"""Appending audit events, integrating them into the Merkle tree, and signing tree heads.

Two steps keep one total order across any number of processes without serialising the requests that
append (docs/adr/0004-audit-log-merkle-tree.md):

1. :meth:`AuditLog.append` inserts the event in the *caller's* transaction, so the event and the
   change it records commit or roll back together. Its ``seq`` comes from the database's sequence.
   On PostgreSQL, sequence values are handed out before commit, so they can commit out of order and
   leave gaps after rollbacks: ``seq`` is an identifier, not a position.
2. :meth:`AuditLog.integrate` (the *integrator*) takes a lock, reads the committed events that have
   no leaf index yet in ``seq`` order, gives them the next leaf indexes, and stores the complete
   subtrees they finish. Leaf indexes are therefore gapless and follow commit visibility: an event is
   placed after everything the integrator had already seen. The lock is a PostgreSQL transaction
   advisory lock; on SQLite, transactions start with ``BEGIN IMMEDIATE``, whose write lock already
   serialises integrators and appenders.

:meth:`AuditLog.issue_tree_head` signs the current root as a C2SP checkpoint. Before it signs, it
checks that the new tree is consistent with the previous signed head (a consistency proof from the
stored nodes), so the log never signs over a tree that was damaged in the database: it refuses, and
the operator runs ``medcollab audit verify``.

Each leaf commits to ``{"event": body, "seq": seq}`` in RFC 8785 canonical form, so an event's
content and its identifier are both covered; the denormalised columns beside ``body`` are checked
against it by the verifier.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from hashlib import sha256
from typing import Any, Final, cast

from sqlalchemy import TextClause, func, insert, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from medcollab.audit.canonical import JsonValue, canonical_json
from medcollab.audit.checkpoint import (
    Checkpoint,
    parse_checkpoint,
    sign_checkpoint,
    truncate_to_milliseconds,
)
from medcollab.audit.events import AuditEvent, Entity
from medcollab.audit.merkle import (
    CompactRange,
    NodeKey,
    ProofInvalid,
    consistency_proof,
    frontier_keys,
    inclusion_proof,
    leaf_hash,
    root_at,
    verify_consistency,
    verify_inclusion,
)
from medcollab.audit.models import (
    AuditEventPatient,
    AuditEventRecord,
    AuditTreeHead,
    AuditTreeNode,
)
from medcollab.crypto.signing import LogSigner
from medcollab.errors import (
    ConfigurationError,
    Conflict,
    MedcollabError,
    NotFound,
    ServiceUnavailable,
)
from medcollab.kernel.clock import Clock, SystemClock

#: The PostgreSQL advisory lock that makes one integrator at a time (any constant; this one spells
#: "mcaudit1" in ASCII so it is recognisable in pg_locks).
INTEGRATOR_LOCK_ID: Final = int.from_bytes(b"mcaudit1", "big")
#: Events are integrated in batches so a backlog never holds millions of rows in memory.
INTEGRATION_BATCH: Final = 5_000
PROOF_FORMAT: Final = "medcollab-audit-inclusion-proof/v1"
_NODE_QUERY_CHUNK: Final = 400


class AuditLogCorrupted(ServiceUnavailable):
    """The stored tree contradicts itself or a signed head; the log refuses to extend or sign it."""

    code = "audit_log_corrupted"

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="run `medcollab audit verify` to locate the damage")


class SignerRequired(ConfigurationError):
    """Issuing a tree head needs the log key, and none was given."""


# Leaves -------------------------------------------------------------------------------------------


def event_body(event: AuditEvent) -> dict[str, object]:
    """The stored, hashed form of an event: identifiers, codes and hashes only."""
    agent = event.agent
    return {
        "type": event.type.value,
        "action": event.action,
        "outcome": event.outcome.value,
        "recorded": event.recorded_at.isoformat(),
        "agent": {
            "user": str(agent.user_id) if agent.user_id else None,
            "org": str(agent.org_id) if agent.org_id else None,
            "role": agent.role,
            "session": agent.session_hash,
            "address": agent.client_address,
            "user_agent": agent.user_agent,
        },
        "subject_user": str(event.subject_user_id) if event.subject_user_id else None,
        "subject_org": str(event.subject_org_id) if event.subject_org_id else None,
        "reasons": list(event.reasons),
        "entity": _entity_body(event.entity),
        "purpose": event.purpose,
        "break_glass": event.break_glass,
    }


def _entity_body(entity: Entity | None) -> dict[str, object] | None:
    if entity is None:
        return None
    return {
        "patient": entity.patient_id,
        "type": entity.resource_type,
        "id": entity.resource_id,
        "version": entity.version,
        "query": [[name, value] for name, value in entity.query],
        "patients": list(entity.patients),
    }


def _patients_of(event: AuditEvent) -> set[str]:
    entity = event.entity
    if entity is None:
        return set()
    found = set(entity.patients)
    if entity.patient_id:
        found.add(entity.patient_id)
    return {p[:64] for p in found if p}


def leaf_entry(seq: int, body: Mapping[str, object]) -> bytes:
    """The bytes a leaf commits to: RFC 8785 JSON of the event body and its sequence number."""
    return canonical_json({"event": cast(JsonValue, body), "seq": seq})


def event_leaf_hash(seq: int, body: Mapping[str, object]) -> bytes:
    return leaf_hash(leaf_entry(seq, body))


def default_origin(public_key: bytes) -> str:
    """A log identity unique to its key, so two deployments never publish under one origin."""
    return f"medcollab.local/audit-log/{sha256(public_key).hexdigest()[:16]}"


# Results ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeHead:
    id: int
    size: int
    root_hash: bytes
    issued_at: datetime
    #: The signed C2SP checkpoint, exactly as issued.
    note: str

    @classmethod
    def from_record(cls, record: AuditTreeHead) -> TreeHead:
        return cls(record.id, record.tree_size, record.root_hash, record.issued_at, record.note)


@dataclass(frozen=True, slots=True)
class IntegrationResult:
    integrated: int
    tree_size: int
    head: TreeHead | None


@dataclass(frozen=True, slots=True)
class EventProof:
    """An inclusion proof of one event against a signed tree head, checkable offline."""

    origin: str
    seq: int
    leaf_index: int
    tree_size: int
    entry: bytes
    leaf_hash: bytes
    inclusion_path: tuple[bytes, ...]
    root_hash: bytes
    checkpoint: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROOF_FORMAT,
            "origin": self.origin,
            "seq": self.seq,
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "entry": self.entry.decode("utf-8"),
            "leaf_hash": _b64(self.leaf_hash),
            "inclusion_path": [_b64(h) for h in self.inclusion_path],
            "root_hash": _b64(self.root_hash),
            "checkpoint": self.checkpoint,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# The stored tree ----------------------------------------------------------------------------------


class DatabaseTree:
    """The ``audit_tree_node`` table as a :class:`~medcollab.audit.merkle.SubtreeSource`."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._size: int | None = None

    def tree_size(self) -> int:
        if self._size is None:
            last = self._session.execute(_TREE_SIZE).scalar()
            self._size = 0 if last is None else int(last) + 1
        return self._size

    def get_nodes(self, keys: Sequence[NodeKey]) -> list[bytes]:
        found = stored_nodes(self._session, keys)
        missing = [key for key in keys if key not in found]
        if missing:
            level, idx = missing[0]
            raise AuditLogCorrupted(f"the stored Merkle tree lacks node (level {level}, {idx})")
        return [found[key] for key in keys]


def stored_nodes(session: Session, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
    """The stored hashes of those of ``keys`` that exist, each found through the primary key."""
    wanted = list(dict.fromkeys(keys))
    found: dict[NodeKey, bytes] = {}
    for start in range(0, len(wanted), _NODE_QUERY_CHUNK):
        chunk = wanted[start : start + _NODE_QUERY_CHUNK]
        params: dict[str, int] = {}
        for i, (level, idx) in enumerate(chunk):
            params[f"l{i}"], params[f"i{i}"] = level, idx
        rows = session.execute(_node_query(len(chunk)), params)
        found.update(((int(level), int(idx)), bytes(h)) for level, idx, h in rows)
    return found


@functools.cache
def _node_query(count: int) -> TextClause:
    # Proofs sit on the hot path (every patient's "who saw my record" check), so this is plain SQL
    # prepared once per key count: building the equivalent expression costs more than running it.
    # OR-ed "level = ? AND idx = ?" terms are each answered from the primary key index on both
    # databases; a row-value IN over (level, idx) would make SQLite scan the table.
    terms = " OR ".join(f"(level = :l{i} AND idx = :i{i})" for i in range(count))
    return text(f"SELECT level, idx, hash FROM audit_tree_node WHERE {terms}")  # noqa: S608 - only generated placeholders are interpolated.


_TREE_SIZE: Final = text("SELECT max(idx) FROM audit_tree_node WHERE level = 0")


# The log ------------------------------------------------------------------------------------------


class AuditLog:
    """The audit log over one session: append in the caller's transaction; integrate; sign heads.

    ``signer`` is needed only to issue tree heads; ``origin`` defaults to one derived from the
    signer's public key.
    """

    def __init__(
        self,
        session: Session,
        *,
        signer: LogSigner | None = None,
        clock: Clock | None = None,
        origin: str | None = None,
    ) -> None:
        self._session = session
        self._signer = signer
        self._clock = clock or SystemClock()
        self._origin = origin

    @property
    def origin(self) -> str:
        if self._origin is None:
            self._origin = default_origin(self._require_signer().public_key_bytes())
        return self._origin

    # Appending --------------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditEventRecord:
        """Record ``event`` in the caller's transaction; it joins the tree at the next integration."""
        record = AuditEventRecord(
            recorded_at=event.recorded_at,
            type=event.type.value,
            action=event.action,
            outcome=event.outcome.value,
            agent_user_id=event.agent.user_id,
            agent_org_id=event.agent.org_id,
            subject_user_id=event.subject_user_id,
            body=event_body(event),
        )
        self._session.add(record)
        self._session.flush()
        patients = _patients_of(event)
        if patients:
            self._session.execute(
                insert(AuditEventPatient),
                [{"seq": record.seq, "patient_id": p} for p in sorted(patients)],
            )
        return record

    # Integrating ------------------------------------------------------------------------------

    def integrate(self, *, issue_head: bool = True) -> IntegrationResult:
        """Give every committed, unintegrated event the next leaf index and extend the tree.

        Appending costs ``O(log n)`` per event: the right edge of the tree is read once, and each
        event adds its leaf and the complete subtrees it finishes. With ``issue_head`` and a signer,
        a new signed tree head is issued whenever the tree has grown past the latest head. Call it
        in its own short transaction (the web server does so every second), so the lock it takes is
        not held across a request.
        """
        self._lock()
        self._session.flush()
        tree = DatabaseTree(self._session)
        size = tree.tree_size()
        self._check_event_count(size)
        compact = CompactRange(size, tree.get_nodes(frontier_keys(size)))
        integrated = 0
        while True:
            rows = self._session.execute(
                select(AuditEventRecord.seq, AuditEventRecord.body)
                .where(AuditEventRecord.leaf_index.is_(None))
                .order_by(AuditEventRecord.seq)
                .limit(INTEGRATION_BATCH)
            ).all()
            if not rows:
                break
            nodes: list[dict[str, object]] = []
            assignments: list[dict[str, int]] = []
            for seq, body in rows:
                for (level, idx), node in compact.append(event_leaf_hash(seq, body)):
                    nodes.append({"level": level, "idx": idx, "hash": node})
                assignments.append({"seq": seq, "leaf_index": compact.size - 1})
            self._store(nodes, assignments)
            integrated += len(rows)
        head = None
        if issue_head and self._signer is not None:
            latest = self._latest_record()
            if latest is None or latest.tree_size < compact.size:
                head = self._issue_locked()
        return IntegrationResult(integrated, compact.size, head)

    def _store(self, nodes: list[dict[str, object]], assignments: list[dict[str, int]]) -> None:
        # Bulk statements (one executemany each), not unit-of-work objects: a batch is thousands of
        # rows and the session should not track them.
        self._session.execute(insert(AuditTreeNode), nodes)
        self._session.execute(update(AuditEventRecord), assignments)
        # Events appended through this session are in its identity map; give them their index
        # without expiring anything else the caller holds.
        for assignment in assignments:
            key = identity_key(AuditEventRecord, assignment["seq"])
            record = self._session.identity_map.get(key)
            if record is not None:
                set_committed_value(record, "leaf_index", assignment["leaf_index"])

    def _lock(self) -> None:
        if self._session.get_bind().dialect.name == "postgresql":
            # Held to the end of the transaction; a second integrator waits here, then sees the
            # first one's committed assignments (READ COMMITTED starts a new snapshot per statement).
            self._session.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": INTEGRATOR_LOCK_ID}
            )
        else:
            # SQLite: the transaction began with BEGIN IMMEDIATE and holds the only write lock; a
            # statement makes sure the transaction (and so the lock) has started.
            self._session.execute(text("SELECT 1"))

    def _check_event_count(self, size: int) -> None:
        last = self._session.scalar(select(func.max(AuditEventRecord.leaf_index)))
        events = 0 if last is None else int(last) + 1
        if events != size:
            raise AuditLogCorrupted(
                f"events claim {events} leaves but the stored Merkle tree has {size}"
            )

    # Tree heads -------------------------------------------------------------------------------

    def issue_tree_head(self) -> TreeHead:
        """Sign the current tree as a checkpoint (on demand; integration issues them as it goes)."""
        self._require_signer()
        self._lock()
        self._session.flush()
        return self._issue_locked()

    def _issue_locked(self) -> TreeHead:
        signer = self._require_signer()
        tree = DatabaseTree(self._session)
        size = tree.tree_size()
        root_hash = root_at(size, tree)
        issued_at = truncate_to_milliseconds(self._clock.now())
        latest = self._latest_record()
        if latest is not None:
            self._check_extends(latest, size, root_hash, tree)
            # Heads are ordered in time as in size, even if the clock steps backwards.
            issued_at = max(issued_at, latest.issued_at)
        signed = sign_checkpoint(Checkpoint(self.origin, size, root_hash, issued_at), signer)
        record = AuditTreeHead(
            tree_size=size, root_hash=root_hash, issued_at=issued_at, note=signed.note
        )
        self._session.add(record)
        self._session.flush()
        return TreeHead.from_record(record)

    def _check_extends(
        self, latest: AuditTreeHead, size: int, root_hash: bytes, tree: DatabaseTree
    ) -> None:
        signer = self._require_signer()
        try:
            previous = parse_checkpoint(latest.note).verify(
                key_name=self.origin, public_key=signer.public_key_bytes()
            )
        except (MedcollabError, ValueError) as exc:
            raise AuditLogCorrupted(
                f"the latest tree head (#{latest.id}) does not verify with the log key: {exc}"
            ) from None
        if size < previous.size:
            raise AuditLogCorrupted(
                f"the tree has {size} leaves but a signed head already covers {previous.size}"
            )
        try:
            if previous.size == 0:
                return
            proof = consistency_proof(previous.size, size, tree) if size > previous.size else []
            verify_consistency(previous.size, size, proof, previous.root_hash, root_hash)
        except ProofInvalid:
            raise AuditLogCorrupted(
                f"the stored tree at size {size} is not consistent with the signed head at size "
                f"{previous.size}; refusing to sign it"
            ) from None

    def _latest_record(self) -> AuditTreeHead | None:
        return self._session.scalars(
            select(AuditTreeHead).order_by(AuditTreeHead.id.desc()).limit(1)
        ).first()

    def latest_tree_head(self) -> TreeHead | None:
        record = self._latest_record()
        return None if record is None else TreeHead.from_record(record)

    def _require_signer(self) -> LogSigner:
        if self._signer is None:
            raise SignerRequired("the audit log key is needed to sign tree heads")
        return self._signer

    # Reading and proving ----------------------------------------------------------------------

    def tree_size(self) -> int:
        return DatabaseTree(self._session).tree_size()

    def root_hash(self, size: int | None = None) -> bytes:
        tree = DatabaseTree(self._session)
        return root_at(tree.tree_size() if size is None else size, tree)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path of leaf ``index`` in the tree of ``size`` leaves (default: all of them)."""
        tree = DatabaseTree(self._session)
        return inclusion_proof(index, tree.tree_size() if size is None else size, tree)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        tree = DatabaseTree(self._session)
        return consistency_proof(size1, tree.tree_size() if size2 is None else size2, tree)

    def event_proof(self, seq: int) -> EventProof:
        """An inclusion proof of event ``seq`` against the latest signed head that covers it.

        Raises :class:`~medcollab.errors.NotFound` for an unknown ``seq`` and
        :class:`~medcollab.errors.Conflict` if the event is not yet in a signed head (integration
        adds it within a second; ``medcollab audit proof`` integrates first).
        """
        row = self._session.execute(
            select(AuditEventRecord.leaf_index, AuditEventRecord.body).where(
                AuditEventRecord.seq == seq
            )
        ).first()
        if row is None:
            raise NotFound(f"no audit event with sequence number {seq}")
        index, body = row
        if index is None:
            raise Conflict(f"audit event {seq} is not in the Merkle tree yet; integrate first")
        head = self._session.scalars(
            select(AuditTreeHead)
            .where(AuditTreeHead.tree_size > index)
            .order_by(AuditTreeHead.id.desc())
            .limit(1)
        ).first()
        if head is None:
            raise Conflict(f"no signed tree head covers audit event {seq} yet")
        # The proof is made against what the head's note says, since that is what was signed.
        signed = parse_checkpoint(head.note).checkpoint
        if signed.size != head.tree_size or signed.root_hash != head.root_hash:
            raise AuditLogCorrupted(f"tree head #{head.id} does not match its signed checkpoint")
        entry = leaf_entry(seq, body)
        hashed = leaf_hash(entry)
        path = self.inclusion_proof(index, signed.size)
        try:
            # Never hand out a proof the log itself cannot check against its signed head.
            verify_inclusion(hashed, index, signed.size, path, signed.root_hash)
        except ProofInvalid:
            raise AuditLogCorrupted(
                f"audit event {seq} does not verify against the signed head at size {signed.size}"
            ) from None
        return EventProof(
            origin=signed.origin,
            seq=seq,
            leaf_index=index,
            tree_size=signed.size,
            entry=entry,
            leaf_hash=hashed,
            inclusion_path=tuple(path),
            root_hash=signed.root_hash,
            checkpoint=head.note,
        )


__all__ = [
    "AuditLog",
    "AuditLogCorrupted",
    "DatabaseTree",
    "EventProof",
    "IntegrationResult",
    "TreeHead",
    "default_origin",
    "event_body",
    "event_leaf_hash",
    "leaf_entry",
    "stored_nodes",
]
