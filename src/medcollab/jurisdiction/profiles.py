"""Jurisdiction profiles: the legal numbers and rules that differ between PIPL, GDPR and HIPAA.

A deployment runs under one profile (``Settings.jurisdiction``, PIPL by default because the seed
document is Chinese) and an organisation may override it (``Organisation.jurisdiction``). Request
deadlines, breach clocks, guardian-consent ages, retention periods, break-glass rules and
cross-border conditions are read from here and nowhere else, so a change in the law is a change in
one file with a test that names the article.

Every value is a :class:`Cited` value: the number or rule, the provision it comes from, and whether
it is law, official guidance, or a default that medcollab chose because the law sets no figure.

Periods are :class:`~datetime.timedelta` so that callers can add them to a timestamp, but the law
counts in calendar months and years. Each conversion is made in the direction that can never put the
platform in breach:

* **deadlines** (things the platform must do by a time) take the *shortest* calendar reading, so
  "one month" is 28 days and a due date computed by addition is never later than the legal one;
* **retention minimums** (things the platform must keep at least this long) take the *longest*
  reading, so "6 years" is 6 × 365 days plus every leap day six years can contain.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from medcollab.errors import InvalidInput

T = TypeVar("T")


class Jurisdiction(StrEnum):
    """The legal regimes medcollab has a profile for; the values match ``Settings.jurisdiction``."""

    PIPL = "PIPL"
    GDPR = "GDPR"
    HIPAA = "HIPAA"


class Basis(StrEnum):
    """How binding a cited value is, so that reports can tell law from a default we chose."""

    #: A statute, regulation or departmental rule that binds the deployment.
    LAW = "law"
    #: A national standard or a regulator's guidance: what regulators check against, not statute.
    GUIDANCE = "guidance"
    #: The law sets no figure; medcollab picked this default and a deployment may change it.
    DEPLOYMENT_CHOICE = "deployment-choice"


class TransferMechanism(StrEnum):
    """Legal instruments that can make a transfer of personal data abroad lawful."""

    SECURITY_ASSESSMENT = "security-assessment"
    CERTIFICATION = "certification"
    STANDARD_CONTRACT = "standard-contract"
    ADEQUACY_DECISION = "adequacy-decision"
    APPROPRIATE_SAFEGUARDS = "appropriate-safeguards"
    DEROGATION = "derogation"
    BUSINESS_ASSOCIATE_AGREEMENT = "business-associate-agreement"


@dataclass(frozen=True, slots=True)
class Cited(Generic[T]):
    """A value with the provision it comes from, so that no number in the platform is anonymous."""

    value: T
    #: The provision, e.g. ``"GDPR Art. 33(1)"``; tests check that it names the article.
    source: str
    basis: Basis = Basis.LAW
    #: What the law actually says when the value is a conversion, a choice, or ``None``.
    note: str = ""

    def __post_init__(self) -> None:
        # A citation without a source is exactly what this type exists to prevent.
        if not self.source.strip():
            raise ValueError("a cited value needs a source")
        if self.basis is not Basis.LAW and not self.note.strip():
            raise ValueError(f"a {self.basis} value needs a note explaining why it is not law")


def _years_at_longest(years: int) -> timedelta:
    """``years`` calendar years at their longest: 365 days each plus every leap day they can hold.

    Any run of ``n`` consecutive years contains at most ``ceil(n / 4)`` leap days, so keeping data
    for this many days always keeps it at least ``n`` calendar years, whatever the start date.
    """
    return timedelta(days=365 * years + (years + 3) // 4)


#: "One month" at its shortest (February), for deadlines counted in months.
_ONE_MONTH_AT_SHORTEST: Final = timedelta(days=28)

#: The platform's audit-log retention, whichever profile applies; a profile can only lengthen it
#: (see :attr:`JurisdictionProfile.audit_log_retention`). Six years matches the longest legal
#: minimum among the profiles (HIPAA), so moving an organisation between profiles never shortens it.
DEFAULT_AUDIT_RETENTION: Final = _years_at_longest(6)


@dataclass(frozen=True, slots=True)
class CrossBorderRules:
    """What must be true before personal data may leave the jurisdiction."""

    #: The data (or a primary copy) must be stored inside the jurisdiction.
    data_localisation: Cited[bool]
    #: The individual must consent to the transfer itself, separately from any other consent.
    separate_consent: Cited[bool]
    #: A transfer needs at least one of these in place for the recipient.
    mechanisms: Cited[tuple[TransferMechanism, ...]]


@dataclass(frozen=True, slots=True)
class JurisdictionProfile:
    """The numbers and rules of one legal regime, each with its citation.

    Retention periods are minimums counted from the end of the relevant event (last visit,
    discharge, creation of the log entry); deadlines are counted from receipt of the request or
    discovery of the breach. A ``None`` clock means the law sets no number; its note says what the
    law does require.
    """

    code: Jurisdiction
    #: Short name for screens and reports.
    name: str
    #: The full citation of the governing law.
    law: str
    #: Who receives breach notifications.
    regulator: str
    #: Time to answer an individual's request (access, copy, correction, erasure).
    request_deadline: Cited[timedelta]
    #: The single extension the law allows on top of the deadline, or ``None`` if there is none.
    request_extension: Cited[timedelta | None]
    #: Time from discovering a breach to notifying the regulator, or ``None`` if the law sets none.
    breach_notice_regulator: Cited[timedelta | None]
    #: Time from discovering a breach to notifying affected individuals, or ``None``.
    breach_notice_individuals: Cited[timedelta | None]
    #: A guardian must consent for individuals *younger* than this many years.
    guardian_consent_below_age: Cited[int]
    #: Minimum retention of outpatient and emergency records, counted from the last visit.
    record_retention_outpatient: Cited[timedelta]
    #: Minimum retention of inpatient records, counted from the last discharge.
    record_retention_inpatient: Cited[timedelta]
    #: The legal minimum for keeping audit and processing logs; see :attr:`audit_log_retention`.
    audit_log_retention_minimum: Cited[timedelta]
    #: Emergency ("break-glass") access may proceed even though the patient denied consent.
    break_glass_overrides_consent: Cited[bool]
    #: The override above only holds while the patient cannot consent (unconscious, incapable).
    break_glass_requires_incapacity: Cited[bool]
    cross_border: CrossBorderRules

    def __post_init__(self) -> None:
        # Profiles are constants written by hand; catching a nonsensical one at import time is
        # cheaper than discovering it when a deadline is computed from it.
        positive = (
            self.request_deadline.value,
            self.record_retention_outpatient.value,
            self.record_retention_inpatient.value,
            self.audit_log_retention_minimum.value,
        )
        if any(period <= timedelta(0) for period in positive):
            raise ValueError(f"{self.code}: deadlines and retention periods must be positive")
        if self.guardian_consent_below_age.value <= 0:
            raise ValueError(f"{self.code}: the guardian-consent age must be positive")
        if not self.cross_border.mechanisms.value:
            # An empty list of lawful mechanisms would read as "no condition"; deny by default.
            raise ValueError(f"{self.code}: at least one cross-border mechanism must be listed")

    @property
    def audit_log_retention(self) -> timedelta:
        """How long audit logs are kept: the platform default, or longer if the law asks more."""
        return max(DEFAULT_AUDIT_RETENTION, self.audit_log_retention_minimum.value)

    def citations(self) -> dict[str, Cited[object]]:
        """Every cited value by field name, so reports and tests can walk them without a list."""
        found: dict[str, Cited[object]] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Cited):
                found[field.name] = value
        for field in fields(self.cross_border):
            found[f"cross_border.{field.name}"] = getattr(self.cross_border, field.name)
        return found


PIPL: Final = JurisdictionProfile(
    code=Jurisdiction.PIPL,
    name="Personal Information Protection Law (China)",
    law=(
        "中华人民共和国个人信息保护法 (Personal Information Protection Law of the People's "
        "Republic of China), adopted 20 August 2021, in force 1 November 2021"
    ),
    regulator="网信部门 (Cyberspace Administration, provincial office) and the health authority",
    request_deadline=Cited(
        timedelta(days=15),
        source=(
            "PIPL Art. 50; App违法违规收集使用个人信息行为认定方法 (2019) item 6(4); "
            "GB/T 35273-2020 §8.5"
        ),
        basis=Basis.GUIDANCE,
        note=(
            "PIPL Art. 50 requires a convenient mechanism and reasons for refusals but no "
            "number. Regulators check against 15 working days (认定方法 item 6(4); GB/T "
            "35273-2020 §8.5 for account cancellation), stricter than the 30 days of GB/T "
            "35273-2020 §8.7. Fifteen calendar days is never longer than 15 working days, so it "
            "meets both."
        ),
    ),
    request_extension=Cited(
        None,
        source="PIPL Art. 50",
        basis=Basis.GUIDANCE,
        note="Neither the law nor the guidance provides an extension of the 15 working days.",
    ),
    breach_notice_regulator=Cited(
        timedelta(hours=1),
        source="PIPL Art. 57; 国家网络安全事件报告管理办法 (2025) Art. 4",
        note=(
            "PIPL Art. 57 says 立即 (immediately). The 2025 incident-reporting measures fix the "
            "outer limits for incidents graded 较大 or above: 1 hour for critical information "
            "infrastructure operators, 2 hours for central state organs, 4 hours for other "
            "operators. Hospitals may be designated critical infrastructure, so the platform uses "
            "the shortest clock, which meets every case and is a fair reading of 'immediately'."
        ),
    ),
    breach_notice_individuals=Cited(
        None,
        source="PIPL Art. 57",
        note=(
            "Individuals are notified 立即 (immediately), with no number. Notice may be omitted "
            "when remedial measures effectively avoid harm, unless the regulator requires it."
        ),
    ),
    guardian_consent_below_age=Cited(
        14,
        source="PIPL Art. 28, Art. 31",
        note=(
            "Information of a minor under 14 is sensitive (Art. 28) and needs a parent's or "
            "guardian's consent (Art. 31). Consent to medical treatment is a separate question "
            "under the Civil Code."
        ),
    ),
    record_retention_outpatient=Cited(
        _years_at_longest(15),
        source="医疗机构病历管理规定 (2013) Art. 29",
        note="At least 15 years from the last visit; electronic records are kept as long.",
    ),
    record_retention_inpatient=Cited(
        _years_at_longest(30),
        source="医疗机构病历管理规定 (2013) Art. 29",
        note="At least 30 years from the patient's last discharge.",
    ),
    audit_log_retention_minimum=Cited(
        _years_at_longest(3),
        source="PIPL Art. 56; Cybersecurity Law Art. 21(3)",
        note=(
            "Processing records for sensitive information (health data) are kept at least 3 "
            "years (PIPL Art. 55-56), which exceeds the 6 months the Cybersecurity Law requires "
            "for network logs."
        ),
    ),
    break_glass_overrides_consent=Cited(
        True,
        source="PIPL Art. 13(4), Art. 18; Civil Code Art. 1220",
        note=(
            "Consent is not needed where processing is necessary to protect life and health in "
            "an emergency (Art. 13(4)); the individual is told once the emergency has passed "
            "(Art. 18)."
        ),
    ),
    break_glass_requires_incapacity=Cited(
        False,
        source="PIPL Art. 13(4)",
        note="The exception turns on emergency and necessity, not on the patient's capacity.",
    ),
    cross_border=CrossBorderRules(
        data_localisation=Cited(
            True,
            source=(
                "国家健康医疗大数据标准、安全和服务管理办法（试行）(2018) Art. 30; "
                "人口健康信息管理办法（试行）(2014) Art. 10; PIPL Art. 40"
            ),
            note=(
                "Health data must be stored on servers in China; a copy may leave only after "
                "the assessment or mechanism the law requires."
            ),
        ),
        separate_consent=Cited(
            True,
            source="PIPL Art. 39",
            note="Given separately, after being told the recipient, purpose and how to object.",
        ),
        mechanisms=Cited(
            (
                TransferMechanism.SECURITY_ASSESSMENT,
                TransferMechanism.CERTIFICATION,
                TransferMechanism.STANDARD_CONTRACT,
            ),
            source="PIPL Art. 38(1)-(3), Art. 40, Art. 55(4); 促进和规范数据跨境流动规定 (2024)",
            note=(
                "A CAC security assessment is mandatory for critical infrastructure operators, "
                "for sensitive information of 10,000 or more people since 1 January of the year, "
                "and above the other thresholds; otherwise a standard contract or certification. "
                "A personal-information impact assessment comes first (Art. 55(4))."
            ),
        ),
    ),
)


GDPR: Final = JurisdictionProfile(
    code=Jurisdiction.GDPR,
    name="General Data Protection Regulation (EU)",
    law=(
        "Regulation (EU) 2016/679 of the European Parliament and of the Council of 27 April 2016 "
        "(General Data Protection Regulation), applicable from 25 May 2018"
    ),
    regulator="the competent (lead) supervisory authority",
    request_deadline=Cited(
        _ONE_MONTH_AT_SHORTEST,
        source="GDPR Art. 12(3)",
        note=(
            "Without undue delay and at the latest within one month of receipt. A calendar month "
            "can be 28 days (Regulation 1182/71), so 28 days is never late."
        ),
    ),
    request_extension=Cited(
        2 * _ONE_MONTH_AT_SHORTEST,
        source="GDPR Art. 12(3)",
        note=(
            "Two further months where necessary given complexity and number of requests; the "
            "individual is told of the extension and its reasons within the first month."
        ),
    ),
    breach_notice_regulator=Cited(
        timedelta(hours=72),
        source="GDPR Art. 33(1)",
        note=(
            "Within 72 hours of becoming aware, where feasible; a later notice must give reasons. "
            "Not required when the breach is unlikely to result in a risk."
        ),
    ),
    breach_notice_individuals=Cited(
        None,
        source="GDPR Art. 34(1)",
        note="Without undue delay when the breach is likely to result in a high risk; no number.",
    ),
    guardian_consent_below_age=Cited(
        16,
        source="GDPR Art. 8(1)",
        note=(
            "Sixteen unless the member state's law lowers it, never below 13. A deployment in "
            "such a member state derives its own profile with the lower age."
        ),
    ),
    record_retention_outpatient=Cited(
        _years_at_longest(10),
        source="GDPR Art. 5(1)(e)",
        basis=Basis.DEPLOYMENT_CHOICE,
        note=(
            "The GDPR sets no period, only storage limitation; member-state health law does "
            "(e.g. 10 years in Germany, BGB §630f(3); 20 in France). Ten years is medcollab's "
            "default; a deployment raises it to its member state's figure."
        ),
    ),
    record_retention_inpatient=Cited(
        _years_at_longest(10),
        source="GDPR Art. 5(1)(e)",
        basis=Basis.DEPLOYMENT_CHOICE,
        note="As for outpatient records: no GDPR figure, member-state law decides.",
    ),
    audit_log_retention_minimum=Cited(
        _years_at_longest(6),
        source="GDPR Art. 5(1)(e)",
        basis=Basis.DEPLOYMENT_CHOICE,
        note=(
            "No GDPR figure. Access logs answer a patient's Art. 15 question 'who consulted my "
            "record and why', so they are kept as long as the platform default of 6 years."
        ),
    ),
    break_glass_overrides_consent=Cited(
        True,
        source="GDPR Art. 9(2)(c)",
        note=(
            "Health data may be processed to protect vital interests where the data subject is "
            "physically or legally incapable of giving consent; routine care relies on Art. "
            "9(2)(h) and member-state law rather than consent."
        ),
    ),
    break_glass_requires_incapacity=Cited(
        True,
        source="GDPR Art. 9(2)(c), Recital 46",
        note=(
            "Vital interests is a basis of last resort and names incapacity as its condition, so "
            "the refusal of a patient who can decide for themselves stands."
        ),
    ),
    cross_border=CrossBorderRules(
        data_localisation=Cited(
            False,
            source="GDPR Art. 1(3), Art. 44",
            note="Data move freely inside the EEA; Chapter V governs transfers outside it.",
        ),
        separate_consent=Cited(
            False,
            source="GDPR Art. 49(1)(a)",
            note="Explicit consent is one derogation among several, not a general requirement.",
        ),
        mechanisms=Cited(
            (
                TransferMechanism.ADEQUACY_DECISION,
                TransferMechanism.APPROPRIATE_SAFEGUARDS,
                TransferMechanism.DEROGATION,
            ),
            source="GDPR Art. 44-49",
            note=(
                "An adequacy decision (Art. 45); otherwise appropriate safeguards such as standard "
                "contractual clauses or binding corporate rules (Art. 46-47), with a transfer "
                "impact assessment; otherwise a specific derogation (Art. 49)."
            ),
        ),
    ),
)


HIPAA: Final = JurisdictionProfile(
    code=Jurisdiction.HIPAA,
    name="HIPAA Privacy, Security and Breach Notification Rules (US)",
    law=(
        "Health Insurance Portability and Accountability Act of 1996 (Pub. L. 104-191) as amended "
        "by the HITECH Act; 45 CFR Parts 160 and 164"
    ),
    regulator="HHS Office for Civil Rights (the Secretary)",
    request_deadline=Cited(
        timedelta(days=30),
        source="45 CFR 164.524(b)(2)(i)",
        note="Act on a request for access no later than 30 days after receipt.",
    ),
    request_extension=Cited(
        timedelta(days=30),
        source="45 CFR 164.524(b)(2)(ii)",
        note=(
            "One extension of at most 30 days, with a written statement of the reasons and the "
            "completion date given within the first 30 days."
        ),
    ),
    breach_notice_regulator=Cited(
        timedelta(days=60),
        source="45 CFR 164.408(b)",
        note=(
            "For 500 or more individuals, the Secretary is notified at the same time as the "
            "individuals, so within 60 days; smaller breaches are logged and reported within 60 "
            "days after the end of the calendar year (164.408(c))."
        ),
    ),
    breach_notice_individuals=Cited(
        timedelta(days=60),
        source="45 CFR 164.404(b)",
        note=(
            "Without unreasonable delay and in no case later than 60 calendar days after "
            "discovery; 60 days is an outer limit, not a safe harbour."
        ),
    ),
    guardian_consent_below_age=Cited(
        18,
        source="45 CFR 164.502(g)(3)",
        basis=Basis.DEPLOYMENT_CHOICE,
        note=(
            "HIPAA defers to State law on who represents a minor. Eighteen is the age of majority "
            "in most States (19 in Alabama and Nebraska, 21 in Mississippi), and many States let "
            "minors consent alone to some care; a deployment adjusts to its State."
        ),
    ),
    record_retention_outpatient=Cited(
        _years_at_longest(5),
        source="42 CFR 482.24(b)(1)",
        note=(
            "HIPAA sets no medical-record retention. The Medicare hospital Conditions of "
            "Participation require at least 5 years; State law is usually longer and wins."
        ),
    ),
    record_retention_inpatient=Cited(
        _years_at_longest(5),
        source="42 CFR 482.24(b)(1)",
        note="As for outpatient records: a federal floor of 5 years, State law usually longer.",
    ),
    audit_log_retention_minimum=Cited(
        _years_at_longest(6),
        source="45 CFR 164.316(b)(2)(i); 45 CFR 164.530(j)(2)",
        note=(
            "Required documentation, including records of actions and activities such as audit "
            "reviews, is kept 6 years from creation or last effective date."
        ),
    ),
    break_glass_overrides_consent=Cited(
        True,
        source="45 CFR 164.506(c); 45 CFR 164.522(a)(1)(iii)",
        note=(
            "Treatment disclosures need no authorisation, and even an agreed restriction yields "
            "when the restricted information is needed for emergency treatment. Records under 42 "
            "CFR Part 2 (substance use) follow their own medical-emergency rule (42 CFR 2.51)."
        ),
    ),
    break_glass_requires_incapacity=Cited(
        False,
        source="45 CFR 164.522(a)(1)(iii)",
        note="The condition is the need for emergency treatment, not the patient's capacity.",
    ),
    cross_border=CrossBorderRules(
        data_localisation=Cited(
            False,
            source="45 CFR 164.308(b), 164.502(e)",
            note=(
                "HIPAA has no localisation rule. Bulk transfers (health data of more than 10,000 "
                "US persons) to countries of concern are restricted separately by 28 CFR Part 202."
            ),
        ),
        separate_consent=Cited(
            False,
            source="45 CFR 164.506(c), 164.508",
            note="Disclosures to a business associate for treatment need no authorisation.",
        ),
        mechanisms=Cited(
            (TransferMechanism.BUSINESS_ASSOCIATE_AGREEMENT,),
            source="45 CFR 164.502(e), 164.504(e), 164.314(a)",
            note="Whoever handles PHI on the entity's behalf signs a business associate agreement.",
        ),
    ),
)


#: The profile of a deployment that names none: PIPL, the law of the seed document.
DEFAULT_JURISDICTION: Final = Jurisdiction.PIPL

#: Every profile by code; read-only so that no caller can swap a profile at run time.
PROFILES: Final[MappingProxyType[Jurisdiction, JurisdictionProfile]] = MappingProxyType(
    {profile.code: profile for profile in (PIPL, GDPR, HIPAA)}
)


def get_profile(code: str | Jurisdiction) -> JurisdictionProfile:
    """The profile for ``code`` (case-insensitive), or :class:`InvalidInput` naming the valid codes.

    Unknown codes are refused rather than mapped to the default, because silently applying another
    country's deadlines is worse than failing the request that carried the typo.
    """
    try:
        return PROFILES[Jurisdiction(code.upper())]
    except ValueError:
        valid = ", ".join(sorted(PROFILES))
        # The echo is truncated so that a hostile value cannot flood logs or error pages.
        raise InvalidInput(
            f"unknown jurisdiction {code[:16]!r}; expected one of {valid}",
            hint="set Settings.jurisdiction or the organisation's override to a listed code",
        ) from None


def effective_profile(deployment: str, organisation_override: str | None) -> JurisdictionProfile:
    """The profile that governs an organisation: its own override when set, else the deployment's.

    An override that is set but invalid raises :class:`InvalidInput` instead of falling back, so a
    corrupt organisation row cannot quietly run under the deployment's rules.
    """
    if organisation_override is not None:
        return get_profile(organisation_override)
    return get_profile(deployment)
