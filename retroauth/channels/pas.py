"""HL7 Da Vinci PAS (Prior Authorization Support, FHIR R4): request bundles, responses, HTTP client.

Three parts, usable on their own:

- ``build_pas_bundle`` turns a ``PasRequest`` (plain data, no database) into a PAS request Bundle:
  type ``collection``, ``identifier`` = our idempotency key (system ``urn:retroauth:submission``) so
  the payer can recognise a repeat, first entry a Claim with ``use = preauthorization`` and one item
  per service line (certificationType ``I``: a retro request is an initial request with past dates),
  then the Patient, Coverage, Organizations, Practitioners and DocumentReferences it references.
  ``build_pas_inquiry_bundle`` makes the query-by-example Bundle that ``Claim/$inquire`` takes.
  Both are validated with fhir.resources' R4B models plus the PAS rules we rely on
  (``validate_pas_request``); a failure names locations and error types, never values.
  (PAS is FHIR R4 4.0.1; fhir.resources 8 ships R4B 4.3 and R5, not R4. R4B's Bundle, Claim,
  ClaimResponse, Coverage, Patient, Organization, Practitioner and DocumentReference accept
  everything we send and read; terminology bindings and PAS profiles are not checked by it, which
  is why the PAS rules are checked here by hand.)
- ``parse_pas_response`` reads what ``$submit`` / ``$inquire`` return: a Bundle whose first entry is
  a ClaimResponse (decision per item in the ``reviewAction`` extension: X12 HCR01 code, the
  certification ``number``, X12 886 reason codes), a bare ClaimResponse, a Parameters wrapping
  Bundles, or an OperationOutcome (an error result with its issue codes).
- ``PasClient`` posts them with httpx, retrying 429 (honouring Retry-After), 5xx and transport
  errors (connect, timeout, dropped connection) with exponential backoff and jitter, never other
  4xx. Every attempt sends the very same bytes and the same ``Idempotency-Key`` header, so a retry
  after a lost response cannot create a second request at a payer that dedupes on the key.

Nothing here logs or raises with patient data, the token or a body: only case ids, keys, codes,
HTTP statuses and element paths.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Literal

import httpx
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle as _R4BBundle
from pydantic import ValidationError

from retroauth.vocab import CodeSystem

logger = logging.getLogger(__name__)

# --- identifiers and URLs ---------------------------------------------------------------------------

SUBMISSION_SYSTEM = "urn:retroauth:submission"  # Bundle.identifier and Claim.identifier: the idempotency key
INQUIRY_SYSTEM = "urn:retroauth:inquiry"
ITEM_TRACE_SYSTEM = "urn:retroauth:item-trace"
PAYER_ID_SYSTEM = "urn:retroauth:payer-id"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
SHA256_URI_SYSTEM = "urn:ietf:rfc:3986"  # masterIdentifier value: ni:///sha-256;... (RFC 6920)

PAS_SD = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/"
PROFILE_REQUEST_BUNDLE = PAS_SD + "profile-pas-request-bundle"
PROFILE_INQUIRY_BUNDLE = PAS_SD + "profile-pas-inquiry-request-bundle"
PROFILE_CLAIM = PAS_SD + "profile-claim"
PROFILE_CLAIM_INQUIRY = PAS_SD + "profile-claim-inquiry"
PROFILE_SUBSCRIBER = PAS_SD + "profile-subscriber"
PROFILE_COVERAGE = PAS_SD + "profile-coverage"
PROFILE_REQUESTOR = PAS_SD + "profile-requestor"
PROFILE_INSURER = PAS_SD + "profile-insurer"
PROFILE_PRACTITIONER = PAS_SD + "profile-practitioner"

EXT_CERTIFICATION_TYPE = PAS_SD + "extension-certificationType"
EXT_REQUEST_TYPE = PAS_SD + "extension-serviceItemRequestType"
EXT_ITEM_TRACE_NUMBER = PAS_SD + "extension-itemTraceNumber"
EXT_LEVEL_OF_SERVICE = PAS_SD + "extension-levelOfServiceCode"
EXT_CARE_TEAM_SCOPE = PAS_SD + "extension-careTeamClaimScope"
EXT_REVIEW_ACTION = PAS_SD + "extension-reviewAction"
EXT_REVIEW_ACTION_CODE = PAS_SD + "extension-reviewActionCode"
EXT_PREAUTH_PERIOD = PAS_SD + "extension-itemPreAuthPeriod"
EXT_PREAUTH_ISSUE_DATE = PAS_SD + "extension-itemPreAuthIssueDate"

X12 = "https://codesystem.x12.org/005010/"
X12_ACTION = X12 + "306"  # HCR01 review action codes
X12_CERTIFICATION_TYPE = X12 + "1322"  # UM02
X12_REQUEST_CATEGORY = X12 + "1525"  # UM01
X12_SERVICE_TYPE = X12 + "1365"  # UM03 / item.category
X12_LEVEL_OF_SERVICE = X12 + "1338"  # UM06
X12_ENTITY = X12 + "98"  # NM101
X12_REASON = "https://codesystem.x12.org/external/886"  # HCR03 review decision reasons
PAS_TEMP_CODES = "http://hl7.org/fhir/us/davinci-pas/CodeSystem/PASTempCodes"
CLAIM_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/claim-type"
PRIORITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/processpriority"
RELATIONSHIP_SYSTEM = "http://terminology.hl7.org/CodeSystem/subscriber-relationship"
COVERAGE_CLASS_SYSTEM = "http://terminology.hl7.org/CodeSystem/coverage-class"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
POS_SYSTEM = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
TYPE_OF_BILL_SYSTEM = "https://www.nubc.org/CodeSystem/TypeOfBill"
ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC_SYSTEM = "http://loinc.org"
RELATED_CLAIM_SYSTEM = "http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship"
LETTER_LOINC = "51852-2"  # LOINC "Letter": the appeal letter sent with a reconsideration

# The one URI each of our code systems is sent with (vocab.CODE_SYSTEM_URIS reads several).
SERVICE_CODE_URIS: dict[CodeSystem, str] = {
    CodeSystem.CPT: "http://www.ama-assn.org/go/cpt",
    CodeSystem.HCPCS: "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    CodeSystem.ICD10PCS: "http://www.cms.gov/Medicare/Coding/ICD10",
    # Outside PAS's required value set (X12278RequestedServiceType): accepted by FHIR-native payers
    # only; an intermediary translating to X12 278 will reject it. Map to CPT/HCPCS where possible.
    CodeSystem.SNOMED: "http://snomed.info/sct",
}

# X12 HCR01 (code list 306) review actions, the decisions a PAS response carries.
REVIEW_ACTIONS: dict[str, str] = {
    "A1": "Certified in total",
    "A2": "Certified - partial",
    "A3": "Not certified",
    "A4": "Pended",
    "A6": "Modified",
    "C": "Cancelled",
    "CT": "Contact payer",
    "NA": "No action required",
}
CERTIFIED = frozenset({"A1", "A2", "A6"})
ERROR = "ERROR"  # PasDecision.decision of an OperationOutcome or a ClaimResponse in error
NOT_FOUND = "NOT_FOUND"  # an inquiry that matched nothing

REQUEST_CATEGORIES = {"AR": "Admission Review", "HS": "Health Services Review", "SC": "Specialty Care Review"}
LEVELS_OF_SERVICE = {"03": "Emergency", "U": "Urgent", "E": "Elective"}
_NS = uuid.UUID("6f1c52a4-8f0e-5d55-9c4e-2b7d6e0a9b31")  # uuid5 namespace: deterministic resource ids

# --- errors -----------------------------------------------------------------------------------------


class PasError(Exception):
    """Base of this module's errors. Messages carry codes, statuses and paths only."""


class PasValidationError(PasError, ValueError):
    """A bundle that is not a valid PAS request; ``problems`` are ``path: error type`` strings."""

    def __init__(self, what: str, problems: Sequence[str]):
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:20]) + (f"; ... ({len(self.problems)} in all)" if len(self.problems) > 20 else "")
        super().__init__(f"invalid {what}: {shown}")


class PasResponseError(PasError):
    """A response that cannot be read as PAS (not JSON, not a ClaimResponse/OperationOutcome)."""


class PasRejected(PasError):
    """The payer refused the request with a 4xx (not 429): resending it as is will not help.

    ``decision`` is the parsed OperationOutcome when the payer sent one (its issue codes)."""

    def __init__(self, operation: str, status: int, decision: PasDecision | None):
        self.operation = operation
        self.status = status
        self.decision = decision
        codes = ",".join(decision.error_codes) if decision else ""
        super().__init__(f"PAS {operation} rejected: HTTP {status}" + (f" ({codes})" if codes else ""))


class PasUnavailable(PasError):
    """No answer after the allowed attempts (or the payer asked to wait longer than we will).

    Safe to try again later with the same bundle: the idempotency key makes it a repeat.
    ``retry_after`` is the payer's requested wait in seconds when it gave one."""

    def __init__(self, operation: str, attempts: int, last: str, retry_after: float | None = None):
        self.operation = operation
        self.attempts = attempts
        self.last = last
        self.retry_after = retry_after
        extra = f", retry after {retry_after:.0f}s" if retry_after is not None else ""
        super().__init__(f"PAS {operation} unavailable after {attempts} attempt(s): {last}{extra}")


class PasMismatch(PasError):
    """The response names a different submission than the one sent."""


# --- the request --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasAddress:
    line: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None


@dataclass(frozen=True)
class PasPatient:
    member_id: str
    family_name: str
    given_name: str
    birth_date: date | None = None
    sex: str | None = None  # FHIR administrative gender: male, female, other, unknown


@dataclass(frozen=True)
class PasCoverage:
    member_id: str  # Coverage.subscriberId
    payer_id: str  # our payer id (a payer rule file)
    payer_name: str
    plan_name: str | None = None
    group_number: str | None = None
    relationship: str = "self"  # subscriber-relationship code


@dataclass(frozen=True)
class PasOrganization:
    name: str
    npi: str | None = None
    address: PasAddress | None = None
    phone: str | None = None


@dataclass(frozen=True)
class PasPractitioner:
    npi: str
    family_name: str | None = None
    given_name: str | None = None


@dataclass(frozen=True)
class PasDiagnosis:
    code: str  # ICD-10-CM, with or without the dot
    recorded_on: date | None = None


@dataclass(frozen=True)
class PasItem:
    code_system: CodeSystem
    code: str
    service_date: date
    units: Decimal = Decimal("1")
    charge: Decimal = Decimal("0")  # the line total: Claim.item.net; unitPrice = charge / units
    description: str | None = None
    modifiers: tuple[str, ...] = ()
    service_end_date: date | None = None
    place_of_service: str | None = None  # CMS POS code
    service_type: str = "1"  # X12 1365 (item.category): 1 medical care, 2 surgical, ...
    practitioner_npi: str | None = None  # rendering/ordering: must be one of PasRequest.practitioners
    diagnosis_sequences: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class PasDocument:
    """One enclosure of the packet, sent as a DocumentReference referenced from Claim.supportingInfo.

    At least one of ``url`` (where the payer can fetch it), ``data`` (inline, small documents) or
    ``sha256`` (what the document is, when it goes by another route such as CDex) is needed."""

    document_id: str  # our stable id for it (e.g. the packet item's source id)
    loinc_type: str
    content_type: str
    title: str | None = None
    url: str | None = None
    data: bytes | None = None
    sha256: str | None = None
    size: int | None = None
    created: datetime | None = None


@dataclass(frozen=True)
class PasRequest:
    """What a PAS request needs, and nothing else: built from a case, its packet and settings."""

    case_id: int
    claim_type: Literal["institutional", "professional"]
    patient: PasPatient
    coverage: PasCoverage
    requester: PasOrganization
    insurer: PasOrganization
    items: tuple[PasItem, ...]
    diagnoses: tuple[PasDiagnosis, ...] = ()
    practitioners: tuple[PasPractitioner, ...] = ()
    documents: tuple[PasDocument, ...] = ()
    request_category: str = "HS"  # X12 1525 (UM01): AR admission review, HS health services, SC specialty care
    level_of_service: str | None = None  # X12 1338 (UM06): 03 emergency, U urgent, E elective
    priority: Literal["stat", "normal", "deferred"] = "normal"
    event_start: date | None = None  # admission / first service date (supportingInfo patientEvent)
    event_end: date | None = None
    type_of_bill: str | None = None  # institutional: item location when no place of service
    message: str | None = None  # free text to the reviewer (e.g. why the request is late): no PHI
    # A reconsideration (appeal) names the denied request it asks the payer to look at again. PAS has no
    # appeal operation: it goes as a new request whose Claim.related points at the prior one.
    related_key: str | None = None


# --- building -----------------------------------------------------------------------------------------


def _uuid(key: str, *parts: object) -> str:
    return str(uuid.uuid5(_NS, "|".join([key, *map(str, parts)])))


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)]}


def _num(v: Decimal | int | float) -> int | float:
    """A JSON number for a FHIR decimal: integral values as ints, money to the cent."""
    d = Decimal(str(v))
    if d == d.to_integral_value():
        return int(d)
    return float(d)


def _money(v: Decimal) -> dict[str, Any]:
    return {"value": _num(v.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)), "currency": "USD"}


def _instant(ts: datetime) -> str:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware")
    return ts.isoformat()


def _address(a: PasAddress | None) -> list[dict[str, Any]] | None:
    if a is None:
        return None
    out: dict[str, Any] = {}
    if a.line:
        out["line"] = [a.line]
    for k, v in (("city", a.city), ("state", a.state), ("postalCode", a.postal_code)):
        if v:
            out[k] = v
    if out:
        out["country"] = "US"
        return [out]
    return None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != {}}


class _Refs:
    """The fullUrl (urn:uuid, deterministic from the key) of each resource in the bundle."""

    def __init__(self, key: str):
        self.key = key
        self.ids: dict[str, str] = {}

    def id(self, role: str) -> str:
        if role not in self.ids:
            self.ids[role] = _uuid(self.key, role)
        return self.ids[role]

    def ref(self, role: str) -> dict[str, str]:
        return {"reference": f"urn:uuid:{self.id(role)}"}

    def entry(self, role: str, resource: dict[str, Any]) -> dict[str, Any]:
        resource = {"resourceType": resource.pop("resourceType"), "id": self.id(role), **resource}
        return {"fullUrl": f"urn:uuid:{self.id(role)}", "resource": resource}


def _check_request(req: PasRequest) -> None:
    """Shape problems that a FHIR model would not catch; messages name fields, not values."""
    problems = []
    if not req.items:
        problems.append("items: at least one service line is required")
    if req.claim_type not in ("institutional", "professional"):
        problems.append("claim_type: must be institutional or professional")
    if req.request_category not in REQUEST_CATEGORIES:
        problems.append("request_category: must be AR, HS or SC")
    if req.level_of_service is not None and req.level_of_service not in LEVELS_OF_SERVICE:
        problems.append("level_of_service: must be 03, U or E")
    npis = {p.npi for p in req.practitioners}
    for i, item in enumerate(req.items, 1):
        if item.code_system not in SERVICE_CODE_URIS:
            problems.append(f"items[{i}].code_system: not a service code system")
        if item.units <= 0:
            problems.append(f"items[{i}].units: must be positive")
        if item.practitioner_npi is not None and item.practitioner_npi not in npis:
            problems.append(f"items[{i}].practitioner_npi: not among practitioners")
        if any(s < 1 or s > len(req.diagnoses) for s in item.diagnosis_sequences) and req.diagnoses:
            problems.append(f"items[{i}].diagnosis_sequences: out of range")
    for i, doc in enumerate(req.documents, 1):
        if not (doc.url or doc.data is not None or doc.sha256):
            problems.append(f"documents[{i}]: needs url, data or sha256")
    if problems:
        raise PasValidationError(f"PAS request for case {req.case_id}", problems)


def _patient(req: PasRequest) -> dict[str, Any]:
    p = req.patient
    return _drop_none({
        "resourceType": "Patient",
        "meta": {"profile": [PROFILE_SUBSCRIBER]},
        "identifier": [{
            "type": _cc(V2_0203, "MB", "Member Number"),
            "system": f"{PAYER_ID_SYSTEM}:{req.coverage.payer_id}:member",
            "value": p.member_id,
        }],
        "name": [{"family": p.family_name, "given": [p.given_name]}],
        "gender": p.sex,
        "birthDate": p.birth_date.isoformat() if p.birth_date else None,
    })


def _coverage(req: PasRequest, refs: _Refs) -> dict[str, Any]:
    c = req.coverage
    classes = []
    if c.group_number:
        classes.append({"type": _cc(COVERAGE_CLASS_SYSTEM, "group"), "value": c.group_number})
    if c.plan_name:
        classes.append({"type": _cc(COVERAGE_CLASS_SYSTEM, "plan"), "value": c.plan_name, "name": c.plan_name})
    return _drop_none({
        "resourceType": "Coverage",
        "meta": {"profile": [PROFILE_COVERAGE]},
        "status": "active",
        "subscriberId": c.member_id,
        "beneficiary": refs.ref("patient"),
        "relationship": _cc(RELATIONSHIP_SYSTEM, c.relationship),
        "payor": [refs.ref("insurer")],
        "class": classes,
    })


def _organization(org: PasOrganization, *, profile: str, entity: str, extra_ids: list[dict[str, Any]]) -> dict[str, Any]:
    ids = ([{"system": NPI_SYSTEM, "value": org.npi}] if org.npi else []) + extra_ids
    return _drop_none({
        "resourceType": "Organization",
        "meta": {"profile": [profile]},
        "identifier": ids,
        "active": True,
        "type": [_cc(X12_ENTITY, entity)],
        "name": org.name,
        "address": _address(org.address),
        "telecom": [{"system": "phone", "value": org.phone}] if org.phone else None,
    })


def _practitioner(p: PasPractitioner) -> dict[str, Any]:
    name = _drop_none({"family": p.family_name, "given": [p.given_name] if p.given_name else None})
    return _drop_none({
        "resourceType": "Practitioner",
        "meta": {"profile": [PROFILE_PRACTITIONER]},
        "identifier": [{"system": NPI_SYSTEM, "value": p.npi}],
        "name": [name] if name else None,
    })


def _document(doc: PasDocument, refs: _Refs) -> dict[str, Any]:
    attachment: dict[str, Any] = {"contentType": doc.content_type}
    if doc.url:
        attachment["url"] = doc.url
    if doc.data is not None:
        attachment["data"] = base64.b64encode(doc.data).decode("ascii")
        attachment["hash"] = base64.b64encode(hashlib.sha1(doc.data).digest()).decode("ascii")  # FHIR: SHA-1
        attachment["size"] = len(doc.data)
    elif doc.size is not None:
        attachment["size"] = doc.size
    if doc.title:
        attachment["title"] = doc.title
    if doc.created:
        attachment["creation"] = _instant(doc.created)
    sha256 = doc.sha256 or (hashlib.sha256(doc.data).hexdigest() if doc.data is not None else None)
    master = None
    if sha256:
        b64url = base64.urlsafe_b64encode(bytes.fromhex(sha256)).decode("ascii").rstrip("=")
        master = {"system": SHA256_URI_SYSTEM, "value": f"ni:///sha-256;{b64url}"}
    return _drop_none({
        "resourceType": "DocumentReference",
        "masterIdentifier": master,
        "status": "current",
        "type": _cc(LOINC_SYSTEM, doc.loinc_type),
        "subject": refs.ref("patient"),
        "date": _instant(doc.created) if doc.created else None,
        "description": doc.title,
        "content": [{"attachment": attachment}],
    })


def _item(req: PasRequest, seq: int, item: PasItem, key: str, care_team: dict[str, int]) -> dict[str, Any]:
    system = SERVICE_CODE_URIS[item.code_system]
    extensions = [
        {"url": EXT_ITEM_TRACE_NUMBER, "valueIdentifier": {"system": ITEM_TRACE_SYSTEM, "value": f"{key}-{seq}"}},
        {"url": EXT_REQUEST_TYPE, "valueCodeableConcept": _cc(
            X12_REQUEST_CATEGORY, req.request_category, REQUEST_CATEGORIES[req.request_category])},
        {"url": EXT_CERTIFICATION_TYPE, "valueCodeableConcept": _cc(X12_CERTIFICATION_TYPE, "I", "Initial")},
    ]
    out: dict[str, Any] = {"extension": extensions, "sequence": seq}
    if item.practitioner_npi is not None:
        out["careTeamSequence"] = [care_team[item.practitioner_npi]]
    elif care_team:
        out["careTeamSequence"] = [min(care_team.values())]
    if req.diagnoses:
        out["diagnosisSequence"] = list(item.diagnosis_sequences)
    out["category"] = _cc(X12_SERVICE_TYPE, item.service_type)
    out["productOrService"] = _cc(system, item.code, item.description)
    if item.modifiers:  # CPT modifiers are two digits (59, 25); HCPCS Level II ones letters (RT, LT, GA)
        out["modifier"] = [_cc(SERVICE_CODE_URIS[CodeSystem.CPT if m.isdigit() else CodeSystem.HCPCS], m)
                           for m in item.modifiers]
    if item.service_end_date and item.service_end_date != item.service_date:
        out["servicedPeriod"] = {"start": item.service_date.isoformat(), "end": item.service_end_date.isoformat()}
    else:
        out["servicedDate"] = item.service_date.isoformat()
    if item.place_of_service:
        out["locationCodeableConcept"] = _cc(POS_SYSTEM, item.place_of_service)
    elif req.type_of_bill:
        out["locationCodeableConcept"] = _cc(TYPE_OF_BILL_SYSTEM, req.type_of_bill)
    out["quantity"] = {"value": _num(item.units)}
    if item.charge > 0:
        out["unitPrice"] = _money(item.charge / item.units)
        out["net"] = _money(item.charge)
    return out


def _claim(req: PasRequest, refs: _Refs, key: str, created: str, *, inquiry: bool) -> dict[str, Any]:
    care_team = {p.npi: i for i, p in enumerate(req.practitioners, 1)}
    claim: dict[str, Any] = {
        "resourceType": "Claim",
        "meta": {"profile": [PROFILE_CLAIM_INQUIRY if inquiry else PROFILE_CLAIM]},
    }
    exts = []
    if req.level_of_service:
        exts.append({"url": EXT_LEVEL_OF_SERVICE, "valueCodeableConcept": _cc(
            X12_LEVEL_OF_SERVICE, req.level_of_service, LEVELS_OF_SERVICE[req.level_of_service])})
    if inquiry:
        exts.append({"url": EXT_CERTIFICATION_TYPE, "valueCodeableConcept": _cc(X12_CERTIFICATION_TYPE, "I", "Initial")})
    if exts:
        claim["extension"] = exts
    claim |= {
        "identifier": [{"system": SUBMISSION_SYSTEM, "value": key}],
        "status": "active",
        "type": _cc(CLAIM_TYPE_SYSTEM, req.claim_type),
        "use": "preauthorization",
        "patient": refs.ref("patient"),
        "created": created,
        "insurer": refs.ref("insurer"),
        "provider": refs.ref("requester"),
        "priority": _cc(PRIORITY_SYSTEM, req.priority),
    }
    if req.related_key and not inquiry:
        claim["related"] = [{"claim": {"identifier": {"system": SUBMISSION_SYSTEM, "value": req.related_key}},
                             "relationship": _cc(RELATED_CLAIM_SYSTEM, "prior")}]
    if req.practitioners:
        claim["careTeam"] = [
            {"extension": [{"url": EXT_CARE_TEAM_SCOPE, "valueBoolean": True}],
             "sequence": i, "provider": refs.ref(f"practitioner:{p.npi}")}
            for i, p in enumerate(req.practitioners, 1)
        ]
    if not inquiry:
        info: list[dict[str, Any]] = []
        if req.event_start:
            timing = ({"timingPeriod": {"start": req.event_start.isoformat(), "end": req.event_end.isoformat()}}
                      if req.event_end and req.event_end != req.event_start
                      else {"timingDate": req.event_start.isoformat()})
            info.append({"sequence": 0, "category": _cc(PAS_TEMP_CODES, "patientEvent"), **timing})
        for doc in req.documents:
            info.append({"sequence": 0, "category": _cc(PAS_TEMP_CODES, "additionalInformation"),
                         "valueReference": refs.ref(f"document:{doc.document_id}")})
        if req.message:
            info.append({"sequence": 0, "category": _cc(PAS_TEMP_CODES, "freeFormMessage"), "valueString": req.message})
        for n, si in enumerate(info, 1):
            si["sequence"] = n
        if info:
            claim["supportingInfo"] = info
    if req.diagnoses:
        claim["diagnosis"] = [
            _drop_none({
                "extension": ([{"url": PAS_SD + "extension-diagnosisRecordedDate", "valueDate": d.recorded_on.isoformat()}]
                              if d.recorded_on else None),
                "sequence": i,
                "diagnosisCodeableConcept": _cc(ICD10CM_SYSTEM, d.code),
            })
            for i, d in enumerate(req.diagnoses, 1)
        ]
    claim["insurance"] = [{"sequence": 1, "focal": True, "coverage": refs.ref("coverage")}]
    claim["item"] = [_item(req, i, it, key, care_team) for i, it in enumerate(req.items, 1)]
    if inquiry:  # the inquiry asks about the services, it does not price them
        for it in claim["item"]:
            it.pop("unitPrice", None)
            it.pop("net", None)
    return claim


def _bundle(req: PasRequest, *, bundle_key: str, bundle_system: str, claim_key: str, timestamp: datetime,
            inquiry: bool) -> dict[str, Any]:
    _check_request(req)
    ts = _instant(timestamp)
    refs = _Refs(f"{bundle_system}|{bundle_key}")
    entries = [refs.entry("claim", _claim(req, refs, claim_key, ts, inquiry=inquiry))]
    entries.append(refs.entry("requester", _organization(
        req.requester, profile=PROFILE_REQUESTOR,
        entity="FA" if req.claim_type == "institutional" else "1P", extra_ids=[])))
    entries.append(refs.entry("insurer", _organization(
        req.insurer, profile=PROFILE_INSURER, entity="PR",
        extra_ids=[{"system": PAYER_ID_SYSTEM, "value": req.coverage.payer_id}])))
    entries.append(refs.entry("coverage", _coverage(req, refs)))
    entries.append(refs.entry("patient", _patient(req)))
    for p in req.practitioners:
        entries.append(refs.entry(f"practitioner:{p.npi}", _practitioner(p)))
    if not inquiry:
        for doc in req.documents:
            entries.append(refs.entry(f"document:{doc.document_id}", _document(doc, refs)))
    return {
        "resourceType": "Bundle",
        "id": refs.id("bundle"),
        "meta": {"profile": [PROFILE_INQUIRY_BUNDLE if inquiry else PROFILE_REQUEST_BUNDLE]},
        "identifier": {"system": bundle_system, "value": bundle_key},
        "type": "collection",
        "timestamp": ts,
        "entry": entries,
    }


def build_pas_bundle(request: PasRequest, *, idempotency_key: str, timestamp: datetime) -> dict[str, Any]:
    """The PAS request Bundle for ``Claim/$submit``, validated; the same inputs give the same bundle."""
    if not idempotency_key or len(idempotency_key) > 64:
        raise ValueError("idempotency_key must be 1-64 characters")
    bundle = _bundle(request, bundle_key=idempotency_key, bundle_system=SUBMISSION_SYSTEM,
                     claim_key=idempotency_key, timestamp=timestamp, inquiry=False)
    validate_pas_request(bundle, what=f"PAS request bundle for case {request.case_id}")
    return bundle


def build_pas_inquiry_bundle(request: PasRequest, *, idempotency_key: str, timestamp: datetime) -> dict[str, Any]:
    """The query-by-example Bundle for ``Claim/$inquire`` about the submission ``idempotency_key``.

    Its Claim carries the original Claim's identifier, patient, coverage, provider and services;
    the Bundle's own identifier names this inquiry (key + time), not the original request."""
    inquiry_id = f"{idempotency_key}@{int(timestamp.timestamp())}"
    bundle = _bundle(request, bundle_key=inquiry_id, bundle_system=INQUIRY_SYSTEM,
                     claim_key=idempotency_key, timestamp=timestamp, inquiry=True)
    validate_pas_request(bundle, what=f"PAS inquiry bundle for case {request.case_id}")
    return bundle


# --- validating ---------------------------------------------------------------------------------------


def _loc(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(root)"


def _leaves(value: Any, limit: int = 2000) -> list[str]:
    """The scalar values inside an input (bounded), to keep any that a message quotes out of it."""
    out: list[str] = []
    stack = [value]
    while stack and len(out) < limit:
        v = stack.pop()
        if isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif v is not None and not isinstance(v, bool) and len(str(v)) >= 2:
            out.append(str(v))
    return out


def _model_problems(resource: Mapping[str, Any]) -> list[str]:
    """fhir.resources R4B validation, reported as ``path: error type`` (pydantic's text can echo input)."""
    try:
        model = _R4BBundle if resource.get("resourceType") == "Bundle" else get_fhir_model_class(
            str(resource.get("resourceType")))
        model.model_validate(resource)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            msg = str(err.get("msg", ""))
            leaked = any(v in msg for v in _leaves(err.get("input")))
            out.append(f"{_loc(err['loc'])}: {err['type']}" + (f" ({msg})" if msg and not leaked else ""))
        return out
    except (TypeError, ValueError, LookupError) as exc:  # a non-dict body, an unknown resourceType...
        return [f"(root): {type(exc).__name__}"]
    return []


def _resolvable(entries: Sequence[Mapping[str, Any]]) -> set[str]:
    keys: set[str] = set()
    for e in entries:
        res = e.get("resource") or {}
        if e.get("fullUrl"):
            keys.add(str(e["fullUrl"]))
        if res.get("resourceType") and res.get("id"):
            keys.add(f"{res['resourceType']}/{res['id']}")
    return keys


def _references(claim: Mapping[str, Any]) -> list[tuple[str, str]]:
    refs: list[tuple[str, str]] = []

    def add(path: str, ref: Any) -> None:
        if isinstance(ref, Mapping) and isinstance(ref.get("reference"), str):
            refs.append((path, ref["reference"]))

    for name in ("patient", "insurer", "provider", "enterer"):
        add(f"Claim.{name}", claim.get(name))
    for i, ins in enumerate(claim.get("insurance") or []):
        add(f"Claim.insurance.{i}.coverage", ins.get("coverage"))
    for i, ct in enumerate(claim.get("careTeam") or []):
        add(f"Claim.careTeam.{i}.provider", ct.get("provider"))
    for i, si in enumerate(claim.get("supportingInfo") or []):
        add(f"Claim.supportingInfo.{i}.valueReference", si.get("valueReference"))
    return refs


def pas_request_problems(bundle: Any, *, inquiry: bool | None = None) -> list[str]:
    """Everything wrong with a PAS request (or inquiry) Bundle: FHIR R4B validity, then the PAS rules
    this product relies on. Empty when it is fine. Paths and rule names only, never values."""
    try:
        return _pas_request_problems(bundle, inquiry)
    except (AttributeError, TypeError):  # elements of the wrong JSON type: FHIR validation said where
        problems = _model_problems(bundle) if isinstance(bundle, Mapping) else []
        return problems or ["(root): malformed bundle structure"]


def _pas_request_problems(bundle: Any, inquiry: bool | None) -> list[str]:
    if not isinstance(bundle, Mapping):
        return ["(root): not a JSON object"]
    if bundle.get("resourceType") != "Bundle":
        return ["resourceType: must be Bundle"]
    problems = _model_problems(bundle)
    if bundle.get("type") != "collection":
        problems.append("Bundle.type: must be collection")
    ident = bundle.get("identifier")
    if not (isinstance(ident, Mapping) and ident.get("value")):
        problems.append("Bundle.identifier: required (the submitter's transaction id)")
    if not bundle.get("timestamp"):
        problems.append("Bundle.timestamp: required")
    entries = bundle.get("entry") or []
    if not entries:
        problems.append("Bundle.entry: at least the Claim is required")
        return problems
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or not e.get("fullUrl"):
            problems.append(f"Bundle.entry.{i}.fullUrl: required")
        if isinstance(e, Mapping) and any(k in e for k in ("request", "response", "search")):
            problems.append(f"Bundle.entry.{i}: request/response/search not allowed")
    first = entries[0].get("resource") if isinstance(entries[0], Mapping) else None
    if not isinstance(first, Mapping) or first.get("resourceType") != "Claim":
        problems.append("Bundle.entry.0.resource: must be the Claim")
        return problems
    claims = sum(1 for e in entries if isinstance(e, Mapping) and (e.get("resource") or {}).get("resourceType") == "Claim")
    if claims != 1:
        problems.append("Bundle.entry: exactly one Claim allowed")
    if first.get("use") != "preauthorization":
        problems.append("Claim.use: must be preauthorization")
    is_inquiry = inquiry if inquiry is not None else PROFILE_CLAIM_INQUIRY in ((first.get("meta") or {}).get("profile") or [])
    if not is_inquiry and first.get("status") != "active":
        problems.append("Claim.status: must be active")
    if not first.get("identifier"):
        problems.append("Claim.identifier: required")
    for name in ("patient", "insurer", "provider"):
        if not first.get(name):
            problems.append(f"Claim.{name}: required")
    insurance = first.get("insurance") or []
    if not insurance:
        problems.append("Claim.insurance: required")
    elif not any(ins.get("focal") is True for ins in insurance):
        problems.append("Claim.insurance.focal: one coverage must be focal")
    if not is_inquiry and not first.get("item"):
        problems.append("Claim.item: at least one item is required")
    for i, item in enumerate(first.get("item") or []):
        if not ((item.get("productOrService") or {}).get("coding")):
            problems.append(f"Claim.item.{i}.productOrService: a coding is required")
    known = _resolvable(entries)
    for path, ref in _references(first):
        if ref not in known and not any(k.endswith("/" + ref) for k in known):
            problems.append(f"{path}: does not resolve to an entry of the bundle")
    return problems


def validate_pas_request(bundle: Any, *, what: str = "PAS request bundle", inquiry: bool | None = None) -> None:
    """Raise ``PasValidationError`` (paths and rule names, no values) unless ``bundle`` is a PAS request."""
    problems = pas_request_problems(bundle, inquiry=inquiry)
    if problems:
        raise PasValidationError(what, problems)


# --- reading responses ------------------------------------------------------------------------------

CLAIM_RESPONSE_OUTCOMES = frozenset({"queued", "complete", "error", "partial"})  # ClaimResponse.outcome (R4)
RESPONSE_BUNDLE_TYPES = frozenset({"collection", "searchset"})  # a PAS response; an $inquire that found nothing


def _is_code(value: str) -> bool:
    """A code (``A1``, ``not-found``, ``0U``), not free text that could be someone's name."""
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "._:-") for c in value)


@dataclass(frozen=True)
class PasItemDecision:
    sequence: int | None
    code: str  # X12 306: A1, A2, A3, A4, A6, C, CT, NA
    number: str | None = None  # reviewAction.number: certification number (HCR02) or review reference
    reason_codes: tuple[str, ...] = ()  # X12 886 (HCR03)
    authorized_from: date | None = None
    authorized_to: date | None = None


@dataclass(frozen=True)
class PasDecision:
    """One PAS response, reduced to what the product acts on.

    ``kind``: ``response`` (a ClaimResponse), ``error`` (OperationOutcome, or a ClaimResponse with
    outcome ``error`` and no decided item) or ``not_found`` (an inquiry that matched nothing).
    ``decision`` is the overall X12 306 code (see ``overall_decision``), ``ERROR`` or ``NOT_FOUND``."""

    kind: Literal["response", "error", "not_found"]
    decision: str
    items: tuple[PasItemDecision, ...] = ()
    outcome: str | None = None  # ClaimResponse.outcome: queued, complete, error, partial
    authorization_number: str | None = None  # only when certified (A1, A2, A6)
    pre_auth_ref: str | None = None  # ClaimResponse.preAuthRef
    reason_codes: tuple[str, ...] = ()  # all items' X12 886 codes, in order, deduplicated
    error_codes: tuple[str, ...] = ()  # OperationOutcome issue codes / ClaimResponse.error codes
    error_details: tuple[str, ...] = ()  # codes of OperationOutcome.issue.details
    bundle_identifier: str | None = None
    claim_identifiers: tuple[str, ...] = ()  # ClaimResponse.identifier and request.identifier values
    echoed_keys: tuple[str, ...] = ()  # those of them in our system (urn:retroauth:submission)
    response_id: str | None = None  # ClaimResponse.id (payers may reuse it across updates)
    response_ref: str = ""  # sha256 of the canonical payload: PayerResponse.response_ref
    authorized_from: date | None = None
    authorized_to: date | None = None
    http_status: int | None = None

    @property
    def approved(self) -> bool:
        return self.kind == "response" and self.decision in CERTIFIED

    @property
    def denied(self) -> bool:
        return self.kind == "response" and self.decision == "A3"

    @property
    def pended(self) -> bool:
        return self.kind == "response" and self.decision == "A4"

    @property
    def final(self) -> bool:
        """A decision that will not change by waiting (pended, errors and not-found are not)."""
        return self.kind == "response" and self.decision != "A4"

    def echoes(self, idempotency_key: str) -> bool | None:
        """True when the response names this key in our identifier system, False when it names another
        one there, None when it carries none of ours (payers may use only their own identifiers)."""
        if not self.echoed_keys:
            return None
        return idempotency_key in self.echoed_keys


def overall_decision(codes: Sequence[str]) -> str:
    """One code for a response from its items' codes.

    Pended wins (something is still open), then contact-payer; cancelled and no-action items are
    ignored beside others; all alike gives that code; a mix of certified and not-certified is
    A2 (partial); certified with modified is A6."""
    s = set(codes)
    if not s:
        return "NA"
    if len(s) == 1:
        return next(iter(s))
    for code in ("A4", "CT"):
        if code in s:
            return code
    rest = s - {"C", "NA"}
    if not rest:
        return "C" if "C" in s else "NA"
    if len(rest) == 1:
        return next(iter(rest))
    if "A3" in rest:
        return "A2"
    if "A2" in rest:
        return "A2"
    return "A6"


def _first_code(cc: Any, system: str | None = None) -> str | None:
    if not isinstance(cc, Mapping):
        return None
    codings = [c for c in cc.get("coding") or [] if isinstance(c, Mapping) and c.get("code")]
    for c in codings:
        if system is None or (c.get("system") or "").rstrip("/").split("://")[-1] == system.split("://")[-1]:
            return str(c["code"])
    return str(codings[0]["code"]) if codings else None


def _date(v: Any) -> date | None:
    if not isinstance(v, str) or len(v) < 10:
        return None
    try:
        return date.fromisoformat(v[:10])
    except ValueError:
        return None


def _review_action(exts: Iterable[Any]) -> dict[str, Any] | None:
    for ext in exts or []:
        if isinstance(ext, Mapping) and ext.get("url") == EXT_REVIEW_ACTION:
            out: dict[str, Any] = {"code": None, "number": None, "reasons": []}
            for sub in ext.get("extension") or []:
                url = sub.get("url")
                if url in (EXT_REVIEW_ACTION_CODE, "code", "reviewActionCode"):
                    out["code"] = _first_code(sub.get("valueCodeableConcept"), X12_ACTION)
                elif url == "number":
                    out["number"] = sub.get("valueString")
                elif url == "reasonCode":
                    code = _first_code(sub.get("valueCodeableConcept"), X12_REASON)
                    if code and _is_code(code):  # free text in a code is not kept (it may name someone)
                        out["reasons"].append(code)
            return out
    return None


def _item_decision(item: Mapping[str, Any]) -> PasItemDecision | None:
    # PAS puts reviewAction on item.adjudication (2.x, and the fixtures); older drafts on item itself.
    action = None
    for adj in item.get("adjudication") or []:
        action = _review_action(adj.get("extension") or [])
        if action:
            break
    if action is None:
        action = _review_action(item.get("extension") or [])
    if action is None:
        for ext in item.get("extension") or []:  # a bare reviewActionCode on the item
            if ext.get("url") == EXT_REVIEW_ACTION_CODE:
                action = {"code": _first_code(ext.get("valueCodeableConcept"), X12_ACTION), "number": None, "reasons": []}
    if not action or not action["code"]:
        return None
    start = end = None
    for ext in item.get("extension") or []:
        if ext.get("url") == EXT_PREAUTH_PERIOD:
            period = ext.get("valuePeriod") or {}
            start, end = _date(period.get("start")), _date(period.get("end"))
    seq = item.get("itemSequence")
    return PasItemDecision(
        sequence=seq if isinstance(seq, int) else None, code=action["code"], number=action["number"],
        reason_codes=tuple(action["reasons"]), authorized_from=start, authorized_to=end)


def _payload_ref(body: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _identifiers(idents: Any) -> list[tuple[str | None, str]]:
    if isinstance(idents, Mapping):
        idents = [idents]
    return [(i.get("system"), str(i["value"])) for i in idents or [] if isinstance(i, Mapping) and i.get("value")]


def _identifier_values(idents: Any) -> list[str]:
    return [v for _, v in _identifiers(idents)]


def _ours(*groups: Iterable[tuple[str | None, str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for g in groups for s, v in g if s == SUBMISSION_SYSTEM))


def _operation_outcome(oo: Mapping[str, Any], *, bundle_ident: Any, ref: str,
                       http_status: int | None) -> PasDecision:
    codes, details = [], []
    for issue in oo.get("issue") or []:
        if issue.get("code") and _is_code(str(issue["code"])):  # codes only: they reach error messages
            codes.append(str(issue["code"]))
        for c in (issue.get("details") or {}).get("coding") or []:
            if c.get("code") and _is_code(str(c["code"])):
                details.append(str(c["code"]))
    kind: Literal["error", "not_found"] = "not_found" if codes and set(codes) == {"not-found"} else "error"
    return PasDecision(kind=kind, decision=NOT_FOUND if kind == "not_found" else ERROR,
                       error_codes=tuple(dict.fromkeys(codes)), error_details=tuple(dict.fromkeys(details)),
                       bundle_identifier=next(iter(_identifier_values(bundle_ident)), None),
                       echoed_keys=_ours(_identifiers(bundle_ident)), response_ref=ref, http_status=http_status)


def _check_review_action(code: str, where: str) -> None:
    """An unknown code must not pass for a decision (it would read as final, neither approved nor denied)."""
    if code not in REVIEW_ACTIONS:
        raise PasResponseError(f"PAS response {where}: reviewAction code is not an X12 306 review action "
                               f"({', '.join(REVIEW_ACTIONS)})")


def _claim_response(cr: Mapping[str, Any], *, bundle_ident: Any, ref: str,
                    http_status: int | None) -> PasDecision:
    items: list[PasItemDecision] = []
    for element in ("item", "addItem"):
        for i, it in enumerate(cr.get(element) or []):
            d = _item_decision(it) if isinstance(it, Mapping) else None
            if d is not None:
                _check_review_action(d.code, f"ClaimResponse.{element}[{i}]")
                items.append(d)
    header = None
    for adj in cr.get("adjudication") or []:  # PAS 2.x: a claim-level reviewAction
        header = _review_action(adj.get("extension") or [])
        if header:
            break
    if header and header["code"]:
        _check_review_action(header["code"], "ClaimResponse.adjudication")
    codes = [d.code for d in items] or ([header["code"]] if header and header["code"] else [])
    outcome = cr.get("outcome")
    if outcome not in CLAIM_RESPONSE_OUTCOMES:
        raise PasResponseError("PAS response ClaimResponse.outcome: not queued, complete, error or partial")
    errors = []
    for err in cr.get("error") or []:
        code = _first_code(err.get("code"))
        if code and _is_code(code):
            errors.append(code)
    idents = _identifiers(cr.get("identifier"))
    request = cr.get("request")
    if isinstance(request, Mapping):
        idents += _identifiers(request.get("identifier"))
    common = dict(outcome=outcome, error_codes=tuple(dict.fromkeys(errors)),
                  bundle_identifier=next(iter(_identifier_values(bundle_ident)), None),
                  claim_identifiers=tuple(dict.fromkeys(v for _, v in idents)),
                  echoed_keys=_ours(_identifiers(bundle_ident), idents),
                  response_id=cr.get("id"), response_ref=ref, http_status=http_status)
    if not codes:
        if outcome == "error" or errors:
            return PasDecision(kind="error", decision=ERROR, **common)
        # No review action at all: queued means still pending; anything else tells us nothing.
        return PasDecision(kind="response", decision="A4" if outcome in ("queued", "partial") else "NA", **common)
    decision = overall_decision(codes)
    reasons = tuple(dict.fromkeys(r for d in items for r in d.reason_codes))
    if header:
        reasons = tuple(dict.fromkeys([*reasons, *header["reasons"]]))
    certified = [d for d in items if d.code in CERTIFIED]
    auth = None
    if decision in CERTIFIED:
        auth = next((d.number for d in certified if d.number), None) or cr.get("preAuthRef") or (
            header["number"] if header else None)
    starts = [d.authorized_from for d in certified if d.authorized_from]
    ends = [d.authorized_to for d in certified if d.authorized_to]
    period = cr.get("preAuthPeriod") or {}
    return PasDecision(
        kind="response", decision=decision, items=tuple(items), authorization_number=auth,
        pre_auth_ref=cr.get("preAuthRef"), reason_codes=reasons,
        authorized_from=min(starts) if starts else (_date(period.get("start")) if decision in CERTIFIED else None),
        authorized_to=max(ends) if ends else (_date(period.get("end")) if decision in CERTIFIED else None),
        **common)


def _bundles_in(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    for p in body.get("parameter") or []:
        res = p.get("resource") if isinstance(p, Mapping) else None
        if isinstance(res, Mapping) and res.get("resourceType") in ("Bundle", "ClaimResponse", "OperationOutcome"):
            out.append(res)
    return out


def parse_pas_response(body: Any, *, idempotency_key: str | None = None, http_status: int | None = None,
                       source: str | None = None) -> PasDecision:
    """Read a PAS ``$submit`` / ``$inquire`` response (see the module doc). Raises ``PasResponseError``
    on anything else, naming the element (a FHIR path) and, with ``source`` (a file name or an
    endpoint), where the body came from; never a value. With several results (an inquiry's
    Parameters), the one that echoes ``idempotency_key`` is chosen, else the first."""
    try:
        return _parse_pas_response(body, idempotency_key, http_status)
    except RecursionError:  # JSON nested thousands deep: the decoder and the encoder recurse per level
        error = PasResponseError("PAS response is nested too deeply to be FHIR")
    except PasResponseError as e:
        error = e
    if source:
        error = PasResponseError(f"{source}: {error}")
    raise error


def _resource_type(rtype: Any) -> str:
    """``rtype`` when it names a FHIR resource type, else a description that does not repeat it."""
    if isinstance(rtype, str) and rtype.isascii() and rtype.isalpha() and rtype[:1].isupper():
        try:
            get_fhir_model_class(rtype)
            return rtype
        except (KeyError, ValueError, LookupError):
            pass
    return "not a FHIR resource (no known resourceType)" if rtype is not None else "not FHIR (no resourceType)"


def _parse_pas_response(body: Any, idempotency_key: str | None, http_status: int | None) -> PasDecision:
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except ValueError:
            raise PasResponseError("PAS response is not JSON") from None
    if not isinstance(body, Mapping):
        raise PasResponseError("PAS response is not a JSON object")
    ref = _payload_ref(body)
    rtype = body.get("resourceType")
    if rtype == "Parameters":
        found = _bundles_in(body)
        if not found:
            return PasDecision(kind="not_found", decision=NOT_FOUND, response_ref=ref, http_status=http_status)
        decisions = [_parse_pas_response(b, None, http_status) for b in found]
        if idempotency_key:
            for d in decisions:
                if d.echoes(idempotency_key):
                    return d
        return decisions[0]
    problems = _model_problems(body) if rtype in ("Bundle", "ClaimResponse", "OperationOutcome") else []
    if problems:
        raise PasResponseError(f"invalid PAS response {rtype}: " + "; ".join(problems[:10]))
    if rtype == "OperationOutcome":
        return _operation_outcome(body, bundle_ident=None, ref=ref, http_status=http_status)
    if rtype == "ClaimResponse":
        return _claim_response(body, bundle_ident=None, ref=ref, http_status=http_status)
    if rtype != "Bundle":
        raise PasResponseError(f"PAS response resourceType: {_resource_type(rtype)}, not a Bundle, ClaimResponse "
                               "or OperationOutcome")
    if body.get("type") not in RESPONSE_BUNDLE_TYPES:
        raise PasResponseError("PAS response Bundle.type: not collection (a $submit or $inquire response) or "
                               "searchset")
    bundle_ident = body.get("identifier")
    entries = [e.get("resource") for e in body.get("entry") or [] if isinstance(e, Mapping)]
    if not entries:
        if body.get("type") == "searchset":
            return PasDecision(kind="not_found", decision=NOT_FOUND,
                               bundle_identifier=next(iter(_identifier_values(bundle_ident)), None),
                               response_ref=ref, http_status=http_status)
        raise PasResponseError("PAS response Bundle.entry: none (a response carries its ClaimResponse)")
    first = entries[0] or {}
    if first.get("resourceType") == "OperationOutcome":
        return _operation_outcome(first, bundle_ident=bundle_ident, ref=ref, http_status=http_status)
    if first.get("resourceType") != "ClaimResponse":
        raise PasResponseError("PAS response Bundle.entry[0].resource: not a ClaimResponse or OperationOutcome")
    return _claim_response(first, bundle_ident=bundle_ident, ref=ref, http_status=http_status)


# --- the HTTP client ----------------------------------------------------------------------------------

FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def _retry_after(value: str | None, now: Callable[[], float]) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now())


def _submission_key(bundle: Mapping[str, Any]) -> str:
    ident = bundle.get("identifier")
    if isinstance(ident, Mapping) and ident.get("value"):
        return str(ident["value"])
    raise PasValidationError("PAS request bundle", ["Bundle.identifier: required (the idempotency key)"])


def _inquiry_key(bundle: Mapping[str, Any]) -> str | None:
    entries = bundle.get("entry") or []
    claim = (entries[0].get("resource") or {}) if entries else {}
    values = _identifier_values(claim.get("identifier"))
    return values[0] if values else None


@lru_cache(maxsize=1)
def _tls_context() -> Any:
    """The certificate store httpx builds for every new client (the same CA bundle), built once per process:
    loading it costs about 0.1 s of CPU, which each send would pay again. An SSLContext may be shared."""
    return httpx.create_ssl_context()


@dataclass
class PasClient:
    """A PAS endpoint: ``submit`` posts ``[base]/Claim/$submit``, ``inquire`` posts ``[base]/Claim/$inquire``.

    Retries 429 (waiting at least Retry-After), 5xx and transport errors up to ``max_attempts`` in
    all, with exponential backoff (``backoff`` * 2^n, capped at ``max_backoff``) and jitter; never
    other 4xx (``PasRejected``). A Retry-After beyond ``max_retry_after`` ends the call at once
    (``PasUnavailable.retry_after``) so the caller can reschedule instead of holding a worker.
    ``transport``, ``sleep`` and ``rng`` are seams for tests."""

    base_url: str
    token: str = field(repr=False)
    timeout: float = 30.0
    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    max_retry_after: float = 300.0
    transport: httpx.BaseTransport | None = field(default=None, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    rng: Callable[[], float] = field(default=random.random, repr=False)
    _client: httpx.Client | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        self.base_url = self.base_url.rstrip("/")

    # httpx.Client is made lazily so that a PasClient can be built in settings code without I/O.
    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), transport=self.transport,
                                        follow_redirects=False, verify=_tls_context())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> PasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, bundle: Mapping[str, Any]) -> PasDecision:
        """Send a PAS request Bundle. The same bundle (and key) on every attempt; a response that names
        another submission raises ``PasMismatch``."""
        validate_pas_request(bundle, inquiry=False)
        key = _submission_key(bundle)
        decision = self._post("submit", "/Claim/$submit", bundle, key, {"Idempotency-Key": key})
        if decision.echoes(key) is False:
            raise PasMismatch(f"PAS submit for {key}: the response names another submission")
        return decision

    def inquire(self, bundle: Mapping[str, Any]) -> PasDecision:
        """Ask for the status of an earlier submission with a query-by-example Bundle
        (``build_pas_inquiry_bundle``). Reads only, so retrying it is always safe."""
        validate_pas_request(bundle, what="PAS inquiry bundle", inquiry=True)
        key = _inquiry_key(bundle) or _submission_key(bundle)
        decision = self._post("inquire", "/Claim/$inquire", bundle, key, {})
        if decision.kind == "response" and decision.echoes(key) is False:
            raise PasMismatch(f"PAS inquire for {key}: the response names another submission")
        return decision

    def _delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        return base / 2 + self.rng() * base / 2  # "equal jitter": never less than half the step

    def _post(self, op: str, path: str, bundle: Mapping[str, Any], key: str, headers: dict[str, str]) -> PasDecision:
        body = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")  # once: same bytes each try
        send_headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": FHIR_JSON,
            "Accept": FHIR_JSON,
            **headers,
        }
        url = self.base_url + path
        last = "no attempt"
        retry_after: float | None = None
        for attempt in range(1, self.max_attempts + 1):
            retry_after = None
            try:
                resp = self.client.post(url, content=body, headers=send_headers)
            except httpx.TransportError as exc:  # connect, timeout, dropped connection
                last = type(exc).__name__
                logger.warning("PAS %s %s attempt %d/%d: %s", op, key, attempt, self.max_attempts, last)
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    logger.info("PAS %s %s: HTTP %d after %d attempt(s)", op, key, status, attempt)
                    return parse_pas_response(self._json(resp, op), idempotency_key=key, http_status=status)
                last = f"HTTP {status}"
                if status not in RETRYABLE_STATUS:
                    logger.warning("PAS %s %s: HTTP %d, not retried", op, key, status)
                    raise PasRejected(op, status, self._outcome(resp, status))
                retry_after = _retry_after(resp.headers.get("Retry-After"), time.time)
                logger.warning("PAS %s %s attempt %d/%d: HTTP %d", op, key, attempt, self.max_attempts, status)
                if retry_after is not None and retry_after > self.max_retry_after:
                    raise PasUnavailable(op, attempt, last, retry_after)
            if attempt == self.max_attempts:
                break
            wait = self._delay(attempt)
            if retry_after is not None:
                wait = max(wait, retry_after)
            self.sleep(wait)
        raise PasUnavailable(op, self.max_attempts, last, retry_after)

    @staticmethod
    def _json(resp: httpx.Response, op: str) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise PasResponseError(f"PAS {op}: HTTP {resp.status_code} with a body that is not JSON") from None

    @staticmethod
    def _outcome(resp: httpx.Response, status: int) -> PasDecision | None:
        try:
            data = resp.json()
        except ValueError:
            return None
        if isinstance(data, Mapping) and data.get("resourceType") in ("OperationOutcome", "Bundle"):
            try:
                return parse_pas_response(data, http_status=status)
            except PasResponseError:
                return None
        return None


__all__ = [
    "CERTIFIED", "ERROR", "LETTER_LOINC", "NOT_FOUND", "REVIEW_ACTIONS", "SUBMISSION_SYSTEM",
    "PasAddress", "PasClient", "PasCoverage", "PasDecision", "PasDiagnosis", "PasDocument", "PasError",
    "PasItem", "PasItemDecision", "PasMismatch", "PasOrganization", "PasPatient", "PasPractitioner",
    "PasRejected", "PasRequest", "PasResponseError", "PasUnavailable", "PasValidationError",
    "build_pas_bundle", "build_pas_inquiry_bundle", "overall_decision", "parse_pas_response",
    "pas_request_problems", "validate_pas_request",
]
