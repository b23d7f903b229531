"""The X12 278 (005010X217) request writer, the structural checker and the response reader.

The files under ``tests/data/x12/278/`` are made by ``corpus_texts()`` below
(``test_corpus_files_are_what_the_builders_make`` fails when they drift; regenerate with
``python -m tests.test_x278``). Every written request is checked by ``check_278``, read back by the
project's generic reader (``retroauth.x12.parse.read_transactions``) and by pyx12's raw tokenizer
(``pyx12.x12file.X12Reader``: segment counts, control numbers, HL numbering and parents, without a
transaction map; pyx12 ships no 005010X217 map). Names, member ids and payer ids are made up.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import pyx12.errors
import pyx12.x12file  # test extra: a second, independent X12 tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from config.settings import Settings
from retroauth.vocab import DELAY_REASON_CODES, MissReason
from retroauth.x12 import X12Error, read_segments, read_transactions
from retroauth.x12.check import check_278
from retroauth.x12.parse import Separators
from retroauth.x12.x278 import (
    PWK_REPORT_TYPE_BY_LOINC,
    Address,
    Attachment278,
    Request278,
    Request278Error,
    Service278,
    gender_code,
    read_278_response,
    write_278_request,
)
from tests.conftest import DATA
from tests.x12build import render

CORPUS = DATA / "x12" / "278"
WHEN = datetime(2026, 12, 2, 9, 30)  # when the requests are sent (facility local time)
COMPANY_ID = "1123456789"  # TRN03: "1" + the facility's EIN (Settings default TIN 12-3456789)
PATIENT_DATA = ("JANE", "M00000001", "BRIEN", "19600517")  # must never appear in an error message

# The facility: the Settings defaults (config/settings.py), spelled out so the sample files do not
# depend on the environment the tests run in.
FACILITY = dict(requester_name="Riverside Community Hospital", requester_npi="1234567893",
                requester_tin="12-3456789", requester_address=Address.from_text("100 Main Street, Springfield, IL 62701"),
                requester_contact="Patient Financial Services, Authorization Desk", requester_phone="217-555-0100")  # fmt: skip
PATIENT = dict(member_id="M00000001", last_name="Doe", first_name="Jane", birth_date=date(1960, 5, 17), gender="F")

# An emergency admission through the ED (no time to ask): NSTEMI, cardiac catheterization.
EMERGENCY = Request278(
    payer_name="Example Health Plan", payer_id="EXHP1", **FACILITY, **PATIENT,
    category="AR", service_type="48", facility_code="11", facility_code_qualifier="A", level_of_service="03",
    event_start=date(2026, 11, 10), event_end=date(2026, 11, 14),
    admission_date=date(2026, 11, 10), discharge_date=date(2026, 11, 14), admission_type_code="1",
    diagnoses=("I21.4", "E11.9", "I10"), admitting_diagnosis="R07.9",
    delay_reason_code=DELAY_REASON_CODES[MissReason.EMERGENCY],
    message="Emergency admission through the ED; authorization could not be requested before treatment.",
    attachments=(
        Attachment278(PWK_REPORT_TYPE_BY_LOINC["34111-5"], "RA000101ED", "EL", "ED note"),
        Attachment278(PWK_REPORT_TYPE_BY_LOINC["18842-5"], "RA000101DS", "FX", "Discharge summary"),
    ),
    services=(
        Service278("99285", date(2026, 11, 10), charge=Decimal("2400"), revenue_code="0450"),
        Service278("93458", date(2026, 11, 11), charge=Decimal("8200.50"), revenue_code="0481", modifiers=("LT",)),
    ),
)  # fmt: skip
EMERGENCY_TRACE, EMERGENCY_REF = "RA-000101-1", "sub-000101-1-7f3a9c2e41d0"

# An outpatient MRI of the brain done without the authorization (administrative error).
IMAGING = Request278(
    payer_name="Example Health Plan", payer_id="EXHP1", **FACILITY, **PATIENT,
    category="HS", service_type="62", facility_code="22", facility_code_qualifier="B",
    event_start=date(2026, 11, 13), diagnoses=("G43.909", "R51.9"),
    delay_reason_code=DELAY_REASON_CODES[MissReason.ADMINISTRATIVE_ERROR],
    attachments=(Attachment278(PWK_REPORT_TYPE_BY_LOINC["18748-4"], "RA000102RR"), Attachment278("B3", "RA000102PO")),
    services=(Service278("70551", date(2026, 11, 13), charge=Decimal("1250"), units=Decimal("1")),),
)  # fmt: skip
IMAGING_TRACE, IMAGING_REF = "RA-000102-1", "sub-000102-1-0b44d6e19a07"

REQUESTS = {
    "emergency-inpatient": (EMERGENCY, 101, EMERGENCY_TRACE, EMERGENCY_REF),
    "outpatient-imaging": (IMAGING, 102, IMAGING_TRACE, IMAGING_REF),
}


def write(request: Request278, control: int = 101, trace: str = EMERGENCY_TRACE, reference: str | None = None,
          **kw) -> str:  # fmt: skip
    return write_278_request(request, control_number=control, trace_number=trace, sender_id="RIVERSIDE",
                             receiver_id="EXHP", when=WHEN, reference=reference, line_breaks=True, **kw)  # fmt: skip


def written(name: str) -> str:
    request, control, trace, ref = REQUESTS[name]
    return write(request, control, trace, ref)


def segments_of(text: str) -> list[list[str]]:
    """The segments of a ``line_breaks`` file as lists of elements (to break them on purpose)."""
    return [line[:-1].split("*") for line in text.splitlines() if line]


def mutate(text: str, change: Callable[[list[list[str]]], None]) -> str:
    segs = segments_of(text)
    change(segs)
    return render(segs, fill_counts=True)


def find(segs: list[list[str]], *prefix: str) -> int:
    return next(i for i, s in enumerate(segs) if s[: len(prefix)] == list(prefix))


def recount(segs: list[list[str]]) -> None:
    """Blank SE01 so that ``render`` fills in the real count (to isolate the problem under test)."""
    segs[find(segs, "SE")][1] = ""


def where(errors: list[X12Error]) -> list[tuple[int | None, str | None, str | None]]:
    return [(e.segment_number, e.segment_id, e.element) for e in errors]


def pyx12_segments(text: str) -> tuple[list[str], list]:
    reader = pyx12.x12file.X12Reader(io.StringIO(text))
    segs = [seg.format() for seg in reader]
    reader.cleanup()
    return segs, reader.pop_errors()


# --- responses -------------------------------------------------------------------------------------


def response(body: list[list[str]], *, control: int, reference: str) -> list[list[str]]:
    isa = ["ISA", "00", " " * 10, "00", " " * 10, "ZZ", "EXHP".ljust(15), "ZZ", "RIVERSIDE".ljust(15), "261204",
           "0930", "^", "00501", f"{control:09d}", "0", "P", ":"]  # fmt: skip
    return [isa, ["GS", "HI", "EXHP", "RIVERSIDE", "20261204", "0930", str(control), "X", "005010X217"],
            ["ST", "278", f"{control:04d}", "005010X217"], ["BHT", "0007", "11", reference, "20261204", "0930"],
            *body, ["SE", "", f"{control:04d}"], ["GE", "1", str(control)], ["IEA", "1", f"{control:09d}"]]  # fmt: skip


def upper_levels(subscriber_children: str = "1") -> list[list[str]]:
    return [["HL", "1", "", "20", "1"], ["NM1", "X3", "2", "EXAMPLE HEALTH PLAN", "", "", "", "", "PI", "EXHP1"],
            ["HL", "2", "1", "21", "1"], ["NM1", "FA", "2", "RIVERSIDE COMMUNITY HOSPITAL", "", "", "", "", "XX",
                                             "1234567893"],
            ["HL", "3", "2", "22", subscriber_children], ["NM1", "IL", "1", "DOE", "JANE", "", "", "", "MI",
                                                          "M00000001"]]  # fmt: skip


def response_a1() -> list[list[str]]:
    """The emergency admission certified: a certification number for the stay and both services."""
    return response(upper_levels() + [
        ["HL", "4", "3", "EV", "1"], ["TRN", "2", EMERGENCY_TRACE, COMPANY_ID], ["TRN", "1", "EXHP5521", "9EXHP00001"],
        ["UM", "AR", "I", "48", "11:A", "", "03"], ["HCR", "A1", "CERT778899"], ["REF", "NT", "CASE5521"],
        ["DTP", "AAH", "RD8", "20261110-20261114"], ["DTP", "007", "RD8", "20261110-20261114"],
        ["HL", "5", "4", "SS", "0"], ["TRN", "2", EMERGENCY_TRACE + "-1", COMPANY_ID], ["UM", "HS", "I"],
        ["HCR", "A1", "CERT778899"], ["REF", "BB", "AUTH778899A"], ["DTP", "472", "D8", "20261110"],
        ["SV2", "0450", "HC:99285", "2400", "UN", "1"],
        ["HL", "6", "4", "SS", "0"], ["TRN", "2", EMERGENCY_TRACE + "-2", COMPANY_ID], ["UM", "HS", "I"],
        ["HCR", "A1", "CERT778899"], ["DTP", "472", "D8", "20261111"], ["SV2", "0481", "HC:93458:LT", "8200.5", "UN", "1"],
    ], control=771, reference=EMERGENCY_REF)  # fmt: skip


def response_a3() -> list[list[str]]:
    """The MRI not certified; HCR03 carries a review decision reason (external code list 886; the
    value here is illustrative)."""
    return response(upper_levels() + [
        ["HL", "4", "3", "EV", "1"], ["TRN", "2", IMAGING_TRACE, COMPANY_ID], ["UM", "HS", "I", "62", "22:B"],
        ["HCR", "A3", "", "0U"], ["DTP", "AAH", "D8", "20261113"], ["MSG", "NOT MEDICALLY NECESSARY AS SUBMITTED"],
        ["HL", "5", "4", "SS", "0"], ["TRN", "2", IMAGING_TRACE + "-1", COMPANY_ID], ["UM", "HS", "I"],
        ["HCR", "A3", "", "0U"], ["DTP", "472", "D8", "20261113"], ["SV1", "HC:70551", "1250", "UN", "1"],
    ], control=772, reference=IMAGING_REF)  # fmt: skip


def response_a4() -> list[list[str]]:
    """The MRI pended for more information: an administrative reference to follow up with."""
    return response(upper_levels() + [
        ["HL", "4", "3", "EV", "1"], ["TRN", "2", IMAGING_TRACE, COMPANY_ID], ["UM", "HS", "I", "62", "22:B"],
        ["HCR", "A4"], ["REF", "NT", "PEND0042"], ["MSG", "ADDITIONAL CLINICAL INFORMATION REQUESTED"],
        ["HL", "5", "4", "SS", "0"], ["TRN", "2", IMAGING_TRACE + "-1", COMPANY_ID], ["UM", "HS", "I"],
        ["HCR", "A4"], ["DTP", "472", "D8", "20261113"], ["SV1", "HC:70551", "1250", "UN", "1"],
    ], control=773, reference=IMAGING_REF)  # fmt: skip


def response_aaa62() -> list[list[str]]:
    """Rejected at the patient event: date of service not within the allowable period (a late retro)."""
    return response(upper_levels() + [
        ["HL", "4", "3", "EV", "0"], ["TRN", "2", IMAGING_TRACE, COMPANY_ID], ["AAA", "N", "", "62", "N"],
        ["UM", "HS", "I", "62", "22:B"], ["DTP", "AAH", "D8", "20261113"],
    ], control=774, reference=IMAGING_REF)  # fmt: skip


def response_subscriber_reject() -> list[list[str]]:
    """Rejected at the subscriber (75: subscriber/insured not found): no patient event comes back."""
    return response(upper_levels("0") + [["AAA", "N", "", "75", "C"]], control=775, reference=IMAGING_REF)


def corpus_texts() -> dict[str, str]:
    em = written("emergency-inpatient")
    texts = {f"good/{name}.278": written(name) for name in REQUESTS}
    texts.update({
        "responses/a1-certified.278": render(response_a1()),
        "responses/a3-not-certified.278": render(response_a3()),
        "responses/a4-pended.278": render(response_a4()),
        "responses/aaa62-date-not-allowed.278": render(response_aaa62()),
        "responses/aaa75-subscriber-not-found.278": render(response_subscriber_reject()),
    })  # fmt: skip

    def se_count(s):
        s[find(s, "SE")][1] = str(int(s[find(s, "SE")][1]) - 1)

    def st_se(s):
        s[find(s, "SE")][2] = "0999"

    def gs_ge(s):
        s[find(s, "GE")][2] = "999"

    def isa_iea(s):
        s[find(s, "IEA")][2] = "000000999"

    def hl_forward(s):
        s[find(s, "HL", "5")][2] = "6"

    def no_bht(s):
        del s[find(s, "BHT")]
        recount(s)

    def ev_under_21(s):
        s[find(s, "HL", "4")][2] = "2"

    def star_in_name(s):
        nm1 = s[find(s, "NM1", "IL")]
        nm1[3:4] = ["O", "BRIEN"]  # a name with an unescaped element separator: one element too many

    def tilde_in_name(s):
        i = find(s, "NM1", "IL")
        s[i:i + 1] = [["NM1", "IL", "1", "O"], ["BRIEN", "JANE", "", "", "", "MI", "M00000001"]]
        recount(s)

    def colon_in_name(s):
        s[find(s, "NM1", "IL")][3] = "O:BRIEN"

    def isa_width(s):
        s[0][6] = "RIVERSIDE"  # ISA06 not padded to 15

    def empty_segment(s):
        s.insert(find(s, "BHT") + 1, [""])  # renders as a second terminator on its own line

    def hl_numbering(s):
        s[find(s, "HL", "6")][1] = "7"

    def group_counts(s):
        s[find(s, "GE")][1] = "2"
        s[find(s, "IEA")][1] = "2"

    mutations = {
        "se-count": se_count, "st-se-mismatch": st_se, "gs-ge-mismatch": gs_ge, "isa-iea-mismatch": isa_iea,
        "group-counts": group_counts, "hl-forward-parent": hl_forward, "hl-numbering": hl_numbering,
        "missing-bht": no_bht, "ev-without-22": ev_under_21, "element-separator-in-name": star_in_name,
        "segment-terminator-in-name": tilde_in_name, "component-separator-in-name": colon_in_name,
        "isa-not-fixed-width": isa_width, "empty-segment": empty_segment,
    }  # fmt: skip
    for name, change in mutations.items():
        texts[f"bad/{name}.278"] = mutate(em, change)
    a1 = render(response_a1())
    texts["bad/response-truncated.278"] = a1[: a1.index("SV2*0450") + 12]
    se = next(line for line in a1.splitlines() if line.startswith("SE*"))
    texts["bad/response-se-count.278"] = a1.replace(se, f"SE*{int(se.split('*')[1]) - 1}*0771~")
    texts["bad/response-hl-parent.278"] = a1.replace("HL*6*4*SS*0", "HL*6*9*SS*0")
    return texts


# --- the corpus ------------------------------------------------------------------------------------


def test_corpus_files_are_what_the_builders_make():
    texts = corpus_texts()
    for name, text in texts.items():
        assert (CORPUS / name).read_text() == text, f"tests/data/x12/278/{name} is stale: python -m tests.test_x278"
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.278")}
    assert on_disk == set(texts)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("se-count", [(36, "SE", "SE01")]),
        ("st-se-mismatch", [(36, "SE", "SE02")]),
        ("gs-ge-mismatch", [(37, "GE", "GE02")]),
        ("isa-iea-mismatch", [(38, "IEA", "IEA02")]),
        ("group-counts", [(37, "GE", "GE01"), (38, "IEA", "IEA01")]),
        ("hl-forward-parent", [(26, "HL", "HL02")]),
        ("hl-numbering", [(31, "HL", "HL01")]),
        ("missing-bht", [(3, "ST", "BHT")]),
        ("ev-without-22", [(12, "HL", "HL04"), (15, "HL", "HL03")]),
        ("element-separator-in-name", [(13, "NM1", None)]),
        ("segment-terminator-in-name", [(14, None, None)]),
        ("component-separator-in-name", [(13, "NM1", "NM103")]),
        ("isa-not-fixed-width", [(1, "ISA", "ISA06")]),
        ("empty-segment", [(4, "BHT", None)]),
    ],
)  # fmt: skip
def test_every_checker_rule_has_a_failing_sample(name, expected):
    text = (CORPUS / "bad" / f"{name}.278").read_text()
    errors = check_278(text, file=f"{name}.278")
    assert where(errors) == expected, [str(e) for e in errors]
    assert all(e.file == f"{name}.278" for e in errors)
    for e in errors:
        assert not any(p in str(e).upper() for p in PATIENT_DATA), str(e)


def test_a_segment_terminator_inside_a_name_starts_a_segment_that_is_not_one():
    errors = check_278((CORPUS / "bad" / "segment-terminator-in-name.278").read_text())
    assert [e.message for e in errors] == ["not a valid segment id"]
    # a fragment that looks like a segment id is still not a segment the 278 uses
    text = mutate(written("emergency-inpatient"), lambda s: s.insert(find(s, "DMG"), ["LEE", "JANE"]) or recount(s))
    assert [(e.segment_number, e.segment_id) for e in check_278(text)] == [(14, "LEE")]


def test_pyx12_agrees_on_the_envelope_and_hl_samples():
    for name in ("se-count", "st-se-mismatch", "gs-ge-mismatch", "isa-iea-mismatch", "group-counts",
                 "hl-forward-parent", "hl-numbering"):  # fmt: skip
        _, problems = pyx12_segments((CORPUS / "bad" / f"{name}.278").read_text())
        assert problems, f"pyx12 accepts bad/{name}.278"
    with pytest.raises(pyx12.errors.X12Error):  # it reads the ISA as 106 characters
        pyx12_segments((CORPUS / "bad" / "isa-not-fixed-width.278").read_text())


# --- the requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_written_requests_pass_the_checker_and_both_readers(name):
    text = written(name)
    assert check_278(text, file=f"{name}.278") == []

    txs = list(read_transactions(io.StringIO(text), file=f"{name}.278"))
    assert len(txs) == 1
    tx = txs[0]
    assert (tx.set_id, tx.implementation, tx.functional_id) == ("278", "005010X217", "HI")
    assert int(tx.se[1]) == len(tx.segments)
    assert tx.isa[13] == f"{REQUESTS[name][1]:09d}" and tx.gs[6] == str(REQUESTS[name][1])

    ours = [s.separators.element.join(s.elements) + "~" for s in read_segments(io.StringIO(text))]
    theirs, problems = pyx12_segments(text)
    assert problems == []
    assert theirs == ours


def test_emergency_inpatient_request_layout():
    text = written("emergency-inpatient")
    tx = next(read_transactions(io.StringIO(text)))
    body = tx.body
    assert [s.elements for s in body if s.id == "BHT"] == [["BHT", "0007", "13", EMERGENCY_REF, "20261202", "0930"]]
    hls = [(s[1], s[2], s[3], s[4]) for s in body if s.id == "HL"]
    assert hls == [("1", "", "20", "1"), ("2", "1", "21", "1"), ("3", "2", "22", "1"), ("4", "3", "EV", "1"),
                   ("5", "4", "SS", "0"), ("6", "4", "SS", "0")]  # fmt: skip
    trns = [s.elements[1:] for s in body if s.id == "TRN"]
    assert trns == [["1", EMERGENCY_TRACE, COMPANY_ID], ["1", EMERGENCY_TRACE + "-1", COMPANY_ID],
                    ["1", EMERGENCY_TRACE + "-2", COMPANY_ID]]  # fmt: skip
    seg = {s.id: s for s in body}  # the last of each id
    assert [s.elements for s in body if s.id == "UM"][0] == ["UM", "AR", "I", "48", "11:A", "", "03"]
    assert seg["HI"].components(1) == ["ABK", "I214"]
    assert [seg["HI"][i] for i in range(1, len(seg["HI"]) + 1)] == ["ABK:I214", "ABJ:R079", "ABF:E119", "ABF:I10"]
    dtps = [s.elements[1:] for s in body if s.id == "DTP"]
    assert dtps == [["AAH", "RD8", "20261110-20261114"], ["435", "D8", "20261110"], ["096", "D8", "20261114"],
                    ["472", "D8", "20261110"], ["472", "D8", "20261111"]]  # fmt: skip
    assert [s.elements for s in body if s.id == "CL1"] == [["CL1", "1"]]
    pwks = [s.elements for s in body if s.id == "PWK"]
    assert pwks == [["PWK", "M1", "EL", "", "", "AC", "RA000101ED", "ED note"],
                    ["PWK", "DS", "FX", "", "", "AC", "RA000101DS", "Discharge summary"]]  # fmt: skip
    assert seg["MSG"][1].startswith("RETROSPECTIVE REQUEST. DELAY REASON 11 (OTHER). Emergency admission")
    assert [s.elements for s in body if s.id == "SV2"] == [["SV2", "0450", "HC:99285", "2400", "UN", "1"],
                                                           ["SV2", "0481", "HC:93458:LT", "8200.5", "UN", "1"]]
    assert [s.elements for s in body if s.id == "NM1"] == [
        ["NM1", "X3", "2", "Example Health Plan", "", "", "", "", "PI", "EXHP1"],
        ["NM1", "FA", "2", "Riverside Community Hospital", "", "", "", "", "XX", "1234567893"],
        ["NM1", "IL", "1", "Doe", "Jane", "", "", "", "MI", "M00000001"]]  # fmt: skip
    assert [s.elements for s in body if s.id in ("N3", "N4", "PER", "DMG")] == [
        ["N3", "100 Main Street"], ["N4", "Springfield", "IL", "62701"],
        ["PER", "IC", "Patient Financial Services, Authorization Desk", "TE", "2175550100"],
        ["DMG", "D8", "19600517", "F"]]  # fmt: skip


def test_outpatient_imaging_request_layout():
    tx = next(read_transactions(io.StringIO(written("outpatient-imaging"))))
    body = tx.body
    assert [(s[1], s[2], s[3], s[4]) for s in body if s.id == "HL"][-2:] == [("4", "3", "EV", "1"), ("5", "4", "SS", "0")]
    assert [s.elements for s in body if s.id == "UM"] == [["UM", "HS", "I", "62", "22:B"], ["UM", "HS", "I"]]
    assert [s.elements[1:] for s in body if s.id == "DTP"] == [["AAH", "D8", "20261113"], ["472", "D8", "20261113"]]
    assert [s.elements for s in body if s.id == "HI"] == [["HI", "ABK:G43909", "ABF:R519"]]
    assert [s.elements for s in body if s.id == "SV1"] == [["SV1", "HC:70551", "1250", "UN", "1"]]
    assert [(s[1], s[2], s[5], s[6]) for s in body if s.id == "PWK"] == [("RR", "EL", "AC", "RA000102RR"),
                                                                         ("B3", "EL", "AC", "RA000102PO")]
    assert not [s for s in body if s.id in ("CL1", "SV2")]
    assert [s[1] for s in body if s.id == "MSG"] == ["RETROSPECTIVE REQUEST. DELAY REASON 10 "
                                                     "(ADMINISTRATION DELAY IN THE PRIOR APPROVAL PROCESS)."]


def test_output_is_deterministic_and_compact_by_default():
    a = write_278_request(EMERGENCY, control_number=5, trace_number="T1", sender_id="RIVERSIDE",
                          receiver_id="EXHP", when=WHEN)  # fmt: skip
    b = write_278_request(EMERGENCY, control_number=5, trace_number="T1", sender_id="RIVERSIDE",
                          receiver_id="EXHP", when=WHEN)  # fmt: skip
    assert a == b and "\n" not in a
    assert a.startswith("ISA*") and len(a.split("~")[0]) + 1 == 106
    assert a.replace("~", "~\n") == write(EMERGENCY, 5, "T1")
    assert check_278(a) == []


def test_control_numbers_fill_isa_gs_and_st():
    text = write(IMAGING, control=123456789, trace="T9", reference="K9")
    tx = next(read_transactions(io.StringIO(text)))
    assert (tx.isa[13], tx.gs[6], tx.st[2], tx.se[2]) == ("123456789", "123456789", "123456789", "123456789")
    assert tx.body[0][3] == "K9"
    assert check_278(text) == []
    assert tx.isa[15] == "P" and next(read_transactions(io.StringIO(write(IMAGING, usage="T")))).isa[15] == "T"


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        (dict(control_number=0), "control_number"),
        (dict(control_number=1_000_000_000), "control_number"),
        (dict(control_number="7"), "control_number"),
        (dict(usage="X"), "usage"),
        (dict(sender_id="A" * 16), "sender_id"),
        (dict(receiver_id="EX*HP"), "receiver_id"),
        (dict(separators=Separators("*", ":", "^", "\n"), line_breaks=True), "line_breaks"),
    ],
)  # fmt: skip
def test_bad_writer_arguments_name_the_argument(kwargs, field_name):
    args = dict(control_number=1, trace_number="T1", sender_id="RIVERSIDE", receiver_id="EXHP", when=WHEN) | kwargs
    with pytest.raises(Request278Error) as info:
        write_278_request(IMAGING, **args)
    assert info.value.field == field_name


def test_the_delay_reason_goes_in_um10_only_when_asked():
    body = next(read_transactions(io.StringIO(write(replace(IMAGING, delay_reason_in_um10=True))))).body
    um = next(s for s in body if s.id == "UM")
    assert um.elements == ["UM", "HS", "I", "62", "22:B", "", "", "", "", "", "10"]
    assert check_278(write(replace(IMAGING, delay_reason_in_um10=True))) == []


def test_more_than_twelve_diagnoses_keep_the_first_twelve():
    many = tuple(f"E11.{i}" for i in range(10)) + ("I10", "I25.10", "N18.3", "Z79.4")
    body = next(read_transactions(io.StringIO(write(replace(IMAGING, diagnoses=many))))).body
    hi = next(s for s in body if s.id == "HI")
    assert len(hi) == 12 and hi[1] == "ABK:E110"


def test_settings_facility_address_parses():
    s = Settings.model_fields
    assert Address.from_text(s["facility_address"].default) == FACILITY["requester_address"]
    assert s["facility_npi"].default == FACILITY["requester_npi"] and s["facility_tin"].default == "12-3456789"
    assert Address.from_text("1 Elm St, Apt 2, Oak Park, il 60302-1234").state == "IL"
    with pytest.raises(Request278Error, match="address"):
        Address.from_text("somewhere")


def test_gender_codes():
    assert [gender_code(x) for x in ("female", "MALE", "F", "other", None, "")] == ["F", "M", "F", "U", "U", "U"]


# --- separators in data ------------------------------------------------------------------------------


def test_free_text_with_separators_is_cleaned_and_cannot_break_the_structure():
    request = replace(EMERGENCY, last_name="O*Brien~^:", first_name="Jäne\n", payer_name="Ex*ample: Health^Plan~",
                      message="line one~\nline*two", requester_contact="Desk:1^2")  # fmt: skip
    text = write(request)
    assert check_278(text) == []
    tx = next(read_transactions(io.StringIO(text)))
    nm1 = [s for s in tx.body if s.id == "NM1"]
    assert nm1[0].elements[3] == "Ex ample Health Plan"
    assert nm1[2].elements == ["NM1", "IL", "1", "O Brien", "Jane", "", "", "", "MI", "M00000001"]
    assert next(s for s in tx.body if s.id == "MSG")[1].endswith("line one line two")
    assert pyx12_segments(text)[1] == []


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        (dict(member_id="M1*23"), "member_id"),
        (dict(member_id="M1~23"), "member_id"),
        (dict(payer_id="EX:HP"), "payer_id"),
        (dict(member_id="M1^23"), "member_id"),
        (dict(member_id="M1\n23"), "member_id"),
        (dict(diagnoses=("I21.4", "E11*9")), "diagnoses[1]"),
        (dict(attachments=(Attachment278("M1", "ACN~1"),)), "attachments[0].control_number"),
        (dict(services=(Service278("70551", date(2026, 11, 13), modifiers=("2:",)),)), "services[0].modifiers[0]"),
        (dict(services=(Service278("7055*", date(2026, 11, 13)),)), "services[0].code"),
        (dict(last_name="*~^:"), "last_name"),  # nothing left after cleaning
        (dict(requester_npi="1234567890"), "requester_npi"),
        (dict(diagnoses=()), "diagnoses"),
        (dict(event_end=date(2026, 11, 1)), "event_end"),
    ],
)  # fmt: skip
def test_identifiers_with_separators_are_rejected_naming_the_field(change, field_name):
    with pytest.raises(Request278Error) as info:
        write(replace(IMAGING, **change))
    assert info.value.field == field_name
    assert str(info.value).startswith(field_name + ":")
    for value in change.values():
        if isinstance(value, str) and len(value) > 3:
            assert value not in str(info.value)


def test_trace_and_reference_are_identifiers_too():
    with pytest.raises(Request278Error, match="^trace_number:"):
        write(IMAGING, trace="T~1")
    with pytest.raises(Request278Error, match="^reference:.*50"):
        write(IMAGING, reference="k" * 64)  # a sha256 idempotency key is too long for BHT03


def test_other_separators_keep_characters_that_are_not_separators():
    seps = Separators(element="|", component=">", repetition="!", segment="~")
    text = write_278_request(replace(IMAGING, last_name="O*Brien|Jr"), control_number=7, trace_number="T:1",
                             sender_id="RIVERSIDE", receiver_id="EXHP", when=WHEN, separators=seps)  # fmt: skip
    assert check_278(text) == []
    tx = next(read_transactions(io.StringIO(text)))
    assert next(s for s in tx.body if s.id == "NM1" and s[1] == "IL").elements[3] == "O*Brien Jr"
    assert next(s for s in tx.body if s.id == "TRN")[2] == "T:1"
    assert next(s for s in tx.body if s.id == "HI").components(1) == ["ABK", "G43909"]
    assert pyx12_segments(text)[1] == []
    with pytest.raises(Request278Error, match="^separators:"):
        write_278_request(IMAGING, control_number=7, trace_number="T1", sender_id="RIVERSIDE", receiver_id="EXHP",
                          when=WHEN, separators=Separators("*", "*", "^", "~"))  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=70), min_size=4, max_size=4), message=st.text(max_size=300))
def test_any_free_text_gives_a_file_that_passes_the_checker(names, message):
    request = replace(IMAGING, last_name="Doe " + names[0], first_name=names[1], payer_name="Plan " + names[2],
                      requester_contact=names[3], message=message)  # fmt: skip
    text = write(request)
    assert check_278(text) == []
    tx = next(read_transactions(io.StringIO(text)))
    assert [len(s) for s in tx.body if s.id == "NM1"][2] == 9


# --- more checker rules ------------------------------------------------------------------------------


def _checked(change: Callable[[list[list[str]]], None]) -> list[tuple[int | None, str | None, str | None]]:
    return where(check_278(mutate(written("emergency-inpatient"), change)))


def test_checker_rules_on_in_memory_samples():
    def root_with_parent(s):
        s[find(s, "HL", "1")][2] = "1"

    def closed_parent(s):  # a second patient event under the subscriber, then a service under the first event
        i = find(s, "HL", "6")
        s[i] = ["HL", "6", "4", "SS", "0"]
        s.insert(find(s, "SE"), ["HL", "7", "3", "EV", "1"])
        s.insert(find(s, "SE"), ["TRN", "1", "T7", COMPANY_ID])
        s.insert(find(s, "SE"), ["UM", "HS", "I"])
        s.insert(find(s, "SE"), ["HL", "8", "4", "SS", "0"])
        s.insert(find(s, "SE"), ["UM", "HS", "I"])
        s[find(s, "HL", "3")][4] = "1"
        recount(s)

    def repetition(s):
        s[find(s, "NM1", "IL")][3] = "O^BRIEN"

    def empty_id(s):
        s.insert(find(s, "BHT") + 1, ["", "X"])
        recount(s)

    def unknown_segment(s):
        s.insert(find(s, "HL", "4"), ["CLM", "1"])
        recount(s)

    def trailing(s):
        s[find(s, "PER")].append("")

    def control_char(s):
        s[find(s, "N3")][1] = "100 MAIN\tSTREET"

    def no_events(s):
        del s[find(s, "HL", "4"):find(s, "SE")]
        s[find(s, "HL", "3")][4] = "0"
        recount(s)

    def hl04(s):
        s[find(s, "HL", "5")][4] = "1"

    def wrong_ids(s):
        s[find(s, "GS")][1] = "HP"
        s[find(s, "GS")][8] = "005010X221A1"
        s[find(s, "ST")][1] = "835"
        s[find(s, "ST")][3] = "005010X221A1"

    def no_um(s):
        del s[find(s, "UM", "AR")]
        recount(s)

    def too_few(s):
        s[find(s, "DTP", "435")] = ["DTP", "435"]

    def bht_codes(s):
        s[find(s, "BHT")][1:3] = ["0019", "99"]

    def before_hl(s):
        s.insert(find(s, "HL", "1"), ["REF", "EJ", "1"])
        recount(s)

    assert _checked(root_with_parent) == [(5, "HL", "HL02")]
    assert _checked(closed_parent) == [(36, "HL", "HL04"), (39, "HL", "HL02")]
    assert _checked(repetition) == [(13, "NM1", "NM103")]
    assert _checked(empty_id) == [(5, None, None)]
    assert _checked(unknown_segment) == [(15, "CLM", None)]
    assert _checked(trailing) == [(11, "PER", "PER05")]
    assert _checked(control_char) == [(9, "N3", "N301")]
    assert _checked(no_events) == [(3, "ST", "HL")]
    assert _checked(hl04) == [(26, "HL", "HL04")]
    assert _checked(wrong_ids) == [(2, "GS", "GS01"), (2, "GS", "GS08"), (3, "ST", "ST01"), (3, "ST", "ST03")]
    assert _checked(no_um) == [(15, "HL", None)]
    assert _checked(too_few) == [(19, "DTP", None)]
    assert _checked(bht_codes) == [(4, "BHT", "BHT01"), (4, "BHT", "BHT02")]
    assert _checked(before_hl) == [(5, "REF", None)]


def test_checker_on_input_that_is_not_x12():
    errors = check_278("hello", file="x.278")
    assert where(errors) == [(None, None, None)]
    assert check_278("", file="x.278")[0].file == "x.278"


# --- responses ----------------------------------------------------------------------------------------


def read(name: str) -> list:
    return read_278_response((CORPUS / "responses" / name).read_text(), file=name)


def test_response_files_pass_the_checker_and_pyx12():
    for path in sorted((CORPUS / "responses").glob("*.278")):
        text = path.read_text()
        assert check_278(text) == [], path.name
        assert pyx12_segments(text)[1] == [], path.name


def test_a1_certified_with_numbers_reconciles_by_trace_and_reference():
    event, svc1, svc2 = read("a1-certified.278")
    assert (event.level, event.hl_number, event.segment_number) == ("EV", 4, 11)
    assert (event.reference, event.control_number) == (EMERGENCY_REF, "0771")
    assert (event.trace_number, event.trace_company_id, event.payer_trace_number) == (EMERGENCY_TRACE, COMPANY_ID,
                                                                                      "EXHP5521")
    assert (event.action, event.certification_number, event.reason) == ("A1", "CERT778899", None)
    assert event.certified and not event.denied and not event.rejected
    assert (event.administrative_reference, event.authorization_number, event.auth_number) == ("CASE5521", None,
                                                                                               "CERT778899")
    assert (event.certified_from, event.certified_to) == (date(2026, 11, 10), date(2026, 11, 14))
    assert (event.service_from, event.service_to) == (date(2026, 11, 10), date(2026, 11, 14))
    assert (svc1.level, svc1.trace_number, svc1.event_trace_number) == ("SS", EMERGENCY_TRACE + "-1", EMERGENCY_TRACE)
    assert (svc1.action, svc1.authorization_number, svc1.service_code, svc1.service_from) == (
        "A1", "AUTH778899A", "99285", date(2026, 11, 10))
    assert (svc2.service_code, svc2.authorization_number, svc2.auth_number) == ("93458", None, "CERT778899")


def test_a3_not_certified_with_reason():
    event, svc = read("a3-not-certified.278")
    assert (event.action, event.reason, event.certification_number, event.denied) == ("A3", "0U", None, True)
    assert event.messages == ("NOT MEDICALLY NECESSARY AS SUBMITTED",)
    assert (svc.action, svc.reason, svc.service_code, svc.trace_number) == ("A3", "0U", "70551", IMAGING_TRACE + "-1")
    assert event.reference == IMAGING_REF and event.trace_number == IMAGING_TRACE


def test_a4_pended():
    event, svc = read("a4-pended.278")
    assert event.pended and svc.pended and not event.certified
    assert (event.administrative_reference, event.auth_number) == ("PEND0042", None)
    assert event.messages == ("ADDITIONAL CLINICAL INFORMATION REQUESTED",)


def test_aaa_62_date_of_service_not_within_allowable_period():
    (event,) = read("aaa62-date-not-allowed.278")
    assert event.rejected and event.action is None and not event.certified
    assert [(r.loop, r.segment_number, r.valid, r.reason, r.follow_up) for r in event.rejects] == [
        ("2000E", 13, False, "62", "N")]
    assert event.rejects[0].description == "date of service not within allowable inquiry period"
    assert event.reject_reasons == ("62",) and event.trace_number == IMAGING_TRACE


def test_a_reject_above_the_patient_event_gives_one_decision_for_the_deepest_level():
    (decision,) = read("aaa75-subscriber-not-found.278")
    assert (decision.level, decision.hl_number, decision.trace_number, decision.reference) == ("22", 3, None,
                                                                                               IMAGING_REF)
    assert [(r.loop, r.reason, r.follow_up) for r in decision.rejects] == [("2010C", "75", "C")]
    assert decision.rejected


def test_rejects_at_any_loop_are_inherited_by_the_levels_below():
    segs = response_a1()
    segs.insert(find(segs, "HL", "2"), ["AAA", "Y", "", "42", "Y"])  # 2010A: after the payer's NM1
    segs.insert(find(segs, "HL", "5"), ["AAA", "N", "", "15", "C"])  # 2000E
    segs.insert(find(segs, "HL", "6"), ["NM1", "SJ", "1", "SMITH", "ANNA", "", "", "", "XX", "1245319599"])
    segs.insert(find(segs, "HL", "6"), ["REF", "BB", "NOT-A-DECISION"])  # a provider loop's REF
    segs.insert(find(segs, "HL", "6"), ["AAA", "N", "", "33", "C"])  # 2010F: after a service provider NM1
    event, svc1, svc2 = read_278_response(render(segs))
    assert [(r.loop, r.reason) for r in event.rejects] == [("2010A", "42"), ("2000E", "15")]
    assert [(r.loop, r.reason) for r in svc1.rejects] == [("2010A", "42"), ("2000E", "15"), ("2010F", "33")]
    assert [(r.loop, r.reason) for r in svc2.rejects] == [("2010A", "42"), ("2000E", "15")]
    assert (svc1.service_code, svc1.authorization_number) == ("99285", "AUTH778899A")  # 2010F is not the decision


def test_our_request_and_its_echo_reconcile():
    text = written("outpatient-imaging")
    tx = next(read_transactions(io.StringIO(text)))
    trace = next(s for s in tx.body if s.id == "TRN")
    (event, _) = read("a3-not-certified.278")
    assert (event.reference, event.trace_number, event.trace_company_id) == (tx.body[0][3], trace[2], trace[3])


@pytest.mark.parametrize(
    ("name", "segment", "segment_id", "element"),
    [
        ("response-truncated.278", 25, "SV2", None),
        ("response-se-count.278", 32, "SE", "SE01"),
        ("response-hl-parent.278", 26, "HL", "HL02"),
    ],
)  # fmt: skip
def test_broken_responses_raise_with_the_segment_number(name, segment, segment_id, element):
    with pytest.raises(X12Error) as info:
        read_278_response((CORPUS / "bad" / name).read_text(), file=name)
    e = info.value
    assert (e.file, e.segment_number, e.segment_id, e.element) == (name, segment, segment_id, element)
    assert not any(p in str(e).upper() for p in PATIENT_DATA)


def test_a_request_or_garbage_is_not_a_response():
    with pytest.raises(X12Error) as info:
        read_278_response(written("outpatient-imaging"), file="req.278")
    assert (info.value.segment_number, info.value.element) == (4, "BHT02")
    with pytest.raises(X12Error) as info:
        read_278_response("not x12 at all", file="junk.278")
    assert info.value.segment_number is None and info.value.file == "junk.278"
    with pytest.raises(X12Error) as info:
        read_278_response(render(response_a3()).replace("DTP*472*D8*20261113", "DTP*472*D8*20261399"), file="d.278")
    assert (info.value.segment_id, info.value.element) == ("DTP", "DTP03") and "20261399" not in str(info.value)


def regenerate() -> None:
    for name, text in corpus_texts().items():
        path = CORPUS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    regenerate()
    print(f"wrote {len(corpus_texts())} files under {Path(CORPUS).relative_to(Path.cwd())}")
