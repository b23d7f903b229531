"""Submission channels: how a retro-authorization request reaches a payer (FHIR PAS, X12 278, packet).

Every channel offers the same small interface (``SubmissionChannel``): ``send`` one outbox row and say
what the payer (or the channel) answered; ``poll`` asks (PAS ``$inquire``) or looks (X12 278 responses in
the inbound location) for the payer's answer to a sent row, and returns None while there is none. ``send`` must be idempotent by ``Outgoing.idempotency_key``:
asked again with the same key (a crash between sending and recording it), it must not make a second
submission but answer as the first time did. A permanent refusal raises ``ChannelRefused`` with a
code (never patient data); anything else is transient and is retried with the same key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa

from retroauth.db import session_scope
from retroauth.models import (
    CaseServiceLine, Coverage, Diagnosis, Encounter, Packet, Patient, RetroCase, ServiceLine,
)


@dataclass(frozen=True)
class Outgoing:
    """One outbox row to send: ids and keys only."""

    submission_id: int
    case_id: int
    payer_id: str
    attempt: int
    kind: str
    idempotency_key: str


@dataclass(frozen=True)
class SendResult:
    """What sending produced. ``decision`` is set when the payer already decided (A1, A3, A4)."""

    tracking_number: str
    payload_key: str | None = None
    decision: str | None = None
    certification_number: str | None = None
    reason_codes: tuple[str, ...] = ()
    response_ref: str | None = None
    response_key: str | None = None


@dataclass(frozen=True)
class Answer:
    """A payer's answer found by ``poll``: A1 approved, A3 denied, A4 still pended (codes only)."""

    decision: str
    response_ref: str  # the payer's response id, or a hash of the payload: recording it twice is a no-op
    certification_number: str | None = None
    reason_codes: tuple[str, ...] = ()
    response_key: str | None = None  # the answer as received, in storage


@dataclass(frozen=True)
class CaseRecord:
    """What every channel reads of one case to build its request (detached rows: read-only)."""

    case: RetroCase
    encounter: Encounter
    patient: Patient
    coverage: Coverage
    lines: Sequence[ServiceLine]  # the case's services, in line order
    diagnoses: Sequence[Diagnosis]  # the encounter's, by rank
    packet: Packet | None


def case_record(engine: sa.Engine, case_id: int) -> CaseRecord:
    """The case and its encounter, patient, coverage (the case's, else the patient's with that payer,
    primary first), services, diagnoses and packet. ``ChannelRefused("case_incomplete")`` without a
    coverage or services: nothing to ask for."""
    with session_scope(engine) as s:
        case = s.get(RetroCase, case_id)
        enc = s.get(Encounter, case.encounter_id)
        cov = s.get(Coverage, case.coverage_id) if case.coverage_id else s.execute(
            sa.select(Coverage).where(Coverage.patient_id == enc.patient_id, Coverage.payer_id == case.payer_id)
            .order_by(Coverage.priority)).scalars().first()
        lines = s.execute(sa.select(ServiceLine).join(CaseServiceLine, CaseServiceLine.service_line_id == ServiceLine.id)
                          .where(CaseServiceLine.case_id == case_id).order_by(ServiceLine.line_number)).scalars().all()
        if cov is None or not lines:
            raise ChannelRefused("case_incomplete")
        return CaseRecord(
            case=case, encounter=enc, patient=s.get(Patient, enc.patient_id), coverage=cov, lines=lines,
            diagnoses=s.execute(sa.select(Diagnosis).where(Diagnosis.encounter_id == enc.id)
                                .order_by(Diagnosis.rank, Diagnosis.id)).scalars().all(),
            packet=s.execute(sa.select(Packet).where(Packet.case_id == case_id)).scalars().first(),
        )


class ChannelRefused(Exception):
    """The channel or payer refused the submission for good (fix and resend). ``code`` only, no PHI."""

    def __init__(self, code: str):
        super().__init__(f"submission refused: {code}")
        self.code = code


class ChannelNotConfigured(Exception):
    """The channel cannot send for anyone until an operator sets it up (a setting's name, no secret): the
    submission stays pending and the run fails, so it shows in the UI and the alert, not in one case."""


class SubmissionChannel(Protocol):
    name: str

    def send(self, engine: sa.Engine, storage: Any, library: Any, settings: Any, out: Outgoing) -> SendResult: ...

    def poll(self, engine: sa.Engine, storage: Any, library: Any, settings: Any, out: Outgoing,
             tracking_number: str | None) -> Answer | None: ...
