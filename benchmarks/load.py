"""Urgent triggers under load: many encounters triggered within a minute against the running stack.

    .venv/bin/python benchmarks/load.py [--triggers 200] [--within 60] [--workers 2] [--limit 3] [--poll 2]
                                        [--background 20000] [--deadline 1800] [--prefect-db postgres|sqlite]
                                        [--json var/bench/load.json]

What it does, in one run in a temp directory (retroauth on SQLite, local storage and results):

1. The stack as ``make serve`` runs it, the way benchmarks/urgent.py starts it: a Prefect server on a free
   local port (telemetry off; its database a throw-away PostgreSQL cluster from the machine's binaries, as
   the README asks for several workers: with SQLite under the server, even 10 triggers in 5 s with two
   workers gave "database is locked" and 503s on create_flow_run; ``--prefect-db sqlite`` shows it),
   deployments/setup.py applied (pool, queues, payer limits, deployments), and --workers process workers
   on the pool's ``urgent`` queue, each polling
   every --poll seconds, at a lower CPU priority than the server (--niceness, as ``make serve`` starts its
   worker) and running at most --limit flow runs at once (``prefect worker start --limit``:
   without it a worker starts a process for every run it finds, and 200 Python processes at once do not fit
   in this machine's memory), warm (they have polled) before the first trigger.
2. --background generated encounters (a hospital's month) and --triggers emergency encounters, each with a
   CT that needs an authorization the payer never gave (test payer: packet channel): each needs a retro
   request.
3. The triggers: ``run_deployment('urgent-case/urgent-case', timeout=0, work_queue_name='urgent',
   idempotency_key=...)`` exactly as ``retroauth trigger urgent`` calls it, one encounter each, evenly spread
   over --within seconds. Meanwhile the database is polled every 0.5 s (an encounter is done when its case is
   ``submitted``) and the server's /api/health every second.
4. Until every case is submitted or --deadline seconds after the first trigger. Then the checks: one
   case and one submission per encounter (the database), one flow run per idempotency key and none failed
   (the Prefect server), the server healthy throughout. Reported: trigger-to-submitted latency p50 / p95 /
   max, throughput, how many completed, where a run's time went (waiting for a worker, running), the CPU
   seconds of the workers and their flow-run processes, and the load average.

The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Recorder, load, tree_cpu  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of values."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]


class Health(threading.Thread):
    """GET /api/health every second: each answer's status and time, failures kept."""

    def __init__(self, api: str) -> None:
        super().__init__(daemon=True)
        self.api, self.stop = api, threading.Event()
        self.samples: list[tuple[float, int | None, float]] = []  # (t, status or None, seconds)

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = client.get(f"{self.api}/health").status_code
                except httpx.HTTPError:
                    status = None
                self.samples.append((t0, status, time.perf_counter() - t0))
                self.stop.wait(max(0.0, 1.0 - (time.perf_counter() - t0)))

    def summary(self) -> dict:
        bad = [s for s in self.samples if s[1] != 200]
        times = [s[2] for s in self.samples]
        return {"polls": len(self.samples), "not_ok": len(bad), "max_seconds": round(max(times), 3) if times else None,
                "p95_seconds": round(pct(times, 95), 3) if times else None,
                "longest_not_ok_streak_polls": _streak([s[1] != 200 for s in self.samples])}


def _streak(flags: list[bool]) -> int:
    best = cur = 0
    for f in flags:
        cur = cur + 1 if f else 0
        best = max(best, cur)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triggers", type=int, default=200, help="encounters triggered, one run each")
    ap.add_argument("--within", type=float, default=60.0, help="seconds the triggers are spread over")
    ap.add_argument("--workers", type=int, default=2, help="process workers on the urgent queue (1-3)")
    ap.add_argument("--limit", type=int, default=3, help="flow runs each worker runs at once")
    ap.add_argument("--poll", type=float, default=None,
                    help="worker poll interval, seconds (default: retroauth.cli_ops.WORKER_POLL_SECONDS, as make serve)")
    ap.add_argument("--niceness", type=int, default=None,
                    help="the workers' niceness (default: retroauth.cli_ops.WORKER_NICENESS, as make serve)")
    ap.add_argument("--background", type=int, default=20000, help="generated encounters in the database")
    ap.add_argument("--deadline", type=float, default=1800.0,
                    help="stop waiting this many seconds after the first trigger and report how far it got")
    ap.add_argument("--prefect-db", choices=("postgres", "sqlite"), default="postgres",
                    help="the Prefect server's database: a throw-away PostgreSQL cluster from the machine's binaries "
                         "(as RETROAUTH_PREFECT_DATABASE_URL sets up for several workers), or SQLite (make serve's default)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs, database)")
    ap.add_argument("--json", type=Path, help="write the results here (for benchmarks/report.py)")
    args = ap.parse_args()
    from retroauth.cli_ops import WORKER_NICENESS, WORKER_POLL_SECONDS

    args.niceness = WORKER_NICENESS if args.niceness is None else args.niceness
    args.poll = WORKER_POLL_SECONDS if args.poll is None else args.poll
    rec = Recorder("load")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped (SIGTERM)"))  # so that the finally blocks run

    tmp = Path(tempfile.mkdtemp(prefix="retroauth-load-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "results"),
        "PREFECT_WORKER_QUERY_SECONDS": str(args.poll),
        "PREFECT_WORKER_PREFETCH_SECONDS": str(max(1.0, args.poll)),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "RETROAUTH_DATABASE_URL": f"sqlite:///{tmp / 'retroauth.db'}",
        "RETROAUTH_STORAGE_URL": f"file://{tmp / 'storage'}",
        "RETROAUTH_RESULTS_DIR": str(tmp / "results"),
        "RETROAUTH_PAYER_RULES_DIR": str(ROOT / "tests" / "data" / "payers"),
    }
    procs: list[subprocess.Popen] = []
    pg = None
    try:
        if args.prefect_db == "postgres":
            from tests.pg import PostgresCluster, find_pg_bin

            bin_dir = find_pg_bin()
            if bin_dir is None:
                sys.exit("no PostgreSQL server binaries (make sysdeps installs them); or pass --prefect-db sqlite")
            pg = PostgresCluster(bin_dir).start()
            pg.execute("CREATE DATABASE prefect")
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:{pg.port}/prefect"
            print(f"PostgreSQL ({bin_dir}) for the Prefect server on port {pg.port}", file=sys.stderr)
        os.environ.update(env)  # before Prefect is imported: it reads its settings once

        from retroauth.cli_ops import healthy

        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT))
        t0 = time.perf_counter()
        while not healthy(api):
            if procs[0].poll() is not None or time.perf_counter() - t0 > 240:
                sys.exit(f"the Prefect server did not start; see {tmp / 'server.log'}")
            time.sleep(0.3)
        print(f"Prefect server up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results = run(args, tmp, procs)
        rec.write(args.json, results)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if pg is not None:
            pg.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)


def run(args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen]) -> dict:
    import sqlalchemy as sa
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    from config.settings import load_settings
    from retroauth.cli_ops import (
        URGENT_DEPLOYMENT, URGENT_QUEUE, load_setup_module, start_worker, urgent_idempotency_key,
    )
    from retroauth.db import make_engine, migrate
    from retroauth.generate import generate
    from retroauth.models import RetroCase, Submission
    from retroauth.rules import load_rule_library
    from tests.factories import add_encounter

    settings = load_settings()
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    if args.background:
        t0 = time.perf_counter()
        g = generate(engine, load_rule_library(settings.payer_rules_dir), encounters=args.background, seed=7,
                     days=30, end=date(2026, 11, 19), payer_ids=["test-commercial"])
        print(f"background: {g.encounters:,} encounters, {g.service_lines:,} services "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    encounters = [add_encounter(engine, cls="emergency", pos="23") for _ in range(args.triggers)]

    report = load_setup_module().setup(settings)
    print(f"deployed: {', '.join(report.deployments)}", file=sys.stderr)

    workers = []
    for i in range(args.workers):
        workers.append(start_worker(  # at the niceness `retroauth serve` and `retroauth worker` give theirs
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "retroauth", "--type", "process",
             "--work-queue", URGENT_QUEUE, "--name", f"load-worker-{i + 1}", "--limit", str(args.limit)],
            args.niceness, stdout=open(tmp / f"worker-{i + 1}.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT))
    procs += workers
    t0 = time.perf_counter()
    with get_client(sync_client=True) as client:
        while True:
            names = {w.name for w in client.read_workers_for_work_pool("retroauth")}
            if all(f"load-worker-{i + 1}" in names for i in range(args.workers)):
                break
            if time.perf_counter() - t0 > 180:
                sys.exit(f"the workers never polled; see {tmp}/worker-*.log")
            time.sleep(0.2)
    print(f"{args.workers} worker(s) polling (warm) after {time.perf_counter() - t0:.1f} s, "
          f"every {args.poll:g} s, at most {args.limit} runs each", file=sys.stderr)
    cpu_workers0 = sum(tree_cpu(w.pid) for w in workers)
    cpu_server0 = tree_cpu(procs[0].pid)

    health = Health(os.environ["PREFECT_API_URL"])
    health.start()
    load_start = load()
    triggered: dict[int, float] = {}  # encounter -> perf_counter at the call
    trigger_seconds: list[float] = []
    trigger_errors: dict[int, str] = {}
    keys: dict[int, str] = {}
    done: dict[int, float] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def watch() -> None:
        """The database every 0.5 s: when each triggered encounter's case is submitted."""
        while not stop.is_set():
            with lock:
                pending = [e for e in triggered if e not in done]
            if pending:
                with engine.connect() as conn:
                    rows = conn.execute(sa.select(RetroCase.encounter_id, RetroCase.status)
                                        .where(RetroCase.encounter_id.in_(pending))).all()
                now = time.perf_counter()
                by_enc: dict[int, set[str]] = {}
                for e, status in rows:
                    by_enc.setdefault(e, set()).add(str(status))
                for e, statuses in by_enc.items():
                    if statuses == {"submitted"}:
                        done[e] = now
            stop.wait(0.5)

    def trigger(encounter: int) -> None:
        asked = datetime.now(timezone.utc)
        key = urgent_idempotency_key("encounter", encounter, asked)
        t = time.perf_counter()
        with lock:
            triggered[encounter], keys[encounter] = t, key
        try:
            run_deployment(URGENT_DEPLOYMENT, parameters={"encounter_id": encounter}, idempotency_key=key,
                           work_queue_name=URGENT_QUEUE, timeout=0, tags=["urgent"])
        except Exception as exc:  # noqa: BLE001 - a trigger that failed is reported, the others go on
            trigger_errors[encounter] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"trigger of encounter {encounter} failed after {time.perf_counter() - t:.1f} s: "
                  f"{trigger_errors[encounter]}", file=sys.stderr)
        trigger_seconds.append(time.perf_counter() - t)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # Each trigger at its time, on a few threads (as separate people clicking): a slow answer from the
    # server does not push the later triggers back.
    first = time.perf_counter()
    with ThreadPoolExecutor(max_workers=32, thread_name_prefix="trigger") as pool:
        for i, encounter in enumerate(encounters):
            due = first + i * args.within / max(1, args.triggers)
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(trigger, encounter)
    last_trigger = time.perf_counter()
    print(f"{len(encounters)} triggers in {last_trigger - first:.1f} s (each call: median "
          f"{statistics.median(trigger_seconds) * 1000:.0f} ms, max {max(trigger_seconds) * 1000:.0f} ms); "
          f"{len(trigger_errors)} failed", file=sys.stderr)

    next_note = time.perf_counter() + 30
    while len(done) < len(encounters) - len(trigger_errors) and time.perf_counter() - first < args.deadline:
        time.sleep(1)
        if time.perf_counter() >= next_note:
            next_note += 30
            print(f"  {time.perf_counter() - first:6.0f} s: {len(done)} of {len(encounters)} submitted; "
                  f"load {load()[0]}", file=sys.stderr)
        if any(w.poll() is not None for w in workers):
            print("a worker stopped; see its log", file=sys.stderr)
            break
    stop.set()
    watcher.join()
    finished_waiting = time.perf_counter()
    health.stop.set()
    health.join()
    load_end = load()
    cpu_workers = sum(tree_cpu(w.pid) for w in workers) - cpu_workers0
    cpu_server = tree_cpu(procs[0].pid) - cpu_server0

    # The database: one case per encounter, one submission per case.
    with engine.connect() as conn:
        cases = conn.execute(sa.select(RetroCase.encounter_id, RetroCase.id, RetroCase.status)
                             .where(RetroCase.encounter_id.in_(encounters))).all()
        subs = dict(conn.execute(sa.select(Submission.case_id, sa.func.count())
                                 .where(Submission.case_id.in_([c.id for c in cases]))
                                 .group_by(Submission.case_id)).all())
    cases_per_encounter: dict[int, int] = {}
    for c in cases:
        cases_per_encounter[c.encounter_id] = cases_per_encounter.get(c.encounter_id, 0) + 1
    submitted_cases = [c for c in cases if str(c.status) == "submitted"]
    db = {
        "encounters_with_one_case": sum(1 for e in encounters if cases_per_encounter.get(e) == 1),
        "encounters_with_more_cases": sum(1 for e in encounters if cases_per_encounter.get(e, 0) > 1),
        "cases_submitted": len(submitted_cases),
        "cases_with_one_submission": sum(1 for c in cases if subs.get(c.id) == 1),
        "cases_with_more_submissions": sum(1 for c in cases if subs.get(c.id, 0) > 1),
        "submitted_cases_without_exactly_one_submission": sum(1 for c in submitted_cases if subs.get(c.id) != 1),
    }

    # The Prefect server: the urgent-case runs of these keys. A run's final state lands a little after its
    # case is submitted (the report artifact, the result, the process's exit): wait up to a minute for it.
    wanted = set(keys.values())

    def read_runs() -> list:
        found = []
        with get_client(sync_client=True) as client:
            offset = 0
            while True:
                page = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["urgent-case"])),
                    limit=200, offset=offset)
                found += page
                offset += len(page)
                if len(page) < 200:
                    break
        return [r for r in found if r.idempotency_key in wanted]

    t_final = time.perf_counter()
    runs = read_runs()
    while any(not (r.state and r.state.is_final()) for r in runs) and time.perf_counter() - t_final < 60:
        time.sleep(2)
        runs = read_runs()
    per_key: dict[str, int] = {}
    states: dict[str, int] = {}
    for r in runs:
        per_key[r.idempotency_key] = per_key.get(r.idempotency_key, 0) + 1
        k = r.state.type.value if r.state else "NONE"
        states[k] = states.get(k, 0) + 1
    waits = [(r.start_time - r.created).total_seconds() for r in runs if r.start_time and r.created]
    running = [(r.end_time - r.start_time).total_seconds() for r in runs if r.end_time and r.start_time]
    prefect = {
        "flow_runs": len(runs), "keys": len(wanted), "keys_with_one_run": sum(1 for n in per_key.values() if n == 1),
        "keys_with_more_runs": sum(1 for n in per_key.values() if n > 1), "states": states,
        "failed_or_crashed": sum(states.get(s, 0) for s in ("FAILED", "CRASHED")),
        "waiting_for_a_worker_seconds": {"p50": _r(pct(waits, 50)), "p95": _r(pct(waits, 95)), "max": _r(max(waits, default=None))},
        "flow_run_seconds": {"p50": _r(pct(running, 50)), "p95": _r(pct(running, 95)), "max": _r(max(running, default=None))},
    }

    latencies = [done[e] - triggered[e] for e in done]
    completed = len(done)
    span = (max(done.values()) - first) if done else None
    out = {
        "prefect_database": "PostgreSQL" if os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") else "SQLite",
        "triggers": len(encounters), "within_seconds": args.within, "workers": args.workers,
        "limit_per_worker": args.limit, "poll_seconds": args.poll, "background_encounters": args.background,
        "deadline_seconds": args.deadline,
        "triggering_took_seconds": round(last_trigger - first, 1),
        "trigger_call_ms": {"p50": _r(pct(trigger_seconds, 50), 1000), "max": _r(max(trigger_seconds), 1000)},
        "trigger_errors": len(trigger_errors),
        "trigger_error_kinds": sorted({v.split(":", 1)[0] for v in trigger_errors.values()}),
        "completed": completed, "all_completed": completed == len(encounters),
        "waited_seconds": round(finished_waiting - first, 1),
        "latency_seconds": {"p50": _r(pct(latencies, 50)), "p95": _r(pct(latencies, 95)),
                            "max": _r(max(latencies, default=None)), "min": _r(min(latencies, default=None))},
        "throughput_per_minute": round(completed / span * 60, 2) if span else None,
        "first_trigger_to_last_submitted_seconds": _r(span),
        "database": db, "prefect": prefect, "health": health.summary(),
        "checks": {
            "no_duplicates": db["encounters_with_more_cases"] == 0 and db["cases_with_more_submissions"] == 0
                             and prefect["keys_with_more_runs"] == 0,
            "each_encounter_one_case": db["encounters_with_one_case"] == len(encounters),
            "each_case_one_submission": db["cases_with_one_submission"] == len(cases)
                                        and db["cases_with_more_submissions"] == 0,
            "each_key_one_flow_run": prefect["keys_with_one_run"] == len(wanted) and prefect["keys_with_more_runs"] == 0,
            "no_run_failed": prefect["failed_or_crashed"] == 0,
            "server_healthy_throughout": health.summary()["not_ok"] == 0,
            "all_submitted": completed == len(encounters),
            "triggered_within_the_window": last_trigger - first <= args.within + 1,
        },
        "cpu_seconds": {"workers_and_flow_runs": round(cpu_workers, 1), "server": round(cpu_server, 1),
                        "per_completed_run": round(cpu_workers / completed, 2) if completed else None},
        "load_start": load_start, "load_end": load_end,
    }
    _print(out)
    return out


def _r(v: float | None, factor: float = 1.0) -> float | None:
    return None if v is None else round(v * factor, 2)


def _print(o: dict) -> None:
    lat = o["latency_seconds"]
    print(f"\n{o['completed']} of {o['triggers']} urgent cases submitted "
          f"({'all' if o['all_completed'] else 'NOT all'}; waited {o['waited_seconds']} s after the first trigger)")
    print(f"trigger -> submitted: p50 {lat['p50']} s, p95 {lat['p95']} s, max {lat['max']} s; "
          f"throughput {o['throughput_per_minute']} per minute")
    p = o["prefect"]
    print(f"Prefect: {p['flow_runs']} flow runs for {p['keys']} keys ({p['keys_with_more_runs']} keys with more "
          f"than one), states {p['states']}; waiting for a worker p50 {p['waiting_for_a_worker_seconds']['p50']} s, "
          f"flow run p50 {p['flow_run_seconds']['p50']} s")
    print(f"database: {o['database']}")
    print(f"checks: {o['checks']}")
    print(f"server health: {o['health']}")
    print(f"CPU: workers and their flow-run processes {o['cpu_seconds']['workers_and_flow_runs']} s "
          f"({o['cpu_seconds']['per_completed_run']} s per run), server {o['cpu_seconds']['server']} s; "
          f"load {o['load_start']} -> {o['load_end']}")


if __name__ == "__main__":
    main()
