"""`make demo`: the whole pipeline on the embedded defaults, told step by step.

It imports the real Synthea FHIR export (10 patients, with a default payer since the export has no
coverage), runs the daily sweep flow as of the end of that data, builds the packets and letters, submits
them by Da Vinci PAS to the payer simulator (playing the fictional Synthea Demo Health), follows up (an
appeal for the denial, an inquiry for the pended request), then sweeps a generated hospital-scale day.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from config.settings import Settings

DEMO_PAYER = "synthea-demo-health"
# The Synthea export ends on 2023-03-22: the demo sweeps its whole history as of the next morning.
# Most of it is long past any payer's window (not eligible, deadline passed): that is the point of
# a daily sweep. The coverage file has one patient's insurance found late (delayed verification).
SYNTHEA_AS_OF = datetime(2023, 3, 23, 6, 0, tzinfo=ZoneInfo("America/Chicago"))
SYNTHEA_LOOKBACK_DAYS = 20_000
DEMO_DAY_ENCOUNTERS = 3000  # a mid-size hospital's day
SYNTHEA_COVERAGE = Path(__file__).resolve().parents[1] / "examples" / "synthea-coverage.csv"
SIM_PORT = 8089  # config/payers/synthea-demo-health.yaml: contact.api_base_url
SIM_TOKEN = "demo-token"


def find_synthea(explicit: Path | None) -> Path:
    candidates = [explicit] if explicit else []
    if env := os.environ.get("RETROAUTH_DEMO_FHIR"):
        candidates.append(Path(env))
    root = Path(__file__).resolve().parents[1]
    candidates += [root.parent / "shared" / "fixtures" / "synthea-10", root / "examples" / "synthea-10"]
    for c in candidates:
        if c and (c / "Patient.000.ndjson").is_file():
            return c
    raise SystemExit("Synthea export not found: pass --fixtures DIR or set RETROAUTH_DEMO_FHIR")


def run_demo(settings: Settings, console: Console, fixtures: Path | None = None) -> None:
    # Offline, self-contained Prefect: a local home under ./var, no telemetry.
    os.environ.setdefault("PREFECT_HOME", str(Path("var/prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("RETROAUTH_PAS_TOKEN", SIM_TOKEN)  # what the simulator below expects

    from retroauth.db import make_engine, migrate
    from retroauth.ingest.errors import record_import
    from retroauth.ingest.fhir import import_fhir
    from retroauth.models import utcnow
    from retroauth.rules import check_directory
    from retroauth.storage import open_storage
    from retroauth.worklist import status_counts, worklist

    console.rule("[bold]retroauth demo")
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    storage = open_storage(settings.storage_url)
    console.print(f"1. database ready at {settings.database_url}, documents in {settings.storage_url}")

    payers = check_directory(settings.payer_rules_dir)
    console.print(f"2. payer rule library: {len(payers)} payers valid ({', '.join(p['id'] for p in payers)})")

    synthea = find_synthea(fixtures)
    started, t0 = utcnow(), time.perf_counter()
    summary = import_fhir(engine, storage, synthea, default_payer=DEMO_PAYER, coverage_csv=SYNTHEA_COVERAGE)
    record_import(engine, "fhir", str(synthea), summary, started)
    counts = Table("resource", "read", "inserted", "unchanged", "errors",
                   title=f"3. imported the Synthea FHIR export ({time.perf_counter() - t0:.1f} s)")
    for name, c in sorted(summary.counts.items()):
        counts.add_row(name, str(c.read), str(c.inserted), str(c.unchanged), str(c.errors))
    console.print(counts)

    from flows.daily_sweep import daily_sweep

    t0 = time.perf_counter()
    result = daily_sweep(as_of=SYNTHEA_AS_OF, lookback_days=SYNTHEA_LOOKBACK_DAYS)
    console.print(
        f"4. daily sweep as of {SYNTHEA_AS_OF:%Y-%m-%d} over {SYNTHEA_LOOKBACK_DAYS} days "
        f"({time.perf_counter() - t0:.1f} s, through Prefect): {result['encounters_scanned']} encounters, "
        f"{result['lines_uncovered']} services without authorization, {result['cases_created']} new cases, "
        f"{result['not_eligible']} not eligible"
    )

    from flows.assemble import assemble_documentation

    t0 = time.perf_counter()
    packets = assemble_documentation(as_of=SYNTHEA_AS_OF)
    waiting = "; ".join(f"case {c}: {', '.join(m)}" for c, m in sorted(packets["missing"].items())) or "none"
    console.print(f"5. documentation packets ({time.perf_counter() - t0:.1f} s, through Prefect): "
                  f"{packets['built']} built, {packets['ready']} ready, {packets['awaiting']} awaiting "
                  f"documentation ({waiting})")

    from flows.render import render_letters

    t0 = time.perf_counter()
    letters = render_letters(as_of=SYNTHEA_AS_OF)
    console.print(f"6. request letters ({time.perf_counter() - t0:.1f} s, through Prefect): {letters['rendered']} "
                  f"rendered (HTML and PDF), {letters['moved']} cases now letter_rendered"
                  + (f", failed: {letters['failed']}" if letters["failed"] else ""))
    for case_id in list(letters["letters"])[:5]:
        console.print(f"   case {case_id}: [bold].venv/bin/retroauth letter {case_id} --out case-{case_id}.pdf[/]")

    submit_and_follow_up(engine, console, sorted(int(c) for c in letters["letters"]))

    # A generated day at hospital scale, swept as of now: the live worklist.
    from datetime import timedelta, timezone

    from retroauth.generate import generate
    from retroauth.rules import load_rule_library

    now = datetime.now(timezone.utc)
    yesterday = (now.astimezone(ZoneInfo(settings.facility_timezone)) - timedelta(days=1)).date()
    t0 = time.perf_counter()
    gen = generate(engine, load_rule_library(settings.payer_rules_dir), encounters=DEMO_DAY_ENCOUNTERS, seed=1,
                   days=1, end=yesterday, documents=True, storage=storage)
    console.print(f"10. generated yesterday ({yesterday}) at hospital scale ({time.perf_counter() - t0:.1f} s): "
                  f"{gen.encounters:,} encounters, {gen.service_lines:,} services, {gen.auth_required_lines:,} "
                  f"needing authorization, {gen.unauthorized_lines:,} without one"
                  + (" (already there from an earlier demo)" if gen.skipped else ""))
    t0 = time.perf_counter()
    result = daily_sweep(as_of=now)
    packets = assemble_documentation(as_of=now)
    console.print(f"11. today's sweep and packets ({time.perf_counter() - t0:.1f} s, through Prefect): "
                  f"{result['cases_created']} new cases, {result['not_eligible']} not eligible, "
                  f"{result['expired']} expired; {packets['built']} packets built, {packets['ready']} ready, "
                  f"{packets['awaiting']} awaiting documentation")

    states = Table("status", "cases", title="Cases by status")
    for status, n in status_counts(engine).items():
        states.add_row(status, str(n))
    console.print(states)

    rows = worklist(engine, states=["identified", "awaiting_documentation", "ready"], limit=15)
    wl = Table("case", "status", "payer", "reason", "due", "at risk", "priority",
               title="Worklist: most urgent first (retroauth cases)")
    for r in rows:
        wl.add_row(str(r.id), r.status, r.payer_id, r.reason or "", f"{r.due_at:%Y-%m-%d %H:%M} UTC" if r.due_at else "-",
                   f"${r.amount_at_risk:,.2f}", str(r.priority))
    console.print(wl)
    console.print("Next: [bold].venv/bin/retroauth cases[/] and [bold].venv/bin/retroauth case show ID[/]")


def submit_and_follow_up(engine, console: Console, case_ids: list[int]) -> None:  # noqa: ANN001 - an Engine
    """Steps 7-9: submit the letters to the simulated payer, then follow up now and two weeks later."""
    from datetime import timedelta, timezone

    from flows.follow_ups import follow_ups
    from flows.submit import submit_requests
    from retroauth.outbox import idempotency_key
    from retroauth.payer_sim import run_simulator

    # The simulated payer decides by submission: the first case approved at once, the second denied (its
    # appeal approved), the rest pended for review and still open two weeks later.
    rules = [{"match": {"key_prefix": idempotency_key(case_ids[1], 1)}, "action": "deny", "reasons": ["T1"],
              "appeal": "approve"}] if len(case_ids) > 1 else []
    if len(case_ids) > 2:
        rules.append({"match": {"key_prefix": [idempotency_key(c, 1) for c in case_ids[2:]]}, "action": "pend",
                      "inquiries": 99})
    try:
        server, _ = run_simulator({"token": SIM_TOKEN, "rules": rules}, port=SIM_PORT)
    except OSError:
        raise SystemExit(f"port {SIM_PORT} is in use: stop what runs there (another `retroauth payer-sim`?) "
                         "and run the demo again") from None
    try:
        t0 = time.perf_counter()
        sent = submit_requests()
        console.print(f"7. submitted by Da Vinci PAS to the payer simulator at {server.url} "
                      f"({time.perf_counter() - t0:.1f} s, through Prefect): {sent['sent']} sent, answers "
                      f"{_answers(Counter(sent['decided'].values()))}")
        t0 = time.perf_counter()
        now = follow_ups()
        console.print(f"8. follow-ups now ({time.perf_counter() - t0:.1f} s): {len(now['appeals_opened'])} appeal "
                      f"opened for the denial, {now['appeals_filed']} filed with its letter, answer "
                      f"{_answers(now['appeal_decisions'])}")
        later = datetime.now(timezone.utc) + timedelta(days=15)
        t0 = time.perf_counter()
        then = follow_ups(as_of=later)
        console.print(f"9. follow-ups two weeks later, as of {later:%Y-%m-%d} ({time.perf_counter() - t0:.1f} s): "
                      f"{then['asked']} status inquiries, answers {_answers(then['decisions'])}; "
                      f"{len(then['escalated'])} escalated past the payer's review SLA")
        stats = server.stats()
    finally:
        server.stop()
    _submitted_table(engine, console, case_ids, stats)


def _answers(counts: dict[str, int]) -> str:
    """{"A1": 2, "A4": 1} as words: "2 approved, 1 pended"."""
    words = {"A1": "approved", "A3": "denied", "A4": "pended"}
    return ", ".join(f"{n} {words.get(code, code)}" for code, n in sorted(counts.items())) or "none yet"


def _submitted_table(engine, console: Console, case_ids: list[int], stats: dict) -> None:  # noqa: ANN001
    from retroauth.worklist import case_detail

    table = Table("case", "status", "submissions", "appeal", "authorization", "escalated",
                  title="Submitted cases (payer simulator: "
                        f"{sum(stats['submissions'].values())} submissions, {sum(stats['repeats'].values())} repeats)")
    for cid in case_ids:
        d = case_detail(engine, cid)
        appeal = ", ".join(f"level {a['level']} {a['status']}" for a in d["appeals"]) or "-"
        auths = [e["details"].get("authorization_id") for e in d["events"] if e["details"]]
        table.add_row(str(cid), d["case"]["status"], ", ".join(f"{s['kind']} {s['status']}" for s in d["submissions"]),
                      appeal, "on file" if any(auths) else "-", "yes" if d["case"]["escalated_at"] else "-")
    console.print(table)
    console.print("   the whole story of a case: [bold].venv/bin/retroauth case show ID[/]")
