"""The daily sweep on SQLite and PostgreSQL: what needs a retro request, why, by when; reruns are no-ops."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
from sqlmodel import select

from retroauth.db import session_scope
from retroauth.models import (
    Authorization, AuthorizationCode, CaseEvent, CaseServiceLine, Coverage, Encounter, PayerOutage, RetroCase,
)
from retroauth.rules import load_rule_library
from retroauth.sweep import NotEligible, sweep
from retroauth.vocab import CaseStatus
from tests.conftest import DATA, table_counts
from tests.factories import CHI, add_encounter

LIB = load_rule_library(DATA / "payers")


def run(engine, as_of=datetime(2026, 11, 20, 6, tzinfo=CHI), days=30, **kw):
    return sweep(engine, LIB, as_of=as_of, lookback_days=days, **kw)


def cases(engine) -> list[RetroCase]:
    with session_scope(engine) as s:
        return list(s.exec(select(RetroCase).order_by(RetroCase.id)))


def test_emergency_case_with_reason_deadline_and_priority(engine):
    enc = add_encounter(engine, cls="emergency", pos="23")
    result = run(engine)
    assert (result.cases_created, result.lines_uncovered, result.encounters_scanned) == (1, 1, 1)
    [c] = cases(engine)
    assert (c.encounter_id, c.payer_id, c.status, c.reason, c.delay_reason_code) == (
        enc, "test-commercial", CaseStatus.IDENTIFIED, "emergency", "11")
    # 90 calendar days from the 2026-11-13 service date, end of day in the payer's zone
    assert c.due_at == datetime(2027, 2, 11, 23, 59, 59, 999999, tzinfo=CHI)
    assert "90 calendar_days from service_date" in c.deadline_rule
    assert c.amount_at_risk == Decimal("2000.00")  # charge x units
    assert c.not_eligible_why is None and 20 < c.priority <= 150
    with session_scope(engine) as s:
        assert [e.event for e in s.exec(select(CaseEvent))] == ["identified", "evaluated"]
        assert s.exec(select(CaseServiceLine)).one().rule_category == "advanced-imaging"


def test_rerun_and_overlapping_window_change_nothing(engine):
    add_encounter(engine, cls="emergency", pos="23")
    add_encounter(engine, codes=(("CPT", "70552"), ("CPT", "74177")))
    run(engine)
    before = table_counts(engine)
    snapshot = [c.model_dump() for c in cases(engine)]
    again = run(engine)
    overlap = run(engine, as_of=datetime(2026, 11, 20, 9, tzinfo=CHI), days=45)
    assert again.cases_created == overlap.cases_created == 0
    assert again.cases_reevaluated == overlap.cases_reevaluated == 0
    assert table_counts(engine) == before
    assert [c.model_dump() for c in cases(engine)] == snapshot


def test_batches_do_not_change_the_answer(engine):
    for i in range(5):
        add_encounter(engine, cls="emergency", pos="23", admitted=datetime(2026, 11, 10 + i, 8, tzinfo=CHI))
    add_encounter(engine, codes=(("CPT", "99213"),))  # no auth needed
    result = run(engine, batch_size=2)
    assert result.encounters_scanned == 6 and result.cases_created == 5
    assert len(cases(engine)) == 5


def test_authorization_on_file_covers_and_a_late_one_withdraws_the_case(engine):
    enc = add_encounter(engine, cls="emergency", pos="23")
    run(engine)
    with session_scope(engine) as s:
        member = s.exec(select(Coverage.member_id).join(Encounter, Encounter.patient_id == Coverage.patient_id)
                        .where(Encounter.id == enc)).one()
        a = Authorization(payer_id="test-commercial", member_id=member, auth_number="AUTH-1", starts_on=date(2026, 11, 1),
                          ends_on=date(2026, 11, 30), status="approved", source="import")
        s.add(a)
        s.flush()
        s.add(AuthorizationCode(authorization_id=a.id, code_system="HCPCS", code="70551"))  # CPT is HCPCS level I
    result = run(engine)
    assert result.withdrawn == 1
    assert cases(engine)[0].status == CaseStatus.WITHDRAWN


def test_authorization_for_other_dates_or_codes_does_not_cover(engine):
    enc = add_encounter(engine, cls="emergency", pos="23")
    with session_scope(engine) as s:
        member = s.exec(select(Coverage.member_id).join(Encounter, Encounter.patient_id == Coverage.patient_id)
                        .where(Encounter.id == enc)).one()
        for number, start, code in (("A-dates", date(2026, 12, 1), "70551"), ("A-code", date(2026, 11, 1), "70553")):
            a = Authorization(payer_id="test-commercial", member_id=member, auth_number=number, starts_on=start,
                              ends_on=date(2026, 12, 31), status="approved", source="import")
            s.add(a)
            s.flush()
            s.add(AuthorizationCode(authorization_id=a.id, code_system="CPT", code=code))
    assert run(engine).cases_created == 1


@pytest.mark.parametrize("codes,expected", [
    ((("CPT", "64612"),), 0),                      # the pair rule needs its partner
    ((("CPT", "64612"), ("HCPCS", "J0586")), 1),   # ... which is in J0585-J0588
    ((("CPT", "64612"), ("HCPCS", "J0589")), 0),
    ((("CPT", "7055"),), 0),                       # a shorter code is not inside 70551-70553
    ((("CPT", "70554"),), 0),
    ((("CPT", "74178"),), 1),
])
def test_code_ranges_and_pairs(engine, codes, expected):
    add_encounter(engine, cls="emergency", pos="23", codes=codes)
    assert run(engine).cases_created == expected


@pytest.mark.parametrize("pos,admitted,expected", [
    ("22", datetime(2026, 6, 10, 9, tzinfo=CHI), 1),
    ("11", datetime(2026, 6, 10, 9, tzinfo=CHI), 0),   # wrong place of service
    ("22", datetime(2026, 7, 10, 9, tzinfo=CHI), 0),   # rule ended 2026-06-30
])
def test_place_of_service_and_effective_dates(engine, pos, admitted, expected):
    add_encounter(engine, cls="emergency", pos=pos, admitted=admitted, codes=(("CPT", "29881"),))
    assert run(engine, as_of=admitted + timedelta(days=3)).cases_created == expected


def test_payer_that_accepts_no_retro_gives_not_eligible(engine):
    add_encounter(engine, payer="test-noretro", cls="emergency", pos="23")
    result = run(engine)
    [c] = cases(engine)
    assert (c.status, c.not_eligible_why, result.not_eligible) == (
        CaseStatus.NOT_ELIGIBLE, NotEligible.PAYER_ACCEPTS_NO_RETRO, 1)


def test_administrative_error_past_its_window_is_not_eligible(engine):
    add_encounter(engine, admitted=datetime(2026, 11, 2, 9, tzinfo=CHI))
    run(engine)  # 7 days from 2026-11-02 by 17:00 has passed on 2026-11-20
    [c] = cases(engine)
    assert (c.status, c.reason, c.not_eligible_why) == (CaseStatus.NOT_ELIGIBLE, "administrative_error",
                                                        NotEligible.DEADLINE_PASSED)
    assert c.due_at == datetime(2026, 11, 9, 17, tzinfo=CHI)


def test_delayed_verification_counts_from_discovery_and_then_expires(engine):
    discovered = datetime(2026, 11, 18, 14, tzinfo=CHI)
    add_encounter(engine, admitted=datetime(2026, 11, 2, 9, tzinfo=CHI), discovered=discovered,
                  discovery="eligibility_check")
    run(engine)
    [c] = cases(engine)
    assert (c.status, c.reason, c.delay_reason_code) == (CaseStatus.IDENTIFIED, "delayed_insurance_verification", "1")
    assert c.due_at == datetime(2026, 12, 18, 23, 59, 59, 999999, tzinfo=CHI)
    result = run(engine, as_of=datetime(2026, 12, 19, 6, tzinfo=CHI), days=60)
    assert result.expired == 1 and cases(engine)[0].status == CaseStatus.EXPIRED


def test_system_issue_from_a_recorded_outage_falls_back_to_the_accepted_reason(engine):
    # test-commercial has no window for system_issue: the case is argued as administrative error
    add_encounter(engine, admitted=datetime(2026, 11, 16, 9, tzinfo=CHI))
    with session_scope(engine) as s:
        s.add(PayerOutage(payer_id="test-commercial", starts_at=datetime(2026, 11, 16, 7, tzinfo=CHI),
                          ends_at=datetime(2026, 11, 16, 12, tzinfo=CHI), reference="OUT-1"))
    run(engine)
    [c] = cases(engine)
    assert c.reason == "administrative_error" and c.status == CaseStatus.IDENTIFIED


def test_encounters_outside_the_lookback_window_are_not_swept(engine):
    add_encounter(engine, cls="emergency", pos="23", admitted=datetime(2026, 9, 1, 9, tzinfo=CHI))
    assert run(engine).cases_created == 0
    assert run(engine, days=120).cases_created == 1


def test_urgent_sweep_of_one_encounter_ignores_the_window(engine):
    old = add_encounter(engine, cls="emergency", pos="23", admitted=datetime(2026, 9, 1, 9, tzinfo=CHI))
    add_encounter(engine, cls="emergency", pos="23")
    result = run(engine, encounter_ids=[old])
    assert result.cases_created == 1 and cases(engine)[0].encounter_id == old


def test_sweeping_one_payer_leaves_the_others_alone(engine):
    add_encounter(engine, cls="emergency", pos="23")
    add_encounter(engine, payer="test-noretro", cls="emergency", pos="23")
    run(engine)
    before = table_counts(engine)
    result = run(engine, payer_ids=["test-noretro"])
    assert result.withdrawn == 0 and table_counts(engine) == before
    with pytest.raises(KeyError, match="known"):
        run(engine, payer_ids=["no-such-payer"])
