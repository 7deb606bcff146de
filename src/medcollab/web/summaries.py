"""What a person sees of a FHIR record: plain display rows and a vital-signs chart.

Everything here is a pure function of resources that the records repository has already decided,
decrypted and masked; nothing reads the database. Resource content is untrusted (it came from
clinicians, imports and partners), so every value is read defensively and rendered by the
autoescaping templates as text. The chart is computed here as coordinates and drawn by the template
as inline SVG: no JavaScript library, nothing inline that the page's CSP would refuse.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from medcollab.web.i18n import N_

#: LOINC codes of the vital signs the chart draws, their series and unit. Blood pressure panels
#: (85354-9) carry systolic and diastolic values as components.
VITAL_SERIES: Final = {
    "8867-4": ("heart-rate", N_("Heart rate"), "/min"),
    "9279-1": ("respiratory-rate", N_("Respiratory rate"), "/min"),
    "8310-5": ("temperature", N_("Body temperature"), "°C"),
    "8480-6": ("blood-pressure", N_("Systolic"), "mmHg"),
    "8462-4": ("blood-pressure", N_("Diastolic"), "mmHg"),
    "59408-5": ("oxygen-saturation", N_("Oxygen saturation"), "%"),
    "2708-6": ("oxygen-saturation", N_("Oxygen saturation"), "%"),
    "29463-7": ("weight", N_("Body weight"), "kg"),
    "39156-5": ("bmi", N_("Body mass index"), "kg/m²"),
}
CHART_TITLES: Final = {
    "heart-rate": N_("Heart rate"),
    "respiratory-rate": N_("Respiratory rate"),
    "temperature": N_("Body temperature"),
    "blood-pressure": N_("Blood pressure"),
    "oxygen-saturation": N_("Oxygen saturation"),
    "weight": N_("Body weight"),
    "bmi": N_("Body mass index"),
}
#: FHIR status and criticality codes as a person reads them; other codes are shown as they are.
CODE_LABELS: Final = {
    "active": N_("active"),
    "inactive": N_("inactive"),
    "resolved": N_("resolved"),
    "remission": N_("in remission"),
    "recurrence": N_("recurrence"),
    "relapse": N_("relapse"),
    "final": N_("final"),
    "preliminary": N_("preliminary"),
    "amended": N_("amended"),
    "corrected": N_("corrected"),
    "registered": N_("registered"),
    "completed": N_("completed"),
    "stopped": N_("stopped"),
    "on-hold": N_("on hold"),
    "cancelled": N_("cancelled"),
    "draft": N_("draft"),
    "intended": N_("intended"),
    "entered-in-error": N_("entered in error"),
    "unknown": N_("unknown"),
    "low": N_("low risk"),
    "high": N_("high risk"),
    "unable-to-assess": N_("unable to assess"),
    "male": N_("male"),
    "female": N_("female"),
    "other": N_("other"),
}
#: Names for the LOINC codes the vital-signs chart knows, for observations that carry only the
#: code (imports often do).
LOINC_NAMES: Final = {
    **{code: name for code, (_key, name, _unit) in VITAL_SERIES.items()},
    "8480-6": N_("Systolic blood pressure"),
    "8462-4": N_("Diastolic blood pressure"),
    "85354-9": N_("Blood pressure"),
    "8302-2": N_("Body height"),
}
_BP_PANEL: Final = "85354-9"
_MAX_ROWS: Final = 200

# Chart geometry, in SVG user units (the SVG scales to its container).
WIDTH: Final = 640
HEIGHT: Final = 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 16, 36


# Reading untrusted resources ----------------------------------------------------------------------


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def concept_text(concept: Any) -> str:
    """A CodeableConcept as a person reads it: its text, else a coding's display, else a code."""
    concept = _dict(concept)
    if _str(concept.get("text")):
        return _str(concept.get("text"))
    for coding in _list(concept.get("coding")):
        display = _str(_dict(coding).get("display"))
        if display:
            return display
    for coding in _list(concept.get("coding")):
        code = _str(_dict(coding).get("code"))
        if code:
            return code
    return ""


def observation_name(concept: Any) -> str:
    """An observation's name: its own text or display, else the name of a known LOINC code (an
    untranslated message, which the template translates), else its code."""
    concept = _dict(concept)
    if _str(concept.get("text")):
        return _str(concept.get("text"))
    codings = [_dict(c) for c in _list(concept.get("coding"))]
    for coding in codings:
        if _str(coding.get("display")):
            return _str(coding.get("display"))
    for coding in codings:
        if _str(coding.get("code")) in LOINC_NAMES:
            return LOINC_NAMES[_str(coding.get("code"))]
    return concept_text(concept)


def _codes(concept: Any) -> set[str]:
    return {_str(_dict(c).get("code")) for c in _list(_dict(concept).get("coding"))} - {""}


def _status(concept_or_code: Any) -> str:
    if isinstance(concept_or_code, str):
        return concept_or_code
    return concept_text(concept_or_code)


def parse_time(text: Any) -> datetime | None:
    """A FHIR date or dateTime as an aware datetime (dates at midnight UTC), else None."""
    if not isinstance(text, str) or not text:
        return None
    value = text.replace("Z", "+00:00")
    if len(value) == 4:
        value += "-01-01"
    elif len(value) == 7:
        value += "-01"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def human_name(patient: Mapping[str, Any] | None) -> str:
    """The patient's first name entry; CJK names are written family name first, without a space."""
    for entry in _list(_dict(patient).get("name")):
        name = _dict(entry)
        if _str(name.get("text")):
            return _str(name.get("text"))
        family = _str(name.get("family"))
        given = " ".join(_str(g) for g in _list(name.get("given")) if _str(g))
        if family and given and any("\u4e00" <= ch <= "\u9fff" for ch in family + given):
            return family + given.replace(" ", "")
        return " ".join(part for part in (given, family) if part)
    return ""


def quantity_text(resource: Mapping[str, Any]) -> str:  # noqa: PLR0911 - one per value[x] kind.
    """An Observation's (or component's) value as text: quantity with unit, string, concept."""
    quantity = _dict(resource.get("valueQuantity"))
    if quantity:
        value = quantity.get("value")
        unit = _str(quantity.get("unit")) or _str(quantity.get("code"))
        if isinstance(value, int | float):
            return f"{value:g} {unit}".strip()
    for key in ("valueString", "valueDateTime", "valueTime"):
        if _str(resource.get(key)):
            return _str(resource.get(key))
    if isinstance(resource.get("valueBoolean"), bool):
        return str(resource["valueBoolean"]).lower()
    if isinstance(resource.get("valueInteger"), int):
        return str(resource["valueInteger"])
    if resource.get("valueCodeableConcept"):
        return concept_text(resource.get("valueCodeableConcept"))
    pressure = _blood_pressure_text(resource)
    if pressure:
        return pressure
    parts = []
    for item in _list(resource.get("component")):
        component = _dict(item)
        label, value_text = concept_text(component.get("code")), quantity_text(component)
        if value_text:
            parts.append(f"{label} {value_text}".strip())
    return " / ".join(parts)


def _blood_pressure_text(resource: Mapping[str, Any]) -> str:
    """A blood pressure panel as it is written: systolic/diastolic unit."""
    values: dict[str, tuple[float, str]] = {}
    for item in _list(resource.get("component")):
        component = _dict(item)
        quantity = _dict(component.get("valueQuantity"))
        value = quantity.get("value")
        if isinstance(value, int | float) and not isinstance(value, bool):
            for code in _codes(component.get("code")) & {"8480-6", "8462-4"}:
                values[code] = (float(value), _str(quantity.get("unit")))
    if len(values) != 2:
        return ""
    (systolic, unit), (diastolic, _unit) = values["8480-6"], values["8462-4"]
    return f"{systolic:g}/{diastolic:g} {unit}".strip()


# Display rows --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a record table: what, a detail, a status, and when."""

    title: str
    detail: str = ""
    status: str = ""
    when: datetime | None = None
    #: The resource's security labels (PSY, HIV, ...), shown so a patient knows what is sensitive.
    labels: tuple[str, ...] = ()
    redacted: bool = False


def _labels(resource: Mapping[str, Any]) -> tuple[str, ...]:
    security = _list(_dict(resource.get("meta")).get("security"))
    return tuple(sorted({_str(_dict(s).get("code")) for s in security} - {"", "REDACTED"}))


def _redacted(resource: Mapping[str, Any]) -> bool:
    security = _list(_dict(resource.get("meta")).get("security"))
    return any(_dict(s).get("code") == "REDACTED" for s in security)


def _row(resource: Mapping[str, Any], title: str, detail: str, status: str, when: Any) -> Row:
    return Row(
        title=title,
        detail=detail,
        status=status,
        when=parse_time(when),
        labels=_labels(resource),
        redacted=_redacted(resource),
    )


def condition_row(r: Mapping[str, Any]) -> Row:
    onset = (
        r.get("onsetDateTime") or _dict(r.get("onsetPeriod")).get("start") or r.get("recordedDate")
    )
    severity = concept_text(r.get("severity"))
    return _row(r, concept_text(r.get("code")), severity, _status(r.get("clinicalStatus")), onset)


def medication_row(r: Mapping[str, Any]) -> Row:
    medication = concept_text(r.get("medicationCodeableConcept")) or _str(
        _dict(r.get("medicationReference")).get("display")
    )
    dosage = _list(r.get("dosageInstruction") or r.get("dosage"))
    detail = _str(_dict(dosage[0]).get("text")) if dosage else ""
    when = r.get("authoredOn") or r.get("effectiveDateTime") or r.get("dateAsserted")
    return _row(r, medication, detail, _status(r.get("status")), when)


def allergy_row(r: Mapping[str, Any]) -> Row:
    reactions = []
    for reaction in _list(r.get("reaction")):
        for manifestation in _list(_dict(reaction).get("manifestation")):
            text = concept_text(manifestation)
            if text:
                reactions.append(text)
    detail = ", ".join(reactions)
    status = _str(r.get("criticality")) or _status(r.get("clinicalStatus"))
    when = r.get("recordedDate") or r.get("onsetDateTime")
    return _row(r, concept_text(r.get("code")), detail, status, when)


def observation_row(r: Mapping[str, Any]) -> Row:
    when = (
        r.get("effectiveDateTime")
        or _dict(r.get("effectivePeriod")).get("start")
        or r.get("issued")
    )
    return _row(
        r, observation_name(r.get("code")), quantity_text(r), _status(r.get("status")), when
    )


def _newest_first(rows: Iterable[Row]) -> list[Row]:
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(rows, key=lambda row: row.when or epoch, reverse=True)[:_MAX_ROWS]


# The chart -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    x: float
    y: float
    value: float
    when: datetime


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    css: str
    points: tuple[Point, ...]

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str
    when: datetime | None = None
    #: SVG text-anchor: the first date starts at the axis, the last ends at the chart's edge.
    anchor: str = "middle"


@dataclass(frozen=True, slots=True)
class Chart:
    key: str
    title: str
    unit: str
    series: tuple[Series, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    right: int = WIDTH - _RIGHT
    top: int = _TOP
    bottom: int = HEIGHT - _BOTTOM


def _vital_values(observation: Mapping[str, Any]) -> list[tuple[str, float, str]]:
    """(LOINC code, value, unit) for each vital sign an Observation carries."""
    found: list[tuple[str, float, str]] = []
    codes = _codes(observation.get("code"))
    candidates: list[tuple[set[str], Mapping[str, Any]]] = [(codes, observation)]
    if _BP_PANEL in codes:
        candidates += [
            (_codes(_dict(c).get("code")), _dict(c)) for c in _list(observation.get("component"))
        ]
    for item_codes, item in candidates:
        quantity = _dict(item.get("valueQuantity"))
        value = quantity.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        for code in item_codes & set(VITAL_SERIES):
            found.append((code, float(value), _str(quantity.get("unit"))))
            break
    return found


def vital_charts(observations: Iterable[Mapping[str, Any]]) -> list[Chart]:
    """One small chart per vital sign, with a line per series (systolic and diastolic share one)."""
    samples: dict[str, dict[str, list[tuple[datetime, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    units: dict[str, str] = {}
    for observation in observations:
        when = parse_time(
            observation.get("effectiveDateTime")
            or _dict(observation.get("effectivePeriod")).get("start")
            or observation.get("issued")
        )
        if when is None or observation.get("status") in ("entered-in-error", "cancelled"):
            continue
        for code, value, unit in _vital_values(observation):
            key, series_name, default_unit = VITAL_SERIES[code]
            samples[key][series_name].append((when, value))
            units.setdefault(key, unit or default_unit)
    charts = []
    for key in CHART_TITLES:
        if key in samples:
            charts.append(_chart(key, units.get(key, ""), samples[key]))
    return charts


def _chart(key: str, unit: str, named: Mapping[str, list[tuple[datetime, float]]]) -> Chart:
    every = [sample for points in named.values() for sample in points]
    first = min(when for when, _ in every)
    last = max(when for when, _ in every)
    low = min(value for _, value in every)
    high = max(value for _, value in every)
    if high == low:
        low, high = low - 1, high + 1
    margin = (high - low) * 0.1
    low, high = low - margin, high + margin
    span = (last - first).total_seconds() or 1.0

    def x_of(when: datetime) -> float:
        if last == first:
            return (_LEFT + WIDTH - _RIGHT) / 2
        return _LEFT + (when - first).total_seconds() / span * (WIDTH - _RIGHT - _LEFT)

    def y_of(value: float) -> float:
        return HEIGHT - _BOTTOM - (value - low) / (high - low) * (HEIGHT - _BOTTOM - _TOP)

    series = []
    for index, (name, points) in enumerate(named.items()):
        ordered = sorted(points)
        series.append(
            Series(
                name=name,
                css=f"series-{index}",
                points=tuple(Point(x_of(w), y_of(v), v, w) for w, v in ordered),
            )
        )
    y_ticks = tuple(
        Tick(y_of(value), f"{value:.4g}")
        for value in (low + margin, (low + high) / 2, high - margin)
    )
    x_ticks = (
        (Tick(x_of(first), "", first, "start"), Tick(x_of(last), "", last, "end"))
        if last != first
        else (Tick(x_of(first), "", first),)
    )
    return Chart(
        key=key,
        title=CHART_TITLES[key],
        unit=unit,
        series=tuple(series),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
    )


# The whole record --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordView:
    patient_id: str
    name: str
    gender: str
    birth_date: str
    conditions: list[Row] = field(default_factory=list)
    medications: list[Row] = field(default_factory=list)
    allergies: list[Row] = field(default_factory=list)
    observations: list[Row] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    #: Resources of other types in the record, counted by type (shown as a summary line).
    others: dict[str, int] = field(default_factory=dict)


_MEDICATION_TYPES: Final = ("MedicationRequest", "MedicationStatement")


def record_view(patient_id: str, resources: Iterable[Mapping[str, Any]]) -> RecordView:
    """Group a patient's visible resources (from ``RecordRepository.everything``) for display."""
    by_type: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for resource in resources:
        by_type[_str(resource.get("resourceType"))].append(resource)
    patient = next(iter(by_type.pop("Patient", [])), None)
    shown = {"Condition", "AllergyIntolerance", "Observation", *_MEDICATION_TYPES}
    return RecordView(
        patient_id=patient_id,
        name=human_name(patient),
        gender=_str(_dict(patient).get("gender")),
        birth_date=_str(_dict(patient).get("birthDate")),
        conditions=_newest_first(condition_row(r) for r in by_type.get("Condition", [])),
        medications=_newest_first(
            medication_row(r) for t in _MEDICATION_TYPES for r in by_type.get(t, [])
        ),
        allergies=_newest_first(allergy_row(r) for r in by_type.get("AllergyIntolerance", [])),
        observations=_newest_first(observation_row(r) for r in by_type.get("Observation", [])),
        charts=vital_charts(by_type.get("Observation", [])),
        others={t: len(rs) for t, rs in sorted(by_type.items()) if t not in shown and t},
    )


# Imaging -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StudyRow:
    """One line of the chart's imaging list, from a FHIR ImagingStudy."""

    id: str
    started: datetime | None
    modalities: tuple[str, ...]
    description: str
    series: int
    instances: int


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def study_row(resource: Mapping[str, Any]) -> StudyRow:
    modalities = (_str(_dict(m).get("code")) for m in _list(resource.get("modality")))
    return StudyRow(
        id=_str(resource.get("id")),
        started=parse_time(resource.get("started")),
        modalities=tuple(m for m in modalities if m),
        description=_str(resource.get("description")),
        series=_count(resource.get("numberOfSeries")),
        instances=_count(resource.get("numberOfInstances")),
    )


def imaging_rows(resources: Iterable[Mapping[str, Any]]) -> list[StudyRow]:
    """The ImagingStudy resources among a patient's visible resources, newest study first."""
    rows = [study_row(r) for r in resources if r.get("resourceType") == "ImagingStudy"]
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(rows, key=lambda row: (row.started or epoch, row.id), reverse=True)[:_MAX_ROWS]
