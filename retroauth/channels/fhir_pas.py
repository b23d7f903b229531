"""The FHIR PAS channel: the case as a Da Vinci PAS request Bundle, posted to the payer's ``Claim/$submit``.

The bundle carries the submission's idempotency key (Bundle.identifier and Claim.identifier), so a send
repeated after a crash is a repeat to the payer, not a second request. The request and the answer are
stored under ``outbound/pas/<payer>/<key>-request.json`` and ``...-response.json``. A final answer
(A1 approved, A3 denied) is recorded with the send; A4 leaves the case in review, and ``poll`` asks again
with ``Claim/$inquire`` (a read: always safe to repeat).

An appeal goes the same way: a new request (its own key) whose Claim.related names the denied request and
which encloses the appeal letter (by its SHA-256 and size, like every document here).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from retroauth.channels import Answer, ChannelNotConfigured, ChannelRefused, Outgoing, SendResult, case_record
from retroauth.channels.pas import (
    LETTER_LOINC, PasClient, PasCoverage, PasDecision, PasDiagnosis, PasDocument, PasItem, PasOrganization,
    PasPatient, PasPractitioner, PasRejected, PasRequest, PasValidationError, build_pas_bundle,
    build_pas_inquiry_bundle,
)
from retroauth.db import session_scope
from retroauth.models import Letter, Submission, utcnow
from retroauth.storage import Storage, key
from retroauth.vocab import CodeSystem

_LOINC = re.compile(r"^\d{1,7}-\d$")
_SEX = {"female": "female", "f": "female", "male": "male", "m": "male", "other": "other"}
_INSTITUTIONAL = {"inpatient", "emergency", "observation"}


def pas_request_for(engine: sa.Engine, library: Any, settings: Any, case_id: int) -> PasRequest:
    """What the payer needs to decide, read from the database (the packet's documents by checksum)."""
    r = case_record(engine, case_id)
    case, enc, patient, cov, lines, dx, packet = r.case, r.encounter, r.patient, r.coverage, r.lines, r.diagnoses, r.packet
    payer = library[case.payer_id]
    npis = sorted({ln.rendering_npi for ln in lines if ln.rendering_npi})
    diagnoses = tuple(PasDiagnosis(d.code) for d in dx if d.code_system == "ICD10CM")
    items = tuple(
        PasItem(CodeSystem(ln.code_system), ln.code, ln.service_date, ln.units, ln.charge, description=ln.description,
                modifiers=tuple(m.strip() for m in (ln.modifiers or "").split(",") if m.strip()),
                place_of_service=enc.place_of_service, practitioner_npi=ln.rendering_npi,
                diagnosis_sequences=(1,) if diagnoses else ())
        for ln in lines
    )
    documents = tuple(
        PasDocument(f"{case_id}-{i}", item["type"], (item.get("media_type") or "text/plain").split(";")[0],
                    title=item.get("label"), sha256=item["sha256"], size=item.get("size"))
        for i, item in enumerate((packet.manifest or {}).get("items", []) if packet else [], 1)
        if item.get("status") == "included" and item.get("sha256") and _LOINC.match(str(item.get("type", "")))
    )
    return PasRequest(
        case_id=case_id,
        claim_type="institutional" if enc.encounter_class in _INSTITUTIONAL else "professional",
        patient=PasPatient(member_id=cov.member_id, family_name=patient.family_name, given_name=patient.given_name,
                           birth_date=patient.birth_date, sex=_SEX.get((patient.sex or "").lower(), "unknown")),
        coverage=PasCoverage(member_id=cov.member_id, payer_id=case.payer_id, payer_name=payer.name,
                             plan_name=cov.plan_name, group_number=cov.group_number),
        requester=PasOrganization(name=settings.facility_name, npi=settings.facility_npi, phone=settings.facility_phone),
        insurer=PasOrganization(name=payer.name),
        items=items,
        diagnoses=diagnoses,
        practitioners=tuple(PasPractitioner(npi=n) for n in npis),
        documents=documents,
        level_of_service="03" if enc.admission_type == "emergency" or enc.encounter_class == "emergency" else None,
        event_start=min(ln.service_date for ln in lines),
        event_end=max(ln.service_date for ln in lines),
        type_of_bill=enc.type_of_bill,
        message=f"Retrospective request (delay reason {case.delay_reason_code})" if case.delay_reason_code else None,
    )


def _appeal_parts(engine: sa.Engine, out: Outgoing) -> tuple[str, PasDocument]:
    """The key of the request an appeal reconsiders, and its appeal letter as an enclosure."""
    with session_scope(engine) as s:
        prior = s.execute(sa.select(Submission.idempotency_key)
                          .where(Submission.case_id == out.case_id, Submission.kind == "request",
                                 Submission.status == "sent")
                          .order_by(Submission.attempt.desc()).limit(1)).scalar_one_or_none()
        letter = s.execute(sa.select(Letter).where(Letter.case_id == out.case_id, Letter.kind == "appeal")
                           .order_by(Letter.appeal_level.desc(), Letter.version.desc()).limit(1)).scalars().first()
    if prior is None:
        raise ChannelRefused("no_sent_request_to_appeal")
    if letter is None:
        raise ChannelRefused("no_appeal_letter")
    doc = PasDocument(f"{out.case_id}-appeal-{letter.appeal_level}-v{letter.version}", LETTER_LOINC,
                      "application/pdf", title=f"Appeal letter (level {letter.appeal_level})",
                      sha256=letter.pdf_sha256)
    return prior, doc


class PasChannel:
    """Posts PAS bundles. ``base_url`` overrides the payer's ``contact.api_base_url``; the token comes from
    the constructor or the ``pas_token`` setting (RETROAUTH_PAS_TOKEN). ``client_factory`` is a seam for tests."""

    name = "fhir_pas"

    def __init__(self, base_url: str | None = None, token: str | None = None,
                 client_factory: Callable[[str, str], PasClient] | None = None):
        self.base_url = base_url
        self.token = token
        self.client_factory = client_factory or (lambda url, token: PasClient(base_url=url, token=token))

    def _request(self, engine: sa.Engine, library: Any, settings: Any, out: Outgoing) -> PasRequest:
        request = pas_request_for(engine, library, settings, out.case_id)
        if out.kind == "appeal":
            prior, letter = _appeal_parts(engine, out)
            request = dataclasses.replace(request, related_key=prior, documents=(*request.documents, letter))
        return request

    def _client(self, library: Any, settings: Any, out: Outgoing) -> PasClient:
        base = self.base_url or str(library[out.payer_id].contact.api_base_url or "")
        if not base:
            raise ChannelRefused("no_api_base_url")
        token = self.token
        if token is None:
            secret = getattr(settings, "pas_token", None)
            token = secret.get_secret_value() if secret is not None else ""
        if not token:
            raise ChannelNotConfigured("no PAS token: set RETROAUTH_PAS_TOKEN")
        return self.client_factory(base, token)

    def send(self, engine: sa.Engine, storage: Storage, library: Any, settings: Any, out: Outgoing) -> SendResult:
        with session_scope(engine) as s:
            created = s.execute(sa.select(Submission.created_at).where(Submission.id == out.submission_id)).scalar_one()
        try:
            bundle = build_pas_bundle(self._request(engine, library, settings, out),
                                      idempotency_key=out.idempotency_key, timestamp=created)
        except PasValidationError:
            raise ChannelRefused("invalid_request") from None
        client = self._client(library, settings, out)
        k_req = key("outbound", "pas", out.payer_id, f"{out.idempotency_key}-request.json")
        storage.put(k_req, json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode(),
                    content_type="application/fhir+json")
        try:
            decision = client.submit(bundle)  # retries 429/5xx itself; the same key on every attempt
        except PasRejected as exc:
            codes = ",".join(exc.decision.error_codes) if exc.decision else ""
            raise ChannelRefused(f"http_{exc.status}" + (f":{codes}" if codes else "")) from None
        finally:
            client.close()
        if decision.kind != "response":
            raise ChannelRefused(f"pas_{decision.kind}:{','.join(decision.error_codes)}"[:64])
        k_resp = self._store_answer(storage, out, decision, "response")
        return SendResult(
            tracking_number=(decision.pre_auth_ref or decision.response_id or out.idempotency_key)[:64],
            payload_key=k_req, decision=decision.decision,
            certification_number=decision.authorization_number, reason_codes=tuple(decision.reason_codes),
            response_ref=decision.response_ref, response_key=k_resp,
        )

    def poll(self, engine: sa.Engine, storage: Storage, library: Any, settings: Any, out: Outgoing,
             tracking_number: str | None) -> Answer | None:
        """Ask the payer with ``Claim/$inquire``; None when it has no record of the request (not found)."""
        try:
            bundle = build_pas_inquiry_bundle(self._request(engine, library, settings, out),
                                              idempotency_key=out.idempotency_key, timestamp=utcnow())
        except PasValidationError:
            raise ChannelRefused("invalid_inquiry") from None
        client = self._client(library, settings, out)
        try:
            decision = client.inquire(bundle)
        except PasRejected as exc:
            if exc.status == 404:
                return None
            raise ChannelRefused(f"inquire_http_{exc.status}") from None
        finally:
            client.close()
        if decision.kind != "response" or not decision.decision:
            return None
        k = self._store_answer(storage, out, decision, "inquiry-" + decision.response_ref.split(":")[-1][:16])
        return Answer(decision=decision.decision, response_ref=decision.response_ref,
                      certification_number=decision.authorization_number,
                      reason_codes=tuple(decision.reason_codes), response_key=k)

    @staticmethod
    def _store_answer(storage: Storage, out: Outgoing, decision: PasDecision, name: str) -> str:
        k = key("outbound", "pas", out.payer_id, f"{out.idempotency_key}-{name}.json")
        storage.put(k, json.dumps({"decision": decision.decision, "response_ref": decision.response_ref,
                                   "authorization_number": decision.authorization_number,
                                   "reason_codes": list(decision.reason_codes)}, sort_keys=True).encode(),
                    content_type="application/json")
        return k
