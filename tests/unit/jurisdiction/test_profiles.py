"""Each profile's numbers pinned to the provisions they come from.

A failing test here means a legal figure changed: check the cited article before changing the
expected value, and update docs/security/jurisdictions.md in the same change.
"""

from __future__ import annotations

import calendar
import dataclasses
import typing
from datetime import date, timedelta

import pytest

from medcollab.config import Settings
from medcollab.errors import InvalidInput
from medcollab.jurisdiction import (
    DEFAULT_AUDIT_RETENTION,
    DEFAULT_JURISDICTION,
    GDPR,
    HIPAA,
    PIPL,
    PROFILES,
    Basis,
    Cited,
    Jurisdiction,
    JurisdictionProfile,
    TransferMechanism,
    effective_profile,
    get_profile,
)

# Calendar periods at the reading that keeps the platform compliant: deadlines at their shortest,
# retention at their longest (see the module docstring of medcollab.jurisdiction.profiles).
ONE_MONTH_SHORTEST = timedelta(days=28)
YEARS_LONGEST = {
    3: timedelta(days=1096),
    5: timedelta(days=1827),
    6: timedelta(days=2192),
    10: timedelta(days=3653),
    15: timedelta(days=5479),
    30: timedelta(days=10958),
}


def assert_cited(
    cited: Cited[typing.Any],
    value: object,
    *sources: str,
    basis: Basis = Basis.LAW,
) -> None:
    """The value, its basis, and every expected provision named in its source."""
    assert cited.value == value
    assert cited.basis is basis
    for source in sources:
        assert source in cited.source, f"{source!r} not cited in {cited.source!r}"


def test_pipl_profile_pins_every_number_to_its_source() -> None:
    p = PIPL
    assert p.code is Jurisdiction.PIPL
    assert "个人信息保护法" in p.law
    assert "2021" in p.law

    assert_cited(
        p.request_deadline,
        timedelta(days=15),
        "PIPL Art. 50",
        "认定方法",
        "GB/T 35273-2020",
        basis=Basis.GUIDANCE,
    )
    assert "15 working days" in p.request_deadline.note
    assert_cited(p.request_extension, None, "PIPL Art. 50", basis=Basis.GUIDANCE)

    assert_cited(
        p.breach_notice_regulator,
        timedelta(hours=1),
        "PIPL Art. 57",
        "国家网络安全事件报告管理办法 (2025) Art. 4",
    )
    assert "4 hours" in p.breach_notice_regulator.note
    assert_cited(p.breach_notice_individuals, None, "PIPL Art. 57")
    assert "立即" in p.breach_notice_individuals.note

    assert_cited(p.guardian_consent_below_age, 14, "PIPL Art. 28", "Art. 31")

    assert_cited(p.record_retention_outpatient, YEARS_LONGEST[15], "病历管理规定 (2013) Art. 29")
    assert_cited(p.record_retention_inpatient, YEARS_LONGEST[30], "病历管理规定 (2013) Art. 29")
    assert_cited(
        p.audit_log_retention_minimum,
        YEARS_LONGEST[3],
        "PIPL Art. 56",
        "Cybersecurity Law Art. 21(3)",
    )
    assert p.audit_log_retention == YEARS_LONGEST[6]

    assert_cited(p.break_glass_overrides_consent, True, "PIPL Art. 13(4)", "Art. 18")
    assert_cited(p.break_glass_requires_incapacity, False, "PIPL Art. 13(4)")

    cb = p.cross_border
    assert_cited(cb.data_localisation, True, "Art. 30", "Art. 10", "PIPL Art. 40")
    assert_cited(cb.separate_consent, True, "PIPL Art. 39")
    assert_cited(
        cb.mechanisms,
        (
            TransferMechanism.SECURITY_ASSESSMENT,
            TransferMechanism.CERTIFICATION,
            TransferMechanism.STANDARD_CONTRACT,
        ),
        "PIPL Art. 38",
        "Art. 40",
        "Art. 55(4)",
    )


def test_gdpr_profile_pins_every_number_to_its_source() -> None:
    p = GDPR
    assert p.code is Jurisdiction.GDPR
    assert "2016/679" in p.law

    assert_cited(p.request_deadline, ONE_MONTH_SHORTEST, "GDPR Art. 12(3)")
    assert "one month" in p.request_deadline.note
    assert_cited(p.request_extension, 2 * ONE_MONTH_SHORTEST, "GDPR Art. 12(3)")
    assert "two further months" in p.request_extension.note.lower()

    assert_cited(p.breach_notice_regulator, timedelta(hours=72), "GDPR Art. 33(1)")
    assert_cited(p.breach_notice_individuals, None, "GDPR Art. 34(1)")
    assert "without undue delay" in p.breach_notice_individuals.note.lower()

    assert_cited(p.guardian_consent_below_age, 16, "GDPR Art. 8(1)")
    assert "13" in p.guardian_consent_below_age.note

    assert_cited(
        p.record_retention_outpatient,
        YEARS_LONGEST[10],
        "GDPR Art. 5(1)(e)",
        basis=Basis.DEPLOYMENT_CHOICE,
    )
    assert_cited(
        p.record_retention_inpatient,
        YEARS_LONGEST[10],
        "GDPR Art. 5(1)(e)",
        basis=Basis.DEPLOYMENT_CHOICE,
    )
    assert_cited(
        p.audit_log_retention_minimum,
        YEARS_LONGEST[6],
        "GDPR Art. 5(1)(e)",
        basis=Basis.DEPLOYMENT_CHOICE,
    )
    assert p.audit_log_retention == YEARS_LONGEST[6]

    assert_cited(p.break_glass_overrides_consent, True, "GDPR Art. 9(2)(c)")
    assert_cited(p.break_glass_requires_incapacity, True, "GDPR Art. 9(2)(c)", "Recital 46")

    cb = p.cross_border
    assert_cited(cb.data_localisation, False, "GDPR Art. 1(3)", "Art. 44")
    assert_cited(cb.separate_consent, False, "GDPR Art. 49(1)(a)")
    assert_cited(
        cb.mechanisms,
        (
            TransferMechanism.ADEQUACY_DECISION,
            TransferMechanism.APPROPRIATE_SAFEGUARDS,
            TransferMechanism.DEROGATION,
        ),
        "GDPR Art. 44-49",
    )


def test_hipaa_profile_pins_every_number_to_its_source() -> None:
    p = HIPAA
    assert p.code is Jurisdiction.HIPAA
    assert "45 CFR Parts 160 and 164" in p.law

    assert_cited(p.request_deadline, timedelta(days=30), "45 CFR 164.524(b)(2)(i)")
    assert_cited(p.request_extension, timedelta(days=30), "45 CFR 164.524(b)(2)(ii)")
    assert "One extension" in p.request_extension.note

    assert_cited(p.breach_notice_regulator, timedelta(days=60), "45 CFR 164.408(b)")
    assert "164.408(c)" in p.breach_notice_regulator.note
    assert_cited(p.breach_notice_individuals, timedelta(days=60), "45 CFR 164.404(b)")

    assert_cited(
        p.guardian_consent_below_age,
        18,
        "45 CFR 164.502(g)(3)",
        basis=Basis.DEPLOYMENT_CHOICE,
    )
    assert "State law" in p.guardian_consent_below_age.note

    assert_cited(p.record_retention_outpatient, YEARS_LONGEST[5], "42 CFR 482.24(b)(1)")
    assert_cited(p.record_retention_inpatient, YEARS_LONGEST[5], "42 CFR 482.24(b)(1)")
    assert_cited(
        p.audit_log_retention_minimum,
        YEARS_LONGEST[6],
        "45 CFR 164.316(b)(2)(i)",
        "164.530(j)(2)",
    )
    assert p.audit_log_retention == YEARS_LONGEST[6]

    assert_cited(
        p.break_glass_overrides_consent,
        True,
        "45 CFR 164.506(c)",
        "164.522(a)(1)(iii)",
    )
    assert_cited(p.break_glass_requires_incapacity, False, "45 CFR 164.522(a)(1)(iii)")

    cb = p.cross_border
    assert_cited(cb.data_localisation, False, "164.502(e)")
    assert "28 CFR Part 202" in cb.data_localisation.note
    assert_cited(cb.separate_consent, False, "164.508")
    assert_cited(
        cb.mechanisms,
        (TransferMechanism.BUSINESS_ASSOCIATE_AGREEMENT,),
        "45 CFR 164.502(e)",
        "164.504(e)",
    )


@pytest.mark.parametrize("code", list(Jurisdiction))
def test_every_value_carries_a_citation(code: Jurisdiction) -> None:
    profile = PROFILES[code]
    # Annotations are strings (postponed evaluation), so a field's type names its wrapper.
    expected = {f.name for f in dataclasses.fields(profile) if str(f.type).startswith("Cited[")}
    expected |= {f"cross_border.{f.name}" for f in dataclasses.fields(profile.cross_border)}
    citations = profile.citations()
    assert len(expected) == 13
    assert set(citations) == expected
    for name, cited in citations.items():
        assert cited.source.strip(), name
        if cited.value is None or cited.basis is not Basis.LAW:
            # A missing number or a number that is not law must say what the law does require.
            assert cited.note.strip(), name


def test_default_is_pipl_and_every_code_has_a_profile() -> None:
    assert DEFAULT_JURISDICTION is Jurisdiction.PIPL
    assert get_profile(DEFAULT_JURISDICTION) is PIPL
    assert set(PROFILES) == set(Jurisdiction)
    assert all(PROFILES[code].code is code for code in Jurisdiction)


def test_jurisdiction_codes_match_the_settings_choices() -> None:
    # Settings spells the codes as a Literal; the two lists must not drift apart.
    annotation = Settings.model_fields["jurisdiction"].annotation
    assert set(typing.get_args(annotation)) == {code.value for code in Jurisdiction}
    assert Settings.model_fields["jurisdiction"].default == DEFAULT_JURISDICTION.value


def test_audit_retention_default_is_six_years_and_never_below_a_legal_minimum() -> None:
    assert YEARS_LONGEST[6] == DEFAULT_AUDIT_RETENTION
    for profile in PROFILES.values():
        assert profile.audit_log_retention >= DEFAULT_AUDIT_RETENTION
        assert profile.audit_log_retention >= profile.audit_log_retention_minimum.value
    longer = dataclasses.replace(
        PIPL, audit_log_retention_minimum=Cited(YEARS_LONGEST[10], source="test Art. 1")
    )
    assert longer.audit_log_retention == YEARS_LONGEST[10]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (Jurisdiction.PIPL, PIPL),
        ("GDPR", GDPR),
        ("hipaa", HIPAA),
        ("Pipl", PIPL),
    ],
)
def test_get_profile_accepts_codes_in_any_case(code: str, expected: JurisdictionProfile) -> None:
    assert get_profile(code) is expected


@pytest.mark.parametrize("code", ["", "CCPA", "PIPL ", "中国", "X" * 200])
def test_get_profile_refuses_unknown_codes_listing_the_valid_ones(code: str) -> None:
    with pytest.raises(InvalidInput) as excinfo:
        get_profile(code)
    message = excinfo.value.message
    assert "expected one of GDPR, HIPAA, PIPL" in message
    # The echo of the bad value is bounded, so hostile input cannot flood a log line.
    assert len(message) < 100
    assert excinfo.value.hint is not None


def test_organisation_override_wins_over_the_deployment() -> None:
    assert effective_profile("PIPL", "GDPR") is GDPR
    assert effective_profile("HIPAA", "pipl") is PIPL
    assert effective_profile(Jurisdiction.GDPR, Jurisdiction.HIPAA) is HIPAA


def test_without_override_the_deployment_profile_applies() -> None:
    assert effective_profile("PIPL", None) is PIPL
    assert effective_profile("GDPR", None) is GDPR


@pytest.mark.parametrize("override", ["", "EU", "gdpr2"])
def test_an_invalid_override_is_refused_not_ignored(override: str) -> None:
    # Falling back to the deployment would quietly apply the wrong country's deadlines.
    with pytest.raises(InvalidInput):
        effective_profile("PIPL", override)


def test_an_invalid_deployment_code_is_refused_even_when_overridden_later() -> None:
    with pytest.raises(InvalidInput):
        effective_profile("NOPE", None)


def test_profiles_and_their_values_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PIPL.request_deadline = Cited(timedelta(days=90), source="x")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PIPL.request_deadline.value = timedelta(days=90)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PIPL.cross_border.separate_consent = Cited(False, source="x")  # type: ignore[misc]
    with pytest.raises(TypeError):
        PROFILES[Jurisdiction.PIPL] = GDPR  # type: ignore[index]
    # Slots leave no instance dictionary to smuggle extra attributes into.
    assert not hasattr(PIPL, "__dict__")
    assert isinstance(PIPL.cross_border.mechanisms.value, tuple)


def test_cited_values_must_name_a_source_and_explain_non_law() -> None:
    with pytest.raises(ValueError, match="needs a source"):
        Cited(14, source="  ")
    with pytest.raises(ValueError, match="needs a note"):
        Cited(10, source="GDPR Art. 5(1)(e)", basis=Basis.DEPLOYMENT_CHOICE)


@pytest.mark.parametrize(
    "change",
    [
        {"request_deadline": Cited(timedelta(0), source="x")},
        {"record_retention_inpatient": Cited(timedelta(days=-1), source="x")},
        {"guardian_consent_below_age": Cited(0, source="x")},
        {"cross_border": dataclasses.replace(PIPL.cross_border, mechanisms=Cited((), source="x"))},
    ],
    ids=["zero-deadline", "negative-retention", "zero-age", "no-mechanism"],
)
def test_a_nonsensical_profile_cannot_be_built(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="PIPL"):
        dataclasses.replace(PIPL, **change)  # type: ignore[arg-type]


# Calendar arithmetic, written independently of the module, to check its day counts.


def _add_months(start: date, months: int, *, clamp: bool) -> date:
    """``start`` plus calendar months; a missing day is the month's last (clamp) or the next 1st."""
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    last = calendar.monthrange(year, month)[1]
    if start.day <= last:
        return date(year, month, start.day)
    if clamp:
        return date(year, month, last)
    return date(year, month, last) + timedelta(days=1)


def _every_day(first: int = 1999, last: int = 2101) -> list[date]:
    start = date(first, 1, 1)
    return [start + timedelta(days=n) for n in range((date(last, 12, 31) - start).days + 1)]


def test_month_deadlines_are_never_later_than_the_calendar_month() -> None:
    # GDPR counts "one month" by the calendar (Regulation 1182/71): 31 January ends on 28 February.
    for day in _every_day():
        first_month = _add_months(day, 1, clamp=True)
        assert day + GDPR.request_deadline.value <= first_month
        assert GDPR.request_extension.value is not None
        extended = day + GDPR.request_deadline.value + GDPR.request_extension.value
        assert extended <= _add_months(day, 3, clamp=True)


@pytest.mark.parametrize("years", sorted(YEARS_LONGEST))
def test_retention_is_never_shorter_than_the_calendar_years(years: int) -> None:
    # A 29 February start counted to 1 March is the longest reading of "n years later".
    for day in _every_day():
        assert day + YEARS_LONGEST[years] >= _add_months(day, 12 * years, clamp=False)
