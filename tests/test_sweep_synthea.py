"""The sweep on the real Synthea export with the shipped rules: real cases, hand-checked deadlines,
and the same answer from SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from config import PAYERS_DIR
from retroauth.db import make_engine
from retroauth.ingest.fhir import import_fhir
from retroauth.models import CaseServiceLine, Encounter, RetroCase
from retroauth.rules import load_rule_library
from retroauth.storage import LocalStorage
from retroauth.sweep import sweep
from tests.conftest import ROOT, SYNTHEA, table_counts
from tests.factories import CHI

AS_OF = datetime(2023, 3, 23, 6, tzinfo=CHI)
COVERAGE = ROOT / "examples" / "synthea-coverage.csv"


def swept(url: str, tmp_path) -> sa.Engine:
    engine = make_engine(url)
    summary = import_fhir(engine, LocalStorage(tmp_path / "docs"), SYNTHEA, default_payer="synthea-demo-health",
                          coverage_csv=COVERAGE)
    assert summary.error_count == 0
    sweep(engine, load_rule_library(PAYERS_DIR), as_of=AS_OF, lookback_days=20_000)
    return engine


def case_rows(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(Encounter.source_id, RetroCase.payer_id, RetroCase.status, RetroCase.reason,
                      RetroCase.delay_reason_code, RetroCase.due_at, RetroCase.not_eligible_why,
                      RetroCase.amount_at_risk, RetroCase.priority,
                      sa.func.count(CaseServiceLine.id))
            .join(Encounter, Encounter.id == RetroCase.encounter_id)
            .join(CaseServiceLine, CaseServiceLine.case_id == RetroCase.id)
            .group_by(Encounter.source_id, RetroCase.payer_id, RetroCase.status, RetroCase.reason,
                      RetroCase.delay_reason_code, RetroCase.due_at, RetroCase.not_eligible_why,
                      RetroCase.amount_at_risk, RetroCase.priority)
            .order_by(Encounter.source_id))]


def test_synthea_yields_real_cases_with_hand_checked_deadlines(db_url, tmp_path):
    engine = swept(db_url, tmp_path)
    rows = {r[0]: r for r in case_rows(engine)}
    reasons = {r[3] for r in rows.values()}
    assert {"emergency", "administrative_error", "delayed_insurance_verification"} <= reasons

    def case_of(admitted_utc: str) -> tuple:
        with engine.connect() as conn:
            source_id = conn.execute(sa.select(Encounter.source_id).where(
                Encounter.admitted_at == datetime.fromisoformat(admitted_utc).replace(tzinfo=timezone.utc))).scalar_one()
        return rows[source_id]

    # Emergency delivery 2023-03-22 (13:45 Chicago): 90 calendar days from the service date, end of
    # day in the payer's zone (New York, EDT): 2023-06-20 23:59:59.999999 EDT = 2023-06-21 03:59:59.999999 UTC.
    c = case_of("2023-03-22 18:45:24")
    assert c[2:5] == ("identified", "emergency", "11")
    assert c[5] == datetime(2023, 6, 21, 3, 59, 59, 999999, tzinfo=timezone.utc)
    # Coverage found on 2023-01-16 for a 2022-11-10 stay: delayed verification, 180 days from the
    # discovery date in New York: 2023-07-15 end of day EDT = 2023-07-16 03:59:59.999999 UTC.
    c = case_of("2022-11-10 21:28:15")
    assert c[2:5] == ("identified", "delayed_insurance_verification", "1")
    assert c[5] == datetime(2023, 7, 16, 3, 59, 59, 999999, tzinfo=timezone.utc)
    # A 2018 emergency is long past its window: not eligible, with the deadline that passed
    # (2018-08-01 + 90 days = 2018-10-30 end of day EDT).
    c = case_of("2018-08-01 18:45:24")
    assert c[2:4] == ("not_eligible", "emergency") and c[6] == "deadline_passed"
    assert c[5] == datetime(2018, 10, 31, 3, 59, 59, 999999, tzinfo=timezone.utc)


def test_two_sweeps_for_the_same_day_leave_cases_and_audit_identical(db_url, tmp_path):
    engine = swept(db_url, tmp_path)

    before_rows, before_counts = case_rows(engine), table_counts(engine)
    with engine.connect() as conn:
        events = conn.execute(sa.text("select * from case_events order by id")).all()
    sweep(engine, load_rule_library(PAYERS_DIR), as_of=AS_OF, lookback_days=20_000)
    assert case_rows(engine) == before_rows and table_counts(engine) == before_counts
    with engine.connect() as conn:
        assert conn.execute(sa.text("select * from case_events order by id")).all() == events


@pytest.mark.postgres
def test_postgresql_and_sqlite_produce_the_same_cases(pg_cluster, sqlite_template, tmp_path):
    sqlite_db = tmp_path / "s.db"
    sqlite_db.write_bytes(sqlite_template.read_bytes())
    pg_cluster.execute("CREATE DATABASE same_cases TEMPLATE retroauth_template")
    a = case_rows(swept(f"sqlite:///{sqlite_db}", tmp_path / "a"))
    b = case_rows(swept(pg_cluster.url("same_cases"), tmp_path / "b"))
    assert len(a) > 40 and a == b
