"""Small builders for test records: one realistic encounter with everything hanging off it."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlmodel import Session

from retroauth.db import session_scope
from retroauth.models import (
    Coverage, Diagnosis, Encounter, Patient, RetroCase, ServiceLine,
)
from retroauth.vocab import CaseStatus, CoverageDiscovery, EncounterClass


def encounter_with_lines(session: Session, n: int = 1, payer_id: str = "priority-health") -> Encounter:
    patient = Patient(source_system="test", source_id=f"p{n}", family_name="Doe", given_name="Jane",
                      birth_date=date(1970, 5, 17), sex="female", state="IL", postal_code="62701")
    session.add(patient)
    session.flush()
    session.add(Coverage(patient_id=patient.id, payer_id=payer_id, member_id=f"M{n:08d}",
                         effective_from=date(2026, 1, 1),
                         discovered_at=datetime(2026, 11, 20, 15, 0, tzinfo=timezone.utc),
                         discovery_method=CoverageDiscovery.ELIGIBILITY_CHECK))
    enc = Encounter(source_system="test", source_id=f"e{n}", patient_id=patient.id,
                    encounter_class=EncounterClass.EMERGENCY,
                    admitted_at=datetime(2026, 11, 13, 23, 0, tzinfo=timezone.utc),
                    timezone="America/Chicago", place_of_service="23")
    session.add(enc)
    session.flush()
    session.add(ServiceLine(encounter_id=enc.id, line_number=1, code_system="CPT", code="70551",
                            units=Decimal("1"), charge=Decimal("1850.00"), service_date=date(2026, 11, 13)))
    session.add(Diagnosis(encounter_id=enc.id, code_system="ICD10CM", code="G44.309", rank=1))
    session.flush()
    return enc


def new_case(session: Session, n: int = 1, status: CaseStatus = CaseStatus.IDENTIFIED) -> RetroCase:
    enc = encounter_with_lines(session, n)
    case = RetroCase(encounter_id=enc.id, payer_id="priority-health", status=status,
                     amount_at_risk=Decimal("1850.00"))
    session.add(case)
    session.flush()
    return case


CHI = ZoneInfo("America/Chicago")
_n = itertools.count(1)


def add_encounter(engine, *, payer="test-commercial", cls="outpatient", pos="22", admitted=datetime(2026, 11, 13, 10, tzinfo=CHI),
                  codes=(("CPT", "70551"),), discovered=None, discovery="on_file", admission_type=None,
                  system_issue=None, npi="1234567893") -> int:
    n = next(_n)
    with session_scope(engine) as s:
        p = Patient(source_system="t", source_id=f"p{n}", family_name="Doe", given_name="Jane")
        s.add(p)
        s.flush()
        s.add(Coverage(patient_id=p.id, payer_id=payer, member_id=f"MBR{n:07d}Q", effective_from=date(2026, 1, 1),
                       discovered_at=discovered or datetime(2026, 1, 2, tzinfo=timezone.utc), discovery_method=discovery))
        e = Encounter(source_system="t", source_id=f"e{n}", patient_id=p.id, encounter_class=cls, place_of_service=pos,
                      admitted_at=admitted, timezone="America/Chicago", admission_type=admission_type,
                      system_issue_reference=system_issue)
        s.add(e)
        s.flush()
        for i, (cs, code) in enumerate(codes, 1):
            s.add(ServiceLine(encounter_id=e.id, line_number=i, code_system=cs, code=code, charge=Decimal("1000.00"),
                              units=Decimal("2"), service_date=admitted.astimezone(CHI).date(), rendering_npi=npi))
        return e.id
