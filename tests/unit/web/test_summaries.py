"""What patients and clinicians read of a record: display rows and the vital-signs chart."""

from __future__ import annotations

from datetime import UTC, datetime

from medcollab.web import summaries


def _obs(code: str, value: float, when: str, **extra: object) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "/min"},
        **extra,
    }


def test_names() -> None:
    assert summaries.human_name({"name": [{"family": "Zhang", "given": ["Wei"]}]}) == "Wei Zhang"
    assert summaries.human_name({"name": [{"family": "李", "given": ["小", "娜"]}]}) == "李小娜"
    assert summaries.human_name({"name": [{"text": "Dr A"}]}) == "Dr A"
    assert summaries.human_name({"name": "not a list"}) == ""
    assert summaries.human_name(None) == ""


def test_rows_read_untrusted_resources_defensively() -> None:
    assert summaries.concept_text({"coding": [{"code": "X"}, {"display": "Shown"}]}) == "Shown"
    assert summaries.concept_text(["weird"]) == ""
    row = summaries.observation_row(_obs("8867-4", 72, "2026-01-01T08:00:00Z"))
    assert row.title == "Heart rate"
    assert row.detail == "72 /min"
    assert row.when == datetime(2026, 1, 1, 8, tzinfo=UTC)
    panel = {
        "resourceType": "Observation",
        "code": {"coding": [{"code": "85354-9"}]},
        "component": [
            {
                "code": {"coding": [{"code": "8480-6"}]},
                "valueQuantity": {"value": 120, "unit": "mmHg"},
            },
            {
                "code": {"coding": [{"code": "8462-4"}]},
                "valueQuantity": {"value": 80, "unit": "mmHg"},
            },
        ],
    }
    assert summaries.quantity_text(panel) == "120/80 mmHg"
    labelled = summaries.condition_row(
        {"code": {"text": "x"}, "meta": {"security": [{"code": "PSY"}, {"code": "REDACTED"}]}}
    )
    assert labelled.labels == ("PSY",)
    assert labelled.redacted
    assert summaries.parse_time("2026") == datetime(2026, 1, 1, tzinfo=UTC)
    assert summaries.parse_time("not a date") is None
    assert summaries.parse_time(5) is None


def test_vital_chart_geometry() -> None:
    observations = [
        _obs("8867-4", 60, "2026-01-01T00:00:00Z"),
        _obs("8867-4", 80, "2026-01-03T00:00:00Z"),
        _obs("8867-4", 70, "2026-01-02T00:00:00Z"),
        _obs("8867-4", 999, "2026-01-04T00:00:00Z", status="entered-in-error"),
        _obs("1234-5", 1, "2026-01-01T00:00:00Z"),  # Not a vital sign.
    ]
    (chart,) = summaries.vital_charts(observations)
    assert chart.key == "heart-rate"
    (series,) = chart.series
    assert [p.value for p in series.points] == [60, 70, 80]  # Ordered by time.
    xs = [p.x for p in series.points]
    ys = [p.y for p in series.points]
    assert xs[0] == chart.left
    assert xs[-1] == chart.right
    assert ys[0] > ys[1] > ys[2]  # Larger values are drawn higher.
    assert all(chart.top <= y <= chart.bottom for y in ys)
    assert series.polyline.count(",") == 3
    assert [t.anchor for t in chart.x_ticks] == ["start", "end"]


def test_blood_pressure_shares_one_chart() -> None:
    panel = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"code": "85354-9"}]},
        "effectiveDateTime": "2026-01-01",
        "component": [
            {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": {"value": 130}},
            {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": {"value": 85}},
        ],
    }
    (chart,) = summaries.vital_charts([panel])
    assert chart.key == "blood-pressure"
    assert [s.name for s in chart.series] == ["Systolic", "Diastolic"]
    assert len(chart.x_ticks) == 1  # One day: one date, in the middle.


def test_record_view_groups_by_type() -> None:
    view = summaries.record_view(
        "p1",
        [
            {
                "resourceType": "Patient",
                "name": [{"family": "Li", "given": ["Na"]}],
                "gender": "female",
            },
            {"resourceType": "Condition", "code": {"text": "Asthma"}},
            {
                "resourceType": "MedicationStatement",
                "medicationCodeableConcept": {"text": "Salbutamol"},
            },
            {"resourceType": "Encounter"},
        ],
    )
    assert view.name == "Na Li"
    assert [r.title for r in view.conditions] == ["Asthma"]
    assert [r.title for r in view.medications] == ["Salbutamol"]
    assert view.others == {"Encounter": 1}
