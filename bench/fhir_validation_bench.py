"""FHIR R4 validation throughput on the HL7 R4 examples and the Synthea bundles (one core).

Prints resources per second for :func:`medcollab.records.validation.validate_resource`, the
acceptance counts, and two ratios measured in the same run: validation time against the time to
parse the same JSON (the cost every import pays anyway), and, when ``fhir.resources`` is installed,
its R4B pydantic models on the same resources (a peer the project does not depend on).

Run: ``python -m bench.fhir_validation_bench [--data DIR] [--repeat N]``. It stays under a minute.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medcollab.records.validation import InvalidResource, validate_resource

_REPO = Path(__file__).resolve().parents[1]
_DATA_CANDIDATES = (
    Path(os.environ.get("MEDCOLLAB_FHIR_DATA", "/nonexistent")),
    _REPO.parent / "shared" / "data" / "fhir",
    _REPO / "shared" / "data" / "fhir",
)


def _data_dir(given: Path | None) -> Path:
    for candidate in (given,) if given else _DATA_CANDIDATES:
        if candidate is not None and (candidate / "hl7-r4-examples").is_dir():
            return candidate
    raise SystemExit("FHIR test data not found; pass --data DIR (holding hl7-r4-examples/)")


def _load(folder: Path) -> list[tuple[str, str]]:
    return [
        (path.name, path.read_text(encoding="utf-8"))
        for path in sorted(folder.glob("*.json"))
        if path.name != "package.json.orig"
    ]


def _best(repeat: int, run: Callable[[], object]) -> float:
    """The fastest of ``repeat`` runs: the least disturbed by whatever else the machine does."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _validate_all(resources: Sequence[Any]) -> int:
    failures = 0
    for resource in resources:
        try:
            validate_resource(resource)
        except InvalidResource:
            failures += 1
    return failures


def _peer() -> Callable[[Any], object] | None:
    try:
        module = importlib.import_module("fhir.resources.R4B")
    except ImportError:
        return None
    get_class = module.get_fhir_model_class

    def validate(resource: Any) -> object:
        return get_class(resource["resourceType"]).model_validate(resource)

    return validate


def _peer_all(validate: Callable[[Any], object], resources: Sequence[Any]) -> int:
    failures = 0
    for resource in resources:
        try:
            validate(resource)
        except Exception:  # noqa: BLE001 - any refusal, including an unknown R4-only type.
            failures += 1
    return failures


def _report(
    label: str, texts: Sequence[str], resources: Sequence[Any], units: int, repeat: int
) -> None:
    validate_resource(resources[0])  # Loads the model outside the timed runs.
    parse = _best(repeat, lambda: [json.loads(text) for text in texts])
    ours = _best(repeat, lambda: _validate_all(resources))
    failures = _validate_all(resources)
    print(f"{label}: {len(resources)} documents, {units} resources")
    print(f"  medcollab validate_resource: {units / ours:10.0f} resources/s  ({ours:.3f} s)")
    print(f"  rejected: {failures}")
    print(f"  json.loads of the same text:  {units / parse:10.0f} resources/s  ({parse:.3f} s)")
    print(f"  ratio validation / parsing:   {ours / parse:10.2f}")
    peer = _peer()
    if peer is None:
        print("  fhir.resources (R4B) not installed: peer comparison skipped")
        return
    # The peer validates Synthea per entry (its Bundle model would count the bundle once).
    subjects = (
        [entry["resource"] for bundle in resources for entry in bundle.get("entry", [])]
        if label.startswith("Synthea")
        else list(resources)
    )
    theirs = _best(1, lambda: _peer_all(peer, subjects))
    rejected = _peer_all(peer, subjects)
    print(f"  fhir.resources R4B models:    {len(subjects) / theirs:10.0f} resources/s")
    print(f"  rejected by R4B models: {rejected}")
    speed_ratio = (units / ours) / (len(subjects) / theirs)
    print(f"  ratio medcollab speed / R4B:  {speed_ratio:10.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    data = _data_dir(args.data)
    examples = _load(data / "hl7-r4-examples")
    example_texts = [text for _, text in examples]
    example_resources = [json.loads(text) for text in example_texts]
    _report(
        "HL7 R4 examples",
        example_texts,
        example_resources,
        len(example_resources),
        args.repeat,
    )
    bundles = _load(data / "synthea-r4")
    bundle_texts = [text for _, text in bundles]
    bundle_resources = [json.loads(text) for text in bundle_texts]
    entries = sum(len(bundle.get("entry", [])) for bundle in bundle_resources)
    _report("Synthea bundles", bundle_texts, bundle_resources, entries, args.repeat)


if __name__ == "__main__":
    main()
