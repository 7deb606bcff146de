"""Importing FHIR R4 resources and Bundles (Synthea transactions, the HL7 examples) idempotently.

Each file is imported in its own savepoint: a file either lands whole or not at all, and a failing
file is reported with its reason while the import goes on. Ids are assigned by the server; the
source's ``fullUrl`` (or ``Type/id`` for a bare resource) is remembered per organisation as a keyed
hash, so running the same import again creates nothing new, and references between files (an HL7
example Observation pointing at ``Patient/example``) resolve to the ids the earlier files got.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sqlalchemy import select

from medcollab.crypto.keys import KeyRing, Purpose
from medcollab.errors import InvalidInput, MedcollabError
from medcollab.records.models import FhirSourceRef
from medcollab.records.repository import RecordRepository

MAX_FILE_BYTES: Final = 64 * 1024 * 1024
_LOOKUP_BATCH: Final = 500
#: Resources that others point at are imported first, so their references resolve.
_FIRST: Final = ("Organization", "Location", "Practitioner", "PractitionerRole", "Patient")


@dataclass
class FileResult:
    path: Path
    created: int = 0
    unchanged: int = 0
    error: str | None = None


@dataclass
class ImportReport:
    files: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def created(self) -> int:
        return sum(f.created for f in self.files)

    @property
    def unchanged(self) -> int:
        return sum(f.unchanged for f in self.files)

    @property
    def failed(self) -> list[FileResult]:
        return [f for f in self.files if f.error]

    @property
    def rate(self) -> float:
        return self.created / self.seconds if self.seconds > 0 else 0.0


def collect(paths: list[Path]) -> list[Path]:
    """Every ``*.json`` file under the given files and folders, sorted so first-class resources
    (Patients, Practitioners, Organizations) come before those that refer to them."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.json") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidInput(f"{path} does not exist")

    def rank(path: Path) -> tuple[int, str]:
        stem = path.name.split("-", 1)[0]
        return (_FIRST.index(stem) if stem in _FIRST else len(_FIRST), str(path))

    return sorted(dict.fromkeys(files), key=rank)


def _entries(data: Any) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(source key, resource) pairs: Bundle entries by fullUrl, or one bare resource."""
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise InvalidInput("not a FHIR resource (no resourceType)")
    # Transaction and batch Bundles are instructions: their entries are imported. Every other
    # Bundle (document, message, collection, ...) is a resource in its own right and stored whole.
    if data["resourceType"] == "Bundle" and data.get("type") in ("transaction", "batch"):
        for index, entry in enumerate(data.get("entry") or []):
            resource = (entry or {}).get("resource")
            method = str(((entry or {}).get("request") or {}).get("method", "")).upper()
            if resource is None and method in ("GET", "HEAD", "DELETE"):
                # Requests that read or delete carry no data to import.
                continue
            if not isinstance(resource, dict):
                raise InvalidInput(f"Bundle.entry[{index}] has no resource")
            full_url = entry.get("fullUrl")
            key = full_url if isinstance(full_url, str) else _bare_key(resource)
            yield key, resource
        return
    yield _bare_key(data), data


def _collect_references(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.add(value)
            else:
                _collect_references(value, found)
    elif isinstance(node, list):
        for item in node:
            _collect_references(item, found)


def _bare_key(resource: dict[str, Any]) -> str | None:
    rid = resource.get("id")
    return f"{resource['resourceType']}/{rid}" if isinstance(rid, str) else None


class Importer:
    def __init__(
        self,
        *,
        repo_scope: Callable[[], AbstractContextManager[RecordRepository]],
        keyring: KeyRing,
        org_id: uuid.UUID,
    ) -> None:
        """``repo_scope`` opens one unit of work per file and yields a system-context repository."""
        self._repo_scope = repo_scope
        self._keys = keyring
        self._org = org_id

    def _hash(self, source: str) -> str:
        return self._keys.keyed_hash(Purpose.SOURCE_REFERENCE, f"{self._org}:{source}")

    def _known(self, repo: RecordRepository, sources: set[str]) -> dict[str, str]:
        """Which of ``sources`` earlier imports already stored, as ``Type/id`` (batched lookups)."""
        by_hash = {self._hash(source): source for source in sources}
        found: dict[str, str] = {}
        hashes = sorted(by_hash)
        for start in range(0, len(hashes), _LOOKUP_BATCH):
            rows = repo.session.execute(
                select(
                    FhirSourceRef.ref_hash, FhirSourceRef.resource_type, FhirSourceRef.resource_id
                ).where(
                    FhirSourceRef.org_id == self._org,
                    FhirSourceRef.ref_hash.in_(hashes[start : start + _LOOKUP_BATCH]),
                )
            )
            for ref_hash, resource_type, resource_id in rows:
                found[by_hash[ref_hash]] = f"{resource_type}/{resource_id}"
        return found

    def _rewrite(self, node: Any, mapping: dict[str, str]) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    out[key] = mapping.get(value, value)
                else:
                    out[key] = self._rewrite(value, mapping)
            return out
        if isinstance(node, list):
            return [self._rewrite(item, mapping) for item in node]
        return node

    def import_file(self, path: Path, repo: RecordRepository) -> FileResult:
        result = FileResult(path)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise InvalidInput(f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
            try:
                data = json.loads(path.read_bytes())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidInput(f"not valid JSON ({type(exc).__name__})") from None
            entries = list(_entries(data))
            references: set[str] = set()
            for _source, resource in entries:
                _collect_references(resource, references)
            sources = {source for source, _resource in entries if source}
            known = self._known(repo, sources | references)
            # Every new entry gets its id first, so references inside the file resolve.
            local: dict[str, str] = {}
            plan: list[tuple[str | None, dict[str, Any], str]] = []
            for source, resource in entries:
                if source and source in known:
                    result.unchanged += 1
                    local[source] = known[source]
                    continue
                new_id = str(uuid.uuid4())
                target = f"{resource['resourceType']}/{new_id}"
                if source:
                    local[source] = target
                    bare = _bare_key(resource)
                    if bare:
                        local.setdefault(bare, target)
                plan.append((source, resource, new_id))
            mapping = {**known, **local}
            with repo.session.begin_nested():
                for source, resource, new_id in plan:
                    body = self._rewrite({k: v for k, v in resource.items() if k != "id"}, mapping)
                    stored = repo.create(body, resource_id=new_id)
                    if source:
                        repo.session.add(
                            FhirSourceRef(
                                org_id=self._org,
                                ref_hash=self._hash(source),
                                resource_type=stored.resource_type,
                                resource_id=stored.resource_id,
                            )
                        )
                    result.created += 1
                repo.session.flush()
        except MedcollabError as exc:
            result.error = _describe(exc)
            result.created = 0
        return result

    def run(
        self, files: list[Path], on_file: Callable[[FileResult], None] | None = None
    ) -> ImportReport:
        report = ImportReport()
        started = time.perf_counter()
        for path in files:
            with self._repo_scope() as repo:
                result = self.import_file(path, repo)
            report.files.append(result)
            if on_file:
                on_file(result)
        report.seconds = time.perf_counter() - started
        return report


def _describe(exc: MedcollabError) -> str:
    issues = getattr(exc, "issues", None)
    if issues:
        first = issues[0]
        more = f" (+{len(issues) - 1} more)" if len(issues) > 1 else ""
        return f"{getattr(first, 'path', '')}: {getattr(first, 'message', '')}{more}"
    return exc.message
