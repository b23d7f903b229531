"""X12 278 (005010X217) health care services review: the retro-authorization request we send, and
the payer's response we read.

The request (``write_278_request``) is one interchange holding one functional group (GS01 ``HI``,
GS08 ``005010X217``) holding one transaction set, laid out as the guide's hierarchy:

    ISA / GS / ST*278*<ctl>*005010X217 / BHT*0007*13*<reference>*CCYYMMDD*HHMM
    HL 20  (2000A) the payer as utilization management organization: NM1*X3 name + PI payer id
    HL 21  (2000B) the requester, our facility: NM1*FA name + XX NPI, N3/N4 address, PER contact
    HL 22  (2000C) the subscriber, who is the patient: NM1*IL name + MI member id, DMG birth date/gender
    HL EV  (2000E) the patient event: TRN*1*<trace>*<1 + our EIN>, UM, DTP*AAH event date(s),
           DTP*435/096 admission/discharge, HI diagnoses (ABK principal, ABJ admitting, ABF other),
           CL1 (institutional codes), PWK per enclosed document, MSG with the delay reason
    HL SS  (2000F) one per service line: TRN, UM*HS*<cert type>, DTP*472, SV1 (professional) or
           SV2 (institutional, when the line has a revenue code)
    SE / GE / IEA with counts and control numbers.

Codes used (domain.md, "X12 278"; the guide itself is licensed, so the items marked there "verify"
stay to be confirmed against the payer's companion guide):
- UM01 ``AR`` admission review for an inpatient stay, ``HS`` health services review otherwise; UM02
  ``I`` (a retro request is an initial request with past dates); UM03 the service type (e.g. ``48``
  hospital inpatient, ``86`` emergency services, ``62`` MRI/CAT scan, ``1`` medical care); UM04
  ``<facility code>:<qualifier>`` with qualifier ``A`` (first two digits of the UB-04 type of bill)
  or ``B`` (CMS place of service). The claim frequency (third component) is a claim concept and is
  not sent. UM06 level of service only when it is not routine: ``03`` emergency, ``U`` urgent,
  ``E`` elective (X12 RFI 2642: "when the level of service is routine, UM06 is not reported").
- The delay reason (element 1514, ``vocab.DELAY_REASON_CODES``) always goes in MSG as text
  ("RETROSPECTIVE REQUEST. DELAY REASON 11 (OTHER): ..."), which the guide allows in 2000E. UM10 is
  the standard's delay-reason element, but whether 005010X217 uses it could not be confirmed, so it
  is written only when ``Request278.delay_reason_in_um10`` is set (a payer companion guide that
  asks for it).
- PWK*<report type>*<transmission>***AC*<attachment control number>[*<description>]: report type
  from code list 755 (``PWK_REPORT_TYPE_BY_LOINC`` suggests one per LOINC document type),
  transmission ``EL`` (electronically, an X12 275 or the payer's portal), ``FX`` fax, ``BM`` mail,
  ``EM`` e-mail, ``FT`` file transfer, ``AA`` available at the provider on request.
- TRN03 is our "originating company identifier": ``1`` followed by the facility's EIN (10 characters).
  The 2000F service traces are ``<trace>-<n>`` unless a service carries its own.

Data and separators. The data never corrupts the structure:
- identifiers and codes (member id, payer id, NPI, trace, reference, codes, attachment control
  numbers) that contain a separator (element, component, repetition, segment terminator), a control
  character or a character outside the X12 extended character set are REJECTED with a
  ``Request278Error`` naming the field (never the value): silently altering an identifier would send
  the request for someone else.
- free text (names, address, contact, message, attachment description) is CLEANED: accents folded to
  ASCII (NFKD), every separator, control character and character outside the X12 extended set
  replaced by a space, runs of spaces collapsed, then cut to the element's maximum length. So
  ``O*Brien~^:`` becomes ``O Brien``. Text that is empty after cleaning is rejected like a missing
  required value.
The output is deterministic: the same request and arguments give the same bytes.

The response (``read_278_response``) gives one ``Decision278`` per patient event (EV) and per service
(SS), with our trace number echoed back (TRN01 ``2``) to reconcile by, the payer's trace (TRN01
``1``), HCR01 action / HCR02 certification number / HCR03 reason, REF*BB authorization number,
REF*NT administrative reference, certification dates (DTP*007 effective, DTP*036 expiration), the
service code and dates, MSG text, and every AAA reject on the path from the root to that level
(AAA can sit in any loop: 2000A/2010A payer, 2010B requester, 2010C subscriber, 2000E event,
2000F service). A response that stops above the patient event (the payer rejected the request at
the subscriber, say) gives one decision for its deepest level. Envelope and HL-tree problems, an
HCR01 that is not a code of list 306 and an EV or SS level without our trace echoed (TRN*2) raise
``X12Error`` naming the file and the segment number.
"""

from __future__ import annotations

import io
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from retroauth.identifiers import npi_is_valid, tin_is_valid
from retroauth.x12.check import IMPLEMENTATION, transaction_problems
from retroauth.x12.parse import Segment, Separators, X12Error, read_transactions

__all__ = [
    "DEFAULT",
    "DEFAULT_SEPARATORS",
    "HCR_ACTIONS",
    "PWK_REPORT_TYPE_BY_LOINC",
    "Address",
    "Attachment278",
    "Decision278",
    "Reject278",
    "Request278",
    "Request278Error",
    "Service278",
    "gender_code",
    "read_278_response",
    "write_278_request",
]

DEFAULT_SEPARATORS = Separators(element="*", component=":", repetition="^", segment="~")
DEFAULT = DEFAULT_SEPARATORS

# X12 basic and extended character sets (letters, digits, space and these specials).
X12_CHARACTERS = frozenset(string.ascii_letters + string.digits + " !\"&'()*+,-./:;?=%@[]_{}\\|<>~^#$")

# HCR01, certification action (code list 306).
HCR_ACTIONS = {
    "A1": "certified in total",
    "A2": "certified, partial",
    "A3": "not certified",
    "A4": "pended",
    "A6": "modified",
    "C": "cancelled",
    "CT": "contact payer",
    "NA": "no action required",
}
# AAA03, reject reason (code list 901), the ones domain.md names; others are passed through.
AAA_REASONS = {
    "15": "required application data missing",
    "33": "input errors",
    "41": "authorization/access restrictions",
    "42": "unable to respond at current time",
    "52": "service dates not within provider plan enrollment",
    "57": "invalid/missing date(s) of service",
    "62": "date of service not within allowable inquiry period",
    "T5": "certification information missing",
    "AA": "authorization number not found",
}
# AAA04, follow-up action (code list 889).
AAA_FOLLOW_UPS = {"C": "correct and resubmit", "N": "resubmission not allowed", "P": "please resubmit original",
                  "R": "resubmission allowed", "S": "do not resubmit; inquiry initiated to a third party",
                  "W": "please wait 30 days and resubmit", "X": "please wait 10 days and resubmit",
                  "Y": "do not resubmit; we will hand over your request"}  # fmt: skip
# Element 1514.
DELAY_REASONS = {
    "1": "proof of eligibility unknown or unavailable",
    "2": "litigation",
    "3": "authorization delays",
    "4": "delay in certifying provider",
    "5": "delay in supplying billing forms",
    "6": "delay in delivery of custom-made appliances",
    "7": "third party processing delay",
    "8": "delay in eligibility determination",
    "9": "original claim rejected or denied due to a reason unrelated to the billing limitation rules",
    "10": "administration delay in the prior approval process",
    "11": "other",
    "15": "natural disaster",
    "16": "lack of information",
    "17": "no response to initial request",
}
# PWK01 (code list 755) suggested for the LOINC document types domain.md lists (verify with the payer).
PWK_REPORT_TYPE_BY_LOINC = {
    "34117-2": "P5",  # history and physical -> patient medical history document
    "18842-5": "DS",  # discharge summary
    "11504-8": "OB",  # surgical operation note -> operative note
    "34111-5": "M1",  # emergency department note -> medical record attachment
    "11506-3": "09",  # progress note -> progress report
    "18748-4": "RR",  # diagnostic imaging study -> radiology reports
    "11502-2": "LA",  # laboratory report -> laboratory results
    "34746-8": "NN",  # nurse note -> nursing notes
}
PWK_TRANSMISSIONS = frozenset({"AA", "BM", "EL", "EM", "FT", "FX"})
REQUEST_CATEGORIES = frozenset({"AR", "HS", "SC"})
CERTIFICATION_TYPES = frozenset({"I", "R", "S", "1", "2", "3", "4"})
LEVELS_OF_SERVICE = frozenset({"03", "U", "E"})
UNIT_BASES = frozenset({"UN", "DA", "MJ"})
MAX_DIAGNOSES = 12  # composites in one HI segment

_CODE = re.compile(r"[A-Z0-9]{1,2}")
_ICD10CM = re.compile(r"[A-Z][0-9][0-9A-Z]([0-9A-Z]{1,4})?")
_PROCEDURE = re.compile(r"[A-Z0-9]{5}")
_MODIFIER = re.compile(r"[A-Z0-9]{2}")
_REVENUE = re.compile(r"[0-9]{3,4}")
_STATE = re.compile(r"[A-Z]{2}")
_POSTAL = re.compile(r"[0-9]{5}([0-9]{4})?")
_INTERCHANGE_ID = re.compile(r"[A-Za-z0-9 .\-]{1,15}")
_ONE_LINE_ADDRESS = re.compile(r"(?P<line>.+?), ?(?P<city>[^,]+), ?(?P<state>[A-Za-z]{2}) (?P<zip>[0-9]{5}(-?[0-9]{4})?)")


class Request278Error(ValueError):
    """A request that cannot be written; ``field`` names the offending field, the message never its value."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        self.message = message
        super().__init__(f"{field_name}: {message}")

    def __reduce__(self):  # noqa: ANN204 - picklable across processes
        return (type(self), (self.field, self.message))


# --- what the writer needs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    line1: str
    city: str
    state: str  # two letters
    postal_code: str  # 5 or 9 digits, a dash allowed
    line2: str | None = None

    @classmethod
    def from_text(cls, text: str) -> Address:
        """``"100 Main Street, Springfield, IL 62701"`` (``Settings.facility_address``) as an address."""
        m = _ONE_LINE_ADDRESS.fullmatch(" ".join((text or "").split()))
        if m is None:
            raise Request278Error("address", "is not 'street, city, ST 12345'")
        return cls(line1=m["line"], city=m["city"], state=m["state"].upper(), postal_code=m["zip"])


@dataclass(frozen=True)
class Attachment278:
    """One enclosed document, announced by a PWK in the patient event."""

    report_type: str  # PWK01, code list 755 (see PWK_REPORT_TYPE_BY_LOINC)
    control_number: str  # PWK06: the attachment control number the 275 / fax cover sheet carries
    transmission: str = "EL"  # PWK02: EL, FX, BM, EM, FT, AA
    description: str | None = None  # PWK07, free text


@dataclass(frozen=True)
class Service278:
    """One service line (2000F)."""

    code: str  # CPT or HCPCS
    service_date: date
    end_date: date | None = None  # a range of service dates (DTP*472 RD8)
    charge: Decimal = Decimal("0")
    units: Decimal = Decimal("1")
    modifiers: tuple[str, ...] = ()
    revenue_code: str | None = None  # institutional line: SV2 instead of SV1
    unit_basis: str = "UN"  # UN units, DA days (SV2 only), MJ minutes
    service_type: str | None = None  # UM03 of the service level
    trace_number: str | None = None  # TRN02 of the service; default "<trace>-<n>"


@dataclass(frozen=True)
class Request278:
    """Everything the writer puts in a 278 request; ids, codes, names, dates, amounts only."""

    # 2000A/2010A: the payer
    payer_name: str
    payer_id: str  # NM109 with qualifier PI
    # 2000B/2010B: the requester (our facility)
    requester_name: str
    requester_npi: str
    requester_tin: str  # TRN03 = "1" + these nine digits
    # 2000C/2010C: the subscriber, who is the patient
    member_id: str
    last_name: str
    first_name: str
    # 2000E: the patient event
    category: str  # UM01: AR admission review, HS health services review
    service_type: str  # UM03
    facility_code: str  # UM04-1: place of service, or the first two digits of the type of bill
    facility_code_qualifier: str  # UM04-2: B place of service, A type of bill
    event_start: date  # DTP*AAH
    diagnoses: tuple[str, ...]  # ICD-10-CM, principal first (dots allowed; they are removed)
    services: tuple[Service278, ...] = ()
    attachments: tuple[Attachment278, ...] = ()
    event_end: date | None = None
    admission_date: date | None = None  # DTP*435
    discharge_date: date | None = None  # DTP*096
    admitting_diagnosis: str | None = None  # HI ABJ
    admission_type_code: str | None = None  # CL101 (NUBC: 1 emergency, 2 urgent, 3 elective, 5 trauma)
    admission_source_code: str | None = None  # CL102
    patient_status_code: str | None = None  # CL103
    certification_type: str = "I"  # UM02
    level_of_service: str | None = None  # UM06: 03, U, E; None when routine
    delay_reason_code: str | None = None  # element 1514, written in MSG (and UM10 if asked)
    delay_reason_in_um10: bool = False
    message: str | None = None  # free text after the delay reason in MSG
    middle_name: str | None = None
    name_suffix: str | None = None
    birth_date: date | None = None  # DMG
    gender: str = "U"  # DMG03: F, M, U (see gender_code)
    requester_address: Address | None = None
    requester_contact: str | None = None  # PER02
    requester_phone: str | None = None  # PER04, digits


def gender_code(sex: str | None) -> str:
    """DMG03 from ``Patient.sex`` (FHIR administrative gender or a letter)."""
    value = (sex or "").strip().lower()
    return {"f": "F", "female": "F", "m": "M", "male": "M"}.get(value, "U")


# --- writer ---------------------------------------------------------------------------------------


class _Fields:
    """Validation and cleaning against the separators in use."""

    def __init__(self, seps: Separators):
        self.seps = seps
        self.banned = frozenset(c for c in (seps.element, seps.component, seps.repetition, seps.segment) if c)

    def ident(self, value: object, name: str, *, least: int = 1, most: int = 50,
              pattern: re.Pattern[str] | None = None, what: str = "") -> str:  # fmt: skip
        if value is None or str(value).strip() == "":
            raise Request278Error(name, "is required")
        text = str(value).strip()
        if any(c in self.banned for c in text):
            raise Request278Error(name, "contains an X12 separator character; identifiers and codes are never "
                                        "altered: correct the source data")  # fmt: skip
        if any(c not in X12_CHARACTERS for c in text):
            raise Request278Error(name, "contains a character outside the X12 character set")
        if not least <= len(text) <= most:
            raise Request278Error(name, f"must be {least} to {most} characters long, is {len(text)}")
        if pattern is not None and not pattern.fullmatch(text):
            raise Request278Error(name, f"is not {what or 'in the expected format'}")
        return text

    def text(self, value: object, name: str, *, most: int, required: bool = True) -> str:
        raw = "" if value is None else str(value)
        folded = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
        cleaned = "".join(c if c in X12_CHARACTERS and c not in self.banned else " " for c in folded)
        cleaned = " ".join(cleaned.split())[:most].rstrip()
        if required and not cleaned:
            raise Request278Error(name, "is required (empty after removing separators and unusable characters)")
        return cleaned

    def composite(self, *parts: str) -> str:
        items = list(parts)
        while items and items[-1] == "":
            items.pop()
        return self.seps.component.join(items)


def _check_separators(seps: Separators) -> Separators:
    chars = [seps.element, seps.component, seps.repetition, seps.segment]
    if any(c is None or len(c) != 1 for c in chars):
        raise Request278Error("separators", "need four single characters (5010 has a repetition separator)")
    if len(set(chars)) != 4:
        raise Request278Error("separators", "are not distinct")
    if any(c.isalnum() or c == " " for c in chars):
        raise Request278Error("separators", "a separator is a letter, digit or space")
    return seps


def _d8(d: date) -> str:
    return d.strftime("%Y%m%d")


def _dates(start: date, end: date | None) -> tuple[str, str]:
    """DTP02/DTP03 for one day (D8) or a range (RD8)."""
    if end is None or end == start:
        return "D8", _d8(start)
    return "RD8", f"{_d8(start)}-{_d8(end)}"


def _decimal(value: object, name: str) -> Decimal:
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise Request278Error(name, "is not a number") from None
    if not number.is_finite():
        raise Request278Error(name, "is not a number")
    return number


def _number(value: Decimal) -> str:
    """An X12 R value: no exponent, no trailing zeros after the point (1250, 12.5)."""
    text = format(value.quantize(Decimal("0.01")), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _icd(value: str | None, name: str, f: _Fields) -> str:
    code = f.ident(value, name, most=8).replace(".", "").upper()
    if not _ICD10CM.fullmatch(code):
        raise Request278Error(name, "is not an ICD-10-CM code")
    return code


def write_278_request(
    request: Request278,
    *,
    control_number: int,
    trace_number: str,
    sender_id: str,
    receiver_id: str,
    when: datetime,
    separators: Separators = DEFAULT_SEPARATORS,
    reference: str | None = None,
    sender_qualifier: str = "ZZ",
    receiver_qualifier: str = "ZZ",
    usage: str = "P",
    line_breaks: bool = False,
) -> str:
    """The text of a 005010X217 278 request for ``request`` (see the module docstring).

    ``control_number`` (1..999999999) is ISA13 (9 digits), GS06 and ST02 (at least 4 digits); the
    caller keeps it unique per sender. ``trace_number`` goes in the patient event's TRN02 and comes
    back in the response; ``reference`` (BHT03, default the trace number) is where the submission's
    idempotency key belongs: both are 1..50 characters. ``when`` is written as given (the sender's
    local time). ``usage`` is ISA15: ``P`` production or ``T`` test. ``line_breaks`` puts a newline
    after every segment terminator (easier to read; most translators accept it).
    Raises ``Request278Error`` naming the field for data that cannot be written.
    """
    seps = _check_separators(separators)
    if line_breaks and seps.segment in "\r\n":
        raise Request278Error("line_breaks", "cannot be used when the segment terminator is a line break")
    f = _Fields(seps)
    r = request
    if type(control_number) is not int or not 1 <= control_number <= 999_999_999:
        raise Request278Error("control_number", "must be an integer from 1 to 999999999")
    if usage not in ("P", "T"):
        raise Request278Error("usage", "must be P (production) or T (test)")
    sender = f.ident(sender_id, "sender_id", least=2, most=15, pattern=_INTERCHANGE_ID, what="an interchange id")
    receiver = f.ident(receiver_id, "receiver_id", least=2, most=15, pattern=_INTERCHANGE_ID,
                       what="an interchange id")  # fmt: skip
    sender_q = f.ident(sender_qualifier, "sender_qualifier", least=2, most=2)
    receiver_q = f.ident(receiver_qualifier, "receiver_qualifier", least=2, most=2)
    trace = f.ident(trace_number, "trace_number", most=50)
    ref = f.ident(reference if reference is not None else trace_number, "reference", most=50)

    tin = re.sub(r"\D", "", r.requester_tin or "")
    if not tin_is_valid(r.requester_tin or ""):
        raise Request278Error("requester_tin", "is not a valid TIN (nine digits)")
    company_id = "1" + tin
    npi = f.ident(r.requester_npi, "requester_npi", least=10, most=10)
    if not npi_is_valid(npi):
        raise Request278Error("requester_npi", "is not a valid NPI")
    if r.category not in REQUEST_CATEGORIES:
        raise Request278Error("category", "must be AR (admission review), HS (health services) or SC (specialty care)")
    if r.certification_type not in CERTIFICATION_TYPES:
        raise Request278Error("certification_type", "is not a UM02 code (I, R, S, 1, 2, 3, 4)")
    if r.level_of_service is not None and r.level_of_service not in LEVELS_OF_SERVICE:
        raise Request278Error("level_of_service", "must be 03 (emergency), U (urgent), E (elective) or None")
    if r.facility_code_qualifier not in ("A", "B"):
        raise Request278Error("facility_code_qualifier", "must be A (type of bill) or B (place of service)")
    if r.gender not in ("F", "M", "U"):
        raise Request278Error("gender", "must be F, M or U")
    if r.delay_reason_code is not None and r.delay_reason_code not in DELAY_REASONS:
        raise Request278Error("delay_reason_code", "is not an X12 delay reason code (element 1514)")
    if r.event_end is not None and r.event_end < r.event_start:
        raise Request278Error("event_end", "is before event_start")
    if r.admission_date and r.discharge_date and r.discharge_date < r.admission_date:
        raise Request278Error("discharge_date", "is before admission_date")
    if isinstance(r.diagnoses, str) or not r.diagnoses:
        raise Request278Error("diagnoses", "need a sequence of codes, the principal diagnosis first")

    isa13 = f"{control_number:09d}"
    st02 = f"{control_number:04d}"
    segs: list[list[str]] = [
        ["ISA", "00", " " * 10, "00", " " * 10, sender_q, sender.ljust(15), receiver_q, receiver.ljust(15),
         when.strftime("%y%m%d"), when.strftime("%H%M"), seps.repetition, "00501", isa13, "0", usage,
         seps.component],
        ["GS", "HI", sender, receiver, when.strftime("%Y%m%d"), when.strftime("%H%M"), str(control_number), "X",
         IMPLEMENTATION],
        ["ST", "278", st02, IMPLEMENTATION],
        ["BHT", "0007", "13", ref, when.strftime("%Y%m%d"), when.strftime("%H%M")],
    ]  # fmt: skip
    body_start = 2

    # 2000A / 2010A: the payer
    segs.append(["HL", "1", "", "20", "1"])
    segs.append(["NM1", "X3", "2", f.text(r.payer_name, "payer_name", most=60), "", "", "", "", "PI",
                 f.ident(r.payer_id, "payer_id", least=2, most=80)])  # fmt: skip
    # 2000B / 2010B: the requester
    segs.append(["HL", "2", "1", "21", "1"])
    segs.append(["NM1", "FA", "2", f.text(r.requester_name, "requester_name", most=60), "", "", "", "", "XX", npi])
    if r.requester_address is not None:
        a = r.requester_address
        line2 = f.text(a.line2, "requester_address.line2", most=55, required=False)
        segs.append(["N3", f.text(a.line1, "requester_address.line1", most=55), line2])
        state = f.ident((a.state or "").upper(), "requester_address.state", least=2, most=2, pattern=_STATE,
                        what="a state code")  # fmt: skip
        postal = f.ident((a.postal_code or "").replace("-", ""), "requester_address.postal_code", least=5, most=9,
                         pattern=_POSTAL, what="a ZIP code (5 or 9 digits)")  # fmt: skip
        segs.append(["N4", f.text(a.city, "requester_address.city", most=30), state, postal])
    if r.requester_contact or r.requester_phone:
        contact = f.text(r.requester_contact, "requester_contact", most=60, required=False)
        per = ["PER", "IC", contact]
        if r.requester_phone:
            phone = re.sub(r"\D", "", r.requester_phone)
            if not 10 <= len(phone) <= 15:
                raise Request278Error("requester_phone", "needs 10 to 15 digits")
            per += ["TE", phone]
        segs.append(per)
    # 2000C / 2010C: the subscriber (the patient)
    segs.append(["HL", "3", "2", "22", "1"])
    segs.append(["NM1", "IL", "1", f.text(r.last_name, "last_name", most=60),
                 f.text(r.first_name, "first_name", most=35, required=False),
                 f.text(r.middle_name, "middle_name", most=25, required=False), "",
                 f.text(r.name_suffix, "name_suffix", most=10, required=False), "MI",
                 f.ident(r.member_id, "member_id", least=2, most=80)])  # fmt: skip
    if r.birth_date is not None:
        segs.append(["DMG", "D8", _d8(r.birth_date), r.gender])

    # 2000E: the patient event
    segs.append(["HL", "4", "3", "EV", "1" if r.services else "0"])
    segs.append(["TRN", "1", trace, company_id])
    um = ["UM", r.category, r.certification_type,
          f.ident(r.service_type, "service_type", most=2, pattern=_CODE, what="a service type code"),
          f.composite(f.ident(r.facility_code, "facility_code", most=2, pattern=_CODE, what="a facility code"),
                      r.facility_code_qualifier),
          "", r.level_of_service or ""]  # fmt: skip
    if r.delay_reason_code and r.delay_reason_in_um10:
        um += ["", "", "", r.delay_reason_code]
    segs.append(um)
    segs.append(["DTP", "AAH", *_dates(r.event_start, r.event_end)])
    if r.admission_date is not None:
        segs.append(["DTP", "435", "D8", _d8(r.admission_date)])
    if r.discharge_date is not None:
        segs.append(["DTP", "096", "D8", _d8(r.discharge_date)])
    hi = [f.composite("ABK", _icd(r.diagnoses[0], "diagnoses[0]", f))]
    if r.admitting_diagnosis:
        hi.append(f.composite("ABJ", _icd(r.admitting_diagnosis, "admitting_diagnosis", f)))
    for i, dx in enumerate(r.diagnoses[1:], start=1):
        code = _icd(dx, f"diagnoses[{i}]", f)
        if len(hi) < MAX_DIAGNOSES:  # one HI holds 12: the principal and admitting ones come first
            hi.append(f.composite("ABF", code))
    segs.append(["HI", *hi])
    if r.admission_type_code or r.admission_source_code or r.patient_status_code:
        segs.append(["CL1",
                     f.ident(r.admission_type_code, "admission_type_code", most=1) if r.admission_type_code else "",
                     f.ident(r.admission_source_code, "admission_source_code", most=1)
                     if r.admission_source_code else "",
                     f.ident(r.patient_status_code, "patient_status_code", most=2)
                     if r.patient_status_code else ""])  # fmt: skip
    for i, att in enumerate(r.attachments):
        name = f"attachments[{i}]"
        if att.transmission not in PWK_TRANSMISSIONS:
            raise Request278Error(f"{name}.transmission", "must be one of AA, BM, EL, EM, FT, FX")
        pwk = ["PWK", f.ident(att.report_type, f"{name}.report_type", least=2, most=2, pattern=_CODE,
                              what="a report type code"),
               att.transmission, "", "", "AC",
               f.ident(att.control_number, f"{name}.control_number", least=2, most=50)]  # fmt: skip
        if att.description:
            pwk.append(f.text(att.description, f"{name}.description", most=80, required=False))
        segs.append(pwk)
    msg = _message(r, f)
    if msg:
        segs.append(["MSG", msg])

    # 2000F: the services
    for n, svc in enumerate(r.services, start=1):
        name = f"services[{n - 1}]"
        segs.append(["HL", str(4 + n), "4", "SS", "0"])
        svc_trace = f.ident(svc.trace_number or f"{trace}-{n}", f"{name}.trace_number", most=50)
        segs.append(["TRN", "1", svc_trace, company_id])
        svc_type = (f.ident(svc.service_type, f"{name}.service_type", most=2, pattern=_CODE,
                            what="a service type code") if svc.service_type else "")  # fmt: skip
        segs.append(["UM", "HS", r.certification_type, svc_type])
        if svc.end_date is not None and svc.end_date < svc.service_date:
            raise Request278Error(f"{name}.end_date", "is before service_date")
        segs.append(["DTP", "472", *_dates(svc.service_date, svc.end_date)])
        code = f.ident((svc.code or "").upper(), f"{name}.code", least=5, most=5, pattern=_PROCEDURE,
                       what="a CPT or HCPCS code")  # fmt: skip
        if len(svc.modifiers) > 4:
            raise Request278Error(f"{name}.modifiers", "at most four modifiers")
        mods = [f.ident(m.upper(), f"{name}.modifiers[{i}]", least=2, most=2, pattern=_MODIFIER, what="a modifier")
                for i, m in enumerate(svc.modifiers)]  # fmt: skip
        charge = _decimal(svc.charge, f"{name}.charge")
        units = _decimal(svc.units, f"{name}.units")
        if charge < 0:
            raise Request278Error(f"{name}.charge", "is negative")
        if units <= 0:
            raise Request278Error(f"{name}.units", "must be more than zero")
        if svc.unit_basis not in UNIT_BASES:
            raise Request278Error(f"{name}.unit_basis", "must be UN (units), DA (days) or MJ (minutes)")
        procedure = f.composite("HC", code, *mods)
        if svc.revenue_code:
            rev = f.ident(svc.revenue_code, f"{name}.revenue_code", least=3, most=4, pattern=_REVENUE,
                          what="a revenue code").zfill(4)  # fmt: skip
            segs.append(["SV2", rev, procedure, _number(charge), svc.unit_basis, _number(units)])
        else:
            if svc.unit_basis == "DA":
                raise Request278Error(f"{name}.unit_basis", "DA (days) needs a revenue code (SV2)")
            segs.append(["SV1", procedure, _number(charge), svc.unit_basis, _number(units)])

    count = len(segs) - body_start + 1  # ST .. SE inclusive
    segs.append(["SE", str(count), st02])
    segs.append(["GE", "1", str(control_number)])
    segs.append(["IEA", "1", isa13])
    return _render(segs, seps, line_breaks)


def _message(r: Request278, f: _Fields) -> str:
    parts = []
    if r.delay_reason_code:
        parts.append(f"RETROSPECTIVE REQUEST. DELAY REASON {r.delay_reason_code} "
                     f"({DELAY_REASONS[r.delay_reason_code].upper()}).")  # fmt: skip
    if r.message:
        parts.append(r.message)
    return f.text(" ".join(parts), "message", most=264, required=False)


def _render(segments: Sequence[Sequence[str]], seps: Separators, line_breaks: bool) -> str:
    lines = []
    for seg in segments:
        elements = list(seg)
        if elements[0] != "ISA":  # the ISA is fixed width; elsewhere no trailing empty elements
            while len(elements) > 1 and elements[-1] == "":
                elements.pop()
        lines.append(seps.element.join(elements) + seps.segment)
    end = "\n" if line_breaks else ""
    return end.join(lines) + end


# --- response reader ------------------------------------------------------------------------------

# HL03 -> (loop before the level's NM1, loop after it)
_LOOPS = {"20": ("2000A", "2010A"), "21": ("2000B", "2010B"), "22": ("2000C", "2010C"),
          "23": ("2000D", "2010D"), "EV": ("2000E", "2010E"), "SS": ("2000F", "2010F")}  # fmt: skip


@dataclass(frozen=True)
class Reject278:
    """One AAA segment: the payer could not process (part of) the request."""

    loop: str  # 2000A, 2010A, 2010B, 2010C, 2000E, 2000F, ...
    segment_number: int
    valid: bool  # AAA01: Y valid request, N invalid
    reason: str  # AAA03, code list 901 (AAA_REASONS)
    follow_up: str | None  # AAA04: C correct and resubmit, N no resubmission, P resubmit original, Y wait

    @property
    def description(self) -> str:
        return AAA_REASONS.get(self.reason, "")


@dataclass(frozen=True)
class Decision278:
    """The payer's answer for one patient event (EV) or service (SS) of a 278 response."""

    file: str
    control_number: str  # ST02 of the response
    reference: str  # BHT03: the request's reference echoed (our idempotency key)
    level: str  # EV, SS, or the deepest level the response reached (20, 21, 22, 23)
    hl_number: int
    segment_number: int  # of the level's HL
    trace_number: str | None  # our TRN02 echoed back (TRN01 = 2)
    trace_company_id: str | None  # its TRN03 (ours: "1" + EIN)
    payer_trace_number: str | None  # the payer's own trace (TRN01 = 1)
    event_trace_number: str | None  # the patient event's echoed trace (a service's parent; an event's own)
    action: str | None  # HCR01 (HCR_ACTIONS)
    certification_number: str | None  # HCR02
    reason: str | None  # HCR03
    authorization_number: str | None  # REF*BB
    administrative_reference: str | None  # REF*NT
    certified_from: date | None  # DTP*007
    certified_to: date | None  # DTP*007 range end, or DTP*036
    service_code: str | None  # SV101-2 / SV202-2 (procedure), else SV201 (revenue code)
    service_from: date | None  # DTP*472 (services) or DTP*AAH (events)
    service_to: date | None
    rejects: tuple[Reject278, ...] = ()  # every AAA from the root down to this level
    messages: tuple[str, ...] = ()  # MSG01 texts of this level

    @property
    def rejected(self) -> bool:
        """Any AAA on the path says the request (part) is not valid (AAA01 = N)."""
        return any(not r.valid for r in self.rejects)

    @property
    def certified(self) -> bool:
        return self.action == "A1" and not self.rejected

    @property
    def denied(self) -> bool:
        return self.action == "A3"

    @property
    def pended(self) -> bool:
        return self.action == "A4"

    @property
    def auth_number(self) -> str | None:
        """The number to put on the claim: HCR02, else REF*BB."""
        return self.certification_number or self.authorization_number

    @property
    def reject_reasons(self) -> tuple[str, ...]:
        return tuple(r.reason for r in self.rejects if r.reason)


@dataclass
class _Level:
    seg: Segment
    number: int
    level: str
    parent: int | None
    rejects: list[Reject278] = field(default_factory=list)
    traces: list[tuple[str, str, str]] = field(default_factory=list)
    hcr: Segment | None = None
    refs: dict[str, str] = field(default_factory=dict)
    dtps: list[Segment] = field(default_factory=list)
    service: Segment | None = None
    messages: list[str] = field(default_factory=list)


def read_278_response(text: str, file: str = "<278>") -> list[Decision278]:
    """The decisions of a 278 response held in memory, one per patient event and per service.

    Raises ``X12Error`` (file, segment number, id, element; never a value) for an envelope problem
    (counts, control numbers, missing trailers, a truncated file), a transaction set that is not a
    278 response, a broken HL tree, an unknown HCR01 action, or an EV or SS level whose decision
    cannot be matched to our request (no TRN*2).
    """
    decisions: list[Decision278] = []
    for tx in read_transactions(io.StringIO(text), file=file):
        problems = transaction_problems(tx.segments, file)
        if problems:
            raise problems[0]
        bht = tx.body[0]
        if bht[2] not in ("11", "18"):
            raise X12Error(file, bht.number, "BHT", "BHT02", "is not 11 (response): this is not a 278 response")
        decisions += _decisions(tx.body[1:], file, tx.control_number, bht[3])
    return decisions


def _decisions(body: Iterable[Segment], file: str, control: str, reference: str) -> list[Decision278]:
    levels: dict[int, _Level] = {}
    order: list[_Level] = []
    current: _Level | None = None
    in_name_loop = False  # after the level's NM1: the 2010 loop
    for seg in body:
        sid = seg.id
        if sid == "HL":
            parent = int(seg[2]) if seg[2] else None
            current = _Level(seg, int(seg[1]), seg[3], parent)
            levels[current.number] = current
            order.append(current)
            in_name_loop = False
            continue
        if current is None:
            continue
        if sid == "NM1":
            in_name_loop = True
        elif sid == "AAA":
            current.rejects.append(Reject278(
                loop=_LOOPS.get(current.level, ("?", "?"))[1 if in_name_loop else 0],
                segment_number=seg.number, valid=seg[1] != "N", reason=seg[3], follow_up=seg[4] or None))  # fmt: skip
        elif sid == "MSG" and not in_name_loop:
            current.messages.append(seg[1])
        elif in_name_loop:
            continue  # provider and contact loops (2010x): their REF/PER are not the decision
        elif sid == "TRN":
            current.traces.append((seg[1], seg[2], seg[3]))
        elif sid == "HCR" and current.hcr is None:
            if seg[1] and seg[1] not in HCR_ACTIONS:  # an unknown action must not pass for a decision
                raise X12Error(file, seg.number, "HCR", "HCR01", "is not a certification action code ("
                               + ", ".join(HCR_ACTIONS) + ")")
            current.hcr = seg
        elif sid == "REF" and seg[1] not in current.refs:
            current.refs[seg[1]] = seg[2]
        elif sid == "DTP":
            current.dtps.append(seg)
        elif sid in ("SV1", "SV2", "SV3") and current.service is None:
            current.service = seg

    targets = [lv for lv in order if lv.level in ("EV", "SS")] or order[-1:]
    out = []
    for lv in targets:
        path = _path(lv, levels)
        rejects = tuple(r for node in path for r in node.rejects)
        event = next((node for node in reversed(path) if node.level == "EV"), None)
        ours = _trace(lv, "2")
        if ours is None and lv.level in ("EV", "SS"):  # we send a TRN at both levels: it must come back
            raise X12Error(file, lv.seg.number, "HL", "TRN", f"level {lv.level} has no TRN*2 echoing our trace "
                                                             "number: the decision cannot be matched to the request")
        payer = _trace(lv, "1")
        hcr = lv.hcr
        cert_from = cert_to = svc_from = svc_to = None
        for dtp in lv.dtps:
            start, end = _dtp(dtp, file)
            if dtp[1] == "007":
                cert_from, cert_to = start, end if end != start else cert_to
            elif dtp[1] == "036":
                cert_to = start
            elif dtp[1] in ("472", "AAH") and svc_from is None:
                svc_from, svc_to = start, end
        out.append(Decision278(
            file=file, control_number=control, reference=reference, level=lv.level, hl_number=lv.number,
            segment_number=lv.seg.number, trace_number=ours[1] if ours else None,
            trace_company_id=ours[2] if ours else None, payer_trace_number=payer[1] if payer else None,
            event_trace_number=(_trace(event, "2") or (None, None))[1] if event else None,
            action=(hcr[1] or None) if hcr else None, certification_number=(hcr[2] or None) if hcr else None,
            reason=(hcr[3] or None) if hcr else None, authorization_number=lv.refs.get("BB"),
            administrative_reference=lv.refs.get("NT"), certified_from=cert_from, certified_to=cert_to,
            service_code=_service_code(lv.service), service_from=svc_from, service_to=svc_to,
            rejects=rejects, messages=tuple(lv.messages)))  # fmt: skip
    return out


def _path(level: _Level, levels: dict[int, _Level]) -> list[_Level]:
    path = [level]
    while path[-1].parent is not None and path[-1].parent in levels and len(path) <= len(levels):
        path.append(levels[path[-1].parent])
    return path[::-1]


def _trace(level: _Level, kind: str) -> tuple[str, str, str] | None:
    return next((t for t in level.traces if t[0] == kind and t[1]), None)


def _service_code(seg: Segment | None) -> str | None:
    if seg is None:
        return None
    parts = seg.components(2) if seg.id == "SV2" else seg.components(1)
    if len(parts) >= 2 and parts[1]:
        return parts[1]
    return (seg[1] or None) if seg.id == "SV2" else None


def _dtp(seg: Segment, file: str) -> tuple[date, date]:
    fmt, value = seg[2], seg[3]
    try:
        if fmt == "D8":
            day = datetime.strptime(value, "%Y%m%d").date()
            return day, day
        if fmt == "RD8":
            first, _, last = value.partition("-")
            return datetime.strptime(first, "%Y%m%d").date(), datetime.strptime(last, "%Y%m%d").date()
    except ValueError:
        raise X12Error(file, seg.number, "DTP", "DTP03", f"not a date in the {fmt} format") from None
    raise X12Error(file, seg.number, "DTP", "DTP02", "is not D8 or RD8")
