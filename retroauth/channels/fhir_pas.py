"""The FHIR PAS channel: the case as a Da Vinci PAS request Bundle, posted to the payer's ``Claim/$submit``.

The bundle carries the submission's idempotency key (Bundle.identifier and Claim.identifier), so a send
repeated after a crash is a repeat to the payer, not a second request. The request and the answer are
stored under ``outbound/pas/<payer>/<key>-request.json`` and ``...-response.json``. A final answer
(A1 approved, A3 denied) is recorded with the send; A4 leaves the case in review.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from retroauth.channels import ChannelRefused, Outgoing, SendResult
from retroauth.channels.pas import (
    PasClient, PasCoverage, PasDiagnosis, PasDocument, PasItem, PasOrganization, PasPatient, PasPractitioner,
    PasRejected, PasRequest, PasValidationError, build_pas_bundle,
)
from retroauth.db import session_scope
from retroauth.models import (
    CaseServiceLine, Coverage, Diagnosis, Encounter, Packet, Patient, RetroCase, ServiceLine, Submission,
)
from retroauth.storage import Storage, key
from retroauth.vocab import CodeSystem

_LOINC = re.compile(r"^\d{1,7}-\d$")
_SEX = {"female": "female", "f": "female", "male": "male", "m": "male", "other": "other"}
_INSTITUTIONAL = {"inpatient", "emergency", "observation"}


def pas_request_for(engine: sa.Engine, library: Any, settings: Any, case_id: int) -> PasRequest:
    """What the payer needs to decide, read from the database (the packet's documents by checksum)."""
    with session_scope(engine) as s:
        case = s.get(RetroCase, case_id)
        enc = s.get(Encounter, case.encounter_id)
        patient = s.get(Patient, enc.patient_id)
        cov = s.get(Coverage, case.coverage_id) if case.coverage_id else s.execute(
            sa.select(Coverage).where(Coverage.patient_id == enc.patient_id, Coverage.payer_id == case.payer_id)
            .order_by(Coverage.priority)).scalars().first()
        lines = s.execute(sa.select(ServiceLine).join(CaseServiceLine, CaseServiceLine.service_line_id == ServiceLine.id)
                          .where(CaseServiceLine.case_id == case_id).order_by(ServiceLine.line_number)).scalars().all()
        dx = s.execute(sa.select(Diagnosis).where(Diagnosis.encounter_id == enc.id)
                       .order_by(Diagnosis.rank, Diagnosis.id)).scalars().all()
        packet = s.execute(sa.select(Packet).where(Packet.case_id == case_id)).scalars().first()
    if cov is None or not lines:
        raise ChannelRefused("case_incomplete")
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


class PasChannel:
    """Posts PAS bundles. ``base_url`` overrides the payer's ``contact.api_base_url``; the token comes from
    the constructor or ``RETROAUTH_PAS_TOKEN``. ``client_factory`` is a seam for tests."""

    name = "fhir_pas"

    def __init__(self, base_url: str | None = None, token: str | None = None,
                 client_factory: Callable[[str, str], PasClient] | None = None):
        self.base_url = base_url
        self.token = token if token is not None else os.environ.get("RETROAUTH_PAS_TOKEN", "")
        self.client_factory = client_factory or (lambda url, token: PasClient(base_url=url, token=token))

    def send(self, engine: sa.Engine, storage: Storage, library: Any, settings: Any, out: Outgoing) -> SendResult:
        with session_scope(engine) as s:
            created = s.execute(sa.select(Submission.created_at).where(Submission.id == out.submission_id)).scalar_one()
        try:
            request = pas_request_for(engine, library, settings, out.case_id)
            bundle = build_pas_bundle(request, idempotency_key=out.idempotency_key, timestamp=created)
        except PasValidationError:
            raise ChannelRefused("invalid_request") from None
        base = self.base_url or str(library[out.payer_id].contact.api_base_url or "")
        if not base:
            raise ChannelRefused("no_api_base_url")
        k_req = key("outbound", "pas", out.payer_id, f"{out.idempotency_key}-request.json")
        storage.put(k_req, json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode(),
                    content_type="application/fhir+json")
        client = self.client_factory(base, self.token)
        try:
            decision = client.submit(bundle)  # retries 429/5xx itself; the same key on every attempt
        except PasRejected as exc:
            codes = ",".join(exc.decision.error_codes) if exc.decision else ""
            raise ChannelRefused(f"http_{exc.status}" + (f":{codes}" if codes else "")) from None
        finally:
            client.close()
        if decision.kind != "response":
            raise ChannelRefused(f"pas_{decision.kind}:{','.join(decision.error_codes)}"[:64])
        k_resp = key("outbound", "pas", out.payer_id, f"{out.idempotency_key}-response.json")
        storage.put(k_resp, json.dumps({"decision": decision.decision, "response_ref": decision.response_ref,
                                        "authorization_number": decision.authorization_number,
                                        "reason_codes": list(decision.reason_codes)}, sort_keys=True).encode(),
                    content_type="application/json")
        return SendResult(
            tracking_number=(decision.pre_auth_ref or decision.response_id or out.idempotency_key)[:64],
            payload_key=k_req, decision=decision.decision,
            certification_number=decision.authorization_number, reason_codes=tuple(decision.reason_codes),
            response_ref=decision.response_ref, response_key=k_resp,
        )
