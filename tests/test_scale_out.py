"""Scale-out for real: retroauth's database and the Prefect server's both on PostgreSQL (two databases of the
suite's cluster), the deployments applied, three process workers (one flow run at a time each), a PAS payer
that takes 0.2 s per request, and one day of many batches run by the daily-run deployment with two helpers.
Every case goes to submitted exactly once (one request per idempotency key at the payer, one letter, one
packet, one event per move), and each of the three workers did part of the day (tests/day_on_workers.py).

A helper's flow run starts many seconds after the daily run's (its worker starts a new Python process), and by
then the daily run would have claimed most of the day. So each run's first claim of each claimed step meets
the other two runs' there (the failpoint ``<step>.after_claim=meet:3@1``) before any run works on: every run
holds a batch of every step, whatever its start took, and from then on the three claim as they would."""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import datetime

import pytest
import sqlalchemy as sa

from retroauth import failpoints
from retroauth.db import make_engine, session_scope
from retroauth.models import CaseEvent, Letter, Packet, RetroCase, Submission
from tests.day_on_workers import DayOnWorkers
from tests.factories import CHI

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
AS_OF = datetime(2026, 11, 20, 6, tzinfo=CHI)
CASES, BATCH = 60, 5  # 12 batches per step, shared by three runs
MOVES = ["ready", "letter_rendered", "submitting", "submitted", "approved"]
# The moves of a claimed batch (assemble, render, send); "submitting" is whichever run queues the case first.
CLAIMED_MOVES = ["ready", "letter_rendered", "submitted", "approved"]
MEET = ",".join(f"{step}.after_claim=meet:3@1" for step in ("assemble", "render", "send"))


@pytest.fixture
def rig(pg_cluster, tmp_path):
    """A Prefect server whose database is a second database of the suite's PostgreSQL cluster."""
    name = f"prefect_{os.getpid()}"
    pg_cluster.execute(f"CREATE DATABASE {name}")
    engine = sa.create_engine(pg_cluster.url(name), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:  # what Prefect's server needs of PostgreSQL: 14.9 or later, with pg_trgm
        assert int(conn.exec_driver_sql("SHOW server_version_num").scalar()) >= 140009
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    engine.dispose()
    rig = DayOnWorkers(tmp_path / "rig", prefect_database_url=pg_cluster.url(name).replace("+psycopg", "+asyncpg"),
                       payer_delay=0.2, payer_api_concurrency=6)
    yield rig
    rig.close()


def test_three_workers_share_one_day_and_work_each_case_once(rig, pg_cluster, tmp_path):
    t0 = time.perf_counter()
    app_db = f"scale_{os.getpid()}"
    pg_cluster.execute(f"CREATE DATABASE {app_db} TEMPLATE retroauth_template")
    rig.start_server()
    report = rig.deploy()
    assert {"daily-run", "work-day"} <= set(report.deployments)
    day = rig.app("day", pg_cluster.url(app_db))
    rig.add_cases(day, CASES, AS_OF)
    rig.start_workers(day, 3, env={failpoints.ENV: MEET, failpoints.DIR_ENV: str(tmp_path / "meet")})
    ready = time.perf_counter() - t0

    flow_run, seconds = rig.run_day(AS_OF, helpers=2, batch_size=BATCH, timeout=600)
    print(f"\nscale-out: set-up {ready:.0f} s, the day of {CASES} cases on three workers {seconds:.0f} s")
    assert flow_run.state.is_completed(), flow_run.state.message

    engine = make_engine(day.database_url)
    try:
        with session_scope(engine) as s:
            statuses = Counter(s.execute(sa.select(RetroCase.status)).scalars())
            moves = Counter(s.execute(sa.select(CaseEvent.case_id, CaseEvent.to_status)
                                      .where(CaseEvent.event == "transition")).tuples())
            movers = s.execute(sa.select(CaseEvent.run_id, CaseEvent.to_status)
                               .where(CaseEvent.event == "transition")).tuples().all()
            letters = Counter(s.execute(sa.select(Letter.case_id)).scalars())
            packets = s.execute(sa.select(Packet.case_id, Packet.version)).tuples().all()
            keys = s.execute(sa.select(Submission.idempotency_key).where(Submission.status == "sent")).scalars().all()
            case_ids = s.execute(sa.select(RetroCase.id)).scalars().all()
    finally:
        engine.dispose()

    # Every case went through every move once: submitted, and approved by the payer at once.
    assert statuses == {"approved": CASES}
    assert set(moves.values()) == {1} and Counter(to for _, to in moves) == {m: CASES for m in MOVES}
    assert sorted(letters) == sorted(case_ids) and set(letters.values()) == {1}
    assert sorted(packets) == sorted((c, 1) for c in case_ids)
    # The payer saw one request per case: one per idempotency key, never a repeat.
    stats = rig.sim.stats()
    assert len(keys) == CASES and stats["submissions"] == {k: 1 for k in keys} and stats["repeats"] == {}

    # The day's report adds up the three runs' counts.
    report = rig.artifact(flow_run.id, "daily-run")
    assert f"{CASES} sent" in report and "counts missing" not in report and "helpers | 2 work-day runs" in report

    # Three deployment runs (the daily run and its two helpers), each on its own worker, each did part of it.
    run_of = rig.deployment_run_of()
    worker_of = rig.runs_by_worker()
    share = Counter(run_of[r] for r, _ in movers)
    assert len(share) == 3, share
    assert len({worker_of[r] for r in share}) == 3, worker_of
    # And each worked at least a batch of each claimed step (MEET): nobody works on a step before all three
    # have claimed a first batch of it, and no first claim is empty: the k-th run to claim finds at least 5k
    # rows of the step's work (all 60 cases to assemble; to render or send, at least the arrived runs' own
    # batches of the step before), and only 5(k-1) of them claimed.
    moved = Counter((run_of[r], to) for r, to in movers)
    print("transitions per worker: " + ", ".join(
        f"{worker_of[r]} {n} (" + " ".join(str(moved[r, to]) for to in MOVES) + ")" for r, n in sorted(share.items())))
    assert all(moved[r, to] >= BATCH for r in share for to in CLAIMED_MOVES), moved
