"""Retention and archives: moving old audit events out of the live log into signed files.

Events stay in the live database for the retention period (``Settings.audit_retention_days``, by
default the jurisdiction profile's: six years, or longer where the law asks). After that,
:func:`archive_before` moves a *prefix* of the log, leaves ``[a, k)``, into a compressed file that
the log key signs, and deletes those events' rows. Their leaf hashes and every tree node stay in
``audit_tree_node``: they are the commitments the signed heads were computed over, so the rest of the
log verifies as before, and every inclusion and consistency proof can still be built. Only prefixes
are archived (the scan stops at the first event that is not old enough), so the live log is always
one contiguous range and each archive continues the previous one.

An archive file is two gzip members, which ``zcat`` prints one after the other:

1. the **statement**, a signed note (https://c2sp.org/signed-note) by the log key::

       medcollab-audit-archive/v1
       <origin>
       leaves <a> <k>
       root <base64 RFC 6962 root of the tree of k leaves>
       payload-sha256 <hex SHA-256 of member 2, exactly as stored in the file>
       payload-bytes <length of member 2>
       created <YYYY-MM-DDTHH:MM:SS.mmmZ>

       — <origin> <base64(key ID || Ed25519 signature)>

   Its first line makes it impossible to read as a checkpoint (whose second line is a tree size),
   so the one log key can sign both without one being passed off as the other.
2. the **payload**: one JSON header line (format, origin, range, creation time, the cutoff, the
   tree's complete subtrees left of ``a`` (``prefix``), the signed checkpoint at ``k``, the log's
   latest signed head when the archive was made and a consistency proof from ``k`` to it), then one
   line per event: ``<leaf index> TAB <seq> TAB <entry>``, where the entry is the RFC 8785 canonical
   JSON whose leaf hash is in the tree, byte for byte. Canonical JSON escapes every control
   character, so an entry never holds a tab or a newline.

Verification (:func:`verify_archive`) authenticates before it parses: it reads the small statement,
checks its signature, and compares the SHA-256 of the payload's *compressed* bytes with the signed
one, so a changed byte in the payload or the statement's text is a signature failure and no
untrusted payload is ever decompressed. (The statement member's gzip header fields, time and OS,
carry nothing and are covered only by the file's SHA-256 in the live log's record.) Then it recomputes every leaf hash, folds them onto the ``prefix`` nodes into the root
at ``k``, and compares that with the signed checkpoint; the consistency proof links the checkpoint
to the later head, and ``live=`` links it to the live log's current head. The prefix nodes need no
signature: a wrong one cannot produce the signed root.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from pathlib import Path
from typing import IO, Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from medcollab.audit.checkpoint import (
    Checkpoint,
    MalformedCheckpoint,
    format_timestamp,
    key_id,
    parse_checkpoint,
    sign_checkpoint,
    truncate_to_milliseconds,
)
from medcollab.audit.merkle import (
    CompactRange,
    ProofInvalid,
    consistency_proof,
    frontier_keys,
    leaf_hash,
    root_at,
    verify_consistency,
)
from medcollab.audit.models import (
    AuditArchive,
    AuditEventPatient,
    AuditEventRecord,
    AuditTreeHead,
    AuditTreeNode,
)
from medcollab.audit.services import (
    AuditLog,
    AuditLogCorrupted,
    DatabaseTree,
    default_origin,
    leaf_entry,
)
from medcollab.crypto.signing import LogSigner, SignatureInvalid, verify_ed25519
from medcollab.errors import ConfigurationError, Conflict, InvalidInput, MedcollabError
from medcollab.jurisdiction.profiles import Basis, JurisdictionProfile
from medcollab.kernel.clock import Clock

ARCHIVE_FORMAT: Final = "medcollab-audit-archive/v1"
#: A statement is a few hundred bytes; more than this is not one.
MAX_STATEMENT_BYTES: Final = 64 * 1024
#: An event line is well under a kilobyte; this bounds the memory a damaged payload can claim.
MAX_LINE_BYTES: Final = 1024 * 1024
_BATCH: Final = 5_000
_READ_CHUNK: Final = 1024 * 1024
_FILE_MODE: Final = 0o600
_SIGNATURE_PREFIX: Final = "\u2014 "
_DECIMAL: Final = re.compile(rb"0|[1-9][0-9]*")
_HEX_SHA256: Final = re.compile(r"[0-9a-f]{64}")


# Errors -------------------------------------------------------------------------------------------


class RetentionTooShort(ConfigurationError):
    """The configured audit retention is shorter than the law requires."""

    code = "audit_retention_too_short"


class RetentionNotElapsed(InvalidInput):
    """The requested cutoff would archive events that are still inside the retention period."""

    code = "audit_retention_not_elapsed"


class ArchiveInvalid(MedcollabError):
    """An archive file is not a valid, complete archive of this log."""

    code = "audit_archive_invalid"


class ArchiveSignatureInvalid(ArchiveInvalid):
    """An archive file is not signed by the log key, or was changed after it was signed."""

    code = "audit_archive_signature_invalid"


class ArchiveExists(Conflict):
    """The output file exists; an archive never overwrites a file (it may be an older archive)."""

    code = "audit_archive_exists"


# Retention ----------------------------------------------------------------------------------------


def _years(period: timedelta) -> str:
    return f"{period.days:,} days, about {period.days / 365.25:.0f} years"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long events stay in the live log, and why."""

    period: timedelta
    #: Where the period comes from: the setting, or the profile and its citation.
    source: str
    #: The longest legal minimum among the profiles that apply, and its citation.
    minimum: timedelta
    minimum_source: str

    def latest_cutoff(self, now: datetime) -> datetime:
        """The newest cutoff allowed at ``now``: events recorded before it are past retention."""
        return now - self.period

    def check_cutoff(self, cutoff: datetime, now: datetime) -> None:
        """Raise :class:`RetentionNotElapsed` unless every event before ``cutoff`` is past retention."""
        latest = self.latest_cutoff(now)
        if cutoff > latest:
            raise RetentionNotElapsed(
                f"refusing to archive events recorded before {cutoff.isoformat()}: the audit "
                f"retention is {_years(self.period)} ({self.source}), so the cutoff may be "
                f"{latest.replace(microsecond=0).isoformat()} at the latest",
                hint=f"--before {latest.date().isoformat()} is the latest date allowed today",
            )


def _cited(profile: JurisdictionProfile) -> str:
    minimum = profile.audit_log_retention_minimum
    basis = "" if minimum.basis is Basis.LAW else f", a {minimum.basis.value} default"
    return f"{profile.code.value}: {minimum.source}{basis}"


def retention_policy(
    configured_days: int | None, profiles: Iterable[JurisdictionProfile]
) -> RetentionPolicy:
    """The live log's retention under ``profiles`` (the deployment's and every organisation's).

    One tree holds every organisation's events, so the strictest profile governs all of them.
    ``configured_days`` of None means the profiles' own retention (:attr:`audit_log_retention`); a
    configured value below the longest legal minimum raises :class:`RetentionTooShort`, naming the
    minimum and where it comes from.
    """
    applicable = {profile.code: profile for profile in profiles}
    if not applicable:
        # No profile would mean no minimum at all; deny rather than archive without a rule.
        raise ConfigurationError("no jurisdiction profile applies, so no retention is defined")
    strictest = max(applicable.values(), key=lambda p: p.audit_log_retention_minimum.value)
    minimum = strictest.audit_log_retention_minimum.value
    minimum_source = _cited(strictest)
    if configured_days is None:
        longest = max(applicable.values(), key=lambda p: p.audit_log_retention)
        return RetentionPolicy(
            period=longest.audit_log_retention,
            source=f"the {longest.code.value} profile's audit retention; legal minimum "
            f"{_cited(longest)}",
            minimum=minimum,
            minimum_source=minimum_source,
        )
    period = timedelta(days=configured_days)
    if period < minimum:
        raise RetentionTooShort(
            f"audit_retention_days = {configured_days} is below the legal minimum for audit logs "
            f"of {_years(minimum)} ({minimum_source})",
            hint="raise MEDCOLLAB_AUDIT_RETENTION_DAYS, or unset it to use the profile's retention",
        )
    return RetentionPolicy(
        period=period,
        source=f"audit_retention_days = {configured_days}",
        minimum=minimum,
        minimum_source=minimum_source,
    )


# The signed statement -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchiveStatement:
    """What the log key signs about an archive file."""

    origin: str
    first_leaf: int
    end_leaf: int
    root_hash: bytes
    payload_sha256: bytes
    payload_bytes: int
    created_at: datetime

    def text(self) -> str:
        lines = [
            ARCHIVE_FORMAT,
            self.origin,
            f"leaves {self.first_leaf} {self.end_leaf}",
            f"root {base64.b64encode(self.root_hash).decode('ascii')}",
            f"payload-sha256 {self.payload_sha256.hex()}",
            f"payload-bytes {self.payload_bytes}",
            f"created {format_timestamp(self.created_at)}",
        ]
        return "\n".join(lines) + "\n"


def sign_statement(statement: ArchiveStatement, signer: LogSigner) -> str:
    """The statement as a signed note by the log key, named after the log's origin."""
    text = statement.text()
    public_key = signer.public_key_bytes()
    blob = key_id(statement.origin, public_key) + signer.sign(text.encode("utf-8"))
    line = f"{_SIGNATURE_PREFIX}{statement.origin} {base64.b64encode(blob).decode('ascii')}\n"
    return text + "\n" + line


def open_statement(note: str, *, origin: str, public_key: bytes) -> ArchiveStatement:
    """The statement in ``note`` if the log key signed it; else :class:`ArchiveSignatureInvalid`.

    As the signed-note specification asks, signatures by other keys are ignored, and at least one
    signature by the log key (its name and key ID) must be present and valid.
    """
    split = note.rfind("\n\n")
    if not note.endswith("\n") or split < 0:
        raise ArchiveSignatureInvalid("the archive statement is not a signed note")
    text, block = note[: split + 1], note[split + 2 :]
    expected_id = key_id(origin, public_key)
    ours = 0
    for line in block.split("\n")[:-1]:
        name, _, blob = line.removeprefix(_SIGNATURE_PREFIX).partition(" ")
        if not line.startswith(_SIGNATURE_PREFIX) or name != origin:
            continue
        try:
            raw = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            continue
        if raw[:4] != expected_id:
            continue
        try:
            verify_ed25519(public_key, raw[4:], text.encode("utf-8"))
        except SignatureInvalid:
            raise ArchiveSignatureInvalid(
                f"the archive statement's signature by {origin} does not verify"
            ) from None
        ours += 1
    if not ours:
        raise ArchiveSignatureInvalid(f"the archive is not signed by the log key {origin}")
    return _parse_statement(text)


def _parse_statement(text: str) -> ArchiveStatement:
    lines = text.split("\n")[:-1]
    fields = dict(line.partition(" ")[::2] for line in lines[2:])
    problem = None
    if len(lines) != 7 or lines[0] != ARCHIVE_FORMAT or len(fields) != 5:
        problem = f"it is not a {ARCHIVE_FORMAT} statement"
    elif not _HEX_SHA256.fullmatch(fields.get("payload-sha256", "")):
        problem = "payload-sha256 is not a hex SHA-256"
    else:
        try:
            first, end = (int(v) for v in fields["leaves"].split(" "))
            return ArchiveStatement(
                origin=lines[1],
                first_leaf=first,
                end_leaf=end,
                root_hash=base64.b64decode(fields["root"], validate=True),
                payload_sha256=bytes.fromhex(fields["payload-sha256"]),
                payload_bytes=int(fields["payload-bytes"]),
                created_at=datetime.strptime(fields["created"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=UTC
                ),
            )
        except (KeyError, ValueError, binascii.Error) as exc:
            problem = f"a field is unreadable ({type(exc).__name__})"
    # Signed by the log key and still unreadable: a bug, never an attacker; say so plainly.
    raise ArchiveInvalid(f"the signed archive statement is malformed: {problem}")


# Reports ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    """An archive written (or planned, or verified): its range, root and file."""

    origin: str
    first_leaf: int
    end_leaf: int
    created_at: datetime
    #: The root of the tree of ``end_leaf`` leaves and the signed checkpoint saying so (None when
    #: there was nothing to archive).
    root_hash: bytes | None = None
    checkpoint: str | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    first_recorded: datetime | None = None
    last_recorded: datetime | None = None
    path: Path | None = None
    file_sha256: bytes | None = None
    #: The size of the later signed head the file's consistency proof reaches.
    linked_size: int | None = None
    #: The live log's head size the archive was checked against (``verify_archive(live=...)``).
    live_size: int | None = None
    dry_run: bool = False

    @property
    def events(self) -> int:
        return self.end_leaf - self.first_leaf

    def describe(self) -> str:
        where = f" in {self.path.name}" if self.path is not None else ""
        if not self.events:
            return "no events archived"
        return (
            f"{self.events} events archived (leaves {self.first_leaf}..{self.end_leaf - 1}){where}"
        )


# Archiving ----------------------------------------------------------------------------------------


def archive_before(
    session: Session,
    *,
    cutoff: datetime,
    out: Path,
    signer: LogSigner,
    clock: Clock,
    retention: RetentionPolicy,
    dry_run: bool = False,
    max_events: int | None = None,
) -> ArchiveReport:
    """Archive the oldest events recorded before ``cutoff`` into ``out``, then drop their rows.

    The archived range starts where the previous archive ended and stops at the first event that is
    not older than ``cutoff``, so archives are always consecutive prefixes. The newest event in the
    tree always stays live, because the integrator checks that the highest leaf index held by an
    event matches the stored tree. Before anything is written, every archived event is re-hashed and
    compared with its stored leaf, and the tree they make is checked against the latest signed head:
    the log never archives (and so never deletes) events it cannot prove. The file is written and
    synced before the rows are deleted in the caller's transaction; if that transaction rolls back,
    the file is a valid archive the live log does not reference, and nothing is lost.

    ``retention`` is required, not defaulted, so no caller can archive without a retention rule; a
    ``cutoff`` inside the retention period raises :class:`RetentionNotElapsed`. ``max_events``
    bounds one archive (and so how long its transaction holds the integrator lock, and on SQLite
    the write lock); the next call continues where it stopped.
    """
    if cutoff.tzinfo is None:
        raise ValueError("the cutoff must be timezone-aware")
    if max_events is not None and max_events < 1:
        raise InvalidInput("an archive holds at least one event")
    now = clock.now()
    retention.check_cutoff(cutoff, now)
    created = truncate_to_milliseconds(now)
    log = AuditLog(session, signer=signer, clock=clock)
    # Integrating first takes the integrator lock for the rest of the transaction and makes sure a
    # signed head covers every event, which the consistency check below relies on.
    log.integrate()
    origin = log.origin
    public_key = signer.public_key_bytes()
    tree = DatabaseTree(session)
    size = tree.tree_size()
    start, previous_root = _archived_prefix(session, origin, public_key)
    end = _prefix_end(session, start, cutoff, size)
    if max_events is not None:
        end = min(end, start + max_events)
    if end <= start:
        return ArchiveReport(origin, start, start, created, dry_run=dry_run)

    latest = _latest_head(session, origin, public_key)
    if latest is None or latest.size != size:
        raise AuditLogCorrupted(f"no signed tree head covers the {size} leaves of the tree")
    root_hash = root_at(end, tree)
    proof = consistency_proof(end, latest.size, tree)
    try:
        verify_consistency(end, latest.size, proof, root_hash, latest.root_hash)
    except ProofInvalid:
        raise AuditLogCorrupted(
            f"the stored tree at size {end} is not consistent with the signed head at size "
            f"{latest.size}; refusing to archive"
        ) from None
    prefix = tree.get_nodes(frontier_keys(start))
    if previous_root is not None and root_at(start, tree) != previous_root:
        raise AuditLogCorrupted(
            f"the stored tree at size {start} no longer matches the previous archive's checkpoint"
        )
    checkpoint = _checkpoint_at(
        session, size=end, root_hash=root_hash, origin=origin, signer=signer, now=created
    )
    header = {
        "format": ARCHIVE_FORMAT,
        "origin": origin,
        "first_leaf": start,
        "end_leaf": end,
        "created": format_timestamp(created),
        "cutoff": cutoff.astimezone(UTC).isoformat(),
        "prefix": [_b64(h) for h in prefix],
        "checkpoint": checkpoint,
        "latest_checkpoint": latest.note,
        "consistency_proof": [_b64(h) for h in proof],
    }
    scan = _EventScan(session, start, end, CompactRange(start, prefix), root_hash)
    file_sha256 = None
    if dry_run:
        for _ in scan.lines():
            pass
    else:
        statement = ArchiveStatement(origin, start, end, root_hash, b"", 0, created)
        file_sha256, note = _write_archive(out, header, scan.lines(), statement, signer)
        _drop_rows(session, start, end)
        session.add(
            AuditArchive(
                first_leaf=start,
                end_leaf=end,
                file_name=out.name[:255],
                file_sha256=file_sha256,
                created_at=created,
                checkpoint=checkpoint,
                statement=note,
            )
        )
        session.flush()
    return ArchiveReport(
        origin=origin,
        first_leaf=start,
        end_leaf=end,
        created_at=created,
        root_hash=root_hash,
        checkpoint=checkpoint,
        first_seq=scan.first_seq,
        last_seq=scan.last_seq,
        first_recorded=scan.first_recorded,
        last_recorded=scan.last_recorded,
        path=None if dry_run else out,
        file_sha256=file_sha256,
        linked_size=latest.size,
        dry_run=dry_run,
    )


@dataclass(frozen=True, slots=True)
class _Head:
    size: int
    root_hash: bytes
    note: str


def _latest_head(session: Session, origin: str, public_key: bytes) -> _Head | None:
    record = session.scalars(
        select(AuditTreeHead).order_by(AuditTreeHead.id.desc()).limit(1)
    ).first()
    if record is None:
        return None
    try:
        checkpoint = parse_checkpoint(record.note).verify(key_name=origin, public_key=public_key)
    except (MalformedCheckpoint, SignatureInvalid):
        raise AuditLogCorrupted(
            f"the latest tree head (#{record.id}) does not verify with the log key"
        ) from None
    return _Head(checkpoint.size, checkpoint.root_hash, record.note)


def _archived_prefix(session: Session, origin: str, public_key: bytes) -> tuple[int, bytes | None]:
    """Where the archived prefix ends, and the root its last archive signed (None: no archive)."""
    end, root_hash = 0, None
    for record in session.scalars(select(AuditArchive).order_by(AuditArchive.first_leaf)):
        try:
            statement = open_statement(record.statement, origin=origin, public_key=public_key)
        except ArchiveInvalid as exc:
            raise AuditLogCorrupted(f"archive record #{record.id}: {exc.message}") from None
        if (record.first_leaf, record.end_leaf) != (end, statement.end_leaf) or (
            statement.first_leaf != end
        ):
            raise AuditLogCorrupted(
                f"archive record #{record.id} does not continue the archived prefix at leaf {end}"
            )
        end, root_hash = statement.end_leaf, statement.root_hash
    return end, root_hash


def _prefix_end(session: Session, start: int, cutoff: datetime, size: int) -> int:
    events = AuditEventRecord
    young = session.scalar(
        select(func.min(events.leaf_index)).where(
            events.leaf_index >= start, events.recorded_at >= cutoff
        )
    )
    # The newest leaf stays live (see archive_before), hence size - 1.
    end = size - 1 if young is None else min(int(young), size - 1)
    return max(end, start)


def _checkpoint_at(
    session: Session, *, size: int, root_hash: bytes, origin: str, signer: LogSigner, now: datetime
) -> str:
    """A signed checkpoint of the tree at ``size``: an issued head of that size, or a new one.

    A new one is not stored as a tree head: heads are issued in order of size, and this one is
    smaller than the latest. It lives in the archive and its record instead.
    """
    for record in session.scalars(select(AuditTreeHead).where(AuditTreeHead.tree_size == size)):
        try:
            checkpoint = parse_checkpoint(record.note).verify(
                key_name=origin, public_key=signer.public_key_bytes()
            )
        except (MalformedCheckpoint, SignatureInvalid):
            continue
        if checkpoint.size == size and checkpoint.root_hash == root_hash:
            return record.note
    return sign_checkpoint(Checkpoint(origin, size, root_hash, now), signer).note


class _EventScan:
    """The archived events in leaf order, each checked against its stored leaf hash.

    The lines end with a check that the events, folded onto the prefix, give ``root_hash``: the
    root the signed head vouches for. A mismatch raises before the file is signed and put in place.
    """

    def __init__(
        self, session: Session, start: int, end: int, compact: CompactRange, root_hash: bytes
    ) -> None:
        self._session = session
        self._start = start
        self._end = end
        self._compact = compact
        self._root_hash = root_hash
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.first_recorded: datetime | None = None
        self.last_recorded: datetime | None = None

    def lines(self) -> Iterator[bytes]:
        events = AuditEventRecord
        position = self._start
        while position < self._end:
            rows = self._session.execute(
                select(events.seq, events.leaf_index, events.body, events.recorded_at)
                .where(events.leaf_index >= position, events.leaf_index < self._end)
                .order_by(events.leaf_index)
                .limit(_BATCH)
            ).all()
            last = position + len(rows)
            nodes = self._session.execute(
                select(AuditTreeNode.idx, AuditTreeNode.hash).where(
                    AuditTreeNode.level == 0,
                    AuditTreeNode.idx >= position,
                    AuditTreeNode.idx < last,
                )
            )
            stored = {int(idx): bytes(h) for idx, h in nodes}
            for seq, leaf_index, body, recorded_at in rows:
                if leaf_index != position:
                    raise AuditLogCorrupted(
                        f"leaf {position} has no event in the live log; run `medcollab audit "
                        "verify` before archiving"
                    )
                entry = leaf_entry(seq, body)
                hashed = leaf_hash(entry)
                if stored.get(position) != hashed:
                    raise AuditLogCorrupted(
                        f"audit event {seq} (leaf {position}) does not hash to its stored leaf; "
                        "refusing to archive it"
                    )
                self._compact.append(hashed)
                if self.first_seq is None:
                    self.first_seq, self.first_recorded = seq, recorded_at
                self.last_seq, self.last_recorded = seq, recorded_at
                position += 1
                yield f"{leaf_index}\t{seq}\t".encode("ascii") + entry + b"\n"
            if not rows:
                raise AuditLogCorrupted(f"leaf {position} has no event in the live log")
        if self._compact.root() != self._root_hash:
            raise AuditLogCorrupted(
                f"the events at leaves {self._start} to {self._end - 1} do not hash to the root "
                "of the signed tree; refusing to archive them"
            )


def _drop_rows(session: Session, start: int, end: int) -> None:
    events = AuditEventRecord
    archived = select(events.seq).where(events.leaf_index >= start, events.leaf_index < end)
    # The patient index is derived from the bodies being removed; it goes with them.
    session.execute(
        delete(AuditEventPatient).where(AuditEventPatient.seq.in_(archived)),
        execution_options={"synchronize_session": False},
    )
    session.execute(
        delete(events).where(events.leaf_index >= start, events.leaf_index < end),
        execution_options={"synchronize_session": False},
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# The file -----------------------------------------------------------------------------------------


def _create_private(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    return os.fdopen(fd, "wb")


def _write_archive(
    out: Path,
    header: dict[str, Any],
    lines: Iterable[bytes],
    statement: ArchiveStatement,
    signer: LogSigner,
) -> tuple[bytes, str]:
    """Write the archive to ``out`` (never overwriting it); returns its SHA-256 and statement."""
    if out.exists():
        raise ArchiveExists(f"{out} exists; an archive never overwrites a file")
    token = secrets.token_hex(8)
    payload_path = out.with_name(f".{out.name}.{token}.payload")
    final_path = out.with_name(f".{out.name}.{token}.tmp")
    try:
        payload_sha256, payload_bytes = _write_payload(payload_path, header, lines)
        note = sign_statement(
            replace(statement, payload_sha256=payload_sha256, payload_bytes=payload_bytes), signer
        )
        digest = sha256()
        with _create_private(final_path) as handle:
            member = _gzip(note.encode("utf-8"))
            handle.write(member)
            digest.update(member)
            with payload_path.open("rb") as payload:
                while chunk := payload.read(_READ_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # A hard link fails if the name exists, so a concurrent writer's file is never replaced.
            os.link(final_path, out)
        except FileExistsError:
            raise ArchiveExists(f"{out} exists; an archive never overwrites a file") from None
        _fsync_directory(out.parent)
        return digest.digest(), note
    except OSError as exc:
        raise InvalidInput(f"cannot write {out}: {exc.strerror}") from None
    finally:
        payload_path.unlink(missing_ok=True)
        final_path.unlink(missing_ok=True)


def _write_payload(path: Path, header: dict[str, Any], lines: Iterable[bytes]) -> tuple[bytes, int]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    digest = sha256()
    written = 0
    with _create_private(path) as handle:

        def emit(data: bytes) -> None:
            nonlocal written
            if data:
                handle.write(data)
                digest.update(data)
                written += len(data)

        head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        buffer = [head.encode("utf-8") + b"\n"]
        buffered = len(buffer[0])
        for line in lines:
            buffer.append(line)
            buffered += len(line)
            if buffered >= _READ_CHUNK:
                emit(compressor.compress(b"".join(buffer)))
                buffer, buffered = [], 0
        emit(compressor.compress(b"".join(buffer)))
        emit(compressor.flush())
        handle.flush()
        os.fsync(handle.fileno())
    return digest.digest(), written


def _gzip(data: bytes) -> bytes:
    # zlib's gzip wrapper writes no file name and a zero time, so equal input gives equal bytes.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_statement(handle: IO[bytes]) -> tuple[str, int]:
    """The statement note of an archive file and the offset at which its payload starts."""
    decompressor = zlib.decompressobj(wbits=31)
    text = b""
    consumed = 0
    try:
        while not decompressor.eof:
            chunk = handle.read(4096)
            if not chunk or consumed > MAX_STATEMENT_BYTES:
                raise ArchiveSignatureInvalid(
                    "the file does not start with a signed archive statement"
                )
            consumed += len(chunk)
            text += decompressor.decompress(chunk, MAX_STATEMENT_BYTES + 1 - len(text))
            if len(text) > MAX_STATEMENT_BYTES or decompressor.unconsumed_tail:
                raise ArchiveSignatureInvalid("the archive statement is too large")
    except zlib.error:
        raise ArchiveSignatureInvalid(
            "the archive statement is unreadable, so the signature cannot be checked"
        ) from None
    try:
        note = text.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveSignatureInvalid("the archive statement is not UTF-8") from None
    return note, consumed - len(decompressor.unused_data)


# Verifying a file ---------------------------------------------------------------------------------


def verify_archive(
    path: Path,
    public_key: bytes,
    *,
    origin: str | None = None,
    live: Session | None = None,
) -> ArchiveReport:
    """Check an archive file on its own (and, with ``live``, against the live log); else raise.

    Raises :class:`ArchiveSignatureInvalid` if the file is not signed by the log key or changed
    after signing, and :class:`ArchiveInvalid` for any other inconsistency, naming the first.
    """
    origin = origin or default_origin(public_key)
    name = path.name
    try:
        with path.open("rb") as handle:
            note, offset = _read_statement(handle)
            statement = open_statement(note, origin=origin, public_key=public_key)
            handle.seek(0)
            file_digest, payload_digest = sha256(), sha256()
            position = 0
            while chunk := handle.read(_READ_CHUNK):
                file_digest.update(chunk)
                if position + len(chunk) > offset:
                    payload_digest.update(chunk[max(offset - position, 0) :])
                position += len(chunk)
            if (
                payload_digest.digest() != statement.payload_sha256
                or position - offset != statement.payload_bytes
            ):
                raise ArchiveSignatureInvalid(
                    "the archive's signature does not cover its contents: the file was changed "
                    "after it was signed"
                )
            handle.seek(offset)
            report = _check_payload(_payload_lines(handle), statement, origin, public_key)
    except FileNotFoundError:
        raise ArchiveInvalid(f"{path}: no such file") from None
    except OSError as exc:
        raise ArchiveInvalid(f"{path}: cannot be read ({exc.strerror})") from None
    except ArchiveInvalid as exc:
        raise type(exc)(f"{name}: {exc.message}", hint=exc.hint) from None
    report = replace(report, path=path, file_sha256=file_digest.digest())
    if live is not None:
        report = _check_against_live(report, live, origin, public_key)
    return report


def _payload_lines(handle: IO[bytes]) -> Iterator[bytes]:
    decompressor = zlib.decompressobj(wbits=31)
    pending = b""
    try:
        while chunk := handle.read(_READ_CHUNK):
            if decompressor.eof:
                raise ArchiveInvalid("data follows the payload")
            pending += decompressor.decompress(chunk)
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE_BYTES:
                raise ArchiveInvalid(f"a payload line is longer than {MAX_LINE_BYTES} bytes")
            yield from lines
    except zlib.error as exc:
        raise ArchiveInvalid(f"the payload cannot be decompressed ({exc})") from None
    if not decompressor.eof or decompressor.unused_data:
        raise ArchiveInvalid("the payload is truncated or followed by other data")
    if pending:
        raise ArchiveInvalid("the payload does not end with a newline")


def _check_payload(
    lines: Iterator[bytes], statement: ArchiveStatement, origin: str, public_key: bytes
) -> ArchiveReport:
    try:
        header = json.loads(next(lines))
    except (StopIteration, ValueError):
        raise ArchiveInvalid("the payload has no header line") from None
    if not isinstance(header, dict) or header.get("format") != ARCHIVE_FORMAT:
        raise ArchiveInvalid(f"the payload header is not a {ARCHIVE_FORMAT} header")
    first, end = statement.first_leaf, statement.end_leaf
    expected = {
        "origin": origin,
        "first_leaf": first,
        "end_leaf": end,
        "created": format_timestamp(statement.created_at),
    }
    for field, value in expected.items():
        if header.get(field) != value:
            raise ArchiveInvalid(f"the header's {field} differs from the signed statement's")
    checkpoint = _open_checkpoint(header.get("checkpoint"), origin, public_key, "checkpoint")
    latest = _open_checkpoint(header.get("latest_checkpoint"), origin, public_key, "later head")
    if checkpoint.size != end or checkpoint.root_hash != statement.root_hash:
        raise ArchiveInvalid(f"the checkpoint is not the signed tree of {end} leaves")
    try:
        proof = _hashes(header.get("consistency_proof"))
        verify_consistency(end, latest.size, proof, checkpoint.root_hash, latest.root_hash)
    except (ProofInvalid, ValueError):
        raise ArchiveInvalid(
            f"the consistency proof from size {end} to the later head at size {latest.size} "
            "does not verify"
        ) from None
    try:
        compact = CompactRange(first, _hashes(header.get("prefix")))
    except ValueError:
        raise ArchiveInvalid(
            f"the header's prefix is not the {len(frontier_keys(first))} subtree hashes of a tree "
            f"of {first} leaves"
        ) from None
    scan = _FileScan(first, compact)
    for line in lines:
        scan.add(line)
    if compact.size != end:
        raise ArchiveInvalid(
            f"the file holds {compact.size - first} events but its statement says {end - first}"
        )
    if compact.root() != checkpoint.root_hash:
        raise ArchiveInvalid("the events do not hash to the root of the signed checkpoint")
    return ArchiveReport(
        origin=origin,
        first_leaf=first,
        end_leaf=end,
        created_at=statement.created_at,
        root_hash=checkpoint.root_hash,
        checkpoint=header["checkpoint"],
        first_seq=scan.first_seq,
        last_seq=scan.last_seq,
        first_recorded=scan.first_recorded,
        last_recorded=scan.last_recorded,
        linked_size=latest.size,
    )


def _open_checkpoint(note: object, origin: str, public_key: bytes, what: str) -> Checkpoint:
    if not isinstance(note, str):
        raise ArchiveInvalid(f"the header has no {what}")
    try:
        return parse_checkpoint(note).verify(key_name=origin, public_key=public_key)
    except MalformedCheckpoint as exc:
        raise ArchiveInvalid(f"the {what} is malformed: {exc.message}") from None
    except SignatureInvalid:
        raise ArchiveInvalid(f"the {what} is not signed by the log key {origin}") from None


def _hashes(value: object) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("not a list of base64 hashes")
    try:
        return [base64.b64decode(v, validate=True) for v in value]
    except binascii.Error:
        raise ValueError("not a list of base64 hashes") from None


class _FileScan:
    """The event lines of an archive file, folded into the tree as they are read."""

    def __init__(self, first: int, compact: CompactRange) -> None:
        self._compact = compact
        self._position = first
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.first_recorded: datetime | None = None
        self.last_recorded: datetime | None = None

    def add(self, line: bytes) -> None:
        position = self._position
        parts = line.split(b"\t", 2)
        if len(parts) != 3 or not (_DECIMAL.fullmatch(parts[0]) and _DECIMAL.fullmatch(parts[1])):
            raise ArchiveInvalid(f"the line for leaf {position} is not LEAF TAB SEQ TAB ENTRY")
        leaf, seq, entry = int(parts[0]), int(parts[1]), parts[2]
        if leaf != position:
            raise ArchiveInvalid(f"leaf {leaf} is where leaf {position} belongs")
        try:
            document = json.loads(entry)
        except ValueError:
            raise ArchiveInvalid(f"the entry of leaf {leaf} is not JSON") from None
        if not isinstance(document, dict) or document.get("seq") != seq:
            raise ArchiveInvalid(f"the entry of leaf {leaf} is not the event with seq {seq}")
        event = document.get("event")
        recorded = event.get("recorded") if isinstance(event, dict) else None
        moment = _moment(recorded)
        self._compact.append(leaf_hash(entry))
        if self.first_seq is None:
            self.first_seq, self.first_recorded = seq, moment
        self.last_seq, self.last_recorded = seq, moment
        self._position += 1


def _moment(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _check_against_live(
    report: ArchiveReport, session: Session, origin: str, public_key: bytes
) -> ArchiveReport:
    """Link a verified archive to the live log: its record, and consistency with the live head."""
    record = session.scalars(
        select(AuditArchive).where(AuditArchive.first_leaf == report.first_leaf)
    ).first()
    name = report.path.name if report.path is not None else "the archive"
    if record is None or record.end_leaf != report.end_leaf:
        raise ArchiveInvalid(
            f"{name}: the live log has no record of an archive of leaves "
            f"{report.first_leaf}..{report.end_leaf - 1}"
        )
    if record.file_sha256 != report.file_sha256:
        raise ArchiveInvalid(
            f"{name}: the live log recorded a different file for leaves "
            f"{report.first_leaf}..{report.end_leaf - 1} (SHA-256 {record.file_sha256.hex()})"
        )
    latest = _latest_head(session, origin, public_key)
    if latest is None or latest.size < report.end_leaf:
        raise ArchiveInvalid(
            f"{name}: the live log's signed heads do not reach the archive's {report.end_leaf} "
            "leaves: it was rolled back"
        )
    assert report.root_hash is not None  # noqa: S101 - a verified archive has its root.
    try:
        proof = (
            consistency_proof(report.end_leaf, latest.size, DatabaseTree(session))
            if latest.size > report.end_leaf
            else []
        )
        verify_consistency(report.end_leaf, latest.size, proof, report.root_hash, latest.root_hash)
    except (ProofInvalid, AuditLogCorrupted):
        raise ArchiveInvalid(
            f"{name}: the archive's tree of {report.end_leaf} leaves is not a prefix of the live "
            f"log's signed head at size {latest.size}"
        ) from None
    return replace(report, live_size=latest.size)


__all__ = [
    "ARCHIVE_FORMAT",
    "ArchiveExists",
    "ArchiveInvalid",
    "ArchiveReport",
    "ArchiveSignatureInvalid",
    "ArchiveStatement",
    "RetentionNotElapsed",
    "RetentionPolicy",
    "RetentionTooShort",
    "archive_before",
    "open_statement",
    "retention_policy",
    "sign_statement",
    "verify_archive",
]
