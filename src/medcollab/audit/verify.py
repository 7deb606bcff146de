"""Verifying the audit log from its stored events, against its signed heads and outside checkpoints.

What is trusted: the log's public key (from the key provider, never from the database) and any
checkpoints the caller kept elsewhere. Everything in the database is evidence, not truth:

1. Every tree head's checkpoint note must carry a valid signature by the log key, and heads must grow
   in size and time in the order they were issued.
2. Every event is re-hashed from its stored body and sequence number (its denormalised columns must
   agree with the body), and the root of the recomputed tree is compared with every signed head and
   every outside checkpoint at its size. This is the authoritative check: a mismatch proves damage
   within the leaves that head covers, whatever else an attacker rewrote.
3. To name the first damaged event and the kind of damage, each event is also compared with the
   stored leaf hash at its position (``audit_tree_node`` level 0) and its neighbours: an event that
   matches the next stored leaf means one is *missing*, one followed by the expected leaf was
   *forged* in, a pair that matches crosswise was *reordered*, and one that matches nothing was
   *modified*. Stored interior nodes are recomputed and compared too, since proofs are built from
   them.
4. A signed head (or an outside checkpoint) that covers more events than remain means the log was
   *truncated* (or rolled back); an event that is not in the tree yet but was recorded long before a
   head that should have included it was *forged* in behind the integrator's back.
5. Archived prefixes (:mod:`medcollab.audit.archive`) have no event rows left. Each ``audit_archive``
   row must carry a statement signed by the log key (an intruder cannot claim an archive to explain
   away deleted events) and a signed checkpoint at its end; archives must follow one another from
   leaf 0. For archived leaves the stored leaf hashes stand in for the events: they are folded into
   the same recomputed tree, so they must still hash up to every signed head, archive checkpoint and
   outside checkpoint, and every stored node above them is compared as usual. The archive files
   themselves are checked on their own by ``medcollab audit verify-archive``.

The result names every problem found, ordered by position in the log; the first is the one to
investigate. Problems that are consequences of an earlier one (every root after a missing event
differs) are not reported twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medcollab.audit.archive import ArchiveInvalid, ArchiveSignatureInvalid, open_statement
from medcollab.audit.checkpoint import MalformedCheckpoint, SignedCheckpoint, parse_checkpoint
from medcollab.audit.merkle import EMPTY_ROOT, HASH_SIZE, CompactRange, NodeKey, leaf_hash
from medcollab.audit.models import AuditArchive, AuditEventRecord, AuditTreeHead, AuditTreeNode
from medcollab.audit.services import default_origin, event_leaf_hash
from medcollab.crypto.signing import SignatureInvalid
from medcollab.errors import ConfigurationError, InvalidInput, MedcollabError

#: No legitimate transaction stays open this long, so an event recorded this long before a tree
#: head that does not include it was inserted behind the integrator's back.
MAX_INTEGRATION_LAG: Final = timedelta(hours=1)
_CHUNK: Final = 2_000
_LOOKAHEAD: Final = 64


class DamageKind(StrEnum):
    MODIFIED = "modified"
    MISSING = "missing"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    FORGED = "forged"
    BAD_SIGNATURE = "bad signature"
    INCONSISTENT = "inconsistent with checkpoint"


@dataclass(frozen=True, slots=True)
class Damage:
    kind: DamageKind
    detail: str
    #: The damaged event's sequence number, when there is a row to name.
    seq: int | None = None
    #: The first leaf position affected.
    leaf_index: int | None = None
    #: The damaged tree head, for head problems.
    head_id: int | None = None
    #: For problems located only to a range of leaves: the end of that range (exclusive).
    range_end: int | None = None
    #: The damaged archive record, for archive problems.
    archive_id: int | None = None

    def describe(self) -> str:
        if self.seq is not None:
            where = f" at seq {self.seq}"
            if self.leaf_index is not None:
                where += f" (leaf {self.leaf_index})"
        elif self.archive_id is not None:
            where = f" in archive record #{self.archive_id}"
        elif self.leaf_index is not None:
            where = f" at leaf {self.leaf_index}"
        elif self.head_id is not None:
            where = f" in tree head #{self.head_id}"
        else:
            where = ""
        return f"{self.kind.value}{where}: {self.detail}"


class AuditLogDamaged(MedcollabError):
    """Verification found damage; the first problem is named."""

    code = "audit_log_damaged"

    def __init__(self, report: VerificationReport) -> None:
        first = report.first
        assert first is not None  # noqa: S101 - only raised for a failed report.
        count = len(report.damages)
        super().__init__(
            f"the audit log is damaged: {first.describe()}",
            hint=f"{count} problem{'s' if count != 1 else ''} found; the first is named",
        )
        self.report = report


class CheckpointRejected(InvalidInput):
    """An outside checkpoint is malformed or not signed by this log's key."""

    code = "checkpoint_rejected"


@dataclass(frozen=True, slots=True)
class ArchivedRange:
    """An archived prefix range the live log records (its statement verified)."""

    first_leaf: int
    end_leaf: int
    file_name: str
    created_at: datetime

    @property
    def events(self) -> int:
        return self.end_leaf - self.first_leaf

    def describe(self) -> str:
        return (
            f"{self.events} events archived (leaves {self.first_leaf}..{self.end_leaf - 1}) "
            f"in {self.file_name}"
        )


@dataclass(slots=True)
class VerificationReport:
    #: Every event the log holds or held: in the tree (archived or live), and waiting.
    events: int = 0
    integrated: int = 0
    pending: int = 0
    #: Leaves ``[0, archived)`` were archived; their events are in files, not in the database.
    archived: int = 0
    archives: list[ArchivedRange] = field(default_factory=list)
    tree_heads: int = 0
    checkpoints: int = 0
    root_hash: bytes = EMPTY_ROOT
    latest_head_size: int | None = None
    latest_head_time: datetime | None = None
    seconds: float = 0.0
    damages: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damages

    @property
    def first(self) -> Damage | None:
        return self.damages[0] if self.damages else None


@dataclass(frozen=True, slots=True)
class OutsideCheckpoint:
    """A checkpoint kept outside the database (a witness's copy, an exported file)."""

    label: str
    signed: SignedCheckpoint


def read_checkpoint(label: str, data: bytes) -> OutsideCheckpoint:
    """Parse an outside checkpoint; raises :class:`CheckpointRejected` naming ``label``."""
    try:
        return OutsideCheckpoint(label, parse_checkpoint(data))
    except MalformedCheckpoint as exc:
        raise CheckpointRejected(f"{label} is not a valid checkpoint: {exc.message}") from None


# Reading the database -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Row:
    seq: int
    leaf_index: int
    body: Any
    hash: bytes
    problem: str | None

    def rehash(self, seq: int) -> bytes | None:
        try:
            return event_leaf_hash(seq, self.body)
        except (MedcollabError, TypeError, ValueError):
            return None


_EVENT_COLUMNS: Final = AuditEventRecord.__table__.c


def _column_problem(record: Mapping[Any, Any]) -> str | None:
    """Why the row's queryable columns disagree with its hashed body, or None."""
    body = record["body"]
    if not isinstance(body, dict):
        return "the stored event body is not a JSON object"
    agent = body.get("agent")
    agent = agent if isinstance(agent, dict) else {}

    def ident(value: uuid.UUID | None) -> str | None:
        return None if value is None else str(value)

    pairs: list[tuple[str, object, object]] = [
        ("type", record["type"], body.get("type")),
        ("action", record["action"], body.get("action")),
        ("outcome", record["outcome"], body.get("outcome")),
        ("agent_user_id", ident(record["agent_user_id"]), agent.get("user")),
        ("agent_org_id", ident(record["agent_org_id"]), agent.get("org")),
        ("subject_user_id", ident(record["subject_user_id"]), body.get("subject_user")),
    ]
    for column, stored, hashed in pairs:
        if stored != hashed:
            return f"column {column} differs from the hashed event"
    recorded = body.get("recorded")
    try:
        same_time = (
            isinstance(recorded, str) and datetime.fromisoformat(recorded) == record["recorded_at"]
        )
    except ValueError:
        same_time = False
    if not same_time:
        return "column recorded_at differs from the hashed event"
    return None


def _quick_leaf_hash(seq: int, body: object) -> bytes | None:
    """The leaf hash of the event as the standard library's JSON encoder writes it, or None.

    For the values a JSON column returns (string keys, no tuples), ``json.dumps`` with sorted keys,
    no spaces and no ASCII escaping writes RFC 8785 bytes except in corners no audit event reaches
    (floats, integers beyond 2**53, lone surrogates, keys above U+FFFF), and it runs in C, several
    times faster than :func:`~medcollab.audit.canonical.canonical_json`. Its result is only ever
    *accepted* when it equals the stored leaf: equal hashes mean equal bytes, and bytes that parse
    back to this body and are the canonical encoding the integrator hashed are that body's
    canonical encoding. Anything else goes to the canonicaliser, which decides.
    """
    try:
        text = json.dumps(
            {"event": body, "seq": seq}, ensure_ascii=False, separators=(",", ":"), sort_keys=True
        )
        return leaf_hash(text.encode("utf-8"))
    except (TypeError, ValueError):
        return None


def _rows(session: Session, stored: _StoredLeaves, *, after: int = -1) -> Iterator[_Row]:
    # The table's columns, not the mapped class's attributes: a Core select skips the ORM's
    # per-row loading machinery, which is a fifth of the cost of reading a million events.
    events = _EVENT_COLUMNS
    columns = (
        events.seq,
        events.leaf_index,
        events.body,
        events.type,
        events.action,
        events.outcome,
        events.recorded_at,
        events.agent_user_id,
        events.agent_org_id,
        events.subject_user_id,
    )
    while True:
        chunk = (
            session.execute(
                select(*columns)
                .where(events.leaf_index.is_not(None), events.leaf_index > after)
                .order_by(events.leaf_index)
                .limit(_CHUNK)
            )
            .mappings()
            .all()
        )
        if not chunk:
            return
        for record in chunk:
            problem = _column_problem(record)
            seq, body = record["seq"], record["body"]
            hashed = _quick_leaf_hash(seq, body)
            if hashed is None or hashed != stored.get(record["leaf_index"]):
                try:
                    hashed = event_leaf_hash(seq, body)
                except (MedcollabError, TypeError, ValueError):
                    hashed = b""
                    problem = problem or "the stored event body cannot be canonicalised"
            yield _Row(seq, record["leaf_index"], body, hashed, problem)
        after = chunk[-1]["leaf_index"]


class _Lookahead:
    """An iterator that can peek a few rows ahead."""

    def __init__(self, rows: Iterator[_Row]) -> None:
        self._rows = rows
        self._buffer: deque[_Row] = deque()

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> _Row:
        if self._buffer:
            return self._buffer.popleft()
        return next(self._rows)

    def peek(self, count: int) -> list[_Row]:
        while len(self._buffer) < count:
            try:
                self._buffer.append(next(self._rows))
            except StopIteration:
                break
        return list(self._buffer)[:count]


class _StoredLeaves:
    """Stored leaf hashes (level-0 nodes), read block by block as the scan advances."""

    _BLOCK: Final = 4096

    def __init__(self, session: Session) -> None:
        self._session = session
        self._blocks: dict[int, dict[int, bytes]] = {}
        last = session.scalar(select(func.max(AuditTreeNode.idx)).where(AuditTreeNode.level == 0))
        self.size = 0 if last is None else int(last) + 1

    def get(self, index: int) -> bytes | None:
        block = index // self._BLOCK
        if block not in self._blocks:
            if len(self._blocks) > 4:
                self._blocks.pop(min(self._blocks))
            start = block * self._BLOCK
            rows = self._session.execute(
                select(AuditTreeNode.idx, AuditTreeNode.hash).where(
                    AuditTreeNode.level == 0,
                    AuditTreeNode.idx >= start,
                    AuditTreeNode.idx < start + self._BLOCK,
                )
            )
            self._blocks[block] = {int(i): bytes(h) for i, h in rows}
        return self._blocks[block].get(index)

    def find(self, leaf: bytes) -> int | None:
        # Only on the damage path: a full scan is acceptable there.
        found = self._session.scalar(
            select(AuditTreeNode.idx)
            .where(AuditTreeNode.level == 0, AuditTreeNode.hash == leaf)
            .order_by(AuditTreeNode.idx)
            .limit(1)
        )
        return None if found is None else int(found)


def _after(last_seq: int | None) -> str:
    return f" (the last remaining event is seq {last_seq})" if last_seq is not None else ""


# Verification -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Expectation:
    size: int
    root_hash: bytes
    kind: DamageKind
    source: str


class _Verifier:
    def __init__(
        self,
        session: Session,
        *,
        public_key: bytes | None,
        origin: str | None,
        checkpoints: Sequence[OutsideCheckpoint],
    ) -> None:
        self._session = session
        self._public_key = public_key
        self._origin = origin or (default_origin(public_key) if public_key else None)
        self._outside = checkpoints
        self.report = VerificationReport()
        self._specific: list[Damage] = []
        self._generic: list[Damage] = []
        self._heads: list[Damage] = []
        self._expectations: dict[int, list[_Expectation]] = {}
        self._head_sizes: list[tuple[int, int]] = []  # (size, head id) of trusted heads.
        self._latest_time: datetime | None = None
        self._nodes_damaged = False
        self._records: list[Damage] = []
        self._archived_end = 0
        self._archive_names: list[tuple[int, str]] = []  # (end leaf, file name) of each archive.

    # Heads and outside checkpoints -----------------------------------------------------------

    def check_heads(self) -> None:
        records = self._session.scalars(select(AuditTreeHead).order_by(AuditTreeHead.id)).all()
        self.report.tree_heads = len(records)
        if records and (self._public_key is None or self._origin is None):
            raise ConfigurationError(
                "the log has signed tree heads but no log public key was given to check them"
            )
        previous = None
        for record in records:
            checkpoint = self._open_head(record)
            if checkpoint is None:
                continue
            size, root_hash, issued = checkpoint
            if previous is not None and (size < previous[0] or issued < previous[1]):
                self._heads.append(
                    Damage(
                        DamageKind.REORDERED,
                        f"issued after a head of size {previous[0]} at {previous[1].isoformat()}, "
                        f"yet it covers {size} events at {issued.isoformat()}",
                        head_id=record.id,
                    )
                )
            previous = (size, issued)
            self._expect(size, root_hash, DamageKind.MODIFIED, f"signed tree head #{record.id}")
            self._head_sizes.append((size, record.id))
            self.report.latest_head_size, self.report.latest_head_time = size, issued
            self._latest_time = (
                issued if self._latest_time is None else max(self._latest_time, issued)
            )

    def _open_head(self, record: AuditTreeHead) -> tuple[int, bytes, datetime] | None:
        assert self._public_key is not None  # noqa: S101 - check_heads checked both.
        assert self._origin is not None  # noqa: S101
        try:
            signed = parse_checkpoint(record.note)
            checkpoint = signed.verify(key_name=self._origin, public_key=self._public_key)
        except MalformedCheckpoint as exc:
            self._heads.append(
                Damage(
                    DamageKind.BAD_SIGNATURE,
                    f"its note is not a checkpoint ({exc.message})",
                    head_id=record.id,
                )
            )
            return None
        except SignatureInvalid:
            self._heads.append(
                Damage(
                    DamageKind.BAD_SIGNATURE,
                    f"the head of size {record.tree_size} is not signed by the log key "
                    f"{self._origin}",
                    head_id=record.id,
                )
            )
            return None
        if checkpoint.timestamp is None:
            self._heads.append(
                Damage(
                    DamageKind.BAD_SIGNATURE, "the signed head has no timestamp", head_id=record.id
                )
            )
            return None
        if (
            checkpoint.size != record.tree_size
            or checkpoint.root_hash != record.root_hash
            or checkpoint.timestamp != record.issued_at
        ):
            # The signed note is still authoritative; only the copies in the columns were changed.
            self._heads.append(
                Damage(
                    DamageKind.MODIFIED,
                    "its size, root or time columns differ from its signed checkpoint",
                    head_id=record.id,
                )
            )
        return checkpoint.size, checkpoint.root_hash, checkpoint.timestamp

    def check_outside(self) -> None:
        self.report.checkpoints = len(self._outside)
        for outside in self._outside:
            if self._public_key is None or self._origin is None:
                raise ConfigurationError("checking outside checkpoints needs the log public key")
            try:
                checkpoint = outside.signed.verify(
                    key_name=self._origin, public_key=self._public_key
                )
            except SignatureInvalid:
                raise CheckpointRejected(
                    f"{outside.label} is not signed by this log's key ({self._origin})"
                ) from None
            self._expect(
                checkpoint.size,
                checkpoint.root_hash,
                DamageKind.INCONSISTENT,
                f"checkpoint {outside.label}",
            )

    # Archives -----------------------------------------------------------------------------------

    def check_archives(self) -> None:
        records = self._session.scalars(
            select(AuditArchive).order_by(AuditArchive.first_leaf, AuditArchive.id)
        ).all()
        if records and (self._public_key is None or self._origin is None):
            raise ConfigurationError(
                "the log has archives but no log public key was given to check them"
            )
        end = 0
        for record in records:
            damage = self._open_archive(record)
            if damage is None and record.first_leaf != end:
                damage = Damage(
                    DamageKind.MISSING if record.first_leaf > end else DamageKind.MODIFIED,
                    f"it covers leaves {record.first_leaf}..{record.end_leaf - 1}, but the archived "
                    f"prefix ends at leaf {end}: "
                    + (
                        "the record of the archive in between was removed"
                        if record.first_leaf > end
                        else "it overlaps an earlier archive"
                    ),
                    archive_id=record.id,
                    leaf_index=end,
                )
            if damage is not None:
                # Archives only ever extend the prefix, so nothing after a bad record is trusted:
                # the leaves it claims count as live, and their missing events are reported.
                self._records.append(damage)
                break
            end = record.end_leaf
            self._archive_names.append((end, record.file_name))
            self.report.archives.append(
                ArchivedRange(
                    record.first_leaf, record.end_leaf, record.file_name, record.created_at
                )
            )
        self._archived_end = self.report.archived = end

    def _open_archive(self, record: AuditArchive) -> Damage | None:
        assert self._public_key is not None  # noqa: S101 - check_archives checked both.
        assert self._origin is not None  # noqa: S101
        try:
            statement = open_statement(
                record.statement, origin=self._origin, public_key=self._public_key
            )
        except ArchiveSignatureInvalid:
            return Damage(
                DamageKind.FORGED,
                f"the record of an archive of leaves {record.first_leaf}..{record.end_leaf - 1} "
                f"({record.file_name}) is not signed by the log key: the log never made it",
                archive_id=record.id,
                leaf_index=record.first_leaf,
            )
        except ArchiveInvalid as exc:
            return Damage(DamageKind.MODIFIED, exc.message, archive_id=record.id)
        if (statement.first_leaf, statement.end_leaf, statement.created_at) != (
            record.first_leaf,
            record.end_leaf,
            record.created_at,
        ):
            return Damage(
                DamageKind.MODIFIED,
                "its leaf range or time columns differ from its signed statement "
                f"(leaves {statement.first_leaf}..{statement.end_leaf - 1})",
                archive_id=record.id,
                leaf_index=statement.first_leaf,
            )
        try:
            checkpoint = parse_checkpoint(record.checkpoint).verify(
                key_name=self._origin, public_key=self._public_key
            )
        except (MalformedCheckpoint, SignatureInvalid):
            return Damage(
                DamageKind.BAD_SIGNATURE,
                "its checkpoint is not signed by the log key",
                archive_id=record.id,
            )
        if checkpoint.size != statement.end_leaf or checkpoint.root_hash != statement.root_hash:
            return Damage(
                DamageKind.MODIFIED,
                "its checkpoint is not the tree its signed statement names",
                archive_id=record.id,
            )
        self._expect(
            checkpoint.size,
            checkpoint.root_hash,
            DamageKind.MODIFIED,
            f"the checkpoint of archive {record.file_name}",
        )
        return None

    def _archive_holding(self, leaf: int) -> str:
        return next((name for end, name in self._archive_names if leaf < end), "an archive")

    def _expect(self, size: int, root_hash: bytes, kind: DamageKind, source: str) -> None:
        self._expectations.setdefault(size, []).append(_Expectation(size, root_hash, kind, source))

    # Events -----------------------------------------------------------------------------------

    def check_events(self) -> None:
        stored = _StoredLeaves(self._session)
        compact = CompactRange()
        archived = self._archived_end
        rows = _Lookahead(_rows(self._session, stored, after=archived - 1))
        aligned = True
        last_ok = {DamageKind.MODIFIED: 0, DamageKind.INCONSISTENT: 0}
        failed: set[DamageKind] = set()
        seq_at: dict[int, int] = {}  # Sequence numbers at the start of each unverified range.
        previous_seq: int | None = None
        for expectation in self._expectations.get(0, []):
            self._compare_root(expectation, EMPTY_ROOT, last_ok, failed, seq_at)
        self._check_archived_rows(archived)

        def check_roots() -> None:
            for expectation in self._expectations.get(compact.size, []):
                self._compare_root(expectation, compact.root(), last_ok, failed, seq_at)

        created = self._fold_archived(archived, stored, compact, check_roots)
        for row in rows:
            position = compact.size
            if position in (last_ok[DamageKind.MODIFIED], last_ok[DamageKind.INCONSISTENT]):
                seq_at[position] = row.seq
            created.extend(node for node in compact.append(row.hash) if node[0][0] > 0)
            if aligned:
                damage = self._align(row, position, previous_seq, stored, rows)
                if damage is not None:
                    self._specific.append(damage)
                    aligned = False
            check_roots()
            if len(created) >= _CHUNK:
                self._compare_nodes(created)
                created = []
            previous_seq = row.seq
        self._compare_nodes(created)
        size = compact.size
        self.report.integrated = size
        self.report.root_hash = compact.root()
        if aligned:
            # After a missing or forged event the counts differ anyway; that says nothing new.
            self._check_truncation(size, previous_seq, stored_size=stored.size)
        self._check_outside_sizes(size, previous_seq)

    def _fold_archived(
        self,
        archived: int,
        stored: _StoredLeaves,
        compact: CompactRange,
        check_roots: Callable[[], None],
    ) -> list[tuple[NodeKey, bytes]]:
        """Fold the archived leaves into ``compact``; returns the nodes not yet compared."""
        created: list[tuple[NodeKey, bytes]] = []
        missing = False
        for position in range(archived):
            # Archived events are gone; their stored leaf hashes are the evidence that remains.
            leaf = stored.get(position)
            if leaf is None:
                if not missing:
                    self._specific.append(
                        Damage(
                            DamageKind.MISSING,
                            f"the stored leaf hash of archived leaf {position} was removed; "
                            "archived events are checked through their stored leaf hashes",
                            leaf_index=position,
                        )
                    )
                    missing = True
                leaf = bytes(HASH_SIZE)
            created.extend(node for node in compact.append(leaf) if node[0][0] > 0)
            check_roots()
            if len(created) >= _CHUNK:
                self._compare_nodes(created)
                created = []
        return created

    def _align(  # noqa: PLR0911 - one return per kind of damage, in the order they are told apart.
        self,
        row: _Row,
        position: int,
        previous_seq: int | None,
        stored: _StoredLeaves,
        rows: _Lookahead,
    ) -> Damage | None:
        if row.problem is not None:
            return Damage(DamageKind.MODIFIED, row.problem, seq=row.seq, leaf_index=position)
        if row.leaf_index != position:
            after = f" after seq {previous_seq}" if previous_seq is not None else ""
            if position == self._archived_end:
                start = f"the live log starts at leaf {row.leaf_index}, not {position}"
            else:
                start = f"leaf indexes jump from {position - 1} to {row.leaf_index}"
            return Damage(
                DamageKind.MISSING,
                f"{start}: {row.leaf_index - position} event(s){after} were removed",
                leaf_index=position,
            )
        expected = stored.get(position)
        if expected is None:
            return Damage(
                DamageKind.FORGED,
                f"the event claims leaf {position}, which the stored Merkle tree "
                f"(size {stored.size}) never recorded",
                seq=row.seq,
                leaf_index=position,
            )
        if row.hash == expected:
            return None
        following = rows.peek(_LOOKAHEAD)
        after_next = stored.get(position + 1)
        if following and after_next == row.hash and following[0].hash == expected:
            return Damage(
                DamageKind.REORDERED,
                f"the events at leaves {position} and {position + 1} "
                f"(seq {row.seq} and seq {following[0].seq}) are in each other's place",
                seq=row.seq,
                leaf_index=position,
            )
        if after_next is not None and after_next == row.hash:
            after = f" after seq {previous_seq}" if previous_seq is not None else ""
            return Damage(
                DamageKind.MISSING,
                f"the event at leaf {position}{after} was removed and later events renumbered",
                leaf_index=position,
            )
        if following and following[0].hash == expected:
            return Damage(
                DamageKind.FORGED,
                f"an event that was never logged was inserted at leaf {position}",
                seq=row.seq,
                leaf_index=position,
            )
        for other in following:
            if expected in (row.rehash(other.seq), other.rehash(row.seq)):
                return Damage(
                    DamageKind.REORDERED,
                    f"seq {row.seq} and seq {other.seq} have swapped places",
                    seq=row.seq,
                    leaf_index=position,
                )
        elsewhere = stored.find(row.hash)
        if elsewhere is not None:
            return Damage(
                DamageKind.REORDERED,
                f"the event belongs at leaf {elsewhere}, not at leaf {position}",
                seq=row.seq,
                leaf_index=position,
            )
        return Damage(
            DamageKind.MODIFIED,
            "the event does not hash to the leaf the log recorded",
            seq=row.seq,
            leaf_index=position,
        )

    def _compare_root(
        self,
        expectation: _Expectation,
        computed: bytes,
        last_ok: dict[DamageKind, int],
        failed: set[DamageKind],
        seq_at: dict[int, int],
    ) -> None:
        kind = expectation.kind
        if computed == expectation.root_hash:
            if kind not in failed:
                last_ok[kind] = max(last_ok[kind], expectation.size)
            return
        if kind in failed:
            return  # Later mismatches follow from the first one.
        failed.add(kind)
        start = last_ok[kind]
        seq = seq_at.get(start)
        span = f"from seq {seq}" if seq is not None else f"from leaf {start}"
        self._generic.append(
            Damage(
                kind,
                f"the {expectation.size} events do not hash to the root of {expectation.source}; "
                f"the damage is among the events {span} to leaf {expectation.size - 1}",
                seq=seq,
                leaf_index=start,
                range_end=expectation.size,
            )
        )

    def _compare_nodes(self, created: list[tuple[NodeKey, bytes]]) -> None:
        if not created or self._nodes_damaged:
            return
        stored = self._stored_ranges([key for key, _ in created])
        for (level, idx), computed in created:
            if stored.get((level, idx)) != computed:
                start = idx << level
                self._generic.append(
                    Damage(
                        DamageKind.MODIFIED,
                        f"stored Merkle tree node (level {level}, index {idx}) is "
                        f"{'missing' if (level, idx) not in stored else 'wrong'}, so proofs "
                        "built from it fail",
                        leaf_index=start,
                        range_end=(idx + 1) << level,
                    )
                )
                self._nodes_damaged = True
                return

    def _stored_ranges(self, keys: list[NodeKey]) -> dict[NodeKey, bytes]:
        # The nodes a scan completes form one run of consecutive indexes per level, so one range
        # query per level reads them all (point lookups would cost one index probe per node).
        spans: dict[int, tuple[int, int]] = {}
        for level, idx in keys:
            low, high = spans.get(level, (idx, idx))
            spans[level] = (min(low, idx), max(high, idx))
        found: dict[NodeKey, bytes] = {}
        nodes = AuditTreeNode
        for level, (low, high) in spans.items():
            rows = self._session.execute(
                select(nodes.idx, nodes.hash).where(
                    nodes.level == level, nodes.idx >= low, nodes.idx <= high
                )
            )
            found.update(((level, int(idx)), bytes(h)) for idx, h in rows)
        return found

    def _check_archived_rows(self, archived: int) -> None:
        if not archived:
            return
        events = AuditEventRecord
        found = self._session.execute(
            select(events.seq, events.leaf_index)
            .where(events.leaf_index.is_not(None), events.leaf_index < archived)
            .order_by(events.leaf_index)
            .limit(1)
        ).first()
        if found is not None:
            self._specific.append(
                Damage(
                    DamageKind.FORGED,
                    f"the event claims leaf {found.leaf_index}, whose event was archived to "
                    f"{self._archive_holding(found.leaf_index)} and removed from the live log",
                    seq=found.seq,
                    leaf_index=found.leaf_index,
                )
            )

    def _check_truncation(self, size: int, last_seq: int | None, *, stored_size: int) -> None:
        beyond = [(s, head_id) for s, head_id in self._head_sizes if s > size]
        if beyond:
            head_size, head_id = max(beyond)
            self._specific.append(
                Damage(
                    DamageKind.TRUNCATED,
                    f"signed tree head #{head_id} covers {head_size} events but only {size} "
                    f"remain{_after(last_seq)}",
                    leaf_index=size,
                )
            )
        elif stored_size > size:
            self._specific.append(
                Damage(
                    DamageKind.TRUNCATED,
                    f"the stored tree has {stored_size} leaves but only {size} events "
                    f"remain{_after(last_seq)}",
                    leaf_index=size,
                )
            )

    def _check_outside_sizes(self, size: int, last_seq: int | None) -> None:
        for size_wanted, expectations in sorted(self._expectations.items()):
            if size_wanted <= size:
                continue
            for expectation in expectations:
                if expectation.kind is DamageKind.INCONSISTENT:
                    self._generic.append(
                        Damage(
                            DamageKind.INCONSISTENT,
                            f"{expectation.source} covers {size_wanted} events but the log has "
                            f"only {size}{_after(last_seq)}: it was rolled back or truncated",
                            leaf_index=size,
                            range_end=size_wanted,
                        )
                    )

    def check_pending(self) -> None:
        events = AuditEventRecord
        self.report.pending = (
            self._session.scalar(
                select(func.count()).select_from(events).where(events.leaf_index.is_(None))
            )
            or 0
        )
        self.report.events = self.report.integrated + self.report.pending
        if self._latest_time is None or not self.report.pending:
            return
        cutoff = self._latest_time - MAX_INTEGRATION_LAG
        backdated = self._session.execute(
            select(events.seq, events.recorded_at)
            .where(events.leaf_index.is_(None), events.recorded_at < cutoff)
            .order_by(events.seq)
            .limit(1)
        ).first()
        if backdated is not None:
            self._specific.append(
                Damage(
                    DamageKind.FORGED,
                    f"the event is not in the tree, yet it claims to be recorded at "
                    f"{backdated.recorded_at.isoformat()}, long before the latest tree head "
                    "that should have included it",
                    seq=backdated.seq,
                    leaf_index=self.report.integrated,
                )
            )

    def damages(self) -> list[Damage]:
        specific = sorted(self._specific, key=lambda d: d.leaf_index or 0)
        first_specific = specific[0].leaf_index if specific else None
        # A range-located problem is reported only when nothing more precise explains it: every
        # root after a missing event differs too, and saying so again names nothing new.
        generic = [
            d
            for d in self._generic
            if first_specific is None or (d.range_end or 0) <= first_specific
        ]
        ranked = [(d.leaf_index or 0, 0, d) for d in specific] + [
            (d.leaf_index or 0, 1, d) for d in generic
        ]
        ranked.sort(key=lambda item: (item[0], item[1]))
        return [*self._heads, *self._records, *(d for _, _, d in ranked)]


def verify_log(
    session: Session,
    *,
    public_key: bytes | None,
    origin: str | None = None,
    checkpoints: Sequence[OutsideCheckpoint] = (),
) -> VerificationReport:
    """Verify the whole log; the report lists every problem found (``report.ok`` if none).

    ``public_key`` is the log's Ed25519 key; ``origin`` defaults to the one derived from it. Raises
    :class:`CheckpointRejected` if an outside checkpoint is not signed by the log key, and
    :class:`~medcollab.errors.ConfigurationError` if the log has signed heads but no key was given.
    """
    started = time.perf_counter()
    verifier = _Verifier(session, public_key=public_key, origin=origin, checkpoints=checkpoints)
    verifier.check_outside()
    verifier.check_heads()
    verifier.check_archives()
    verifier.check_events()
    verifier.check_pending()
    report = verifier.report
    report.damages = verifier.damages()
    report.seconds = time.perf_counter() - started
    return report


__all__ = [
    "MAX_INTEGRATION_LAG",
    "ArchivedRange",
    "AuditLogDamaged",
    "CheckpointRejected",
    "Damage",
    "DamageKind",
    "OutsideCheckpoint",
    "VerificationReport",
    "read_checkpoint",
    "verify_log",
]
