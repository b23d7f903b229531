"""Migrations and the model, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel, select

from retroauth.db import current_revision, make_engine, migrate, session_scope
from retroauth.models import (
    Authorization, AuthorizationCode, CaseEvent, CaseServiceLine, ClinicalDocument, Coverage, Diagnosis,
    Encounter, Patient, PayerOutage, PayerResponse, RetroCase, ServiceLine, Submission,
)
from tests.factories import encounter_with_lines, new_case

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("empty_db_url", BACKENDS, indirect=True)
def test_migrations_take_an_empty_database_to_head_and_match_the_model(empty_db_url):
    migrate(empty_db_url)
    migrate(empty_db_url)  # a second run is a no-op
    engine = make_engine(empty_db_url)
    assert current_revision(engine) is not None
    tables = set(sa.inspect(engine).get_table_names())
    assert {t.name for t in SQLModel.metadata.sorted_tables} <= tables
    # The migrations and the model agree: autogenerate finds nothing left to do.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []
    engine.dispose()


def test_model_round_trips(engine):
    admitted = datetime(2026, 3, 8, 1, 30, tzinfo=timezone(timedelta(hours=-6)))  # before US DST
    with session_scope(engine) as s:
        enc = encounter_with_lines(s)
        enc.admitted_at = admitted
        s.add(ClinicalDocument(source_system="test", source_id="d1", patient_id=enc.patient_id,
                               encounter_id=enc.id, loinc_type="34111-5", authored_at=admitted,
                               storage_key="documents/1/d1.txt", sha256="ab" * 32, size_bytes=12))
        s.add(PayerOutage(payer_id="priority-health", starts_at=admitted, reference="INC-1"))
        auth = Authorization(payer_id="priority-health", member_id="M00000001", auth_number="A123",
                             starts_on=date(2026, 3, 1), ends_on=date(2026, 3, 31), status="approved",
                             source="import")
        s.add(auth)
        s.flush()
        s.add(AuthorizationCode(authorization_id=auth.id, code_system="CPT", code="70551"))
        case = RetroCase(encounter_id=enc.id, payer_id="priority-health", due_at=admitted + timedelta(days=90),
                         amount_at_risk=Decimal("1850.25"), reason="emergency")
        s.add(case)
        s.flush()
        line = s.exec(select(ServiceLine)).one()
        s.add(CaseServiceLine(case_id=case.id, service_line_id=line.id))
        s.add(CaseEvent(case_id=case.id, event="note", details={"codes": ["70551"], "n": 1}))
        sub = Submission(case_id=case.id, channel="x12_278", idempotency_key="k-1")
        s.add(sub)
        s.flush()
        s.add(PayerResponse(submission_id=sub.id, case_id=case.id, response_ref="r1", decision="A1",
                            certification_number="CERT9"))

    with session_scope(engine) as s:
        enc = s.exec(select(Encounter)).one()
        assert enc.admitted_at == admitted and enc.admitted_at.tzinfo is not None
        case = s.exec(select(RetroCase)).one()
        assert case.amount_at_risk == Decimal("1850.25")
        assert case.status == "identified" and case.version == 1
        assert case.created_at.tzinfo is not None
        assert s.exec(select(CaseEvent)).one().details == {"codes": ["70551"], "n": 1}
        assert s.exec(select(ServiceLine)).one().charge == Decimal("1850.00")
        assert s.exec(select(PayerResponse)).one().certification_number == "CERT9"


def test_naive_datetimes_are_refused(engine):
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        with session_scope(engine) as s:
            s.add(PayerOutage(payer_id="x", starts_at=datetime(2026, 1, 1), reference="r"))


@pytest.mark.parametrize(
    "make_duplicate",
    [
        lambda s, enc: Patient(source_system="test", source_id="p1", family_name="X", given_name="Y"),
        lambda s, enc: Encounter(source_system="test", source_id="e1", patient_id=enc.patient_id,
                                 encounter_class="outpatient", admitted_at=enc.admitted_at, timezone="UTC"),
        lambda s, enc: ServiceLine(encounter_id=enc.id, line_number=1, code_system="CPT", code="1",
                                   service_date=date(2026, 1, 1)),
        lambda s, enc: Diagnosis(encounter_id=enc.id, code_system="ICD10CM", code="G44.309"),
        lambda s, enc: Coverage(patient_id=enc.patient_id, payer_id="priority-health", member_id="M00000001",
                                effective_from=date(2026, 1, 1), discovered_at=enc.admitted_at,
                                discovery_method="on_file"),
        lambda s, enc: RetroCase(encounter_id=enc.id, payer_id="priority-health"),
    ],
    ids=["patient", "encounter", "service_line", "diagnosis", "coverage", "case"],
)
def test_natural_keys_refuse_duplicates(engine, make_duplicate):
    with session_scope(engine) as s:
        enc = new_case(s).encounter_id
        enc = s.get(Encounter, enc)
    with pytest.raises(sa.exc.IntegrityError):
        with session_scope(engine) as s:
            s.add(make_duplicate(s, enc))


def test_submission_idempotency_key_is_unique(engine):
    with session_scope(engine) as s:
        case = new_case(s)
        s.add(Submission(case_id=case.id, channel="packet", idempotency_key="same"))
    with pytest.raises(sa.exc.IntegrityError):
        with session_scope(engine) as s:
            s.add(Submission(case_id=case.id, attempt=2, channel="packet", idempotency_key="same"))
