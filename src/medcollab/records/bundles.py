"""Bundles: transaction (all or nothing), batch (each entry on its own), and response shapes.

A transaction resolves ``urn:uuid:`` full URLs to server-assigned ids before anything is written,
refuses references to ``urn:uuid:`` entries that are not in the Bundle, and runs inside one
savepoint: if any entry fails, every entry is undone and the error names the entry.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Final

from medcollab.errors import InvalidInput, MedcollabError
from medcollab.records.repository import RecordRepository, StoredResource

BASE: Final = "/fhir/R4"
MAX_ENTRIES: Final = 10_000
_METHOD_ORDER: Final = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}


class TransactionFailed(MedcollabError):
    """One entry of a transaction failed; nothing of the transaction was kept.

    Its HTTP status is the failing entry's. Writes are "kept" because after the transaction's
    savepoint is rolled back the only write left is the audit event recording the failure.
    """

    code = "transaction_failed"
    keeps_writes = True

    def __init__(self, index: int, inner: MedcollabError) -> None:
        super().__init__(f"Bundle.entry[{index}] failed: {inner.message}", hint=inner.hint)
        self.index = index
        self.inner = inner


def searchset(resources: list[StoredResource], *, total: int) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "entry": [
            {
                "fullUrl": f"{BASE}/{r.resource_type}/{r.resource_id}",
                "resource": r.body,
                "search": {"mode": "match"},
            }
            for r in resources
        ],
    }


def history_bundle(versions: list[StoredResource]) -> dict[str, Any]:
    entries = []
    for v in versions:
        entry: dict[str, Any] = {
            "fullUrl": f"{BASE}/{v.resource_type}/{v.resource_id}",
            "request": {
                "method": "DELETE" if v.deleted else ("POST" if v.version == 1 else "PUT"),
                "url": f"{v.resource_type}/{v.resource_id}",
            },
            "response": {
                "status": "204" if v.deleted else ("201" if v.version == 1 else "200"),
                "etag": f'W/"{v.version}"',
            },
        }
        if v.body is not None:
            entry["resource"] = v.body
        entries.append(entry)
    return {"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries}


def _rewrite_references(node: Any, mapping: dict[str, str], missing: set[str]) -> Any:
    """Replace ``urn:uuid:`` references with ``Type/id``; collect the unresolved ones."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value.startswith("urn:uuid:"):
                if value in mapping:
                    out[key] = mapping[value]
                else:
                    missing.add(value)
                    out[key] = value
            else:
                out[key] = _rewrite_references(value, mapping, missing)
        return out
    if isinstance(node, list):
        return [_rewrite_references(item, mapping, missing) for item in node]
    return node


def _entries(data: object) -> tuple[str, list[dict[str, Any]]]:
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise InvalidInput("POST to the base URL takes a Bundle of type transaction or batch")
    kind = data.get("type")
    if kind not in ("transaction", "batch"):
        raise InvalidInput("Bundle.type must be 'transaction' or 'batch'")
    entries = data.get("entry") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidInput("Bundle.entry must be a list of entries")
    if len(entries) > MAX_ENTRIES:
        raise InvalidInput(f"a Bundle may hold at most {MAX_ENTRIES} entries")
    return kind, entries


def _plan(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Assign ids to POSTed entries and map every urn:uuid full URL to ``Type/id``."""
    mapping: dict[str, str] = {}
    planned: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        request = entry.get("request") or {}
        method = str(request.get("method", "")).upper()
        url = str(request.get("url", ""))
        if method not in _METHOD_ORDER:
            raise InvalidInput(
                f"Bundle.entry[{index}].request.method must be GET, POST, PUT or DELETE"
            )
        resource = entry.get("resource")
        full_url = entry.get("fullUrl")
        new_id = None
        if method == "POST":
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                raise InvalidInput(f"Bundle.entry[{index}].resource is required for POST")
            new_id = str(uuid.uuid4())
            if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                mapping[full_url] = f"{resource['resourceType']}/{new_id}"
        planned.append(
            {
                "index": index,
                "method": method,
                "url": url,
                "resource": resource,
                "new_id": new_id,
                "if_match": request.get("ifMatch"),
            }
        )
    planned.sort(key=lambda e: (_METHOD_ORDER[str(e["method"])], int(e["index"])))
    return planned, mapping


def _split_url(url: str, index: int) -> tuple[str, str | None]:
    path = url.split("?", 1)[0].strip("/")
    if path.startswith("fhir/R4/"):
        path = path[len("fhir/R4/") :]
    parts = path.split("/")
    if not parts or not parts[0]:
        raise InvalidInput(f"Bundle.entry[{index}].request.url is empty")
    return parts[0], parts[1] if len(parts) > 1 else None


def _execute(repo: RecordRepository, entry: dict[str, Any]) -> dict[str, Any]:
    index, method = entry["index"], entry["method"]
    resource_type, resource_id = _split_url(entry["url"], index)
    if method == "POST":
        stored = repo.create(entry["resource"], resource_id=entry["new_id"])
        return _response(stored, "201 Created")
    if resource_id is None:
        if method == "GET":
            page = repo.search(resource_type, {})
            return {
                "resource": searchset(page.entries, total=page.total),
                "response": {"status": "200 OK"},
            }
        raise InvalidInput(f"Bundle.entry[{index}].request.url needs Type/id for {method}")
    if method == "PUT":
        if_match = entry.get("if_match")
        version = None
        if isinstance(if_match, str):
            digits = "".join(ch for ch in if_match if ch.isdigit())
            version = int(digits) if digits else None
        stored = repo.update(resource_type, resource_id, entry["resource"], if_match=version)
        return _response(stored, "200 OK")
    if method == "DELETE":
        repo.delete(resource_type, resource_id)
        return {"response": {"status": "204 No Content"}}
    stored = repo.read(resource_type, resource_id)
    return _response(stored, "200 OK")


def _response(stored: StoredResource, status: str) -> dict[str, Any]:
    return {
        "fullUrl": f"{BASE}/{stored.resource_type}/{stored.resource_id}",
        "resource": stored.body,
        "response": {
            "status": status,
            "location": f"{stored.resource_type}/{stored.resource_id}/_history/{stored.version}",
            "etag": f'W/"{stored.version}"',
        },
    }


def _transaction(
    repo: RecordRepository,
    planned: list[dict[str, Any]],
    total: int,
    on_entry: Callable[[], None] | None,
) -> dict[int, dict[str, Any]]:
    responses: dict[int, dict[str, Any]] = {}
    savepoint = repo.session.begin_nested()
    try:
        for entry in planned:
            try:
                responses[entry["index"]] = _execute(repo, entry)
            except MedcollabError as exc:
                raise TransactionFailed(entry["index"], exc) from exc
            if on_entry:
                on_entry()
    except TransactionFailed as failure:
        savepoint.rollback()
        repo.record_transaction(total, failure.message, success=False)
        raise
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    repo.record_transaction(total, "transaction-committed", success=True)
    return responses


def _batch(
    repo: RecordRepository,
    planned: list[dict[str, Any]],
    missing: set[str],
    status_for: Callable[[MedcollabError], int],
    on_entry: Callable[[], None] | None,
) -> dict[int, dict[str, Any]]:
    responses: dict[int, dict[str, Any]] = {}
    for entry in planned:
        savepoint = repo.session.begin_nested()
        try:
            if missing & _refs_in(entry["resource"]):
                raise InvalidInput("the entry references a urn:uuid that is not in the Bundle")
            responses[entry["index"]] = _execute(repo, entry)
            savepoint.commit()
        except MedcollabError as exc:
            savepoint.rollback()
            responses[entry["index"]] = {
                "response": {
                    "status": str(status_for(exc)),
                    "outcome": {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {"severity": "error", "code": "processing", "diagnostics": exc.message}
                        ],
                    },
                }
            }
        if on_entry:
            on_entry()
    return responses


def process(
    repo: RecordRepository,
    data: object,
    *,
    status_for: Callable[[MedcollabError], int],
    on_entry: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run a transaction or batch Bundle and return its response Bundle."""
    kind, entries = _entries(data)
    planned, mapping = _plan(entries)
    missing: set[str] = set()
    for entry in planned:
        if entry["resource"] is not None:
            entry["resource"] = _rewrite_references(entry["resource"], mapping, missing)
    if kind == "transaction":
        if missing:
            raise InvalidInput(
                f"the transaction references {len(missing)} urn:uuid entries that are not in it "
                f"(first: {sorted(missing)[0][:60]})"
            )
        responses = _transaction(repo, planned, len(entries), on_entry)
    else:
        responses = _batch(repo, planned, missing, status_for, on_entry)
    return {
        "resourceType": "Bundle",
        "type": f"{kind}-response",
        "entry": [responses[i] for i in range(len(entries))],
    }


def _refs_in(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.add(value)
            else:
                found |= _refs_in(value)
    elif isinstance(node, list):
        for item in node:
            found |= _refs_in(item)
    return found
