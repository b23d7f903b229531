"""Claims (retroauth.claims) on SQLite and PostgreSQL: a batch is taken in one statement, never by two
claimers, handed back for good in its round, taken again when a crashed claimer's lease runs out; and
many claimers at once share the work without an overlap."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa

from retroauth import claims
from retroauth.db import make_engine, session_scope
from retroauth.models import RetroCase, Submission, utcnow
from retroauth.vocab import CaseStatus
from tests.factories import new_case


def _cases(engine, n: int, status: CaseStatus = CaseStatus.IDENTIFIED, start: int = 1) -> list[int]:
    with session_scope(engine) as s:
        return [new_case(s, n=i, status=status).id for i in range(start, start + n)]


def test_a_claim_takes_a_batch_most_urgent_first_and_nobody_else_gets_it(engine):
    ids = _cases(engine, 5)
    with session_scope(engine) as s:
        s.execute(sa.update(RetroCase).where(RetroCase.id == ids[3]).values(priority=9))
    first = claims.claim(engine, "assemble", owner="run-a", round_id="r1", limit=2)
    assert ids[3] in first and len(first) == 2
    second = claims.claim(engine, "assemble", owner="run-b", round_id="r1", limit=10)
    assert sorted(first + second) == ids  # disjoint, and everything
    assert claims.claim(engine, "assemble", owner="run-c", round_id="r1", limit=10) == []
    with session_scope(engine) as s:
        rows = {c.id: c for c in s.execute(sa.select(RetroCase)).scalars()}
    assert {rows[i].claimed_by for i in first} == {"run-a"} and {rows[i].claimed_by for i in second} == {"run-b"}
    assert all(rows[i].claim_round == "assemble:r1" and rows[i].claimed_until > utcnow() for i in ids)
    # a lease does not stop another step's claim of a case that is in both (a ready case: assemble, render)
    assert claims.claim(engine, "render", owner="run-a", round_id="r1", limit=10) == []  # none is ready


def test_a_batch_handed_back_is_not_taken_again_in_its_round_but_in_the_next(engine):
    ids = _cases(engine, 3)
    got = claims.claim(engine, "assemble", owner="run-a", round_id="r1", limit=10)
    assert claims.release(engine, "assemble", got, owner="someone-else") == 0  # not theirs
    assert claims.release(engine, "assemble", got, owner="run-a") == 3
    assert claims.claim(engine, "assemble", owner="run-b", round_id="r1", limit=10) == []  # done this round
    assert claims.claim(engine, "assemble", owner="run-b", round_id="r2", limit=10) == ids  # a new round
    with session_scope(engine) as s:
        assert set(s.execute(sa.select(RetroCase.claimed_by)).scalars()) == {"run-b"}


def test_a_crashed_claimers_lease_runs_out(engine):
    ids = _cases(engine, 2)
    assert claims.claim(engine, "assemble", owner="crashed", round_id="r1", limit=10,
                        lease=timedelta(seconds=-1)) == ids  # as if it had run out already
    assert claims.claim(engine, "assemble", owner="run-b", round_id="r1", limit=10) == ids
    assert claims.release(engine, "assemble", ids, owner="crashed") == 0  # too late: it is run-b's now


def test_a_retry_of_a_crashed_run_takes_back_what_its_first_attempt_held(engine):
    ids = _cases(engine, 2)
    assert claims.claim(engine, "assemble", owner="run-a", round_id="run-a#1", limit=10) == ids  # then killed
    assert claims.claim(engine, "assemble", owner="run-b", round_id="run-a#1", limit=10) == []  # still leased
    assert claims.claim(engine, "assemble", owner="run-a", round_id="run-a#1", limit=10) == []  # same attempt
    assert claims.claim(engine, "assemble", owner="run-a", round_id="run-a#2", limit=10) == ids  # its retry


def test_cases_leave_a_step_when_their_state_moves_on(engine):
    identified = _cases(engine, 2)
    ready = _cases(engine, 2, CaseStatus.READY, start=3)
    _cases(engine, 1, CaseStatus.SUBMITTED, start=5)
    assert claims.claim(engine, "render", owner="a", round_id="r", limit=10) == ready
    assert claims.claim(engine, "assemble", owner="a", round_id="r", limit=10) == identified  # ready ones: held


def test_submissions_are_claimed_for_sending(engine):
    case_ids = _cases(engine, 3, CaseStatus.SUBMITTING)
    with session_scope(engine) as s:
        for i, cid in enumerate(case_ids):
            s.add(Submission(case_id=cid, channel="packet", idempotency_key=f"k{cid}",
                             status="sent" if i == 0 else "pending"))
    with session_scope(engine) as s:
        pending = sorted(s.execute(sa.select(Submission.id).where(Submission.status == "pending")).scalars())
    assert claims.claim(engine, "send", owner="a", round_id="r", limit=10) == pending
    from retroauth.outbox import pending_submissions

    assert pending_submissions(engine) == []  # held by a run that is sending them
    claims.release(engine, "send", pending, owner="a")
    assert pending_submissions(engine) == pending


def _submissions(engine, payers: list[str]) -> list[int]:
    """One pending submission per payer given, in that order (a submitting case each)."""
    case_ids = _cases(engine, len(payers), CaseStatus.SUBMITTING)
    with session_scope(engine) as s:
        for cid, payer in zip(case_ids, payers):
            s.execute(sa.update(RetroCase).where(RetroCase.id == cid).values(payer_id=payer))
        subs = [Submission(case_id=cid, channel="packet", idempotency_key=f"k{cid}") for cid in case_ids]
        s.add_all(subs)
        s.flush()
        return [sub.id for sub in subs]


def test_a_send_batch_is_one_payers_and_runs_at_once_spread_over_the_payers(engine):
    a1, b1, a2, c1, b2, a3 = _submissions(engine, ["a", "b", "a", "c", "b", "a"])
    # the payer of the oldest submission; only its submissions, oldest first
    assert claims.claim(engine, "send", owner="r1", round_id="x", limit=2) == [a1, a2]
    # another run now: payer a is being sent to, b and c are not; b has the older work
    assert claims.claim(engine, "send", owner="r2", round_id="x", limit=10) == [b1, b2]
    assert claims.claim(engine, "send", owner="r3", round_id="x", limit=10) == [c1]
    assert claims.claim(engine, "send", owner="r4", round_id="x", limit=10) == [a3]  # only a has work left
    assert claims.claim(engine, "send", owner="r5", round_id="x", limit=10) == []


def test_bad_claims_are_refused(engine):
    with pytest.raises(claims.ClaimError, match="unknown step"):
        claims.claim(engine, "sweep", owner="a", round_id="r", limit=1)
    with pytest.raises(claims.ClaimError, match="longer"):
        claims.claim(engine, "assemble", owner="a", round_id="r" * 80, limit=1)
    with pytest.raises(claims.ClaimError, match="limit"):
        claims.claim(engine, "assemble", owner="a", round_id="r", limit=0)


def _claim_at_once(db_url: str, step: str, claimers: int, limit: int) -> list[tuple[str, list[int]]]:
    """``claimers`` threads, each with its own engine (connections), claim batches of ``limit`` of ``step`` at
    the same time until each gets an empty claim; every batch with its claimer."""
    taken: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(claimers)

    def worker(name: str) -> None:
        eng = make_engine(db_url)
        try:
            start.wait()
            while batch := claims.claim(eng, step, owner=name, round_id="r1", limit=limit):
                taken.append((name, batch))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    return taken


def test_many_claimers_at_once_never_get_the_same_case(engine, db_url):
    ids = _cases(engine, 120)
    taken = _claim_at_once(db_url, "assemble", claimers=8, limit=7)
    counts = Counter(cid for _, batch in taken for cid in batch)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    with session_scope(engine) as s:
        owner = dict(s.execute(sa.select(RetroCase.id, RetroCase.claimed_by)).all())
    assert all(owner[cid] == name for name, batch in taken for cid in batch)


def test_many_senders_at_once_take_one_payers_submissions_per_batch_each_once(engine, db_url):
    subs = _submissions(engine, [f"payer-{i % 4}" for i in range(60)])
    with session_scope(engine) as s:
        payer_of = dict(s.execute(sa.select(Submission.id, RetroCase.payer_id)
                                  .join(RetroCase, RetroCase.id == Submission.case_id)).all())
    taken = _claim_at_once(db_url, "send", claimers=6, limit=4)
    counts = Counter(sid for _, batch in taken for sid in batch)
    assert sorted(counts) == subs and set(counts.values()) == {1}
    assert all(len({payer_of[sid] for sid in batch}) == 1 for _, batch in taken)


@pytest.mark.usefixtures("prefect_server", "app_env")
def test_two_runs_of_a_step_in_one_round_work_each_case_once(engine, monkeypatch):
    """Two assemble flows at once in the same round, in small batches: every case is assembled by one of them."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime

    from flows.assemble import assemble_documentation
    from retroauth.models import CaseEvent
    from retroauth.rules import load_rule_library
    from retroauth.sweep import sweep
    from tests.conftest import DATA
    from tests.factories import CHI, add_encounter

    monkeypatch.setenv("RETROAUTH_PAYER_RULES_DIR", str(DATA / "payers"))
    as_of = datetime(2026, 11, 20, 6, tzinfo=CHI)
    for _ in range(12):
        add_encounter(engine, cls="emergency", pos="23", admitted=datetime(2026, 11, 18, 10, tzinfo=CHI))
    assert sweep(engine, load_rule_library(DATA / "payers"), as_of=as_of, lookback_days=30).cases_created == 12

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(assemble_documentation, batch_size=2, as_of=as_of, claim_round="shared-round",
                            in_flight=1) for _ in range(2)]
        summaries = [r.result() for r in runs]
    assert sum(s["built"] for s in summaries) == 12  # between them, each case once
    with session_scope(engine) as s:
        moved = Counter(s.execute(sa.select(CaseEvent.case_id).where(CaseEvent.to_status == "ready")).scalars())
        rounds = set(s.execute(sa.select(RetroCase.claim_round)).scalars())
        held = s.execute(sa.select(RetroCase.id).where(RetroCase.claimed_until.is_not(None))).all()
    assert len(moved) == 12 and set(moved.values()) == {1}
    assert rounds == {"assemble:shared-round"} and held == []  # every batch handed back
    # The same round again finds nothing; a new round (a later run) looks at every case again, writing nothing.
    assert assemble_documentation(batch_size=5, as_of=as_of, claim_round="shared-round")["unchanged"] == 0
    assert assemble_documentation(batch_size=5, as_of=as_of)["unchanged"] == 12
