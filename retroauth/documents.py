"""Documentation packets: what a case needs, what is on file, and the packet that encloses it.

What a case needs is the payer's ``documents.required(categories, reason, encounter class)``:
LOINC document types (clinical notes) and evidence slugs (``coverage_discovery_timeline``, ...).

- A LOINC type is matched against the patient's clinical documents (``match_document``): the note
  of the case's own encounter, or one authored in a window around the stay
  (``DOCUMENT_WINDOW_BEFORE`` / ``DOCUMENT_WINDOW_AFTER``; a note of another encounter only up to
  the end of the stay), and never one authored after ``as_of``.
  The encounter's own note wins over one from the window; then the latest; then the highest id.
  The note is enclosed by reference (its own storage key and sha256), not copied.
- Evidence is generated from the database where the facts live there (``GENERATED_EVIDENCE``:
  coverage discovery timeline, outage record, late-request explanation) and is missing where they
  do not (no outage row and no system-issue reference: the outage record is missing). Evidence that
  only the payer or a third party can issue (``EVIDENCE_DOCUMENTS``: the eligibility notice, another
  payer's coverage record) must be on file as a document of a designated type and title.
- Every packet also carries two generated items: the case summary (demographics, member id,
  providers with NPI, dates, diagnoses, services with units and charges) and a medical-necessity
  statement (diagnoses, services and the relevant sections of the enclosed notes).

Generated items are text (for people, fax: the item's ``storage_key``) plus JSON (for machines:
letters, PAS; the item's ``data``), stored under ``packets/<case id>/v<version>/<item>.txt|.json``
beside ``manifest.json``. One manifest item per enclosure. Their bytes depend on
the case's inputs only (no clock), so writing them again writes nothing.

``assemble`` reads a batch with one query per table, computes each case's ``input_hash`` (sha256 of
the canonical JSON of everything the packet is built from) and builds only the cases whose hash
changed: storage objects first, then one transaction per case with the packet row, the state change
and its audit event. A crash in between leaves objects that the rerun finds byte-identical.
Storage failures are reported per case (``AssembleResult.failed``) so one bad object does not hold
up the batch; the caller retries (the Prefect task raises ``PacketsIncomplete`` to get a retry).

Patient data goes into the stored packet only: events, results and exception messages carry case
ids, document ids, codes and storage keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlmodel import Session

from retroauth import failpoints
from retroauth.cases import Actor, StaleCase, record_event, transition
from retroauth.db import session_scope
from retroauth.models import (
    CaseServiceLine, ClinicalDocument, Coverage, Diagnosis, Encounter, Packet, Patient, PayerOutage, RetroCase,
    ServiceLine,
)
from retroauth.rules import RuleLibrary
from retroauth.storage import Storage, StorageError, key, sha256_hex
from retroauth.vocab import DELAY_REASON_CODES, CaseStatus, MissReason

# Bump when the generated content or the manifest changes shape: every packet is rebuilt once.
GENERATOR_VERSION = 1
MANIFEST_FORMAT = "retroauth.packet/1"

# The window of documents that belong to a stay, besides those linked to its encounter
# (``match_document``: notes linked to another encounter count up to the end of the stay only):
# - 3 days before admission: the pre-admission work-up (the ED visit before the admission, the
#   pre-operative H&P) belongs to the stay, as Medicare's 3-day payment window bundles services of
#   the 3 days before an inpatient admission into it (42 CFR 412.2(c)(5), verify).
# - 14 days after discharge (admission when there is no discharge): notes are often signed late
#   (dictated operative notes, discharge summaries; CMS allows 30 days to complete the record,
#   42 CFR 482.24(c)(4)(viii), verify). 14 days catches late notes without reaching the routine
#   follow-up visit a few weeks later, whose notes are about another encounter.
DOCUMENT_WINDOW_BEFORE = timedelta(days=3)
DOCUMENT_WINDOW_AFTER = timedelta(days=14)

# Items every packet has, whatever the payer asks.
CASE_SUMMARY = "case_summary"
MEDICAL_NECESSITY = "medical_necessity"

# Evidence generated from records in the database.
COVERAGE_DISCOVERY_TIMELINE = "coverage_discovery_timeline"
OUTAGE_RECORD = "outage_record"
LATE_REQUEST_EXPLANATION = "late_request_explanation"
GENERATED_EVIDENCE = (COVERAGE_DISCOVERY_TIMELINE, OUTAGE_RECORD, LATE_REQUEST_EXPLANATION)


@dataclass(frozen=True)
class EvidenceDocument:
    """Evidence that someone else issues, filed as a document of this LOINC type whose title names it."""

    loinc_type: str
    title_words: tuple[str, ...]  # lower-case; any one in the title is enough


# Decision: an eligibility notice (retroactive enrolment letter from the payer or the state) is never
# generated: a packet claiming retroactive eligibility without the notice would be denied. It counts
# when an administrative document (LOINC 51851-4) whose title names it is on file for the patient,
# authored from the window start up to ``as_of`` (no upper bound: the notice comes weeks or months
# after the service). A title is required because 51851-4 is generic (consents, forms, letters).
ADMINISTRATIVE_NOTE = "51851-4"
EVIDENCE_DOCUMENTS: Mapping[str, EvidenceDocument] = {
    "eligibility_notice": EvidenceDocument(ADMINISTRATIVE_NOTE, ("eligibility", "enrollment", "enrolment")),
    "other_coverage_record": EvidenceDocument(
        ADMINISTRATIVE_NOTE, ("other coverage", "explanation of benefits", "eob", "other insurance")),
}

# Labels for people reading a manifest (the code is what machines use).
LABELS: Mapping[str, str] = {
    "34117-2": "History and physical note",
    "34111-5": "Emergency department note",
    "18842-5": "Discharge summary",
    "11504-8": "Surgical operation note",
    "11506-3": "Progress note",
    "11488-4": "Consult note",
    "18748-4": "Diagnostic imaging study",
    "51847-2": "Evaluation and plan note",
    "57133-1": "Referral note",
    "18776-5": "Plan of care note",
    "28570-0": "Procedure note",
    ADMINISTRATIVE_NOTE: "Administrative note",
    CASE_SUMMARY: "Case summary",
    MEDICAL_NECESSITY: "Medical necessity statement",
    COVERAGE_DISCOVERY_TIMELINE: "Coverage discovery timeline",
    OUTAGE_RECORD: "System outage record",
    LATE_REQUEST_EXPLANATION: "Explanation of the late request",
    "eligibility_notice": "Eligibility notice",
    "other_coverage_record": "Other coverage record",
}

# Note sections worth quoting for medical necessity, matched as words in a heading.
RELEVANT_HEADINGS = (
    "chief complaint", "reason for", "history of present illness", "hpi", "assessment", "plan", "impression",
    "indication", "diagnosis", "diagnoses", "hospital course", "findings", "procedure", "procedures",
)
MAX_SECTION_CHARS = 1500  # per quoted section
MAX_SECTIONS_PER_NOTE = 6
_HEADING_MD = re.compile(r"^\s{0,3}#{1,6}\s*(.+?)\s*#*\s*$")
_HEADING_LABEL = re.compile(r"^\s*([A-Za-z][A-Za-z /&+-]{1,40}):\s*(.*)$")
_HEADING_CAPS = re.compile(r"^\s*([A-Z][A-Z /&+-]{2,60})\s*$")
_WORD = re.compile(r"[a-z]{5,}")
# Words of code descriptions that say nothing about the patient's condition.
_STOP_WORDS = frozenset({
    "procedure", "finding", "disorder", "situation", "regime", "therapy", "observable", "entity", "other",
    "unspecified", "without", "with", "patient", "history", "screening", "assessment", "evaluation", "encounter",
    "qualifier", "value", "specified", "initial", "subsequent", "right", "left", "bilateral", "structure",
})


class PacketsIncomplete(Exception):
    """Some cases' packets could not be built (storage trouble): ids and error types only."""

    def __init__(self, failed: Mapping[int, str]):
        self.failed = dict(failed)
        shown = ", ".join(f"{cid} ({err})" for cid, err in sorted(self.failed.items())[:20])
        more = f" and {len(self.failed) - 20} more" if len(self.failed) > 20 else ""
        super().__init__(f"packets not built for {len(self.failed)} case(s): {shown}{more}; safe to retry")


@dataclass
class AssembleResult:
    built: int = 0  # packets written (first build or inputs changed)
    unchanged: int = 0  # input hash unchanged: nothing written (a state may have been reconciled)
    ready: int = 0  # cases of the batch in 'ready' afterwards
    awaiting: int = 0  # cases of the batch in 'awaiting_documentation' afterwards
    skipped: int = 0  # not found, not in a packet state, or payer not in the rule library
    stale: int = 0  # changed by someone else while we built: picked up by the next run
    missing: dict[int, list[str]] = field(default_factory=dict)  # awaiting case id -> item codes
    failed: dict[int, str] = field(default_factory=dict)  # case id -> error type name

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (string keys): what tasks return and flows add up."""
        return {
            "built": self.built, "unchanged": self.unchanged, "ready": self.ready, "awaiting": self.awaiting,
            "skipped": self.skipped, "stale": self.stale,
            "missing": {str(k): v for k, v in sorted(self.missing.items())},
            "failed": {str(k): v for k, v in sorted(self.failed.items())},
        }


def merge_results(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up ``AssembleResult.as_dict()`` of several batches."""
    total: dict[str, Any] = AssembleResult().as_dict()
    for r in results:
        for k in ("built", "unchanged", "ready", "awaiting", "skipped", "stale"):
            total[k] += r.get(k, 0)
        total["missing"].update(r.get("missing", {}))
        total["failed"].update(r.get("failed", {}))
    return total


# States whose packet this module keeps up to date.
PACKET_STATES = (CaseStatus.IDENTIFIED, CaseStatus.AWAITING_DOCUMENTATION, CaseStatus.READY)


def needs_packet() -> sa.ColumnElement[bool]:
    """The cases whose packet a batch (re)assembles: identified, awaiting documentation, and ready ones
    (their inputs may have changed; the input hash makes an unchanged one cost a few reads)."""
    return RetroCase.status.in_([str(s) for s in PACKET_STATES])


def cases_needing_packets(engine: sa.Engine, limit: int | None = None) -> list[int]:
    """Cases to (re)assemble (``needs_packet``), ids only."""
    q = sa.select(RetroCase.id).where(needs_packet()).order_by(RetroCase.id)
    if limit is not None:
        q = q.limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(q).scalars())


# --- the plain data a packet is built from ------------------------------------------------------------


def _iso(v: datetime | None) -> str | None:
    return v.astimezone(timezone.utc).isoformat() if v is not None else None


def _json_default(v: object) -> object:
    if isinstance(v, datetime):
        return _iso(v)
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    raise TypeError(f"not JSON: {type(v).__name__}")


def canonical_json(data: object) -> bytes:
    """Sorted keys, fixed separators, UTF-8: the same data always gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default).encode()


def pretty_json(data: object) -> bytes:
    """Deterministic and readable: stored items and manifests."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode()


def input_hash(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(inputs)).hexdigest()


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The stored form of a manifest: sha256 of these bytes is the manifest's checksum."""
    return pretty_json(manifest)


@dataclass(frozen=True)
class DocInfo:
    """A clinical document's metadata (never its content)."""

    id: int
    patient_id: int
    encounter_id: int | None
    loinc_type: str
    title: str | None
    authored_at: datetime
    content_type: str
    storage_key: str
    sha256: str
    size_bytes: int

    def as_input(self) -> dict[str, Any]:
        return {"id": self.id, "loinc_type": self.loinc_type, "title": self.title, "encounter_id": self.encounter_id,
                "authored_at": _iso(self.authored_at), "content_type": self.content_type,
                "storage_key": self.storage_key, "sha256": self.sha256, "size": self.size_bytes}


@dataclass(frozen=True)
class Window:
    """Where a case's documents may come from (see ``match_document``)."""

    encounter_id: int
    start: datetime  # admission - DOCUMENT_WINDOW_BEFORE
    stay_end: datetime  # discharge (admission when there is none)
    end: datetime  # stay_end + DOCUMENT_WINDOW_AFTER


def document_window(admitted_at: datetime, discharged_at: datetime | None, encounter_id: int) -> Window:
    stay_end = discharged_at or admitted_at
    return Window(encounter_id, admitted_at - DOCUMENT_WINDOW_BEFORE, stay_end, stay_end + DOCUMENT_WINDOW_AFTER)


def match_document(docs: Iterable[DocInfo], loinc_type: str, window: Window, as_of: datetime, *,
                   title_words: Sequence[str] = (), open_ended: bool = False) -> DocInfo | None:
    """The document to enclose for one required type, or None.

    Candidates are of this type, authored no later than ``as_of``, and
    - linked to the case's encounter: any date;
    - linked to no encounter: authored in [start, end] (pre-admission work-up, late-signed notes);
    - linked to another encounter: authored in [start, stay_end] only: the ED visit or pre-operative
      work-up before the stay, or a note filed under a separate encounter during it. A later
      visit's notes are about that visit, not this one.
    ``open_ended`` (evidence documents such as an eligibility notice, which concern the patient, not
    a visit): any link, from ``start`` up to ``as_of``. With ``title_words`` one of them must be in the
    title. The encounter's own document wins, then the latest authored, then the highest id (so the
    choice never depends on row order).
    """
    best: tuple | None = None
    chosen = None
    for d in docs:
        if d.loinc_type != loinc_type or d.authored_at > as_of:
            continue
        own = d.encounter_id == window.encounter_id
        if open_ended:
            fits = own or d.authored_at >= window.start
        elif d.encounter_id is None:
            fits = window.start <= d.authored_at <= window.end
        else:
            fits = own or window.start <= d.authored_at <= window.stay_end
        if not fits:
            continue
        if title_words and not any(w in (d.title or "").lower() for w in title_words):
            continue
        rank = (own, d.authored_at, d.id)
        if best is None or rank > best:
            best, chosen = rank, d
    return chosen


def is_loinc(code: str) -> bool:
    return code[:1].isdigit()


# --- reading a batch ------------------------------------------------------------------------------------


@dataclass
class _Case:
    """Everything read for one case."""

    case: RetroCase
    encounter: Encounter
    patient: Patient
    coverage: Coverage | None
    lines: list[tuple[ServiceLine, str | None]] = field(default_factory=list)
    diagnoses: list[Diagnosis] = field(default_factory=list)
    documents: list[DocInfo] = field(default_factory=list)
    outages: list[PayerOutage] = field(default_factory=list)
    packet: Packet | None = None
    required: list[str] = field(default_factory=list)

    @property
    def window(self) -> Window:
        return document_window(self.encounter.admitted_at, self.encounter.discharged_at, self.encounter.id)


def _chunks(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _load(engine: sa.Engine, library: RuleLibrary, case_ids: Sequence[int], as_of: datetime,
          result: AssembleResult) -> list[_Case]:
    """One query per table for the whole batch (chunked under the bound-parameter limits)."""
    ids = sorted(set(case_ids))
    loaded: dict[int, _Case] = {}
    with Session(engine, expire_on_commit=False) as s:
        for chunk in _chunks(ids):
            rows = s.execute(
                sa.select(RetroCase, Encounter, Patient, Coverage)
                .join(Encounter, Encounter.id == RetroCase.encounter_id)
                .join(Patient, Patient.id == Encounter.patient_id)
                .outerjoin(Coverage, Coverage.id == RetroCase.coverage_id)
                .where(RetroCase.id.in_(chunk))
            ).all()
            for case, enc, patient, coverage in rows:
                if case.status not in PACKET_STATES or case.payer_id not in library:
                    continue
                loaded[case.id] = _Case(case, enc, patient, coverage)
        result.skipped += len(ids) - len(loaded)
        if not loaded:
            return []
        case_keys = sorted(loaded)
        for chunk in _chunks(case_keys):
            for cid, category, line in s.execute(
                sa.select(CaseServiceLine.case_id, CaseServiceLine.rule_category, ServiceLine)
                .join(ServiceLine, ServiceLine.id == CaseServiceLine.service_line_id)
                .where(CaseServiceLine.case_id.in_(chunk))
                .order_by(CaseServiceLine.case_id, ServiceLine.service_date, ServiceLine.line_number, ServiceLine.id)
            ):
                loaded[cid].lines.append((line, category))

        for c in loaded.values():
            categories = list(dict.fromkeys(cat for _, cat in c.lines if cat))
            c.required = library[c.case.payer_id].documents.required(
                categories, c.case.reason, c.encounter.encounter_class)

        by_encounter: dict[int, list[_Case]] = {}
        for c in loaded.values():
            by_encounter.setdefault(c.encounter.id, []).append(c)
        encounter_ids = sorted(by_encounter)
        for chunk in _chunks(encounter_ids):
            for d in s.execute(sa.select(Diagnosis).where(Diagnosis.encounter_id.in_(chunk))
                               .order_by(Diagnosis.encounter_id, Diagnosis.rank, Diagnosis.code)).scalars():
                for c in by_encounter[d.encounter_id]:
                    c.diagnoses.append(d)

        types = sorted({code for c in loaded.values() for code in c.required if is_loinc(code)}
                       | {EVIDENCE_DOCUMENTS[code].loinc_type for c in loaded.values() for code in c.required
                          if code in EVIDENCE_DOCUMENTS})
        by_patient: dict[int, list[_Case]] = {}
        for c in loaded.values():
            by_patient.setdefault(c.patient.id, []).append(c)
        if types:
            earliest = min(c.window.start for c in loaded.values())
            patient_ids = sorted(by_patient)
            for chunk in _chunks(patient_ids, 400):
                q = (
                    sa.select(ClinicalDocument.id, ClinicalDocument.patient_id, ClinicalDocument.encounter_id,
                              ClinicalDocument.loinc_type, ClinicalDocument.title, ClinicalDocument.authored_at,
                              ClinicalDocument.content_type, ClinicalDocument.storage_key, ClinicalDocument.sha256,
                              ClinicalDocument.size_bytes)
                    .where(ClinicalDocument.patient_id.in_(chunk), ClinicalDocument.loinc_type.in_(types),
                           ClinicalDocument.authored_at <= as_of,
                           sa.or_(ClinicalDocument.authored_at >= earliest,
                                  ClinicalDocument.encounter_id.in_(encounter_ids)))
                )
                for row in s.execute(q):
                    doc = DocInfo(*row)
                    for c in by_patient[doc.patient_id]:
                        c.documents.append(doc)

        if any(OUTAGE_RECORD in c.required for c in loaded.values()):
            payers = sorted({c.case.payer_id for c in loaded.values() if OUTAGE_RECORD in c.required})
            first = min(c.encounter.admitted_at for c in loaded.values())
            last = max(c.encounter.discharged_at or c.encounter.admitted_at for c in loaded.values())
            outages = s.execute(
                sa.select(PayerOutage)
                .where(PayerOutage.payer_id.in_(payers), PayerOutage.starts_at <= last, PayerOutage.starts_at <= as_of,
                       sa.or_(PayerOutage.ends_at.is_(None), PayerOutage.ends_at >= first))
                .order_by(PayerOutage.starts_at, PayerOutage.id)
            ).scalars().all()
            for c in loaded.values():
                # The sweep's rule (retroauth.sweep.case_facts): an outage overlapping the stay.
                start, end = c.encounter.admitted_at, c.encounter.discharged_at or c.encounter.admitted_at
                c.outages = [o for o in outages if o.payer_id == c.case.payer_id and o.starts_at <= end
                             and (o.ends_at is None or o.ends_at >= start)]

        for chunk in _chunks(case_keys):
            for p in s.execute(sa.select(Packet).where(Packet.case_id.in_(chunk))).scalars():
                loaded[p.case_id].packet = p
    return [loaded[cid] for cid in case_keys]


# --- what the packet is built from ------------------------------------------------------------------------


def _inputs(c: _Case, library: RuleLibrary, as_of: datetime) -> dict[str, Any]:
    """Every input of the packet, as plain JSON data: hashed for change detection, and the only thing
    (with the enclosed notes' bytes, fixed by their sha256) the generated items are made from."""
    payer = library[c.case.payer_id]
    case, enc, pt, cov = c.case, c.encounter, c.patient, c.coverage
    documents: dict[str, Any] = {}
    for code in c.required:
        if is_loinc(code):
            doc = match_document(c.documents, code, c.window, as_of)
        elif code in EVIDENCE_DOCUMENTS:
            ev = EVIDENCE_DOCUMENTS[code]
            doc = match_document(c.documents, ev.loinc_type, c.window, as_of, title_words=ev.title_words,
                                 open_ended=True)
        else:
            continue
        documents[code] = doc.as_input() if doc else None
    return {
        "generator": GENERATOR_VERSION,
        "case": {"id": case.id, "payer_id": case.payer_id, "reason": case.reason,
                 "delay_reason_code": case.delay_reason_code, "due_at": _iso(case.due_at),
                 "deadline_rule": case.deadline_rule},
        "payer": {"id": payer.id, "name": payer.name, "documents": payer.documents.model_dump(mode="json")},
        "required": list(c.required),
        "patient": {"id": pt.id, "mrn": pt.mrn, "family_name": pt.family_name, "given_name": pt.given_name,
                    "birth_date": pt.birth_date, "sex": pt.sex, "address_line": pt.address_line, "city": pt.city,
                    "state": pt.state, "postal_code": pt.postal_code, "phone": pt.phone},
        "coverage": None if cov is None else {
            "id": cov.id, "payer_id": cov.payer_id, "plan_name": cov.plan_name, "member_id": cov.member_id,
            "group_number": cov.group_number, "priority": cov.priority, "effective_from": cov.effective_from,
            "effective_to": cov.effective_to, "discovered_at": _iso(cov.discovered_at),
            "discovery_method": cov.discovery_method},
        "encounter": {"id": enc.id, "encounter_class": enc.encounter_class, "admission_type": enc.admission_type,
                      "admitted_at": _iso(enc.admitted_at), "discharged_at": _iso(enc.discharged_at),
                      "timezone": enc.timezone, "facility_name": enc.facility_name, "facility_npi": enc.facility_npi,
                      "place_of_service": enc.place_of_service, "type_of_bill": enc.type_of_bill,
                      "system_issue_reference": enc.system_issue_reference},
        "lines": [{"id": ln.id, "line_number": ln.line_number, "code_system": ln.code_system, "code": ln.code,
                   "description": ln.description, "modifiers": ln.modifiers, "units": ln.units, "charge": ln.charge,
                   "service_date": ln.service_date, "rendering_npi": ln.rendering_npi,
                   "ordering_npi": ln.ordering_npi, "rule_category": category}
                  for ln, category in c.lines],
        "diagnoses": [{"rank": d.rank, "code_system": d.code_system, "code": d.code, "description": d.description}
                      for d in c.diagnoses],
        "documents": documents,
        "outages": [{"id": o.id, "reference": o.reference, "starts_at": _iso(o.starts_at),
                     "ends_at": _iso(o.ends_at), "description": o.description} for o in c.outages]
        if OUTAGE_RECORD in c.required else [],
    }


# --- generated items --------------------------------------------------------------------------------------


def _day(iso: str | None, tz: str) -> str:
    if not iso:
        return "-"
    from zoneinfo import ZoneInfo

    return datetime.fromisoformat(iso).astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M %Z")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _money(v: object) -> str:
    return f"${Decimal(str(v)):,.2f}"


def _providers(inp: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    enc = inp["encounter"]
    if enc["facility_npi"] or enc["facility_name"]:
        out[("facility", enc["facility_npi"] or "")] = {"role": "facility", "npi": enc["facility_npi"],
                                                         "name": enc["facility_name"]}
    for ln in inp["lines"]:
        for role in ("rendering", "ordering"):
            npi = ln[f"{role}_npi"]
            if npi:
                out.setdefault((role, npi), {"role": role, "npi": npi, "name": None})
    return list(out.values())


def case_summary(inp: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Who, which coverage, who treated, when, why (diagnoses) and what (services): JSON and text."""
    pt, cov, enc = inp["patient"], inp["coverage"], inp["encounter"]
    dates = sorted(str(ln["service_date"]) for ln in inp["lines"])
    total = sum((Decimal(str(ln["charge"])) * Decimal(str(ln["units"])) for ln in inp["lines"]), Decimal("0"))
    data = {
        "case_id": inp["case"]["id"], "payer": {"id": inp["payer"]["id"], "name": inp["payer"]["name"]},
        "reason": inp["case"]["reason"], "delay_reason_code": inp["case"]["delay_reason_code"],
        "patient": {k: pt[k] for k in ("family_name", "given_name", "birth_date", "sex", "mrn", "address_line",
                                        "city", "state", "postal_code", "phone")},
        "coverage": None if cov is None else {k: cov[k] for k in ("member_id", "group_number", "plan_name",
                                                                   "priority", "effective_from", "effective_to")},
        "providers": _providers(inp),
        "encounter": {k: enc[k] for k in ("encounter_class", "admission_type", "admitted_at", "discharged_at",
                                          "facility_name", "facility_npi", "place_of_service", "type_of_bill")},
        "dates_of_service": {"from": dates[0] if dates else None, "to": dates[-1] if dates else None},
        "diagnoses": inp["diagnoses"],
        "services": [{k: ln[k] for k in ("line_number", "code_system", "code", "description", "modifiers", "units",
                                         "charge", "service_date", "rendering_npi", "ordering_npi", "rule_category")}
                     for ln in inp["lines"]],
        "total_charge": total,
    }
    tz = enc["timezone"]
    lines = [
        "CASE SUMMARY",
        f"Case {data['case_id']} - retro-authorization request to {inp['payer']['name']} ({inp['payer']['id']})",
        "",
        "Patient",
        f"  Name: {pt['given_name']} {pt['family_name']}",
        f"  Date of birth: {pt['birth_date'] or '-'}   Sex: {pt['sex'] or '-'}   MRN: {pt['mrn'] or '-'}",
        f"  Address: {', '.join(x for x in (pt['address_line'], pt['city'], pt['state'], pt['postal_code']) if x) or '-'}",
        "",
        "Coverage",
    ]
    if cov is None:
        lines.append("  none on file")
    else:
        lines += [f"  Member ID: {cov['member_id']}   Group: {cov['group_number'] or '-'}   Plan: {cov['plan_name'] or '-'}",
                  f"  Effective: {cov['effective_from']} to {cov['effective_to'] or 'open'}"]
    lines += ["", "Providers"]
    lines += [f"  {p['role']}: NPI {p['npi'] or '-'}" + (f" ({p['name']})" if p["name"] else "") for p in data["providers"]]
    lines += [
        "", "Encounter",
        f"  Class: {enc['encounter_class']}   Admission type: {enc['admission_type'] or '-'}   "
        f"Place of service: {enc['place_of_service'] or '-'}",
        f"  Admitted: {_day(enc['admitted_at'], tz)}   Discharged: {_day(enc['discharged_at'], tz)}",
        f"  Dates of service: {data['dates_of_service']['from'] or '-'} to {data['dates_of_service']['to'] or '-'}",
        "", "Diagnoses (ICD-10-CM or as coded)",
    ]
    lines += [f"  {d['rank']}. {d['code_system']} {d['code']}  {d['description'] or ''}".rstrip()
              for d in inp["diagnoses"]] or ["  none on file"]
    lines += ["", "Services"]
    lines += [f"  {s['line_number']}. {s['code_system']} {s['code']}"
              + (f"-{s['modifiers']}" if s["modifiers"] else "")
              + f"  {s['description'] or ''}  units {s['units']}  charge {_money(s['charge'])}  on {s['service_date']}"
              + (f"  rendering NPI {s['rendering_npi']}" if s["rendering_npi"] else "")
              for s in data["services"]]
    lines += [f"  Total charges: {_money(total)}", ""]
    return data, "\n".join(lines)


def _split_sections(text: str) -> list[tuple[str | None, str]]:
    """(heading, body) pairs: markdown headings, 'Label:' lines and ALL-CAPS lines start a section."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for raw in text.splitlines():
        m = _HEADING_MD.match(raw)
        if m:
            sections.append((m.group(1).strip(), []))
            continue
        m = _HEADING_LABEL.match(raw)
        if m and len(m.group(1).split()) <= 4:  # "Assessment:", not "The following were done:"
            sections.append((m.group(1).strip(), [m.group(2)] if m.group(2).strip() else []))
            continue
        m = _HEADING_CAPS.match(raw)
        if m and len(raw.split()) <= 8:
            sections.append((m.group(1).strip().title(), []))
            continue
        sections[-1][1].append(raw)
    return [(h, "\n".join(body).strip()) for h, body in sections]


def _relevant_heading(heading: str) -> bool:
    h = " " + re.sub(r"[^a-z]+", " ", heading.lower()) + " "
    return any(f" {w} " in h for w in RELEVANT_HEADINGS)


def _terms(inp: Mapping[str, Any]) -> set[str]:
    """Content words of the case's diagnosis and service descriptions."""
    words: set[str] = set()
    for item in [*inp["diagnoses"], *inp["lines"]]:
        words |= set(_WORD.findall((item.get("description") or "").lower()))
    return words - _STOP_WORDS


def _clip(text: str, limit: int = MAX_SECTION_CHARS) -> str:
    text = re.sub(r"\n{3,}", "\n\n", text.strip())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " [...]"


def relevant_sections(text: str, terms: set[str]) -> list[dict[str, str | None]]:
    """The parts of a note that argue medical necessity, in note order, deterministic.

    A section under a relevant heading (assessment, plan, history of present illness, ...) is kept
    whole (clipped); from other sections only the lines naming a diagnosis or service word are kept.
    """
    out: list[dict[str, str | None]] = []
    for heading, body in _split_sections(text):
        if not body:
            continue
        if heading and _relevant_heading(heading):
            out.append({"heading": heading, "text": _clip(body)})
            continue
        hits = [ln.strip() for ln in body.splitlines()
                if ln.strip() and terms & set(_WORD.findall(ln.lower()))]
        if hits:
            out.append({"heading": heading, "text": _clip("\n".join(hits))})
    return out[:MAX_SECTIONS_PER_NOTE]


_REASON_TEXT: Mapping[str, str] = {
    MissReason.EMERGENCY: "The services were emergency care: there was no time to request authorization before "
                          "treating the patient.",
    MissReason.DELAYED_INSURANCE_VERIFICATION: "The patient's coverage with this plan was not known at the time of "
                                               "service; it was found afterwards (see the coverage discovery timeline).",
    MissReason.RETROACTIVE_ELIGIBILITY: "The patient's eligibility was granted retroactively, after the services were "
                                        "provided (see the eligibility notice).",
    MissReason.SYSTEM_ISSUE: "A system problem prevented the authorization request before the service (see the "
                             "outage record).",
    MissReason.ADMINISTRATIVE_ERROR: "Authorization was not requested in advance because of an administrative error "
                                     "(see the explanation of the late request).",
}


def medical_necessity(inp: Mapping[str, Any], notes: Mapping[str, str | None]) -> tuple[dict[str, Any], str]:
    """Diagnoses, services and quoted note sections; ``notes``: required code -> note text (None: not text)."""
    terms = _terms(inp)
    excerpts = []
    for code, doc in inp["documents"].items():
        if doc is None or code not in notes:
            continue
        text = notes[code]
        excerpts.append({"type": code, "document_id": doc["id"], "title": doc["title"],
                         "authored_at": doc["authored_at"],
                         "sections": relevant_sections(text, terms) if text is not None else [],
                         "note": None if text is not None else "not text: enclosed as is"})
    enc = inp["encounter"]
    reason = inp["case"]["reason"]
    data = {
        "case_id": inp["case"]["id"], "reason": reason, "encounter_class": enc["encounter_class"],
        "admission_type": enc["admission_type"], "admitted_at": enc["admitted_at"],
        "discharged_at": enc["discharged_at"], "diagnoses": inp["diagnoses"],
        "services": [{k: ln[k] for k in ("code_system", "code", "description", "units", "service_date")}
                     for ln in inp["lines"]],
        "excerpts": excerpts,
    }
    tz = enc["timezone"]
    pt = inp["patient"]
    dx = "; ".join(f"{d['code']} {d['description'] or ''}".strip() for d in inp["diagnoses"]) or "see the enclosed notes"
    lines = [
        "STATEMENT OF MEDICAL NECESSITY",
        f"Case {inp['case']['id']} - {pt['given_name']} {pt['family_name']}, born {pt['birth_date'] or '-'}",
        "",
        f"The services below were provided during {_article(enc['encounter_class'])} {enc['encounter_class']} encounter "
        f"(admitted {_day(enc['admitted_at'], tz)}, discharged {_day(enc['discharged_at'], tz)}) "
        f"for: {dx}.",
    ]
    if reason in _REASON_TEXT:
        lines += ["", _REASON_TEXT[MissReason(reason)]]
    lines += ["", "Diagnoses"]
    lines += [f"  {d['rank']}. {d['code_system']} {d['code']}  {d['description'] or ''}".rstrip()
              for d in inp["diagnoses"]] or ["  none on file"]
    lines += ["", "Services"]
    lines += [f"  {s['code_system']} {s['code']}  {s['description'] or ''}  units {s['units']}  on {s['service_date']}"
              for s in data["services"]]
    lines += ["", "From the clinical record"]
    if not excerpts:
        lines.append("  no clinical note enclosed")
    for e in excerpts:
        lines += ["", f"  [{LABELS.get(e['type'], e['type'])}, {_day(e['authored_at'], tz)}, document {e['document_id']}]"]
        if e["note"]:
            lines.append(f"  ({e['note']})")
        for sec in e["sections"]:
            lines.append(f"  {sec['heading'] or 'Note'}:")
            lines += [f"    {ln}" for ln in (sec["text"] or "").splitlines()]
    lines.append("")
    return data, "\n".join(lines)


def coverage_discovery_timeline(inp: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """When the service happened and when and how the coverage became known; None without a coverage."""
    cov, enc = inp["coverage"], inp["encounter"]
    if cov is None or not cov["discovered_at"]:
        return None
    admitted, discovered = datetime.fromisoformat(enc["admitted_at"]), datetime.fromisoformat(cov["discovered_at"])
    days = (discovered - admitted).total_seconds() / 86400
    data = {
        "case_id": inp["case"]["id"], "admitted_at": enc["admitted_at"], "discharged_at": enc["discharged_at"],
        "coverage_effective_from": cov["effective_from"], "coverage_effective_to": cov["effective_to"],
        "discovered_at": cov["discovered_at"], "discovery_method": cov["discovery_method"],
        "days_from_admission_to_discovery": round(days, 1),
    }
    tz = enc["timezone"]
    text = "\n".join([
        "COVERAGE DISCOVERY TIMELINE",
        f"Case {inp['case']['id']}",
        "",
        f"  Admitted / service began: {_day(enc['admitted_at'], tz)}",
        f"  Discharged:               {_day(enc['discharged_at'], tz)}",
        f"  Coverage effective:       {cov['effective_from']} to {cov['effective_to'] or 'open'}",
        f"  Coverage found:           {_day(cov['discovered_at'], tz)} by {cov['discovery_method'].replace('_', ' ')}",
        f"  Days from admission to discovery: {data['days_from_admission_to_discovery']}",
        "",
        "Authorization could not be requested before the coverage was known; the request follows its discovery.",
        "",
    ])
    return data, text


def outage_record(inp: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The payer outages overlapping the stay and the encounter's system-issue reference; None if neither."""
    ref = inp["encounter"]["system_issue_reference"]
    if not inp["outages"] and not ref:
        return None
    tz = inp["encounter"]["timezone"]
    data = {"case_id": inp["case"]["id"], "payer_id": inp["payer"]["id"], "system_issue_reference": ref,
            "outages": inp["outages"]}
    lines = ["SYSTEM OUTAGE RECORD", f"Case {inp['case']['id']} - payer {inp['payer']['id']}", ""]
    if ref:
        lines.append(f"  Provider system issue reference: {ref}")
    for o in inp["outages"]:
        lines.append(f"  Payer outage {o['reference']}: {_day(o['starts_at'], tz)} to {_day(o['ends_at'], tz)}"
                     + (f" - {o['description']}" if o["description"] else ""))
    lines += ["", "The authorization request could not be made while these systems were unavailable.", ""]
    return data, "\n".join(lines)


def late_request_explanation(inp: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Why the request comes after the service, for the administrative-error reason."""
    case, enc = inp["case"], inp["encounter"]
    dates = sorted(str(ln["service_date"]) for ln in inp["lines"])
    data = {"case_id": case["id"], "reason": case["reason"], "delay_reason_code": case["delay_reason_code"]
            or DELAY_REASON_CODES[MissReason.ADMINISTRATIVE_ERROR],
            "first_service_date": dates[0] if dates else None, "deadline_rule": case["deadline_rule"],
            "due_at": case["due_at"]}
    text = "\n".join([
        "EXPLANATION OF THE LATE AUTHORIZATION REQUEST",
        f"Case {case['id']}",
        "",
        f"Prior authorization for the services of {data['first_service_date'] or '-'} was not requested before they "
        "were provided because of an administrative error in our authorization process (X12 delay reason "
        f"{data['delay_reason_code']}: administration delay in the prior approval process).",
        "The omission was found by our daily authorization review, and this request is submitted within the "
        f"plan's retrospective review window ({case['deadline_rule'] or 'see the plan policy'}"
        + (f", due {_day(case['due_at'], enc['timezone'])}" if case["due_at"] else "") + ").",
        "The services were medically necessary as documented in the enclosed records; we ask the plan to review "
        "them on their merits.",
        "",
    ])
    return data, text


_GENERATORS = {
    COVERAGE_DISCOVERY_TIMELINE: coverage_discovery_timeline,
    OUTAGE_RECORD: outage_record,
    LATE_REQUEST_EXPLANATION: late_request_explanation,
}
_MISSING_WHY = {
    COVERAGE_DISCOVERY_TIMELINE: "no_coverage_discovery",
    OUTAGE_RECORD: "no_outage_on_record",
}


# --- building one packet ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Object:
    key: str
    data: bytes
    content_type: str


@dataclass
class _Built:
    manifest: dict[str, Any]
    objects: list[_Object]

    @property
    def missing(self) -> list[str]:
        return self.manifest["missing"]


def _read_notes(storage: Storage, inp: Mapping[str, Any]) -> dict[str, str | None]:
    """The text of every enclosed clinical note, checked against its sha256 (None: not text)."""
    notes: dict[str, str | None] = {}
    for code, doc in inp["documents"].items():
        if doc is None or not is_loinc(code):
            continue
        if not doc["content_type"].lower().startswith("text/"):
            notes[code] = None
            continue
        notes[code] = storage.get(doc["storage_key"], sha256=doc["sha256"]).decode("utf-8", errors="replace")
    return notes


def build_packet(inp: Mapping[str, Any], ihash: str, version: int, notes: Mapping[str, str | None]) -> _Built:
    """The manifest and the objects to store, from the inputs alone: same inputs, same bytes."""
    case_id = inp["case"]["id"]
    folder = ("packets", case_id, f"v{version}")
    items: list[dict[str, Any]] = []
    objects: list[_Object] = []
    missing: list[str] = []

    def generated(code: str, made: tuple[dict[str, Any], str]) -> None:
        # One item per enclosure: the text is what goes to the payer; the JSON beside it ("data")
        # is the same content for machines (letters, PAS).
        data, text = made
        body_json, body_text = pretty_json(data), text.encode()
        k_json, k_text = key(*folder, f"{code}.json"), key(*folder, f"{code}.txt")
        objects.append(_Object(k_json, body_json, "application/json"))
        objects.append(_Object(k_text, body_text, "text/plain; charset=utf-8"))
        items.append({"type": code, "label": LABELS.get(code, code), "source": "generated", "storage_key": k_text,
                      "sha256": sha256_hex(body_text), "size": len(body_text),
                      "media_type": "text/plain; charset=utf-8", "status": "included",
                      "data": {"storage_key": k_json, "sha256": sha256_hex(body_json), "size": len(body_json),
                               "media_type": "application/json"}})

    def absent(code: str, why: str) -> None:
        missing.append(code)
        items.append({"type": code, "label": LABELS.get(code, code), "source": None, "storage_key": None,
                      "sha256": None, "size": None, "media_type": None, "status": "missing", "why": why})

    generated(CASE_SUMMARY, case_summary(inp))
    generated(MEDICAL_NECESSITY, medical_necessity(inp, notes))
    for code in inp["required"]:
        if code in inp["documents"]:
            doc = inp["documents"][code]
            if doc is None:
                absent(code, "no_document_on_file")
            else:
                items.append({"type": code, "label": LABELS.get(code, code), "source": doc["id"],
                              "storage_key": doc["storage_key"], "sha256": doc["sha256"], "size": doc["size"],
                              "media_type": doc["content_type"], "status": "included"})
        elif code in _GENERATORS:
            made = _GENERATORS[code](inp)
            if made is None:
                absent(code, _MISSING_WHY.get(code, "no_source"))
            else:
                generated(code, made)
        else:
            absent(code, "no_source")  # an evidence slug this module cannot produce or find
    manifest = {
        "format": MANIFEST_FORMAT, "case_id": case_id, "payer_id": inp["payer"]["id"], "version": version,
        "input_hash": ihash, "reason": inp["case"]["reason"], "required": list(inp["required"]),
        "complete": not missing, "missing": missing, "items": items,
    }
    objects.append(_Object(key(*folder, "manifest.json"), manifest_bytes(manifest), "application/json"))
    return _Built(manifest, objects)


# --- the batch ----------------------------------------------------------------------------------------------


class _Stale(Exception):
    pass


def assemble(
    engine: sa.Engine,
    storage: Storage,
    library: RuleLibrary,
    case_ids: Sequence[int],
    *,
    actor: Actor = Actor(),
    as_of: datetime,
) -> AssembleResult:
    """Build or refresh the packets of a batch of cases and move each case to ready or awaiting_documentation.

    Safe to repeat: a case whose inputs are unchanged writes nothing (no storage, no database); one
    whose state disagrees with its unchanged packet (e.g. the sweep moved it back to identified) is
    only moved. Storage failures are recorded in ``failed`` and the other cases go on.
    """
    if as_of.tzinfo is None:
        raise ValueError("as_of must carry its time zone")
    result = AssembleResult()
    for c in _load(engine, library, case_ids, as_of, result):
        inp = _inputs(c, library, as_of)
        ihash = input_hash(inp)
        try:
            if c.packet is not None and c.packet.input_hash == ihash:
                result.unchanged += 1
                status = _reconcile(engine, c, actor)
                missing = list(c.packet.missing or [])
            else:
                version = c.packet.version + 1 if c.packet is not None else 1
                built = build_packet(inp, ihash, version, _read_notes(storage, inp))
                for obj in built.objects:  # before the database: a row never points at nothing
                    storage.put(obj.key, obj.data, content_type=obj.content_type)
                status = _commit(engine, c, built, ihash, version, actor)
                result.built += 1
                missing = built.missing
        except (StorageError, OSError) as exc:
            result.failed[c.case.id] = type(exc).__name__
            continue
        except (_Stale, StaleCase):
            result.stale += 1
            continue
        if status == CaseStatus.READY:
            result.ready += 1
        elif status == CaseStatus.AWAITING_DOCUMENTATION:
            result.awaiting += 1
            result.missing[c.case.id] = missing
    failpoints.hit("assemble.after_batch")
    return result


def _target(complete: bool) -> CaseStatus:
    return CaseStatus.READY if complete else CaseStatus.AWAITING_DOCUMENTATION


def _fresh_case(s: Session, c: _Case) -> RetroCase:
    case = s.get(RetroCase, c.case.id)
    if case is None or case.version != c.case.version or case.status != c.case.status:
        raise _Stale()  # moved or re-evaluated since we read it: the next run sees the new inputs
    return case


def _reconcile(engine: sa.Engine, c: _Case, actor: Actor) -> str:
    """Unchanged packet: move the case only if its state disagrees with the packet."""
    assert c.packet is not None
    target = _target(c.packet.complete)
    if c.case.status == target:
        return target
    with session_scope(engine) as s:
        case = _fresh_case(s, c)
        transition(s, case, target, actor=actor, details=_details(c.packet.version, c.packet.missing or [], None))
    return target


def _details(version: int, missing: Sequence[str], manifest_sha256: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"packet_version": version, "missing": list(missing)}
    if manifest_sha256:
        d["manifest_sha256"] = manifest_sha256
    return d


def _commit(engine: sa.Engine, c: _Case, built: _Built, ihash: str, version: int, actor: Actor) -> str:
    """The packet row, the state change and its audit event: one transaction."""
    manifest_obj = built.objects[-1]
    values = dict(version=version, input_hash=ihash, manifest=built.manifest, manifest_key=manifest_obj.key,
                  complete=built.manifest["complete"], missing=built.missing,
                  built_at=datetime.now(timezone.utc))
    details = _details(version, built.missing, sha256_hex(manifest_obj.data))
    target = _target(built.manifest["complete"])
    with session_scope(engine) as s:
        case = _fresh_case(s, c)
        if c.packet is None:
            try:
                with s.begin_nested():
                    s.add(Packet(case_id=case.id, **values))
            except DbIntegrityError:  # the unique case_id: another worker built it first
                raise _Stale() from None
        else:
            updated = s.execute(
                sa.update(Packet).where(Packet.case_id == case.id, Packet.version == c.packet.version)
                .values(**values).execution_options(synchronize_session=False)
            )
            if updated.rowcount != 1:
                raise _Stale()
        if case.status != target:
            transition(s, case, target, actor=actor, details=details)
        else:
            record_event(s, case.id, "packet_built", actor=actor, details=details)
    return target
