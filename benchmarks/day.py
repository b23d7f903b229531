"""A whole day through Prefect against the same domain calls made directly, on identical copies of the same data.

    .venv/bin/python benchmarks/day.py [--encounters 360000] [--days 1] [--rounds 1] [--json var/bench/day.json]

What it does:

1. The data (built once, cached under benchmarks/.data/day-...): a template database of generated encounters
   (the generator's realistic mix: about one encounter in 180 ends up as a case a payer accepts a retro
   request for, so 360,000 encounters, about a million service lines, give about 2,000 such cases).
   Generated notes cover few of the documents payers ask for, so most packets would wait for documents.
   To make the cases go all the way, a scratch copy is swept and its packets assembled to learn what
   each case lacks, and those documents are added to the TEMPLATE (clinical_documents rows linked to the
   case's encounter, and their placeholder bodies in the template's storage, written in bulk).
2. A real Prefect server on a free local port (``prefect server start``, SQLite under a temp PREFECT_HOME,
   telemetry off), with deployments/setup.py applied (pool, queues, the per-payer send limits).
3. Per round, two identical copies of the template (database and storage), each run in a fresh process:
   - direct: the domain functions called straight: ``sweep`` (and the sweep's report) -> ``assemble`` in
     batches of 200 -> ``render_letters`` in batches of 100 (threads per batch as the task uses) ->
     ``enqueue`` and ``send_pending`` in batches of 100 (per payer, at most RETROAUTH_PAYER_API_CONCURRENCY
     send batches at a time, as the payer limit allows) -> the day's counts and worklist. The batches of
     a step run at the same time in threads, as Prefect's default task runner runs them.
   - prefect: the real ``daily_run`` flow called in-process against the server (subflows, task runs,
     persisted results, artifacts, the payer concurrency limits).
   Timed: the day itself (imports and process start are reported apart).
4. Both copies must end with the same status for every case (by encounter and payer), the same
   submissions and the same outbound files (packet PDFs, X12 278 files) in their storage.

Reported: both times, Prefect's share of the day ((t_prefect - t_direct) / t_prefect, target <= 15%),
per-step times, CPU seconds of each process and of the Prefect server, and the load average. The machine
may be shared: read the ratio and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Recorder, load, tree_cpu  # noqa: E402

CHI = ZoneInfo("America/Chicago")
END = date(2026, 11, 26)  # the generated day(s) end here
AS_OF = datetime(2026, 11, 27, 6, 0, tzinfo=CHI)  # the next morning's daily run
SEED = 11
# The flows' own batch sizes (checked against flows/*.py before the run), and the tasks' retries
# (tasks/*.py: retries, exponential backoff factor in seconds), which the direct path applies to its batches too.
ASSEMBLE_BATCH, RENDER_BATCH, SUBMIT_BATCH = 200, 100, 100
RETRIES = {"assemble": (4, 5), "render": (3, 5), "enqueue": (3, 5), "send": (4, 10)}
BENCH_SOURCE = "bench-day"
OPEN_WORK = ["identified", "awaiting_documentation", "ready", "letter_rendered", "submitting"]  # tasks/day.py


# --- the data ----------------------------------------------------------------------------------------------


def _checkpoint(db: Path) -> None:
    """Fold the WAL into the database file, so that a file copy is the whole database."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _write_plain(root: Path, key: str, data: bytes) -> None:
    """A storage object written as LocalStorage lays it out (root/key, owner-only), without a per-file fsync."""
    path = root / key
    for d in reversed([path.parent, *path.parent.parents]):
        if d.is_relative_to(root) and d != root and not d.exists():
            d.mkdir(mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _placeholder(source_id: str, loinc: str, title: str | None) -> bytes:
    from retroauth.generate import _body  # the generator's own placeholder, so its rows' sha256 match

    return _body(source_id, loinc, title)


def build_template(folder: Path, encounters: int, days: int) -> dict:
    import sqlalchemy as sa

    from config import PAYERS_DIR
    from retroauth.db import make_engine, migrate
    from retroauth.documents import (
        ADMINISTRATIVE_NOTE, EVIDENCE_DOCUMENTS, LABELS, assemble, cases_needing_packets, is_loinc,
    )
    from retroauth.generate import generate
    from retroauth.models import ClinicalDocument, Encounter, RetroCase
    from retroauth.rules import load_rule_library
    from retroauth.storage import LocalStorage, sha256_hex
    from retroauth.sweep import sweep

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    template, store = folder / "template.db", folder / "storage"
    store.mkdir(mode=0o700)
    url = f"sqlite:///{template}"
    migrate(url)
    engine = make_engine(url)
    library = load_rule_library(PAYERS_DIR)
    t0 = time.perf_counter()
    g = generate(engine, library, encounters=encounters, seed=SEED, days=days, end=END)
    print(f"generated {g.encounters:,} encounters, {g.service_lines:,} service lines in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    engine.dispose()
    _checkpoint(template)

    # A scratch copy, swept: which patients have cases (their notes need bodies), then what each packet lacks.
    scratch = folder / "scratch"
    scratch.mkdir()
    shutil.copy(template, scratch / "retroauth.db")
    s_engine = make_engine(f"sqlite:///{scratch / 'retroauth.db'}")
    t0 = time.perf_counter()
    swept = sweep(s_engine, library, as_of=AS_OF, lookback_days=30)
    print(f"scratch sweep: {swept.cases_created:,} cases ({swept.not_eligible:,} not eligible) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    docs = ClinicalDocument.__table__
    with s_engine.connect() as conn:
        patients = sa.select(Encounter.patient_id).join(RetroCase, RetroCase.encounter_id == Encounter.id)
        rows = conn.execute(sa.select(docs.c.source_id, docs.c.loinc_type, docs.c.title, docs.c.storage_key,
                                      docs.c.sha256).where(docs.c.patient_id.in_(patients))).all()
    for r in rows:
        body = _placeholder(r.source_id, r.loinc_type, r.title)
        assert sha256_hex(body) == r.sha256, "the generator's placeholder changed"
        _write_plain(store, r.storage_key, body)
    shutil.copytree(store, scratch / "storage")
    ids = cases_needing_packets(s_engine)
    t0 = time.perf_counter()
    missing: dict[int, list[str]] = {}
    s_store = LocalStorage(scratch / "storage")
    for i in range(0, len(ids), ASSEMBLE_BATCH):
        r = assemble(s_engine, s_store, library, ids[i:i + ASSEMBLE_BATCH], as_of=AS_OF)
        missing.update(r.missing)
    print(f"scratch packets: {len(ids):,} cases, {len(missing):,} lacking documents "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    with s_engine.connect() as conn:
        where = {cid: row for cid, *row in conn.execute(
            sa.select(RetroCase.id, RetroCase.encounter_id, Encounter.patient_id, Encounter.admitted_at)
            .join(Encounter, Encounter.id == RetroCase.encounter_id).where(RetroCase.id.in_(list(missing))))}
    s_engine.dispose()
    shutil.rmtree(scratch)

    # The missing documents, into the template: one note per missing type, linked to the case's encounter.
    added, left = [], {}
    n = 0
    for cid, codes in sorted(missing.items()):
        encounter_id, patient_id, admitted_at = where[cid]
        authored = min(admitted_at + timedelta(hours=2), AS_OF - timedelta(minutes=5))
        for code in codes:
            if is_loinc(code):
                loinc, title = code, LABELS.get(code, f"LOINC {code}")
            elif code in EVIDENCE_DOCUMENTS:
                loinc, title = ADMINISTRATIVE_NOTE, EVIDENCE_DOCUMENTS[code].title_words[0].capitalize() + " record"
            else:  # generated evidence whose facts are not in the data (an outage record): it stays missing
                left[code] = left.get(code, 0) + 1
                continue
            n += 1
            source_id = f"bd{n}"
            body = _placeholder(source_id, loinc, title)
            k = f"documents/{patient_id}/{BENCH_SOURCE}-{n}.txt"
            _write_plain(store, k, body)
            added.append(dict(source_system=BENCH_SOURCE, source_id=source_id, patient_id=patient_id,
                              encounter_id=encounter_id, loinc_type=loinc, title=title, author=None,
                              authored_at=authored, content_type="text/plain", storage_key=k,
                              sha256=sha256_hex(body), size_bytes=len(body)))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.insert(ClinicalDocument), added)
    engine.dispose()
    _checkpoint(template)
    os.sync()
    meta = {"encounters": g.encounters, "service_lines": g.service_lines, "days": days, "seed": SEED,
            "end": END.isoformat(), "as_of": AS_OF.isoformat(), "cases": swept.cases_created,
            "not_eligible": swept.not_eligible, "cases_for_packets": len(ids), "cases_lacking_documents": len(missing),
            "documents_added": len(added), "still_missing": left,
            "note_bodies_written": len(rows) + len(added)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --- the two ways to run the day (each in a child process) ----------------------------------------------


def _batches(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _cpu() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def flow_shape() -> int:
    """How the checkout's flows hand out batches: 0 = all of a step's batches at once (``wait`` on them all);
    N = claimed batch by batch from the database (retroauth.claims), N in flight (flows/batches.py)."""
    import re

    batches = ROOT / "flows" / "batches.py"
    if not batches.exists():
        return 0
    m = re.search(r"^IN_FLIGHT = (\d+)", batches.read_text(), re.M)
    return int(m.group(1)) if m else 0


def child_direct(work: Path, sequential: bool) -> dict:
    t_start = time.perf_counter()
    import uuid

    in_flight = flow_shape()
    claim_round = f"bench-direct-{uuid.uuid4().hex[:12]}"
    import threading
    from collections import Counter

    from config.settings import load_settings
    from retroauth.cases import Actor
    from retroauth.db import make_engine
    from retroauth.documents import assemble, cases_needing_packets
    from retroauth.documents import merge_results as merge_packets
    from retroauth.letters import cases_to_render, letter_templates, render_letters, templates_dir_of
    from retroauth.letters import merge_results as merge_letters
    from retroauth.outbox import SendSummary, cases_to_enqueue, enqueue, pending_submissions, send_pending
    from retroauth.rules import load_rule_library
    from retroauth.storage import open_storage
    from retroauth.sweep import sweep
    from retroauth.worklist import status_counts, submissions_by_payer, sweep_report, worklist

    settings = load_settings()  # RETROAUTH_* of this copy, from the environment
    imported = time.perf_counter() - t_start
    cpu0, t0 = _cpu(), time.perf_counter()
    engine = make_engine(settings.database_url)
    storage = open_storage(settings.storage_url)
    library = load_rule_library(settings.payer_rules_dir)
    templates = letter_templates(templates_dir_of(settings))
    actor = Actor(run_id=None, name="bench:direct")
    workers = max(1, min(8, os.cpu_count() or 1))  # tasks/letters.py render_workers()
    payer_slots: dict[str, threading.Semaphore] = {}
    slots_lock = threading.Lock()

    retried: dict[str, int] = {}

    def retrying(step: str, fn):  # noqa: ANN001, ANN202
        """A batch retried as its task is (tasks/*.py: retries, exponential backoff, jitter 0.5): on an error,
        or when the batch reports failed cases (the task raises for those)."""
        import random

        retries, factor = RETRIES[step]

        def run(batch: list[int]) -> dict:
            for attempt in range(retries + 1):
                try:
                    out = fn(batch)
                    if out.get("failed"):
                        raise RuntimeError(f"{len(out['failed'])} failed in the batch")
                    return out
                except Exception:
                    if attempt == retries:
                        raise
                    with slots_lock:
                        retried[step] = retried.get(step, 0) + 1
                    time.sleep(factor * 2 ** attempt * random.uniform(0.5, 1.5))
            raise AssertionError("unreachable")

        return run

    def run_all(fn, batches):  # noqa: ANN001, ANN202 - all of a step's batches at once, as each_batch does
        if sequential or len(batches) < 2:
            return [fn(b) for b in batches]
        with ThreadPoolExecutor(max_workers=len(batches)) as pool:
            futures = [pool.submit(fn, b) for b in batches]
            return [f.result() for f in futures]

    def run_claimed(step: str, size: int, fn):  # noqa: ANN001, ANN202 - flows/batches.py claimed_batches
        from concurrent.futures import FIRST_COMPLETED, wait

        from retroauth import claims

        owner = "bench-direct"
        out, running, done_ids = [], {}, []
        width = 1 if sequential else in_flight
        with ThreadPoolExecutor(max_workers=width) as pool:
            while True:
                while len(running) < width:
                    ids, done_ids = claims.claim(engine, step, owner=owner, round_id=claim_round, limit=size,
                                                 handing_back=done_ids), []
                    if not ids:
                        break
                    running[pool.submit(fn, ids)] = ids
                if not running:
                    return out
                done = next(iter(wait(list(running), return_when=FIRST_COMPLETED).done))
                done_ids = running.pop(done)
                out.append(done.result())

    def send_batch(ids: list[int]) -> dict:
        summary = SendSummary()
        for payer_id, sids in submissions_by_payer(engine, ids).items():
            with slots_lock:
                slot = payer_slots.setdefault(payer_id, threading.Semaphore(settings.payer_api_concurrency))
            with slot:
                part = send_pending(engine, storage, library, settings, actor=actor, submission_ids=sids)
            summary.sent += part.sent
            summary.refused.update(part.refused)
            summary.failed.update(part.failed)
            summary.decided.update(part.decided)
        return summary.as_dict()

    steps: dict[str, float] = {}
    t = time.perf_counter()
    swept = sweep(engine, library, as_of=AS_OF, lookback_days=settings.sweep_lookback_days, actor=actor)
    sweep_report(engine, swept.case_ids, AS_OF)
    steps["sweep"] = time.perf_counter() - t

    one_assemble = retrying("assemble", lambda b: assemble(engine, storage, library, b, actor=actor,
                                                           as_of=AS_OF).as_dict())
    one_render = retrying("render", lambda b: render_letters(engine, storage, settings, library, b,
                                                             templates=templates, as_of=AS_OF, actor=actor,
                                                             workers=workers).as_dict())
    one_enqueue = retrying("enqueue", lambda b: enqueue(engine, b, library=library, actor=actor).as_dict())
    one_send = retrying("send", send_batch)

    t = time.perf_counter()
    if in_flight:
        packets = merge_packets(run_claimed("assemble", ASSEMBLE_BATCH, one_assemble))
    else:
        packets = merge_packets(run_all(one_assemble, _batches(cases_needing_packets(engine), ASSEMBLE_BATCH)))
    steps["assemble"] = time.perf_counter() - t

    t = time.perf_counter()
    if in_flight:
        letters = merge_letters(run_claimed("render", RENDER_BATCH, one_render))
    else:
        letters = merge_letters(run_all(one_render, _batches(cases_to_render(engine), RENDER_BATCH)))
    steps["render"] = time.perf_counter() - t

    t = time.perf_counter()
    queued = run_all(one_enqueue, _batches(cases_to_enqueue(engine), SUBMIT_BATCH))
    if in_flight:
        sent = run_claimed("send", SUBMIT_BATCH, one_send)
    else:
        sent = run_all(one_send, _batches(pending_submissions(engine, None), SUBMIT_BATCH))
    steps["submit"] = time.perf_counter() - t

    t = time.perf_counter()
    counts = status_counts(engine)
    worklist(engine, states=OPEN_WORK, limit=20)
    steps["report"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    return {
        "seconds": total, "cpu_seconds": _cpu() - cpu0, "import_seconds": imported, "steps": steps,
        "batches_retried": retried,
        "mode": ("one batch at a time" if sequential else
                 f"claimed batches, {in_flight} in flight (threads)" if in_flight else
                 "all batches of a step at once (threads)"),
        "summary": {
            "sweep": {"cases_created": swept.cases_created, "not_eligible": swept.not_eligible},
            "assemble": {k: packets[k] for k in ("built", "ready", "awaiting", "stale")} | {"failed": len(packets["failed"])},
            "render": {k: letters[k] for k in ("rendered", "moved")} | {"failed": len(letters["failed"])},
            "submit": {"enqueued": sum(q["enqueued"] for q in queued), "sent": sum(s["sent"] for s in sent),
                       "refused": sum(len(s["refused"]) for s in sent), "failed": sum(len(s["failed"]) for s in sent),
                       "decided": dict(Counter(v for s in sent for v in s["decided"].values()))},
            "statuses": counts,
        },
    }


def child_prefect(work: Path) -> dict:
    t_start = time.perf_counter()
    from flows.daily_run import daily_run

    imported = time.perf_counter() - t_start
    cpu0, t0 = _cpu(), time.perf_counter()
    state = daily_run(as_of=AS_OF, return_state=True)
    total = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    out = {"seconds": total, "cpu_seconds": cpu, "import_seconds": imported, "state": state.type.value,
           "flow_run_id": str(state.state_details.flow_run_id)}
    if state.is_completed():
        r = state.result()
        out["summary"] = {
            "sweep": {k: r["sweep"][k] for k in ("cases_created", "not_eligible")},
            "assemble": {k: r["assemble"][k] for k in ("built", "ready", "awaiting", "stale")}
            | {"failed": len(r["assemble"]["failed"])},
            "render": {k: r["render"][k] for k in ("rendered", "moved")} | {"failed": len(r["render"]["failed"])},
            "submit": {"enqueued": r["submit"]["enqueued"], "sent": r["submit"]["sent"],
                       "refused": len(r["submit"]["refused"])},
            "statuses": r["statuses"],
        }
    return out


# --- the parent: server, copies, children, checks ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_template(folder: Path, dest: Path) -> None:
    from retroauth.db import migrate

    dest.mkdir(parents=True)
    shutil.copy(folder / "template.db", dest / "retroauth.db")
    migrate(f"sqlite:///{dest / 'retroauth.db'}")  # a template cached before a newer migration: up to date
    shutil.copytree(folder / "storage", dest / "storage")
    (dest / "results").mkdir()


def child_env(base: dict[str, str], work: Path) -> dict[str, str]:
    return {**base,
            "RETROAUTH_DATABASE_URL": f"sqlite:///{work / 'retroauth.db'}",
            "RETROAUTH_STORAGE_URL": f"file://{work / 'storage'}",
            "RETROAUTH_RESULTS_DIR": str(work / "results"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(work / "results")}


def run_child(mode: str, work: Path, env: dict[str, str], server_pid: int | None, log: Path, timeout: float) -> dict:
    os.sync()  # the copies' dirty pages written out before the clock starts, for both alike
    load0, server0 = load(), tree_cpu(server_pid) if server_pid else 0.0
    wall0 = time.perf_counter()
    with open(log, "ab") as err:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, str(work)], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=err, timeout=timeout)
        except subprocess.TimeoutExpired:
            sys.exit(f"the {mode} run did not finish within {timeout:.0f} s (stopped); see {log}")
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"the {mode} run failed (exit {proc.returncode}); the end of its log ({log}):\n{tail}")
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - wall0
    out["load_before"], out["load_after"] = load0, load()
    if server_pid:
        out["server_cpu_seconds"] = tree_cpu(server_pid) - server0
    return out


def end_state(work: Path) -> dict:
    """What the day left behind: every case's status by (encounter, payer), the submissions, the outbound files."""
    with sqlite3.connect(work / "retroauth.db") as conn:
        cases = {f"{e}/{p}": s for e, p, s in conn.execute("select encounter_id, payer_id, status from retro_cases")}
        subs = dict(((f"{c}/{st}", n) for c, st, n in conn.execute(
            "select channel, status, count(*) from submissions group by 1, 2")))
        letters = conn.execute("select count(*) from letters").fetchone()[0]
    files: dict[str, int] = {}
    out = work / "storage" / "outbound"
    for p in out.rglob("*") if out.exists() else []:
        if p.is_file() and not p.name.startswith(".tmp-"):
            kind = p.relative_to(out).parts[0]
            files[kind] = files.get(kind, 0) + 1
    return {"cases": cases, "submissions": subs, "letters": letters, "outbound_files": files}


def prefect_runs(flow_run_id: str) -> dict:
    """The daily run's flow runs and task runs on the server: states, counts, each step's duration."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def secs(r) -> float | None:  # noqa: ANN001
        return (r.end_time - r.start_time).total_seconds() if r.end_time and r.start_time else None

    with get_client(sync_client=True) as client:
        top = client.read_flow_run(UUID(flow_run_id))
        flows = {f.id: f.name for f in client.read_flows()}
        # Its subflows: the runs that started while it ran (the server runs nothing else meanwhile).
        subs = [r for r in client.read_flow_runs(limit=200)
                if r.id != top.id and r.start_time and top.start_time <= r.start_time <= top.end_time]
        ids = [top.id, *(r.id for r in subs)]
        tasks, offset = [], 0
        while True:
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                         limit=200, offset=offset)
            tasks += page
            offset += len(page)
            if len(page) < 200:
                break
    states: dict[str, int] = {}
    retried: dict[str, int] = {}
    for t in tasks:
        k = t.state.type.value if t.state else "none"
        states[k] = states.get(k, 0) + 1
        if (t.run_count or 0) > 1:
            name = t.task_key.rsplit("-", 1)[0] if t.task_key else t.name
            retried[name] = retried.get(name, 0) + t.run_count - 1
    return {"retried": retried,"state": top.state.type.value if top.state else None, "seconds": secs(top),
            "subflows": {flows.get(r.flow_id, str(r.flow_id)): {"state": r.state.type.value if r.state else None,
                                                                "seconds": secs(r)} for r in subs},
            "task_runs": len(tasks), "task_run_states": states}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encounters", type=int, default=360_000, help="generated encounters (about 1 case in 180)")
    ap.add_argument("--days", type=int, default=1, help="days the encounters are spread over, ending the day before")
    ap.add_argument("--rounds", type=int, default=1, help="direct and Prefect runs, alternating their order")
    ap.add_argument("--sequential-too", action="store_true",
                    help="also time the direct path with its batches one after another")
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".data")
    ap.add_argument("--json", type=Path, help="write the results here (for benchmarks/report.py)")
    ap.add_argument("--note", help="a remark for BENCHMARKS.md (kept in the JSON)")
    ap.add_argument("--timeout", type=float, default=3600, help="stop a run that takes longer (seconds)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (copies, logs)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, work = args.child[0], Path(args.child[1])
        out = child_prefect(work) if mode == "prefect" else child_direct(work, sequential=mode == "sequential")
        print(json.dumps(out, default=str))
        return

    rec = Recorder("day", note=args.note)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped (SIGTERM)"))  # so that the finally blocks run
    folder = args.data / f"day-e{args.encounters}-d{args.days}-s{SEED}"
    if not (folder / "meta.json").exists():
        t0 = time.perf_counter()
        meta = build_template(folder, args.encounters, args.days)
        print(f"built the template in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    meta = json.loads((folder / "meta.json").read_text())
    print(f"template: {meta['encounters']:,} encounters, {meta['service_lines']:,} service lines; "
          f"{meta['cases']:,} cases of which {meta['cases_for_packets']:,} eligible; "
          f"{meta['documents_added']:,} documents added", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="retroauth-day-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {**os.environ,
            "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RETROAUTH_DATABASE_URL": f"sqlite:///{tmp / 'setup.db'}"}
    os.environ.update(base)  # before Prefect is imported here (setup, checks)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=base)
    results: dict = {"template": meta, "as_of": AS_OF.isoformat(), "rounds": []}
    try:
        from retroauth.cli_ops import healthy

        t0 = time.perf_counter()
        while not healthy(api):
            if server.poll() is not None or time.perf_counter() - t0 > 180:
                sys.exit(f"the Prefect server did not start; see {tmp / 'server.log'}")
            time.sleep(0.3)
        print(f"Prefect server up in {time.perf_counter() - t0:.1f} s on port {port}", file=sys.stderr)
        check_batch_sizes()
        from config.settings import load_settings
        from retroauth.cli_ops import load_setup_module

        report = load_setup_module().setup(load_settings())
        print(f"applied deployments/setup.py: {len(report.limits)} payer limits, "
              f"{len(report.deployments)} deployments", file=sys.stderr)
        results["payer_api_concurrency"] = load_settings().payer_api_concurrency

        for r in range(args.rounds):
            order = ["direct", "prefect"] if r % 2 == 0 else ["prefect", "direct"]
            if args.sequential_too:
                order.append("sequential")
            rnd: dict = {"order": order}
            for mode in order:
                work = tmp / f"r{r}-{mode}"
                copy_template(folder, work)
                print(f"round {r + 1}: {mode} ...", file=sys.stderr)
                out = run_child(mode, work, child_env(base, work), server.pid, tmp / f"r{r}-{mode}.log",
                                args.timeout)
                out["end_state"] = end_state(work)
                if mode == "prefect":
                    out["server"] = prefect_runs(out["flow_run_id"])
                print(f"round {r + 1}: {mode} {out['seconds']:.1f} s (CPU {out['cpu_seconds']:.1f} s, load "
                      f"{out['load_before'][0]} -> {out['load_after'][0]})", file=sys.stderr)
                rnd[mode] = out
                shutil.rmtree(work, ignore_errors=True) if not args.keep else None
            d, p = rnd["direct"], rnd["prefect"]
            rnd["same_end_state"] = {
                "case_statuses": d["end_state"]["cases"] == p["end_state"]["cases"],
                "submissions": d["end_state"]["submissions"] == p["end_state"]["submissions"],
                "letters": d["end_state"]["letters"] == p["end_state"]["letters"],
                "outbound_files": d["end_state"]["outbound_files"] == p["end_state"]["outbound_files"],
            }
            rnd["prefect_share"] = (p["seconds"] - d["seconds"]) / p["seconds"]
            results["rounds"].append(rnd)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)

    summarize(results)
    for rnd in results["rounds"]:  # the per-case map is for the check only: too long for the JSON
        for mode in rnd["order"]:
            es = rnd[mode]["end_state"]
            es["case_status_counts"] = _count(es.pop("cases").values())
    rec.write(args.json, results)


def _count(values) -> dict[str, int]:  # noqa: ANN001
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def check_batch_sizes() -> None:
    import inspect

    from flows.assemble import assemble_documentation
    from flows.render import render_letters
    from flows.submit import submit_requests

    for f, size in ((assemble_documentation, ASSEMBLE_BATCH), (render_letters, RENDER_BATCH),
                    (submit_requests, SUBMIT_BATCH)):
        default = inspect.signature(f.fn).parameters["batch_size"].default
        if default != size:
            sys.exit(f"{f.name} batches {default} cases now; update the batch sizes in {__file__}")
    from tasks.documents import assemble_batch
    from tasks.letters import render_batch
    from tasks.submit import enqueue_batch, send_batch

    for t, step in ((assemble_batch, "assemble"), (render_batch, "render"), (enqueue_batch, "enqueue"),
                    (send_batch, "send")):
        delays = t.retry_delay_seconds if isinstance(t.retry_delay_seconds, list) else [t.retry_delay_seconds]
        if (t.retries, delays[0] if delays else 0) != RETRIES[step]:
            sys.exit(f"task {t.name} retries {t.retries} times after {delays} s now; update RETRIES in {__file__}")


def summarize(results: dict) -> None:
    shares = []
    for i, rnd in enumerate(results["rounds"], 1):
        d, p = rnd["direct"], rnd["prefect"]
        shares.append(rnd["prefect_share"])
        print(f"\nround {i} (order: {', '.join(rnd['order'])})")
        print(f"{'step':10s} {'direct s':>9s} {'Prefect s':>10s}")
        sub = p.get("server", {}).get("subflows", {})
        names = {"sweep": "daily-sweep", "assemble": "assemble-documentation", "render": "render-letters",
                 "submit": "submit-requests"}
        for step, secs in d["steps"].items():
            ps = (sub.get(names.get(step, ""), {}) or {}).get("seconds")
            print(f"{step:10s} {secs:9.1f} {ps if ps is not None else float('nan'):10.1f}")
        print(f"{'the day':10s} {d['seconds']:9.1f} {p['seconds']:10.1f}   (CPU: direct {d['cpu_seconds']:.0f} s, "
              f"Prefect {p['cpu_seconds']:.0f} s + server {p.get('server_cpu_seconds', 0):.0f} s)")
        if "sequential" in rnd:
            print(f"direct with sequential batches: {rnd['sequential']['seconds']:.1f} s")
        print(f"cases: {d['summary']['statuses']}")
        print(f"Prefect: {p['server']['task_runs']} task runs {p['server']['task_run_states']}, "
              f"flow run {p['server']['state']}; task retries {p['server'].get('retried') or 'none'}; "
              f"direct batch retries {d.get('batches_retried') or 'none'}")
        print(f"same end state: {rnd['same_end_state']}")
        print(f"Prefect's share of the day: {rnd['prefect_share'] * 100:.1f}% (target <= 15%); load "
              f"{d['load_before'][0]}-{p['load_after'][0]}")
    results["prefect_share"] = sorted(shares)[len(shares) // 2]


if __name__ == "__main__":
    main()
