"""The case state machine: allowed moves, refused moves that write nothing, batch moves, audit."""

from __future__ import annotations

import pytest
from sqlmodel import select

from retroauth.cases import (
    OPEN_STATES, TRANSITIONS, Actor, InvalidTransition, StaleCase, check, sources_of, transition,
    transition_many,
)
from retroauth.db import session_scope
from retroauth.models import CaseEvent, RetroCase
from retroauth.vocab import CaseStatus as S
from tests.conftest import table_counts
from tests.factories import new_case


def test_every_state_is_in_the_table_and_closed_is_final():
    assert set(TRANSITIONS) == set(S)
    assert TRANSITIONS[S.CLOSED] == frozenset()
    assert S.CLOSED not in OPEN_STATES
    # every state can eventually reach closed: no case is stranded
    for start in S:
        seen, todo = set(), [start]
        while todo:
            st = todo.pop()
            seen.add(st)
            todo.extend(TRANSITIONS[st] - seen)
        assert S.CLOSED in seen, start


@pytest.mark.parametrize("src,dst", [(S.IDENTIFIED, S.SUBMITTED), (S.CLOSED, S.IDENTIFIED),
                                     (S.APPROVED, S.DENIED), (S.SUBMITTING, S.WITHDRAWN)])
def test_check_refuses_moves_outside_the_table(src, dst):
    with pytest.raises(InvalidTransition, match=f"from {src} to {dst}"):
        check(src, dst, case_id=7)


def test_transition_writes_state_and_audit_event_together(engine):
    with session_scope(engine) as s:
        case = new_case(s)
        transition(s, case, S.READY, actor=Actor(run_id="run-1", name="flow"), details={"items": 4})
        assert case.status == S.READY and case.version == 2
    with session_scope(engine) as s:
        ev = s.exec(select(CaseEvent)).one()
        assert (ev.from_status, ev.to_status, ev.run_id, ev.details) == ("identified", "ready", "run-1", {"items": 4})


def test_invalid_transition_raises_and_writes_nothing(engine):
    with session_scope(engine) as s:
        case_id = new_case(s).id
    before = table_counts(engine)
    with pytest.raises(InvalidTransition):
        with session_scope(engine) as s:
            transition(s, s.get(RetroCase, case_id), S.SUBMITTED)
    assert table_counts(engine) == before
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).status == S.IDENTIFIED


def test_a_failure_after_the_transition_rolls_back_state_and_event(engine):
    with session_scope(engine) as s:
        case_id = new_case(s).id
    before = table_counts(engine)
    with pytest.raises(RuntimeError):
        with session_scope(engine) as s:
            transition(s, s.get(RetroCase, case_id), S.READY)
            raise RuntimeError("storage failed")
    assert table_counts(engine) == before
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).status == S.IDENTIFIED


def test_stale_copy_cannot_move_a_case_twice(engine):
    with session_scope(engine) as s:
        case_id = new_case(s).id
    with session_scope(engine) as s:
        stale = s.get(RetroCase, case_id)
        s.expunge(stale)
    with session_scope(engine) as s:
        transition(s, s.get(RetroCase, case_id), S.READY)
    with pytest.raises(StaleCase):
        with session_scope(engine) as s:
            transition(s, stale, S.AWAITING_DOCUMENTATION)
    with session_scope(engine) as s:
        assert s.get(RetroCase, case_id).status == S.READY
        assert len(s.exec(select(CaseEvent)).all()) == 1


def test_transition_many_moves_only_eligible_cases_and_is_a_noop_on_rerun(engine):
    with session_scope(engine) as s:
        ids = [new_case(s, n).id for n in range(1, 6)]
        transition(s, s.get(RetroCase, ids[4]), S.READY)  # already moved
    with session_scope(engine) as s:
        moved = transition_many(s, ids, S.READY, from_statuses=[S.IDENTIFIED], actor=Actor(run_id="r2"),
                                details={ids[0]: {"manifest": "m1"}})
    assert moved == ids[:4]
    with session_scope(engine) as s:
        assert transition_many(s, ids, S.READY, from_statuses=[S.IDENTIFIED]) == []
        assert {c.status for c in s.exec(select(RetroCase))} == {S.READY}
        events = s.exec(select(CaseEvent).where(CaseEvent.run_id == "r2")).all()
        assert sorted(e.case_id for e in events) == ids[:4]
        assert next(e for e in events if e.case_id == ids[0]).details == {"manifest": "m1"}
        assert all(c.version == 2 for c in s.exec(select(RetroCase)))


def test_transition_many_refuses_a_forbidden_source_before_writing(engine):
    with session_scope(engine) as s:
        ids = [new_case(s, n).id for n in range(1, 3)]
    before = table_counts(engine)
    with pytest.raises(InvalidTransition):
        with session_scope(engine) as s:
            transition_many(s, ids, S.SUBMITTED, from_statuses=[S.IDENTIFIED])
    assert table_counts(engine) == before


def test_sources_of_is_the_inverse_of_the_table():
    assert sources_of(S.SUBMITTING) == {S.LETTER_RENDERED}
    assert S.DENIED in sources_of(S.APPEALED)
