"""One day with one worker, then the same day with three, through a real Prefect server on PostgreSQL.

    .venv/bin/python benchmarks/scale_out.py [--cases 300] [--delay 0.2] [--batch-size 10] [--payer-slots 6]
                                             [--sqlite-server] [--keep]

What it does, in one run in a temp directory:

1. Starts a throw-away PostgreSQL cluster (tests/pg.py, the machine's PostgreSQL binaries), a Prefect server
   whose database is one of its databases (``--sqlite-server``: SQLite instead), applies
   deployments/prefect.yaml with deployments/setup.py (pool, queues, payer limits of ``--payer-slots`` send
   batches at a time, deployments) and starts a Da Vinci PAS payer simulator that answers every request
   after ``--delay`` seconds, as a real payer's API does.
2. Two application databases (PostgreSQL) with the same day: ``--cases`` emergency encounters whose CT had no
   authorization, one case each, all through the PAS channel.
3. Day 1: one worker, the daily-run deployment with helpers=0. Day 2: three workers (one flow run at a time
   each), helpers=2: the daily run and two work-day runs claim batches of ``--batch-size`` cases.
   Each day is timed from the trigger to the end of the daily run (which waits for its helpers), and the
   day's work alone from the first case event to the last (without the runs' start-up).
4. Checks both days: every case submitted exactly once (the simulator saw one request per idempotency key
   and no repeat), and says which runs did how much.

The machine may be shared: the load average is printed with the results; read the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AS_OF = datetime(2026, 11, 20, 6, tzinfo=ZoneInfo("America/Chicago"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=300, help="cases in the day (one encounter each)")
    ap.add_argument("--delay", type=float, default=0.2, help="seconds the payer takes to answer a request")
    ap.add_argument("--batch-size", type=int, default=10, help="cases (submissions) per claimed batch")
    ap.add_argument("--payer-slots", type=int, default=6, help="send batches to the payer at a time, all workers")
    ap.add_argument("--sqlite-server", action="store_true", help="the Prefect server on SQLite, not PostgreSQL")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = ap.parse_args()

    import sqlalchemy as sa

    from tests.day_on_workers import DayOnWorkers
    from tests.pg import PostgresCluster, find_pg_bin

    if find_pg_bin() is None:
        sys.exit("PostgreSQL binaries not found (set RETROAUTH_PG_BIN)")
    tmp = Path(tempfile.mkdtemp(prefix="retroauth-scale-out-"))
    cluster = PostgresCluster(find_pg_bin()).start()
    rig = None
    try:
        prefect_url = None
        if not args.sqlite_server:
            cluster.execute("CREATE DATABASE prefect")
            engine = sa.create_engine(cluster.url("prefect"), isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            engine.dispose()
            prefect_url = cluster.url("prefect").replace("+psycopg", "+asyncpg")
        rig = DayOnWorkers(tmp, prefect_database_url=prefect_url, payer_delay=args.delay,
                           payer_api_concurrency=args.payer_slots)
        took = rig.start_server()
        print(f"Prefect server on {'SQLite' if args.sqlite_server else 'PostgreSQL'} up in {took:.0f} s")
        rig.deploy()
        days = []
        for name, workers in (("one", 1), ("three", 3)):
            cluster.execute(f"CREATE DATABASE day_{name}")
            day = rig.app(name, cluster.url(f"day_{name}"))
            rig.add_cases(day, args.cases, AS_OF)
            rig.start_workers(day, workers)
            flow_run, seconds = rig.run_day(AS_OF, helpers=workers - 1, batch_size=args.batch_size, timeout=3600)
            work, shares = check(day.database_url, rig, args.cases)
            rig.sim.reset()
            rig.stop_workers()
            days.append((workers, seconds, work))
            print(f"{workers} worker(s): {flow_run.state.name} in {seconds:.1f} s from the trigger to the end; "
                  f"the day's work {work:.1f} s from the first case event to the last; "
                  f"case events per worker's run: {', '.join(str(n) for n in shares)}")
        (_, one, one_work), (_, three, three_work) = days
        print(f"\n{args.cases} cases, payer answering in {args.delay:g} s, batches of {args.batch_size}, "
              f"{args.payer_slots} payer slots: 1 worker {one:.1f} s, 3 workers {three:.1f} s "
              f"({one / three:.2f}x); the work alone {one_work:.1f} s vs {three_work:.1f} s "
              f"({one_work / three_work:.2f}x); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    finally:
        if rig is not None:
            rig.close()
        cluster.stop()
        if args.keep:
            print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def check(database_url: str, rig, cases: int) -> tuple[float, list[int]]:  # noqa: ANN001 - DayOnWorkers
    """Every case submitted once; seconds from the first case event to the last; events per run."""
    import sqlalchemy as sa

    from retroauth.db import make_engine, session_scope
    from retroauth.models import CaseEvent, RetroCase, Submission

    engine = make_engine(database_url)
    try:
        with session_scope(engine) as s:
            statuses = Counter(s.execute(sa.select(RetroCase.status)).scalars())
            keys = set(s.execute(sa.select(Submission.idempotency_key)).scalars())
            first, last = s.execute(sa.select(sa.func.min(CaseEvent.occurred_at),
                                              sa.func.max(CaseEvent.occurred_at))).one()
            submitted = Counter(s.execute(sa.select(CaseEvent.case_id).where(CaseEvent.to_status == "submitted"))
                                .scalars())
            by_run = Counter(s.execute(sa.select(CaseEvent.run_id)).scalars())
            spans = dict((to, (b - a).total_seconds()) for to, a, b in s.execute(
                sa.select(CaseEvent.to_status, sa.func.min(CaseEvent.occurred_at), sa.func.max(CaseEvent.occurred_at))
                .where(CaseEvent.to_status.in_(["ready", "letter_rendered", "submitted"]))
                .group_by(CaseEvent.to_status)).tuples())
    finally:
        engine.dispose()
    top = rig.deployment_run_of()
    shares: Counter = Counter()
    for run_id, n in by_run.items():
        shares[top.get(run_id, run_id)] += n
    stats = rig.sim.stats()
    ok = (sum(statuses.values()) == cases and len(submitted) == cases and set(submitted.values()) == {1}
          and set(stats["submissions"]) == keys and set(stats["submissions"].values()) == {1}
          and not stats["repeats"])
    if not ok:
        sys.exit(f"the day is wrong: statuses {dict(statuses)}, submitted {len(submitted)}, "
                 f"simulator {len(stats['submissions'])} keys, repeats {len(stats['repeats'])}")
    print(f"  first to last move: ready {spans.get('ready', 0):.1f} s (packets), letter_rendered "
          f"{spans.get('letter_rendered', 0):.1f} s (letters), submitted {spans.get('submitted', 0):.1f} s (sends)")
    return (last - first).total_seconds(), sorted(shares.values(), reverse=True)


if __name__ == "__main__":
    main()
