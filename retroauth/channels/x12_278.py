"""The X12 278 channel: the case as a 005010X217 request file that a clearinghouse collects, and the payer's
278 responses read from the inbound location.

``send`` writes ``outbound/x12/278/<payer>/<idempotency key>.x12``: BHT03 and the patient event's TRN02 carry
the idempotency key (our trace number), ISA/GS dates are the Submission row's ``created_at`` in the facility's
zone, and the control number comes from the submission id, so the same submission always gives the same
bytes. An object already there is left alone (a clearinghouse may have collected it): a send repeated after a
crash writes nothing. No decision comes with the send.

``poll`` lists ``inbound/x12/278/<payer>/``, reads each file with ``read_278_response`` and finds the answer
whose echoed trace (TRN02, or BHT03 for a response that stops above the patient event) is the key:
- HCR01 is the decision: A1 with the certification number (HCR02, else REF*BB), A3 with the HCR03 reasons,
  A4 pended (A2/A6/CT/... pass through as they are). Without an event-level HCR, the services' HCRs decide.
- AAA rejects (code list 901 in AAA03, follow-up in AAA04), decided by the follow-up:
  N (resubmission not allowed, e.g. 62 "date of service not within allowable period", the usual answer to a
  late retro request) is a final no: A3 with reason codes ``AAA:<code>``; Y or S (the payer goes on with it)
  is A4; C, P, R, W, X or none (correct and resubmit, resubmit later) mean this request is dead and a new
  one must go: ``ChannelRefused("x12_rejected:AAA:<code>,...")``.
- Several files for one key (A4, then the final answer): a final answer wins over a pended one, and among
  equals the file that sorts last (names compared with their numbers as numbers).
A file that cannot be read is skipped and logged once, by key and X12 position (never a value). Parsed files
are cached per channel instance (response files are written once), so polling hundreds of submissions reads
each file once.

X12 278 has no appeal transaction: ``kind == "appeal"`` is refused (``outbox.appeal_channel`` sends those
payers' appeals as a packet).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from retroauth.channels import Answer, ChannelRefused, Outgoing, SendResult, case_record
from retroauth.db import session_scope
from retroauth.models import ServiceLine, Submission
from retroauth.storage import Storage, key
from retroauth.x12.check import check_278
from retroauth.x12.parse import X12Error
from retroauth.x12.x278 import (
    PWK_REPORT_TYPE_BY_LOINC, Address, Attachment278, Decision278, Request278, Request278Error, Service278,
    gender_code, read_278_response, write_278_request,
)

logger = logging.getLogger(__name__)

_LOINC = re.compile(r"^\d{1,7}-\d$")
_SERVICE_SYSTEMS = {"CPT", "HCPCS"}  # SV1/SV2 carry HC procedure codes; other lines ride on the event
_ADMISSION_TYPE = {"emergency": "1", "urgent": "2", "elective": "3"}  # CL101 (NUBC priority of admission)
_LEVEL_OF_SERVICE = {"emergency": "03", "urgent": "U"}  # UM06; routine (elective) is not reported
_DEFAULT_POS = {"inpatient": "21", "emergency": "23", "outpatient": "22", "observation": "22",
                "home_health": "12", "virtual": "02"}  # fmt: skip
_FINAL_REJECT, _PENDING_REJECT = {"N"}, {"Y", "S"}  # AAA04 follow-ups: see the module docstring


def request_key(payer_id: str, idempotency_key: str) -> str:
    return key("outbound", "x12", "278", payer_id, f"{idempotency_key}.x12")


def inbound_prefix(payer_id: str) -> str:
    return key("inbound", "x12", "278", payer_id)


def _local_date(t: datetime | None, zone: str) -> date | None:
    return t.astimezone(ZoneInfo(zone)).date() if t else None


def _service_type(encounter_class: str, lines: Iterable[ServiceLine]) -> str:
    """UM03: 48 hospital inpatient, 86 emergency, 62 MRI/CAT scan (outpatient lines that are all diagnostic
    radiology: the imaging that needs authorization is CT/MR), else 1 medical care."""
    if encounter_class == "inpatient":
        return "48"
    if encounter_class == "emergency":
        return "86"
    codes = [ln.code for ln in lines if ln.code_system in _SERVICE_SYSTEMS]
    if codes and all(c.isdigit() and "70010" <= c <= "76499" for c in codes):
        return "62"
    return "1"


def request_278_for(engine: sa.Engine, library: Any, settings: Any, case_id: int) -> Request278:
    """What the payer needs to decide, read from the database (like ``fhir_pas.pas_request_for``).

    Lines coded CPT/HCPCS become services (SV1); revenue-code lines are not written as services (the writer's
    SV2 needs a procedure code beside the revenue code, which a service line does not have): an inpatient stay
    goes as the admission review (UM01 AR, DTP*435/096). Raises ``ChannelRefused`` without coverage or lines,
    ``Request278Error`` (a field name) for data the writer cannot take."""
    r = case_record(engine, case_id)
    case, enc, patient, cov, lines, dx, packet = r.case, r.encounter, r.patient, r.coverage, r.lines, r.diagnoses, r.packet
    inpatient = enc.encounter_class == "inpatient"
    admitted, discharged = _local_date(enc.admitted_at, enc.timezone), _local_date(enc.discharged_at, enc.timezone)
    days = [ln.service_date for ln in lines] + ([d for d in (admitted, discharged) if d] if inpatient else [])
    tob = (enc.type_of_bill or "").lstrip("0")  # UM04: facility type + classification, else place of service
    facility = (tob[:2], "A") if len(tob) >= 2 else (
        enc.place_of_service or _DEFAULT_POS.get(enc.encounter_class, "99"), "B")
    services = tuple(
        Service278(ln.code.upper(), ln.service_date, charge=ln.charge, units=ln.units,
                   modifiers=tuple(m.strip() for m in (ln.modifiers or "").split(",") if m.strip()))
        for ln in lines if ln.code_system in _SERVICE_SYSTEMS
    )
    items = (packet.manifest or {}).get("items", []) if packet else []
    included = [it for it in items if it.get("status") == "included"]
    level = _LEVEL_OF_SERVICE.get(enc.admission_type or "") or ("03" if enc.encounter_class == "emergency" else None)
    return Request278(
        payer_name=library[case.payer_id].name, payer_id=case.payer_id,
        requester_name=settings.facility_name, requester_npi=settings.facility_npi,
        requester_tin=settings.facility_tin, requester_address=Address.from_text(settings.facility_address),
        requester_contact=settings.facility_contact, requester_phone=settings.facility_phone,
        member_id=cov.member_id, last_name=patient.family_name, first_name=patient.given_name,
        birth_date=patient.birth_date, gender=gender_code(patient.sex),
        category="AR" if inpatient else "HS", service_type=_service_type(enc.encounter_class, lines),
        facility_code=facility[0], facility_code_qualifier=facility[1], level_of_service=level,
        event_start=min(days), event_end=max(days),
        admission_date=admitted if inpatient else None, discharge_date=discharged if inpatient else None,
        admission_type_code=_ADMISSION_TYPE.get(enc.admission_type or "") if inpatient else None,
        diagnoses=tuple(d.code for d in dx if d.code_system == "ICD10CM"),
        delay_reason_code=case.delay_reason_code, services=services,
        attachments=tuple(_attachment(case_id, i, item) for i, item in enumerate(included, 1)),
    )


def _attachment(case_id: int, n: int, item: dict[str, Any]) -> Attachment278:
    """A PWK for an enclosed document: its LOINC type's report type (M1 medical record when unmapped), OZ
    support data for a generated one (case summary, evidence). AA: "available on request at the provider",
    since no X12 275 carries the documents (yet); the control number names the case and the item."""
    t = str(item.get("type", ""))
    report = PWK_REPORT_TYPE_BY_LOINC.get(t, "M1") if _LOINC.match(t) else "OZ"
    return Attachment278(report, f"RA{case_id}D{n}", "AA", item.get("label"))


@dataclass(frozen=True)
class _Found:
    """One response file's answer for one key: an Answer, or the code of a reject that needs a new request."""

    answer: Answer | None
    refused: str | None = None

    @property
    def final(self) -> bool:
        return self.refused is not None or (self.answer is not None and self.answer.decision != "A4")


def _natural(k: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k))


def _answer(ds: list[Decision278], ref: str, response_key: str) -> _Found | None:
    """The answer of one key from its decisions in one file (the patient event first, then its services)."""
    top = next((d for d in ds if d.level == "EV"), ds[0])
    if any(not r.valid for r in top.rejects):
        codes = tuple(dict.fromkeys(f"AAA:{r.reason}" for r in top.rejects if not r.valid))
        ups = {r.follow_up for r in top.rejects if not r.valid}
        if ups & _FINAL_REJECT:
            return _Found(Answer("A3", ref, reason_codes=codes, response_key=response_key))
        if ups & _PENDING_REJECT:
            return _Found(Answer("A4", ref, reason_codes=codes, response_key=response_key))
        return _Found(None, ("x12_rejected:" + ",".join(codes))[:64])
    actions = [d.action for d in ds if d.action and d is not top]
    decision = top.action or (actions[0] if len(set(actions)) == 1 else
                              "A2" if "A1" in actions else "A4" if actions else None)
    if decision is None:
        return _Found(Answer("A4", ref, response_key=response_key)) if top.rejects else None  # AAA*Y: not yet
    number = top.auth_number or next((d.auth_number for d in ds if d.auth_number), None)
    reasons = tuple(dict.fromkeys(d.reason for d in [top, *ds] if d.reason))
    return _Found(Answer(decision, ref, certification_number=number, reason_codes=reasons,
                         response_key=response_key))


def _read_file(data: bytes, response_key: str) -> dict[str, _Found]:
    """Every key a response file answers. Raises X12Error for a file that is not a readable 278 response."""
    decisions = read_278_response(data.decode("latin-1"), file=response_key)
    ref = "x12:" + hashlib.sha256(data).hexdigest()[:40]  # unique per file: A4 then A1 are two responses
    by_key: dict[str, list[Decision278]] = {}
    for d in decisions:
        k = (d.trace_number if d.level == "EV" else d.event_trace_number if d.level == "SS" else None) or d.reference
        if k:
            by_key.setdefault(k, []).append(d)
    found = {k: _answer(ds, ref, response_key) for k, ds in by_key.items()}
    return {k: f for k, f in found.items() if f is not None}


class X12Channel:
    """Writes 278 request files for a clearinghouse and reads its 278 responses.

    ``sender_id`` (ISA06/GS02) defaults to the facility NPI, ``receiver_id`` (ISA08/GS03) to the payer id
    without punctuation (the rule library has no EDI ids yet); ``usage`` is ISA15 (P or T)."""

    name = "x12_278"

    def __init__(self, sender_id: str | None = None, receiver_id: str | None = None, usage: str = "P"):
        self.sender_id, self.receiver_id, self.usage = sender_id, receiver_id, usage
        self._storage: Any = None  # the storage the caches below describe
        self._files: dict[str, dict[str, _Found]] = {}  # response key -> what it answers
        self._index: dict[str, tuple[tuple[str, ...], dict[str, _Found]]] = {}  # payer -> (listing, key -> best)
        self._logged: set[str] = set()  # unreadable files already logged

    def send(self, engine: sa.Engine, storage: Storage, library: Any, settings: Any, out: Outgoing) -> SendResult:
        if out.kind == "appeal":
            raise ChannelRefused("appeal_not_supported_by_x12")
        k = request_key(out.payer_id, out.idempotency_key)
        if not storage.exists(k):  # written before (a crash before it was recorded): the same object stands
            storage.put(k, self.request_bytes(engine, library, settings, out), content_type="application/edi-x12")
        return SendResult(tracking_number=out.idempotency_key, payload_key=k)

    def request_bytes(self, engine: sa.Engine, library: Any, settings: Any, out: Outgoing) -> bytes:
        """The 278 request of ``out``: the same bytes every time for the same submission."""
        with session_scope(engine) as s:
            created = s.execute(sa.select(Submission.created_at).where(Submission.id == out.submission_id)).scalar_one()
        when = created.astimezone(ZoneInfo(settings.facility_timezone)).replace(tzinfo=None)
        receiver = self.receiver_id or re.sub(r"[^A-Za-z0-9]", "", out.payer_id).upper()[:15]
        try:
            text = write_278_request(
                request_278_for(engine, library, settings, out.case_id),
                control_number=(out.submission_id - 1) % 999_999_999 + 1, trace_number=out.idempotency_key,
                reference=out.idempotency_key, sender_id=self.sender_id or settings.facility_npi,
                receiver_id=receiver, when=when, usage=self.usage)
        except Request278Error as exc:
            raise ChannelRefused(f"invalid_278:{exc.field}"[:64]) from None
        problems = check_278(text, file=f"submission-{out.submission_id}")
        if problems:  # X12Error messages name positions, never values
            logger.error("x12_278: submission %s fails the 278 check: %s", out.submission_id,
                         "; ".join(str(p) for p in problems[:5]))
            raise ChannelRefused("invalid_278")
        return text.encode("ascii")

    def poll(self, engine: sa.Engine, storage: Storage, library: Any, settings: Any, out: Outgoing,
             tracking_number: str | None) -> Answer | None:
        if out.kind == "appeal":
            raise ChannelRefused("appeal_not_supported_by_x12")
        found = self._answers(storage, out.payer_id).get(out.idempotency_key)
        if found is None:
            return None
        if found.refused:
            raise ChannelRefused(found.refused)
        return found.answer

    def _answers(self, storage: Storage, payer_id: str) -> dict[str, _Found]:
        """Key -> the best answer in the payer's inbound files; rebuilt only when the listing changed."""
        if storage is not self._storage:
            self._storage, self._files, self._index = storage, {}, {}
        listing = tuple(sorted(storage.list(inbound_prefix(payer_id)), key=_natural))
        cached = self._index.get(payer_id)
        if cached is not None and cached[0] == listing:
            return cached[1]
        best: dict[str, _Found] = {}
        for k in listing:
            if k not in self._files:
                try:
                    self._files[k] = _read_file(storage.get(k), k)
                except X12Error as exc:
                    self._skip(k, str(exc))  # not cached: a file still being written is read again next time
                    continue
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                    self._skip(k, type(exc).__name__)  # the type only: a message may quote data
                    continue
            for trace, f in self._files[k].items():
                if trace not in best or f.final or not best[trace].final:  # later wins, final beats pended
                    best[trace] = f
        present, prefix = set(listing), inbound_prefix(payer_id) + "/"
        self._files = {k: v for k, v in self._files.items() if k in present or not k.startswith(prefix)}  # gone
        self._index[payer_id] = (listing, best)
        return best

    def _skip(self, k: str, why: str) -> None:
        if k not in self._logged:
            self._logged.add(k)
            logger.warning("x12_278: skipping unreadable response %s: %s", k, why)


__all__ = ["X12Channel", "inbound_prefix", "request_278_for", "request_key"]
