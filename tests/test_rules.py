"""The payer rule library: the shipped files, the matcher, and errors that point at file, field and line."""

from __future__ import annotations

import json
from datetime import date, time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from config import PAYERS_DIR
from retroauth.rules import (
    CodeSet,
    Duration,
    PayerRuleError,
    PayerRules,
    Problem,
    RetroWindow,
    RuleLibrary,
    check_directory,
    code_in_entry,
    load_payer_file,
    load_rule_library,
    loinc_check_digit_ok,
    snomed_check_digit_ok,
)
from retroauth.vocab import FHIR_ENCOUNTER_CLASSES, Anchor, Channel, MissReason, WindowUnit
from tests.conftest import DATA, SYNTHEA

BAD = DATA / "bad" / "payers"

SHIPPED = {
    "medicare-ffs-opd", "priority-health", "hometown-health", "emblemhealth", "hpsj-medi-cal",
    "alameda-alliance-imaging", "uhc-commercial", "synthea-demo-health",
}


@pytest.fixture(scope="module")
def library() -> RuleLibrary:
    return load_rule_library(PAYERS_DIR)


@pytest.fixture(scope="module")
def medicare(library: RuleLibrary) -> PayerRules:
    return library["medicare-ffs-opd"]


def categories(rules) -> list[str]:
    return [r.category for r in rules]


# --- the shipped library ---------------------------------------------------------------------------


def test_shipped_library_loads(library: RuleLibrary) -> None:
    assert set(library) == SHIPPED
    for payer_id, payer in library.items():
        assert payer.id == payer_id
        assert payer.source.read_on == date(2026, 11, 27)
        assert payer.source.url.startswith("https://")


def test_every_shipped_file_says_it_is_a_model(library: RuleLibrary) -> None:
    for payer_id in library:
        text = library.file_of(payer_id).read_text()
        assert "verify" in text.lower() or "FICTIONAL" in text, payer_id


def test_check_directory_summaries() -> None:
    summaries = {s["id"]: s for s in check_directory(PAYERS_DIR)}
    assert set(summaries) == SHIPPED
    medicare = summaries["medicare-ffs-opd"]
    assert medicare["retro_accepted"] is False and medicare["retro_windows"] == []
    assert medicare["auth_rules"] == 10 and medicare["codes"] > 40
    assert summaries["uhc-commercial"]["channel"] == "x12_278"
    assert summaries["hometown-health"]["retro_windows"] == [
        "emergency, delayed_insurance_verification, retroactive_eligibility, system_issue, "
        "administrative_error: 7 calendar_days from service_date"
    ]
    json.dumps(list(summaries.values()))  # the CLI's --json prints them as they are


def test_shipped_window_styles(library: RuleLibrary) -> None:
    assert library["priority-health"].retro.window_for("emergency").within == Duration(value=90, unit="calendar_days")
    hometown = library["hometown-health"]
    assert hometown.time_zone == "America/Los_Angeles"
    notice = hometown.notifications[0]
    assert (notice.within.value, notice.within.unit) == (24, WindowUnit.HOURS)
    assert notice.weekend_holiday_by.next_business_day_local_time == time(17, 0)
    assert library["emblemhealth"].retro.window_for("administrative_error").anchor is Anchor.REMITTANCE
    hpsj = library["hpsj-medi-cal"].retro
    assert hpsj.window_for(MissReason.RETROACTIVE_ELIGIBILITY).within.value == 30
    assert hpsj.window_for(MissReason.EMERGENCY) is None  # not a reason this plan takes
    alameda = library["alameda-alliance-imaging"].retro.window_for("system_issue")
    assert alameda.within.unit is WindowUnit.BUSINESS_DAYS and alameda.cutoff_local_time == time(17, 0)
    uhc = library["uhc-commercial"].retro.window_for("emergency")
    assert uhc.within.unit is WindowUnit.HOURS and uhc.anchor is Anchor.COVERAGE_DISCOVERY
    assert library["medicare-ffs-opd"].retro.window_for("emergency") is None


def test_review_sla_defaults_are_cms_0057(library: RuleLibrary) -> None:
    sla = library["synthea-demo-health"].review_sla
    assert str(sla.expedited) == "72 hours" and str(sla.standard) == "7 calendar_days"
    medicare = library["medicare-ffs-opd"].review_sla
    assert str(medicare.standard) == "10 business_days" and str(medicare.expedited) == "2 business_days"


def test_documents_and_calendar(library: RuleLibrary) -> None:
    docs = library["synthea-demo-health"].documents
    assert docs.required(["advanced-imaging"], "emergency", "emergency") == ["34117-2", "34111-5"]
    emblem = library["emblemhealth"]
    assert not emblem.calendar().is_business_day(date(2026, 12, 24))  # a payer closure
    assert emblem.calendar().is_business_day(date(2026, 12, 23))


# --- the matcher -----------------------------------------------------------------------------------

OPD = "22"  # on-campus outpatient hospital


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("15820", ["blepharoplasty"]),  # range start
        ("15823", ["blepharoplasty"]),  # range end
        ("15819", []),
        ("15824", []),
        ("1582", []),  # shorter: never inside a 5-character range
        ("158200", []),
        ("67906", ["blepharoplasty"]),  # single code
        ("67905", []),  # between 67904 and 67906, listed as singles
        (" 67906 ", ["blepharoplasty"]),  # trimmed
    ],
)
def test_range_edges(medicare: PayerRules, code: str, expected: list[str]) -> None:
    assert categories(medicare.rules_requiring_auth("CPT", code, date(2024, 1, 2), OPD)) == expected


def test_pair_rule_needs_its_partner(medicare: PayerRules) -> None:
    day = date(2024, 1, 2)
    assert medicare.rules_requiring_auth("CPT", "64612", day, OPD, None, set()) == []
    assert medicare.rules_requiring_auth("CPT", "64612", day, OPD, None, {("CPT", "99213")}) == []
    with_drug = medicare.rules_requiring_auth("CPT", "64612", day, OPD, None, {("HCPCS", "J0587")})
    assert categories(with_drug) == ["botulinum-toxin"]
    # and the drug itself, billed with the procedure
    drug = medicare.rules_requiring_auth("HCPCS", "j0588", day, OPD, None, {("CPT", "64615")})
    assert categories(drug) == ["botulinum-toxin"]
    assert medicare.rules_requiring_auth("HCPCS", "J0589", day, OPD, None, {("CPT", "64615")}) == []


def test_cpt_and_hcpcs_are_one_family(medicare: PayerRules) -> None:
    # An 835 reports CPT codes with the HCPCS qualifier: the rule must still match.
    assert categories(medicare.rules_requiring_auth("HCPCS", "22551", date(2022, 1, 3), OPD)) == ["cervical-fusion"]
    assert medicare.rules_requiring_auth("SNOMED", "22551", date(2022, 1, 3), OPD) == []


@pytest.mark.parametrize(("pos", "expected"), [("22", True), ("19", True), ("11", False), (None, False)])
def test_place_of_service_filter(medicare: PayerRules, pos: str | None, expected: bool) -> None:
    assert bool(medicare.rules_requiring_auth("CPT", "63650", date(2022, 1, 3), pos)) is expected


@pytest.mark.parametrize(
    ("code", "day", "expected"),
    [
        ("64492", date(2023, 6, 30), False),  # before facet joints joined the list
        ("64492", date(2023, 7, 1), True),
        ("64492", date(2024, 7, 31), True),  # last day before removal
        ("64492", date(2024, 8, 1), False),  # removed
        ("64495", date(2025, 3, 3), False),
        ("64490", date(2024, 8, 1), True),  # still on the list
        ("22551", date(2021, 6, 30), False),
        ("22551", date(2021, 7, 1), True),
    ],
)
def test_effective_dates(medicare: PayerRules, code: str, day: date, expected: bool) -> None:
    assert bool(medicare.rules_requiring_auth("CPT", code, day, OPD)) is expected


@pytest.mark.parametrize(("cls", "expected"), [("outpatient", True), ("emergency", False), ("inpatient", False), (None, False)])
def test_encounter_class_filter(library: RuleLibrary, cls: str | None, expected: bool) -> None:
    rules = library.rules_requiring_auth("priority-health", "CPT", "70553", date(2025, 5, 5), None, cls)
    assert bool(rules) is expected


def test_revenue_code_ranges_keep_leading_zeros(library: RuleLibrary) -> None:
    payer = library["uhc-commercial"]
    assert categories(payer.rules_requiring_auth("REV", "0120", date(2025, 5, 5), None, "inpatient")) == ["inpatient-admission"]
    assert payer.rules_requiring_auth("REV", "120", date(2025, 5, 5), None, "inpatient") == []
    assert payer.rules_requiring_auth("REV", "0220", date(2025, 5, 5), None, "inpatient") == []


def test_unknown_code_system_is_an_error(medicare: PayerRules) -> None:
    with pytest.raises(ValueError):
        medicare.rules_requiring_auth("CTP", "15820", date(2024, 1, 2), OPD)


def test_unknown_payer_is_a_clear_key_error(library: RuleLibrary) -> None:
    with pytest.raises(KeyError, match="no payer rules for payer id 'acme'"):
        library["acme"]


def test_match_rows_for_sql(medicare: PayerRules) -> None:
    rule = medicare.authorization_required[0]
    assert rule.match_rows()[:2] == [("HCPCS", "15820", "15823"), ("HCPCS", "67900", "67904")]


@given(st.integers(0, 99999), st.integers(0, 99999), st.integers(0, 99999))
def test_range_compare_is_numeric_for_same_length_codes(a: int, b: int, c: int) -> None:
    lo, hi = sorted((a, b))
    assert code_in_entry(f"{c:05d}", f"{lo:05d}", f"{hi:05d}") == (lo <= c <= hi)


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason="Synthea fixtures not available")
def test_demo_payer_finds_a_few_dozen_lines_in_the_fixture(library: RuleLibrary) -> None:
    payer = library["synthea-demo-health"]
    classes = {}
    for line in (SYNTHEA / "Encounter.000.ndjson").open():
        enc = json.loads(line)
        classes[f"Encounter/{enc['id']}"] = FHIR_ENCOUNTER_CLASSES[enc["class"]["code"]]
    hits = 0
    for line in (SYNTHEA / "Procedure.000.ndjson").open():
        proc = json.loads(line)
        coding = proc["code"]["coding"][0]
        assert coding["system"] == "http://snomed.info/sct"
        start = proc.get("performedPeriod", {}).get("start") or proc["performedDateTime"]
        cls = classes[proc["encounter"]["reference"]]
        hits += bool(payer.rules_requiring_auth("SNOMED", coding["code"], date.fromisoformat(start[:10]), None, cls))
    assert 20 <= hits <= 100


# --- field validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "entry", "message"),
    [
        ("CPT", "15823-15820", "reversed"),
        ("CPT", "9581-95811", "same length"),
        ("HCPCS", "J0585-K0588", "same letters"),
        ("CPT", "15820-", "start and an end"),
        ("CPT", "J0585", "not a well-formed CPT code"),
        ("SNOMED", "73761001-73761999", "no order"),
        ("SNOMED", "73761002", "check digit"),
        ("REV", "450", "not a well-formed REV code"),
    ],
)
def test_bad_code_entries(system: str, entry: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CodeSet(code_system=system, codes=[entry])


@pytest.mark.parametrize(
    ("system", "entry"),
    [("CPT", "0275T"), ("CPT", "0275T-0278T"), ("HCPCS", "J0585-J0588"), ("HCPCS", "64612"),
     ("SNOMED", "16335031000119103"), ("REV", "0100-0219"), ("ICD10PCS", "0DTJ4ZZ"), ("LOINC", "34117-2")],
)
def test_good_code_entries(system: str, entry: str) -> None:
    assert CodeSet(code_system=system, codes=[entry.lower()]).codes == [entry.upper()]


def test_check_digits() -> None:
    assert loinc_check_digit_ok("34117-2") and not loinc_check_digit_ok("34117-3")
    assert snomed_check_digit_ok("430193006") and not snomed_check_digit_ok("430193007")


@pytest.mark.parametrize("value", ["5pm", "25:00", "7:00", "17:60", "17:00:00", 1020])
def test_bad_cutoffs(value: object) -> None:
    with pytest.raises(ValidationError, match="HH:MM"):
        RetroWindow(reasons=["emergency"], within={"value": 2, "unit": "business_days"}, anchor="service_date",
                    cutoff_local_time=value)


def test_cutoff_only_for_day_windows() -> None:
    with pytest.raises(ValidationError, match="applies to day windows"):
        RetroWindow(reasons=["emergency"], within={"value": 24, "unit": "hours"}, anchor="service_date",
                    cutoff_local_time="17:00")


def test_retro_window_cannot_count_from_a_denial() -> None:
    with pytest.raises(ValidationError, match="anchors appeals"):
        RetroWindow(reasons=["emergency"], within={"value": 2, "unit": "hours"}, anchor="denial")


def test_duration_needs_a_unit() -> None:
    with pytest.raises(ValidationError, match="a duration needs a value and a unit"):
        Duration.model_validate(90)
    with pytest.raises(ValidationError):
        Duration.model_validate({"value": 90})
    with pytest.raises(ValidationError):
        Duration(value=0, unit=WindowUnit.HOURS)


# --- YAML reading ----------------------------------------------------------------------------------

MINIMAL = """\
id: minimal
name: Minimal Payer
time_zone: America/Chicago
source: {title: Test, url: "https://example.com/", read_on: 2026-11-27}
contact: {fax: 800-555-0100}
channel: packet
authorization_required:
  - category: observation
    code_system: REV
    codes: [0762, 0450]
    places_of_service: [01, 22]
    effective_from: 2020-01-01
retro:
  accepted: true
  windows:
    - reasons: [emergency, system_issue]
      within: {value: 2, unit: business_days}
      anchor: service_date
      cutoff_local_time: 17:00
    - reasons: [administrative_error]
      within: {value: 1, unit: business_days}
      anchor: service_date
      cutoff_local_time: 09:30
follow_up: {first_after: {value: 7, unit: calendar_days}, every: {value: 7, unit: calendar_days}, max_inquiries: 3}
"""


def test_yaml_numbers_stay_text(tmp_path: Path) -> None:
    # Plain YAML 1.1 reads 0762 as octal 498, 01 as 1 and 17:00 as 1020 (base 60).
    path = tmp_path / "minimal.yaml"
    path.write_text(MINIMAL)
    payer = load_payer_file(path)
    rule = payer.authorization_required[0]
    assert rule.codes == ["0762", "0450"] and rule.places_of_service == ["01", "22"]
    assert payer.retro.windows[0].cutoff_local_time == time(17, 0)
    assert payer.retro.windows[1].cutoff_local_time == time(9, 30)
    assert payer.follow_up.max_inquiries == 3 and payer.channel is Channel.PACKET


def test_problem_format() -> None:
    assert str(Problem("a.yaml", "retro.windows", 7, "bad")) == "a.yaml:7: retro.windows: bad"
    assert str(Problem("a.yaml", "", None, "the file is empty")) == "a.yaml: the file is empty"


def test_several_problems_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(MINIMAL.replace("America/Chicago", "Mars/Olympus").replace("channel: packet", "channel: pigeon"))
    with pytest.raises(PayerRuleError) as exc:
        load_payer_file(path)
    assert [(p.path, p.line) for p in exc.value.problems] == [("time_zone", 3), ("channel", 6)]


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "the file is empty"), ("- just\n- a list\n", "must be a YAML mapping")],
)
def test_files_that_are_not_payers(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(PayerRuleError, match=message):
        load_payer_file(path)


def test_missing_or_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(PayerRuleError, match="not a directory"):
        load_rule_library(tmp_path / "nope")
    with pytest.raises(PayerRuleError, match="no payer files"):
        load_rule_library(tmp_path)


# --- broken payer files: file, field path and line -------------------------------------------------


def defect_line(path: Path) -> int:
    """The line the fixture marks with '<- defect' (the comment on line 1 only describes the file)."""
    lines = path.read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if i > 1 and "<- defect" in text)


@pytest.mark.parametrize(
    ("name", "path", "message"),
    [
        ("unknown-field.yaml", "retro.windows[0].grace_days", "unknown field"),
        ("range-reversed.yaml", "authorization_required[0].codes[1]", "reversed"),
        ("range-mixed-lengths.yaml", "authorization_required[0].codes[0]", "same length"),
        ("window-without-unit.yaml", "retro.windows[0].within.unit", "needs a unit"),
        ("window-bare-number.yaml", "retro.windows[0].within", "needs a value and a unit"),
        ("unknown-time-zone.yaml", "time_zone", "not an IANA time zone"),
        ("malformed-cutoff.yaml", "retro.windows[0].cutoff_local_time", "HH:MM"),
        ("cutoff-out-of-range.yaml", "retro.windows[0].cutoff_local_time", "HH:MM"),
        ("retro-false-with-windows.yaml", "retro.windows", "accepted is false"),
        ("duplicate-key.yaml", "channel", "duplicate key 'channel' (first at line 7)"),
        ("yaml-syntax-error.yaml", "", "YAML syntax error"),
    ],
)
def test_broken_payer_file(name: str, path: str, message: str) -> None:
    file = BAD / name
    line = defect_line(file)
    with pytest.raises(PayerRuleError) as exc:
        load_payer_file(file)
    [problem] = exc.value.problems  # the fixture is otherwise valid
    assert (Path(problem.file).name, problem.path, problem.line) == (name, path, line)
    assert message in problem.message
    where = f"{file}:{line}: {path}: " if path else f"{file}:{line}: "
    assert where in str(exc.value)


def test_duplicate_payer_id_names_both_files() -> None:
    directory = BAD / "duplicate-id"
    with pytest.raises(PayerRuleError) as exc:
        load_rule_library(directory)
    [problem] = exc.value.problems
    assert (Path(problem.file).name, problem.path, problem.line) == ("b.yaml", "id", defect_line(directory / "b.yaml"))
    assert str(directory / "a.yaml") in problem.message and "dup-payer" in problem.message


def test_library_reports_every_bad_file_together() -> None:
    files = sorted(p.name for p in BAD.glob("*.yaml"))
    with pytest.raises(PayerRuleError) as exc:
        load_rule_library(BAD)
    assert sorted({Path(p.file).name for p in exc.value.problems}) == files
    assert str(exc.value).startswith(f"{len(exc.value.problems)} problems in the payer rule library:")


def test_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(MINIMAL.replace("follow_up:", "folow_up:"))
    with pytest.raises(PayerRuleError) as exc:
        load_payer_file(path)
    messages = {p.path: p.message for p in exc.value.problems}
    assert "did you mean 'follow_up'?" in messages["folow_up"]
    assert messages["follow_up"] == "required field is missing"

