"""The payer rule library: one YAML file per payer (``config/payers/*.yaml``), validated on load.

A file says which services need authorization, whether and until when the payer takes a retro
request (per reason), admission notices, the documents to send, the channel, review SLAs, the
follow-up cadence, appeal levels and payer closure days. Every model forbids unknown fields, so a
misspelt key fails loudly instead of being ignored.

Loading errors come as one ``PayerRuleError`` listing every problem of every file, each line naming
the file, the line number (when the YAML parser knows it) and the dotted field path, e.g.::

    config/payers/acme.yaml:14: retro.windows[0].within.unit: required field is missing (...)

YAML is read with numbers, dates and times kept as text, and the schema converts them: plain YAML 1.1
would turn the revenue code ``0450`` into 296 (octal), ``17:00`` into 1020 (base 60) and crash on a date
such as ``2026-13-01`` without saying where.

Matching semantics (``PayerRules.rules_requiring_auth``; the daily sweep reproduces them in SQL):

* Code systems: CPT and HCPCS are one family (CPT is HCPCS Level I, and an 835 reports both as ``HC``);
  every other system must be equal.
* Codes are compared trimmed and upper-cased. A single code matches by equality. A range ``lo-hi``
  matches ``code`` when ``len(code) == len(lo) and lo <= code <= hi``, as plain strings (in PostgreSQL
  compare with ``COLLATE "C"``). Range ends must have the same length and the same letters in the same
  places, so ``J0585-J0588`` and ``0275T-0278T`` are ranges of one code family.
* Effective dates are inclusive: ``effective_from <= service_date`` and (no ``effective_to`` or
  ``service_date <= effective_to``).
* ``places_of_service`` / ``encounter_classes``, when given, must contain the line's value; an unknown
  (NULL) value does not match a restricted rule, as ``x IN (...)`` behaves in SQL.
* ``only_with``: a pair rule applies only when another code on the same encounter matches ``only_with``
  (same system and range rules; the partner's own date and filters are not checked).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, time
from pathlib import Path
from typing import Annotated, Any, TypedDict, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from retroauth.deadlines import BusinessCalendar
from retroauth.vocab import Anchor, Channel, CodeSystem, EncounterClass, MissReason, WindowUnit

# ---------------------------------------------------------------------------------------------------
# Small value checks (plain functions, so messages stay in one place)

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_EVIDENCE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_URL = re.compile(r"https?://[^\s/]+\S*")
_PHONE_CHARS = re.compile(r"[0-9+(). -]+")
_POS = re.compile(r"\d{2}")
_LOINC = re.compile(r"\d{1,7}-\d")

# Code formats per system: a typo ("7055l", a J-code filed under CPT) fails on load.
_CPT = re.compile(r"\d{4}[0-9A-Z]")  # category I 5 digits; II/III/PLA end in F, T, U, M
_CODE_FORMATS: dict[CodeSystem, tuple[re.Pattern[str], str]] = {
    CodeSystem.CPT: (_CPT, "4 digits and a digit or letter, e.g. 70551 or 0275T"),
    CodeSystem.HCPCS: (re.compile(r"[A-V]\d{4}|\d{4}[0-9A-Z]"), "a letter A-V and 4 digits (J0585) or a CPT code"),
    CodeSystem.SNOMED: (re.compile(r"[1-9]\d{5,17}"), "6 to 18 digits"),
    CodeSystem.ICD10PCS: (re.compile(r"[0-9A-HJ-NP-Z]{7}"), "7 characters, digits and letters except I and O"),
    CodeSystem.ICD10CM: (re.compile(r"[A-Z]\d[0-9A-Z](?:\.?[0-9A-Z]{1,4})?"), "a letter, a digit, then up to 5 characters"),
    CodeSystem.REVENUE: (re.compile(r"\d{4}"), "4 digits, e.g. 0450"),
    CodeSystem.LOINC: (_LOINC, "digits, a dash and a check digit, e.g. 34117-2"),
}
# Systems whose codes have no order: a range would match arbitrary concepts.
_NO_RANGES = {CodeSystem.SNOMED, CodeSystem.LOINC}


def loinc_check_digit_ok(code: str) -> bool:
    """LOINC's mod-10 (Luhn) check digit: ``34117-2`` is valid, ``34117-3`` is not."""
    body, _, check = code.partition("-")
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)  # double every other digit, from the right
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10 == int(check)


_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def snomed_check_digit_ok(sctid: str) -> bool:
    """SNOMED CT identifiers end in a Verhoeff check digit: it catches most one-digit typos."""
    c = 0
    for i, ch in enumerate(reversed(sctid)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][int(ch)]]
    return c == 0


def code_problem(system: CodeSystem, code: str) -> str | None:
    """Why ``code`` is not a well-formed code of ``system``, or None. The message describes the
    shape and never repeats the code (importers report it next to patient records)."""
    pattern, shape = _CODE_FORMATS[system]
    if not pattern.fullmatch(code):
        return f"not a well-formed {system.value} code ({shape})"
    if system is CodeSystem.LOINC and not loinc_check_digit_ok(code):
        return "wrong LOINC check digit"
    if system is CodeSystem.SNOMED and not snomed_check_digit_ok(code):
        return "wrong SNOMED CT check digit"
    return None


def _code_problem(system: CodeSystem, code: str) -> str | None:
    """``code_problem`` naming the code: in a payer file the code is the useful part of the message."""
    problem = code_problem(system, code)
    return f"{code!r}: {problem}" if problem else None


def _shape(code: str) -> str:
    # Digits become '#': two range ends of the same shape differ only in their digits.
    return re.sub(r"\d", "#", code)


def split_code_entry(entry: str, system: CodeSystem | str) -> tuple[str, str]:
    """``"15820-15823"`` -> ("15820", "15823"); a single code -> (code, code). LOINC codes keep their dash."""
    if CodeSystem(system) is CodeSystem.LOINC:
        return entry, entry
    lo, sep, hi = entry.partition("-")
    return (lo, hi) if sep else (entry, entry)


def _check_code_entry(value: str, info: ValidationInfo) -> str:
    """A single code or a range, checked against the sibling ``code_system`` when that one is valid."""
    value = value.strip().upper()
    system: CodeSystem | None = info.data.get("code_system")  # None: itself invalid and reported
    if not value:
        raise ValueError("empty code")
    if system is CodeSystem.LOINC:  # the dash belongs to the code
        lo, is_range, hi = value, False, value
    else:
        lo, sep, hi = value.partition("-")
        is_range, hi = bool(sep), hi if sep else lo
    if is_range:
        if not lo or not hi:
            raise ValueError(f"range {value!r} needs a start and an end, e.g. 15820-15823")
        if system in _NO_RANGES:
            raise ValueError(f"{system.value} codes have no order: list each code instead of the range {value!r}")
        if len(lo) != len(hi):
            raise ValueError(
                f"range {value!r}: both ends must have the same length ({len(lo)} and {len(hi)} characters)"
            )
        if _shape(lo) != _shape(hi):
            raise ValueError(f"range {value!r}: both ends must have the same letters in the same places")
        if lo > hi:
            raise ValueError(f"range {value!r} is reversed: the start must not be after the end")
    if system is not None:
        for code in dict.fromkeys((lo, hi)):
            problem = _code_problem(system, code)
            if problem:
                raise ValueError(problem)
    return value


def _hhmm(value: Any) -> time:
    if isinstance(value, time):
        return value
    m = _HHMM.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f'must be a 24-hour local time "HH:MM" such as "17:00", got {value!r}')
    return time(int(m.group(1)), int(m.group(2)))


def _slug(value: str) -> str:
    if not _SLUG.fullmatch(value):
        raise ValueError(f"{value!r} must be a slug: lowercase letters and digits joined by dashes, e.g. 'priority-health'")
    return value


def _url(value: str) -> str:
    if not _URL.fullmatch(value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


def _phone(value: str) -> str:
    digits = re.sub(r"\D", "", value)
    if not _PHONE_CHARS.fullmatch(value) or not (len(digits) == 10 or (len(digits) == 11 and digits[0] == "1")):
        raise ValueError(f"{value!r} is not a US phone number (10 digits, optionally with a leading 1)")
    return value


def _pos(value: str) -> str:
    if not _POS.fullmatch(value):
        raise ValueError(f"{value!r} is not a CMS place-of-service code (2 digits, e.g. 22)")
    return value


def _loinc(value: str) -> str:
    problem = _code_problem(CodeSystem.LOINC, value.strip())
    if problem:
        raise ValueError(problem)
    return value.strip()


def _loinc_or_evidence(value: str) -> str:
    # A document is a LOINC type (a clinical note) or a reason's evidence slug ("outage_record").
    value = value.strip()
    if value[:1].isdigit():
        return _loinc(value)
    if not _EVIDENCE.fullmatch(value):
        raise ValueError(f"{value!r} is neither a LOINC document code (34111-5) nor an evidence slug (outage_record)")
    return value


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


Slug = Annotated[str, AfterValidator(_slug)]
Text = Annotated[str, AfterValidator(_nonempty)]
Url = Annotated[str, AfterValidator(_url)]
Phone = Annotated[str, AfterValidator(_phone)]
PlaceOfService = Annotated[str, AfterValidator(_pos)]
Loinc = Annotated[str, AfterValidator(_loinc)]
DocumentRef = Annotated[str, AfterValidator(_loinc_or_evidence)]
LocalTime = Annotated[time, BeforeValidator(_hhmm)]
CodeEntry = Annotated[str, AfterValidator(_check_code_entry)]


def code_family(code_system: CodeSystem | str) -> str:
    """The system codes are matched in: CPT codes are HCPCS Level I, so both map to ``HCPCS``."""
    cs = CodeSystem(code_system)  # an unknown system raises: a typo must not silently match nothing
    return CodeSystem.HCPCS.value if cs is CodeSystem.CPT else cs.value


def code_in_entry(code: str, lo: str, hi: str) -> bool:
    """The range rule the SQL sweep reproduces: same length, ``lo <= code <= hi`` as strings."""
    return len(code) == len(lo) and lo <= code <= hi


# ---------------------------------------------------------------------------------------------------
# The schema of one payer file


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Duration(_Model):
    """A length of time: ``{value: 90, unit: calendar_days}``. Never a bare number: 90 what?"""

    value: PositiveInt
    unit: WindowUnit

    @model_validator(mode="before")
    @classmethod
    def _needs_mapping(cls, data: Any) -> Any:
        if isinstance(data, (Mapping, Duration)):
            return data
        raise ValueError(
            f"a duration needs a value and a unit, e.g. {{value: 90, unit: calendar_days}}; got {data}"
        )

    def __str__(self) -> str:
        return f"{self.value} {self.unit.value}"


class Source(_Model):
    """The public page the file is modeled on, and when it was read."""

    title: Text
    url: Url
    read_on: date


class Contact(_Model):
    mail_lines: list[Text] = []
    fax: Phone | None = None
    phone: Phone | None = None
    portal_url: Url | None = None
    api_base_url: Url | None = None

    @model_validator(mode="after")
    def _reachable(self) -> Contact:
        if not (self.mail_lines or self.fax or self.phone or self.portal_url or self.api_base_url):
            raise ValueError("give at least one way to reach the payer: mail_lines, fax, phone, portal_url or api_base_url")
        return self


class CodeSet(_Model):
    """Codes of one system: single codes and ranges such as ``15820-15823``."""

    code_system: CodeSystem
    codes: list[CodeEntry] = Field(min_length=1)

    @field_validator("codes")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        dups = sorted({c for c in v if v.count(c) > 1})  # a copy-paste slip, and code_count would count it twice
        if dups:
            raise ValueError(f"code listed twice: {', '.join(dups)}")
        return v

    def ranges(self) -> list[tuple[str, str]]:
        """(lo, hi) per entry, lo == hi for a single code."""
        return [split_code_entry(c, self.code_system) for c in self.codes]

    def contains(self, code_system: CodeSystem | str, code: str) -> bool:
        if code_family(code_system) != code_family(self.code_system):
            return False
        code = code.strip().upper()
        return any(code_in_entry(code, lo, hi) for lo, hi in self.ranges())

    def code_count(self) -> int:
        """How many codes the entries cover (a range counts each code of its shape)."""
        total = 0
        for lo, hi in self.ranges():
            if lo == hi:
                total += 1
            else:
                total += int(re.sub(r"\D", "", hi)) - int(re.sub(r"\D", "", lo)) + 1
        return total


class AuthRule(CodeSet):
    """Services of one category that need authorization, where and when."""

    category: Slug
    only_with: CodeSet | None = None  # a pair rule: only when billed with one of these on the encounter
    places_of_service: list[PlaceOfService] | None = Field(None, min_length=1)
    encounter_classes: list[EncounterClass] | None = Field(None, min_length=1)
    effective_from: date
    effective_to: date | None = None
    provider_specific: bool = False  # an auth on file must name the same rendering provider

    @field_validator("effective_to")
    @classmethod
    def _after_from(cls, v: date | None, info: ValidationInfo) -> date | None:
        start = info.data.get("effective_from")
        if v is not None and start is not None and v < start:
            raise ValueError(f"effective_to {v} is before effective_from {start}")
        return v

    def match_rows(self) -> list[tuple[str, str, str]]:
        """(code family, lo, hi) rows: what the SQL sweep loads to match service lines."""
        family = code_family(self.code_system)
        return [(family, lo, hi) for lo, hi in self.ranges()]

    def in_effect(self, service_date: date) -> bool:
        return self.effective_from <= service_date and (self.effective_to is None or service_date <= self.effective_to)

    def applies(
        self,
        code_system: CodeSystem | str,
        code: str,
        service_date: date,
        place_of_service: str | None = None,
        encounter_class: EncounterClass | str | None = None,
        other_codes_on_encounter: Iterable[tuple[str, str]] = (),
    ) -> bool:
        """Whether this rule requires authorization for the line (see the module doc for the semantics)."""
        if not (self.contains(code_system, code) and self.in_effect(service_date)):
            return False
        if self.places_of_service is not None and place_of_service not in self.places_of_service:
            return False
        if self.encounter_classes is not None:
            if encounter_class is None or EncounterClass(encounter_class) not in self.encounter_classes:
                return False
        if self.only_with is not None:
            partner = self.only_with
            return any(partner.contains(cs, c) for cs, c in other_codes_on_encounter)
        return True


class WeekendHolidayBy(_Model):
    """'Weekend or holiday: by 5 pm on the next business day' (see ``deadlines.notification_due``)."""

    next_business_day_local_time: LocalTime


class RetroWindow(_Model):
    """How long after ``anchor`` a retro request for these reasons is still taken."""

    reasons: list[MissReason] = Field(min_length=1)
    within: Duration
    anchor: Anchor
    cutoff_local_time: LocalTime | None = None  # due time on the last day (default: end of day)
    roll_to_business_day: bool = False  # a due date on a weekend/holiday moves to the next business day
    weekend_holiday_by: WeekendHolidayBy | None = None

    @field_validator("reasons")
    @classmethod
    def _unique(cls, v: list[MissReason]) -> list[MissReason]:
        dups = sorted({r.value for r in v if v.count(r) > 1})
        if dups:
            raise ValueError(f"reason listed twice: {', '.join(dups)}")
        return v

    @field_validator("anchor")
    @classmethod
    def _not_denial(cls, v: Anchor) -> Anchor:
        if v is Anchor.DENIAL:
            raise ValueError("'denial' anchors appeals; a retro window counts from service_date, admission, "
                             "discharge, coverage_discovery or remittance")
        return v

    @field_validator("cutoff_local_time", "roll_to_business_day")
    @classmethod
    def _day_window_only(cls, v: Any, info: ValidationInfo) -> Any:
        within = info.data.get("within")
        if v and within is not None and within.unit is WindowUnit.HOURS:
            raise ValueError(f"{info.field_name} applies to day windows; this window is {within} (exact elapsed time)")
        return v

    def describe(self) -> str:
        text = f"{self.within} from {self.anchor.value}"
        if self.cutoff_local_time:
            text += f" by {self.cutoff_local_time:%H:%M}"
        if self.weekend_holiday_by:
            text += f" (weekend/holiday: next business day {self.weekend_holiday_by.next_business_day_local_time:%H:%M})"
        return text


class RetroPolicy(_Model):
    accepted: bool
    windows: list[RetroWindow] = Field(default_factory=list, validate_default=True)
    notes: str | None = None

    @field_validator("windows")
    @classmethod
    def _consistent(cls, v: list[RetroWindow], info: ValidationInfo) -> list[RetroWindow]:
        accepted = info.data.get("accepted")
        if accepted is False and v:
            raise ValueError("retro.accepted is false, so there must be no windows (remove them or set accepted: true)")
        if accepted is True and not v:
            raise ValueError("retro.accepted is true: give at least one window (reasons, within, anchor)")
        first: dict[MissReason, int] = {}
        for i, window in enumerate(v):
            for reason in window.reasons:
                if reason in first:
                    raise ValueError(
                        f"reason '{reason.value}' is in windows[{first[reason]}] and windows[{i}]; "
                        "a reason may appear in one window only"
                    )
                first[reason] = i
        return v

    def window_for(self, reason: MissReason | str) -> RetroWindow | None:
        """The window for ``reason``, or None: the payer takes no retro request for it."""
        reason = MissReason(reason)
        return next((w for w in self.windows if reason in w.reasons), None)


class Notification(_Model):
    """A notice the payer wants after the fact, e.g. an admission notice within 24 hours."""

    name: Text
    encounter_classes: list[EncounterClass] = Field(min_length=1)
    within: Duration
    anchor: Anchor
    weekend_holiday_by: WeekendHolidayBy | None = None


class Documents(_Model):
    """What goes in the packet: LOINC document types, plus evidence slugs per reason."""

    always: list[Loinc] = []
    by_category: dict[Slug, list[Loinc]] = {}
    by_reason: dict[MissReason, list[DocumentRef]] = {}
    by_encounter_class: dict[EncounterClass, list[Loinc]] = {}

    def required(
        self,
        categories: Iterable[str] = (),
        reason: MissReason | str | None = None,
        encounter_class: EncounterClass | str | None = None,
    ) -> list[str]:
        """Every document for a case, in file order without repeats."""
        out = list(self.always)
        for category in categories:
            out += self.by_category.get(category, [])
        if reason is not None:
            out += self.by_reason.get(MissReason(reason), [])
        if encounter_class is not None:
            out += self.by_encounter_class.get(EncounterClass(encounter_class), [])
        return list(dict.fromkeys(out))


class ReviewSla(_Model):
    # Defaults: CMS-0057-F decision times (72 hours expedited, 7 calendar days standard).
    expedited: Duration = Duration(value=72, unit=WindowUnit.HOURS)
    standard: Duration = Duration(value=7, unit=WindowUnit.CALENDAR_DAYS)


class FollowUp(_Model):
    first_after: Duration
    every: Duration
    max_inquiries: int = Field(ge=1, le=20)


class Appeal(_Model):
    level: int = Field(ge=1, le=3)
    name: Text
    within: Duration
    anchor: Anchor = Anchor.DENIAL


class PayerRules(_Model):
    """One payer file."""

    id: Annotated[str, Field(max_length=64), AfterValidator(_slug)]
    name: Text
    time_zone: str
    source: Source
    contact: Contact
    channel: Channel
    authorization_required: list[AuthRule] = []
    retro: RetroPolicy
    notifications: list[Notification] = []
    documents: Documents = Documents()
    review_sla: ReviewSla = ReviewSla()
    follow_up: FollowUp
    appeals: list[Appeal] = []
    closures: list[date] = []  # payer closure days beyond US federal holidays

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file name
            raise ValueError(f"{v!r} is not an IANA time zone such as America/Chicago") from None
        return v

    @field_validator("channel")
    @classmethod
    def _channel_reachable(cls, v: Channel, info: ValidationInfo) -> Channel:
        contact: Contact | None = info.data.get("contact")
        if contact is None:
            return v
        if v is Channel.FHIR_PAS and not contact.api_base_url:
            raise ValueError("channel fhir_pas needs contact.api_base_url (the PAS endpoint)")
        if v is Channel.PACKET and not (contact.fax or contact.mail_lines or contact.portal_url):
            raise ValueError("channel packet needs contact.fax, contact.mail_lines or contact.portal_url")
        return v

    @field_validator("documents")
    @classmethod
    def _known_categories(cls, v: Documents, info: ValidationInfo) -> Documents:
        rules: list[AuthRule] | None = info.data.get("authorization_required")
        if rules is None:
            return v
        known = {r.category for r in rules}
        unknown = sorted(set(v.by_category) - known)
        if unknown:
            raise ValueError(
                f"by_category names {', '.join(unknown)}, which no authorization_required rule has "
                f"(categories: {', '.join(sorted(known)) or 'none'})"
            )
        return v

    @field_validator("appeals")
    @classmethod
    def _levels(cls, v: list[Appeal]) -> list[Appeal]:
        levels = [a.level for a in v]
        if levels != list(range(1, len(levels) + 1)):
            raise ValueError(f"appeal levels must be 1, 2, 3 in order without gaps, got {levels}")
        return v

    def rules_requiring_auth(
        self,
        code_system: CodeSystem | str,
        code: str,
        service_date: date,
        place_of_service: str | None = None,
        encounter_class: EncounterClass | str | None = None,
        other_codes_on_encounter: Iterable[tuple[str, str]] = (),
    ) -> list[AuthRule]:
        """The rules that require authorization for one service line, in file order (empty: none needed).

        ``other_codes_on_encounter`` holds (code system, code) pairs of the encounter's other lines, for
        pair rules. See the module doc for the exact semantics.
        """
        others = list(other_codes_on_encounter)
        return [
            r for r in self.authorization_required
            if r.applies(code_system, code, service_date, place_of_service, encounter_class, others)
        ]

    def calendar(self) -> BusinessCalendar:
        """Business days for this payer's deadlines: weekdays minus federal holidays and its closures."""
        return BusinessCalendar(self.closures)

    def code_count(self) -> int:
        return sum(r.code_count() for r in self.authorization_required)

    def categories(self) -> list[str]:
        return list(dict.fromkeys(r.category for r in self.authorization_required))


# ---------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one file."""

    file: str
    path: str  # dotted field path, e.g. retro.windows[0].within.unit ("" for the whole file)
    line: int | None  # 1-based, when the YAML parser knows it
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PayerRuleError(Exception):
    """The payer rule library cannot be used; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the payer rule library:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


# ---------------------------------------------------------------------------------------------------
# YAML: text scalars, line numbers, duplicate keys

_TEXT_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}


class _RuleLoader(yaml.SafeLoader):
    """SafeLoader that leaves numbers, dates and times as text (only booleans and null are resolved)."""


_RuleLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _TEXT_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

Loc = tuple[str | int, ...]


def _index_nodes(node: yaml.Node, loc: Loc, lines: dict[Loc, int], dups: list[tuple[Loc, int, int]],
                 active: set[int]) -> None:
    """Record the line of every key and list item; note duplicate keys (SafeLoader keeps the last silently)."""
    if id(node) in active:  # a recursive alias
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first:
                dups.append((loc + (key,), line, first[key]))
                continue
            first[key] = line
            lines[loc + (key,)] = line
            _index_nodes(value_node, loc + (key,), lines, dups, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _index_nodes(item, loc + (i,), lines, dups, active)
    active.discard(id(node))


def _read_yaml(path: Path) -> tuple[Any, dict[Loc, int], list[Problem]]:
    """The file's data, the line of each key path, and its YAML-level problems."""
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return None, {}, [Problem(name, "", None, f"cannot read the file: {exc.__class__.__name__}")]
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        return None, {}, [Problem(name, "", line, "cannot read the file: not UTF-8 text")]
    try:
        loader = _RuleLoader(text)  # it checks every character first
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        return None, {}, [Problem(name, "", line, f"YAML error: character #x{exc.character:04x} is not allowed in YAML")]
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, [Problem(name, "", None, "the file is empty")]
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        dups: list[tuple[Loc, int, int]] = []
        _index_nodes(node, (), lines, dups, set())
        if dups:
            return None, lines, [
                Problem(name, _dotted(loc), line, f"duplicate key '{loc[-1]}' (first at line {first_line})")
                for loc, line, first_line in dups
            ]
        return loader.construct_document(node), lines, []
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        if exc.context_mark and mark is not exc.context_mark and exc.context_mark.line != mark.line:
            detail += f" (opened at line {exc.context_mark.line + 1})"
        return None, {}, [Problem(name, "", mark.line + 1 if mark else None, f"YAML syntax error: {detail}")]
    except yaml.YAMLError as exc:
        return None, {}, [Problem(name, "", None, f"YAML error: {exc}")]
    except RecursionError:  # the composer recurses once per level: "[[[[..." thousands deep
        return None, {}, [Problem(name, "", loader.line + 1, "YAML error: collections nested too deeply")]
    finally:
        loader.dispose()


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(loc: Sequence[str | int], lines: dict[Loc, int]) -> int | None:
    """The line of ``loc``, or of its nearest ancestor present in the file (a missing field's parent)."""
    key: Loc = tuple(p for p in loc if p != "[key]")
    while key and key not in lines:
        key = key[:-1]
    if not key and loc:  # only the document start is known: a line number would mislead
        return None
    return lines.get(key)


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model a location points into (for 'did you mean' on unknown fields)."""
    model: type[BaseModel] | None = PayerRules
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _inner_model(model.model_fields[part].annotation)
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _error_message(err: Any) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        if model is None:
            return "unknown field"
        allowed = list(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown field{hint}; allowed: {', '.join(allowed)}"
    if kind == "missing":
        if loc and loc[-1] == "unit":
            return "required field is missing: a duration needs a unit, one of hours, calendar_days, business_days"
        return "required field is missing"
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    msg = err["msg"]
    if "[key]" in loc:
        msg = f"not a valid key: {msg}"
    value = err.get("input")
    if isinstance(value, (str, int, float, bool)) and len(repr(value)) <= 60:
        msg += f", got {value!r}"
    return msg


def _validate(path: Path) -> tuple[PayerRules | None, dict[Loc, int], list[Problem]]:
    data, lines, problems = _read_yaml(path)
    if problems:
        return None, lines, problems
    name = str(path)
    if not isinstance(data, dict):
        return None, lines, [Problem(name, "", lines.get(()), "a payer file must be a YAML mapping (id: ..., name: ...)")]
    try:
        return PayerRules.model_validate(data), lines, []
    except ValidationError as exc:
        return None, lines, [
            Problem(name, _dotted(e["loc"]), _line_for(e["loc"], lines), _error_message(e)) for e in exc.errors()
        ]


# ---------------------------------------------------------------------------------------------------
# Loading


def load_payer_file(path: str | Path) -> PayerRules:
    """One payer file, validated; ``PayerRuleError`` lists every problem in it."""
    rules, _, problems = _validate(Path(path))
    if problems:
        raise PayerRuleError(problems)
    assert rules is not None
    return rules


class PayerSummary(TypedDict):
    id: str
    name: str
    file: str
    auth_rules: int
    codes: int
    retro_accepted: bool
    retro_windows: list[str]  # "emergency, administrative_error: 90 calendar_days from admission"
    channel: str


class RuleLibrary(Mapping[str, PayerRules]):
    """The loaded library: payer id -> ``PayerRules``."""

    def __init__(self, payers: Mapping[str, PayerRules], files: Mapping[str, Path]) -> None:
        self._payers = dict(payers)
        self._files = dict(files)

    def __getitem__(self, payer_id: str) -> PayerRules:
        try:
            return self._payers[payer_id]
        except KeyError:
            raise KeyError(f"no payer rules for payer id {payer_id!r} (known: {', '.join(sorted(self._payers))})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._payers)

    def __len__(self) -> int:
        return len(self._payers)

    def file_of(self, payer_id: str) -> Path:
        self[payer_id]  # the same KeyError for an unknown id
        return self._files[payer_id]

    def rules_requiring_auth(self, payer_id: str, *args: Any, **kwargs: Any) -> list[AuthRule]:
        """``PayerRules.rules_requiring_auth`` for one payer."""
        return self[payer_id].rules_requiring_auth(*args, **kwargs)

    def summaries(self) -> list[PayerSummary]:
        out: list[PayerSummary] = []
        for pid, p in sorted(self._payers.items()):
            windows = [f"{', '.join(r.value for r in w.reasons)}: {w.describe()}" for w in p.retro.windows]
            out.append(PayerSummary(
                id=pid, name=p.name, file=str(self._files[pid]), auth_rules=len(p.authorization_required),
                codes=p.code_count(), retro_accepted=p.retro.accepted, retro_windows=windows,
                channel=p.channel.value,
            ))
        return out


def load_rule_library(directory: str | Path) -> RuleLibrary:
    """Every ``*.yaml`` / ``*.yml`` file of ``directory`` (not its subdirectories), all validated.

    ``PayerRuleError`` lists the problems of every bad file together, and duplicate payer ids.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PayerRuleError([Problem(str(directory), "", None, "not a directory")])
    files = sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.suffix in (".yaml", ".yml") and not p.name.startswith(".")
    )
    if not files:
        raise PayerRuleError([Problem(str(directory), "", None, "no payer files (*.yaml) in this directory")])
    problems: list[Problem] = []
    payers: dict[str, PayerRules] = {}
    where: dict[str, tuple[Path, int | None]] = {}
    for path in files:
        rules, lines, file_problems = _validate(path)
        problems += file_problems
        if rules is None:
            continue
        id_line = lines.get(("id",))
        if rules.id in where:
            other, other_line = where[rules.id]
            problems.append(Problem(
                str(path), "id", id_line,
                f"payer id '{rules.id}' is also used by {other}" + (f" (line {other_line})" if other_line else "")
                + "; each payer id must be unique",
            ))
            continue
        payers[rules.id] = rules
        where[rules.id] = (path, id_line)
    if problems:
        raise PayerRuleError(problems)
    return RuleLibrary(payers, {pid: p for pid, (p, _) in where.items()})


def check_directory(directory: str | Path) -> list[PayerSummary]:
    """What ``retroauth payers check [DIR]`` shows: one summary per payer, or ``PayerRuleError``."""
    return load_rule_library(directory).summaries()
