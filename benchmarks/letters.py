"""Letters per second through the product's batch path, against the bare engines on the same documents.

    .venv/bin/python benchmarks/letters.py [--rounds 6] [--batch-size N] [--in-flight K] [--workers 2]
                                           [--database-url URL] [--alternatives] [--json var/bench/letters.json]

What it does, in one run on a fresh database (SQLite in a temp dir unless --database-url is given):

1. Generates ready cases straight into the database (1-4 services, 1-3 diagnoses, a packet manifest,
   the five reasons in turn, several payers including one with template overrides): disjoint sets drawn
   alike for each side below (Typst memoizes within a process: documents compiled before would flatter
   whichever side compiles them second).
2. Product, PDF, as the render flow runs it: ``render_letters`` on batches of the flow's batch size
   (100), the flow's number of batches in flight (2) at once, each typeset on ``--workers`` threads,
   timed end to end: the set-based load, Jinja2 HTML, HTML -> Typst document, Typst PDF, hashes, storage
   writes, the letters rows, the state changes and audit events. Also one batch at a time, and the same
   letters again (all unchanged: nothing is written).
3. Bare Typst on the same documents: the JSON the product hands Typst for the very letters of each
   product side, compiled with the same number of threads in a separate, warmed-up process, nothing else
   (a separate process: its memo is not the product's). Overhead = product time / bare time on the same
   documents, in wall-clock and in CPU seconds (target <= 1.2), in total and per round.
4. The HTML -> PDF engine alone (convert + Typst) on other cases; the batch path's HTML half (load +
   Jinja2 + data hash) against bare Jinja2 rendering the same templates with the same contexts.
5. Threads against processes (spawn) for the render step, and a determinism check (same input, same bytes).
6. ``--alternatives``: WeasyPrint and fpdf2 (``write_html``) on the same HTML, single-threaded, when installed.

The sides alternate in rounds (their order turned round every other round) because the machine may be
shared and its load drifts: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Recorder  # noqa: E402
from config import PAYERS_DIR  # noqa: E402
from config.settings import load_settings  # noqa: E402
from retroauth.db import make_engine, migrate, session_scope  # noqa: E402
from retroauth.letters import (  # noqa: E402
    LetterRequest, letter_date_of, letter_templates, load_letter_data, merge_results, render_all, render_letters,
)
from retroauth.models import (  # noqa: E402
    CaseServiceLine, Coverage, Diagnosis, Encounter, Packet, Patient, RetroCase, ServiceLine,
)
from retroauth.rules import load_rule_library  # noqa: E402
from retroauth.storage import LocalStorage  # noqa: E402
from retroauth import typeset  # noqa: E402
from retroauth.typeset import to_document  # noqa: E402
from retroauth.vocab import DELAY_REASON_CODES, CaseStatus, MissReason  # noqa: E402

CHI = ZoneInfo("America/Chicago")
AS_OF = datetime(2026, 11, 20, 9, tzinfo=CHI)
PAYERS = ["priority-health", "hometown-health", "emblemhealth", "uhc-commercial", "synthea-demo-health"]
GIVEN = ["Avery", "Blake", "Casey", "Devon", "Emery", "Finley", "Harper", "Jordan", "Kendall", "Morgan"]
FAMILY = ["Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir", "Hawthorn", "Juniper", "Larch", "Maple"]
CODES = [("70551", "MRI brain without contrast", "1850.00"), ("74177", "CT abdomen and pelvis with contrast", "1200.00"),
         ("72148", "MRI lumbar spine without contrast", "1600.00"), ("95810", "Polysomnography, 4 or more parameters", "2100.00"),
         ("27447", "Total knee arthroplasty", "24000.00"), ("81162", "BRCA1/BRCA2 gene analysis", "3400.00")]
DIAGNOSES = [("G44.309", "Post-traumatic headache, unspecified"), ("R10.9", "Unspecified abdominal pain"),
             ("M54.50", "Low back pain, unspecified"), ("G47.33", "Obstructive sleep apnea"),
             ("M17.11", "Unilateral primary osteoarthritis, right knee")]
ITEMS = [("case_summary", "Case summary"), ("medical_necessity", "Medical necessity statement"),
         ("34117-2", "History and physical note"), ("34111-5", "Emergency department note"),
         ("18748-4", "Diagnostic imaging study"), ("coverage_discovery_timeline", "Coverage discovery timeline")]


def generate(engine, n: int, seed: int = 7) -> list[int]:
    rnd = random.Random(seed)
    reasons = list(MissReason)
    ids = []
    with session_scope(engine) as s:
        for i in range(n):
            reason = reasons[i % len(reasons)]
            payer = PAYERS[i % len(PAYERS)]
            p = Patient(source_system="bench", source_id=f"p{i}", given_name=rnd.choice(GIVEN),
                        family_name=rnd.choice(FAMILY), birth_date=date(1940 + rnd.randrange(60), rnd.randrange(1, 13), 5),
                        mrn=f"MRN{i:07d}")
            s.add(p)
            s.flush()
            admitted = datetime(2026, 11, 1 + rnd.randrange(15), rnd.randrange(24), tzinfo=CHI)
            cov = Coverage(patient_id=p.id, payer_id=payer, member_id=f"BM{i:08d}",
                           effective_from=date(2026, 1, 1), discovered_at=admitted + timedelta(days=rnd.randrange(1, 9)),
                           discovery_method="eligibility_check")
            e = Encounter(source_system="bench", source_id=f"e{i}", patient_id=p.id,
                          encounter_class="emergency" if reason == MissReason.EMERGENCY else "outpatient",
                          admitted_at=admitted, timezone="America/Chicago", place_of_service="22",
                          system_issue_reference="INC-1" if reason == MissReason.SYSTEM_ISSUE else None)
            s.add_all([cov, e])
            s.flush()
            lines = []
            for k, (code, desc, charge) in enumerate(rnd.sample(CODES, rnd.randint(1, 4)), 1):
                lines.append(ServiceLine(encounter_id=e.id, line_number=k, code_system="CPT", code=code, description=desc,
                                         units=Decimal(rnd.randint(1, 2)), charge=Decimal(charge),
                                         service_date=(admitted + timedelta(days=k // 3)).date(), rendering_npi="1234567893"))
            s.add_all(lines)
            for r, (code, desc) in enumerate(rnd.sample(DIAGNOSES, rnd.randint(1, 3)), 1):
                s.add(Diagnosis(encounter_id=e.id, code_system="ICD10CM", code=code, description=desc, rank=r))
            c = RetroCase(encounter_id=e.id, payer_id=payer, coverage_id=cov.id, status=CaseStatus.READY,
                          reason=reason, delay_reason_code=DELAY_REASON_CODES[reason],
                          due_at=admitted + timedelta(days=90), amount_at_risk=Decimal("0"))
            s.add(c)
            s.flush()
            s.add_all([CaseServiceLine(case_id=c.id, service_line_id=ln.id) for ln in lines])
            s.add(Packet(case_id=c.id, input_hash="b" * 64, complete=True, manifest={"items": [
                {"type": t, "label": label, "status": "included"} for t, label in rnd.sample(ITEMS, rnd.randint(2, 5))]}))
            ids.append(c.id)
    return ids


CPU: dict[int, float] = {}  # id(result) of the last timed call -> CPU seconds (this process and its children)


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kw):
    """(result, wall seconds); the CPU seconds of the call go to ``LAST_CPU`` (all threads, and children)."""
    global LAST_CPU
    c, t = _cpu(), time.perf_counter()
    out = fn(*args, **kw)
    LAST_CPU = _cpu() - c
    return out, time.perf_counter() - t


LAST_CPU = 0.0


def bare_typst(docs: list[dict], templates, workers: int) -> float:
    """Typst alone on the same documents (same program, same threads, same per-thread compilers)."""
    from concurrent.futures import ThreadPoolExecutor

    ts = templates.typesetter(None)
    payloads = docs

    def one(doc):
        return ts.pdf_from_document(doc)

    t = time.perf_counter()
    if workers <= 1:
        for d in payloads:
            one(d)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, payloads))
    return time.perf_counter() - t


# Bare Typst in a process of its own (``bare_typst`` there): reads a JSON list of documents per line,
# answers [wall seconds, CPU seconds of that process] per line.
BARE_PROCESS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.letters import _cpu, bare_typst
from retroauth.letters import letter_templates
templates, workers = letter_templates(), int(sys.argv[2])
for line in sys.stdin:
    c = _cpu()
    wall = bare_typst(json.loads(line), templates, workers)
    print(json.dumps([wall, _cpu() - c]), flush=True)
"""


class BareProcess:
    """Bare Typst on the product's own documents, without sharing the product process's memo."""

    def __init__(self, workers: int):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-c", BARE_PROCESS, str(ROOT), str(workers)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def compile(self, docs: list[dict]) -> tuple[float, float]:
        self.proc.stdin.write(json.dumps(docs) + "\n")
        self.proc.stdin.flush()
        wall, cpu = json.loads(self.proc.stdout.readline())
        return wall, cpu

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def html_to_pdf(htmls: list[tuple[str, str]], templates, workers: int) -> None:
    """The HTML -> PDF engine alone (``Typesetter.pdf``: HTML -> Typst document -> Typst), as WeasyPrint would be."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job):
        return templates.typesetter(job[0]).pdf(job[1])

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, htmls))


def render_flow_defaults() -> tuple[int, int]:
    """The render flow's batch size and batches in flight, read from the flow (imports Prefect, as a flow
    run's process has it)."""
    import inspect

    from flows.batches import IN_FLIGHT
    from flows.render import render_letters as render_flow

    return inspect.signature(render_flow.fn).parameters["batch_size"].default, IN_FLIGHT


def as_the_flow_runs_it(engine, storage, settings, library, ids: list[int], size: int, in_flight: int, **kw):
    """``render_letters`` on batches of ``size``, ``in_flight`` at once on threads, as the render flow's task
    runner works a day's batches (without Prefect's own cost, which benchmarks/day.py measures)."""
    from concurrent.futures import ThreadPoolExecutor

    def batch(part: list[int]) -> dict:
        return render_letters(engine, storage, settings, library, part, **kw).as_dict()

    with ThreadPoolExecutor(in_flight) as pool:
        return merge_results(pool.map(batch, [ids[i:i + size] for i in range(0, len(ids), size)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    flow_size, flow_in_flight = render_flow_defaults()
    ap.add_argument("--rounds", type=int, default=6,
                    help="alternate the sides this many times, each on batch-size x in-flight letters")
    ap.add_argument("--batch-size", type=int, default=flow_size, help="default: the render flow's")
    ap.add_argument("--in-flight", type=int, default=flow_in_flight, help="default: the render flow's")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads a batch typesets on")
    ap.add_argument("--compiles-at-once", type=int, default=None,
                    help="Typst compiles the product runs at once (default: one per core, typeset.COMPILES_AT_ONCE); "
                         "e.g. 4 shows what the cap saves when two batches of two threads are in flight")
    ap.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    ap.add_argument("--alternatives", action="store_true", help="also WeasyPrint and fpdf2 on the same HTML")
    ap.add_argument("--json", type=Path, help="write the results here (for benchmarks/report.py)")
    args = ap.parse_args(argv)
    rec = Recorder("letters")

    tmp = Path(tempfile.mkdtemp(prefix="letters-bench-"))
    url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    migrate(url)
    engine = make_engine(url)
    storage = LocalStorage(tmp / "storage")
    settings = load_settings(database_url=url)
    library = load_rule_library(PAYERS_DIR)
    templates = letter_templates()
    w, size, in_flight = args.workers, args.batch_size, args.in_flight
    compiles_at_once = args.compiles_at_once or typeset.CORES
    typeset.COMPILES_AT_ONCE = threading.BoundedSemaphore(compiles_at_once)
    per_round = size * in_flight
    rounds = args.rounds
    n = rounds * per_round  # letters for each product side
    rows: list[tuple[str, int, float, float, str]] = []

    # Disjoint sets drawn alike (Typst memoizes within a process: compiling documents it has compiled
    # before would flatter the second run): a warm-up, the product as the flow runs it, the product one
    # batch at a time, the HTML -> PDF engine, and three small ones for the render step alone.
    step = 100
    all_ids, t_gen = timed(generate, engine, 10 + 3 * n + 3 * step)
    warm_ids, ids, single_ids = all_ids[:10], all_ids[10:10 + n], all_ids[10 + n:10 + 2 * n]
    engine_ids = all_ids[10 + 2 * n:10 + 3 * n]
    step_ids = [all_ids[10 + 3 * n + k * step:10 + 3 * n + (k + 1) * step] for k in range(3)]
    day = letter_date_of(AS_OF, settings)
    with session_scope(engine) as s:
        warm, _ = load_letter_data(s, settings, library, [LetterRequest(i) for i in warm_ids])
        engine_data, _ = load_letter_data(s, settings, library, [LetterRequest(i) for i in engine_ids])
    # Warm up once (Jinja2 compiles templates, Typst loads fonts): steady state is what a batch sees.
    render_all(templates, [(d, day) for d in warm.values()], workers=w)
    engine_htmls = [(d.payer.id, templates.render_html(d, day)) for d in engine_data.values()]

    def documents(case_ids: list[int]) -> list[dict]:
        """The documents the product will hand Typst for these cases, in its order."""
        with session_scope(engine) as s:
            data, _ = load_letter_data(s, settings, library, [LetterRequest(i) for i in case_ids])
        return [to_document(templates.render_html(data[LetterRequest(i)], day)) for i in case_ids]

    flow_docs, single_docs = documents(ids), documents(single_ids)
    bare_same = BareProcess(w)
    bare_same.compile([to_document(templates.render_html(d, day)) for d in warm.values()])  # fonts, first compile
    product = dict(templates=templates, as_of=AS_OF, workers=w)

    # Each side on its own set, alternating in rounds (the order turned round every other round): a shared
    # machine's load drifts, and alternating spreads the drift over every side.
    totals: dict[str, list[float]] = {k: [0.0, 0.0] for k in ("same", "flow", "same1", "single", "engine")}
    ratios: list[float] = []  # wall, product as the flow runs it / bare Typst on its documents, per round
    rendered = 0

    def add(side: str, wall: float, cpu: float) -> None:
        totals[side][0] += wall
        totals[side][1] += cpu

    for r in range(rounds):
        part = slice(r * per_round, (r + 1) * per_round)

        def flow_side() -> None:
            nonlocal rendered
            t, c = bare_same.compile(flow_docs[part])
            add("same", t, c)
            result, tp = timed(as_the_flow_runs_it, engine, storage, settings, library, ids[part], size, in_flight,
                               **product)
            add("flow", tp, LAST_CPU)
            ratios.append(tp / t)
            assert not result["failed"], result["failed"]
            rendered += result["rendered"]

        def single_side() -> None:
            t, c = bare_same.compile(single_docs[part])
            add("same1", t, c)
            result, tp = timed(as_the_flow_runs_it, engine, storage, settings, library, single_ids[part], size, 1,
                               **product)
            add("single", tp, LAST_CPU)
            assert not result["failed"] and result["rendered"] == per_round, result["failed"]

        def engine_side() -> None:
            _, t = timed(html_to_pdf, engine_htmls[part], templates, w)
            add("engine", t, LAST_CPU)

        for side in (flow_side, single_side, engine_side)[::1 if r % 2 == 0 else -1]:
            side()
    assert rendered == n
    bare_same.close()  # outside any timed call: its CPU joins this process's children's when it ends
    (t_same, cpu_same), (t_product, cpu_product) = totals["same"], totals["flow"]
    (t_same1, cpu_same1), (t_single, cpu_single) = totals["same1"], totals["single"]
    t_engine, cpu_engine = totals["engine"]
    shape = f"batches of {size}, {in_flight} in flight, {w} threads each"
    rows.append(("bare Typst, the flow side's documents", n, t_same, cpu_same, f"{w} threads, {rounds} rounds, own process"))
    rows.append(("product as the render flow runs it", n, t_product, cpu_product, shape))
    rows.append(("bare Typst, the one-batch side's documents", n, t_same1, cpu_same1,
                 f"{w} threads, {rounds} rounds, own process"))
    rows.append(("product, one batch at a time", n, t_single, cpu_single, f"batches of {size}, {w} threads"))
    rows.append(("HTML -> PDF engine (convert + Typst)", n, t_engine, cpu_engine, f"{w} threads, {rounds} rounds"))
    again, t_again = timed(as_the_flow_runs_it, engine, storage, settings, library, ids, size, in_flight, **product)
    assert again["rendered"] == 0 and again["unchanged"] == n
    rows.append(("product again, all unchanged", n, t_again, LAST_CPU, "writes nothing"))
    memo_docs = flow_docs[:step]
    _, t_bare1 = timed(bare_typst, memo_docs, templates, 1)  # the product has compiled them in this process
    rows.append(("bare Typst (memoized: compiled before)", len(memo_docs), t_bare1, LAST_CPU, "1 thread"))

    html_ids = ids[:per_round]  # the HTML half on one round's letters
    n_html = len(html_ids)
    with session_scope(engine) as s:
        data, _ = load_letter_data(s, settings, library, [LetterRequest(i) for i in html_ids])
    htmls = {k: templates.render_html(d, day) for k, d in data.items()}
    docs = [to_document(h) for h in htmls.values()]

    def product_html() -> None:
        with session_scope(engine) as s:
            loaded, _ = load_letter_data(s, settings, library, [LetterRequest(i) for i in html_ids])
        for d in loaded.values():
            templates.resolve_for(d)
            templates.render_html(d, day)
            d.data_hash()

    _, t_html = timed(product_html)
    cpu_html = LAST_CPU
    rows.append(("product HTML: load + Jinja2 + data hash", n_html, t_html, cpu_html, "1 thread"))
    contexts = [(templates.environment(d.payer.id).get_template(templates.template_name(d.kind, d.reason, d.appeal_level)),
                 d.context(day)) for d in data.values()]
    _, t_jinja = timed(lambda: [tpl.render(ctx) for tpl, ctx in contexts])
    cpu_jinja = LAST_CPU
    rows.append(("bare Jinja2, same templates and contexts", n_html, t_jinja, cpu_jinja, "1 thread"))

    # Render step alone (HTML + PDF, no database, no storage): one thread, threads, processes; each on
    # its own cases, never compiled before in this process.
    for k, (label, kw) in enumerate((("1 thread", dict(workers=1)), (f"{w} threads", dict(workers=w)),
                                     (f"{w} processes (spawn)", dict(workers=w, executor="process")))):
        with session_scope(engine) as s:
            loaded, _ = load_letter_data(s, settings, library, [LetterRequest(i) for i in step_ids[k]])
        _, t = timed(render_all, templates, [(d, day) for d in loaded.values()], **kw)
        rows.append(("render step only (HTML + PDF)", len(loaded), t, LAST_CPU, label))

    # Determinism.
    one = next(iter(data.values()))
    a = templates.render(one, day).pdf
    b = letter_templates.__wrapped__(templates.root).render(one, day).pdf  # a fresh environment and compiler
    same = "yes" if a == b else "NO"

    if args.alternatives:
        sample_html = list(htmls.values())[:20]
        try:
            import weasyprint

            weasyprint.HTML(string=sample_html[0]).write_pdf()
            _, t = timed(lambda: [weasyprint.HTML(string=h).write_pdf() for h in sample_html])
            rows.append(("WeasyPrint, same HTML", len(sample_html), t, LAST_CPU, "1 thread"))
        except ImportError:
            rows.append(("WeasyPrint", 0, 0.0, 0.0, "not installed"))
        try:
            from fpdf import FPDF

            def fpdf_one(h: str) -> bytes:
                pdf = FPDF(format="letter")
                pdf.add_page()
                pdf.set_font("helvetica", size=10)
                # fpdf2 takes a smaller subset: no containers, no line breaks or small text inside cells.
                body = h.split("<body>", 1)[1].split("</body>", 1)[0].replace("·", "-")
                body = re.sub(r"</?(main|header|address|div|footer|small|span)[^>]*>| data-cols=\"[^\"]*\"", "", body)
                body = re.sub(r"<td([^>]*)>(.*?)</td>", lambda m: f"<td{m[1]}>{m[2].replace('<br>', ' ')}</td>", body)
                pdf.write_html(body)
                return bytes(pdf.output())

            fpdf_one(sample_html[0])
            _, t = timed(lambda: [fpdf_one(h) for h in sample_html])
            rows.append(("fpdf2 write_html, same HTML", len(sample_html), t, LAST_CPU, "1 thread, crude layout"))
        except ImportError:
            rows.append(("fpdf2", 0, 0.0, 0.0, "not installed"))
        except Exception as exc:  # noqa: BLE001 - its HTML support is partial; report, don't fail
            rows.append(("fpdf2 write_html", 0, 0.0, 0.0, f"failed: {type(exc).__name__}"))

    print(f"\nletters benchmark: {n} cases, {url.split(':')[0]}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}, generated in {t_gen:.1f} s, "
          f"{compiles_at_once} Typst compiles at once at most\n")
    print(f"{'what':46s} {'letters':>7s} {'wall s':>7s} {'per s':>7s} {'CPU s':>7s} {'per CPU s':>9s}  notes")
    for what, count, secs, cpu, note in rows:
        rate = f"{count / secs:7.1f}" if secs else f"{'-':>7s}"
        cpu_rate = f"{count / cpu:9.1f}" if cpu else f"{'-':>9s}"
        print(f"{what:46s} {count:7d} {secs:7.2f} {rate} {cpu:7.2f} {cpu_rate}  {note}")
    rate_product = n / t_product
    print(f"\nPDF overhead, product as the render flow runs it ({shape}) vs bare Typst on the same documents "
          f"({w} threads): wall {t_product / t_same:.2f}x, CPU {cpu_product / cpu_same:.2f}x (target <= 1.2x); "
          f"round by round {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    print(f"PDF overhead, product one batch at a time vs bare Typst on its documents: "
          f"wall {t_single / t_same1:.2f}x, CPU {cpu_single / cpu_same1:.2f}x")
    print(f"PDF overhead, product as the flow runs it vs the HTML -> PDF engine alone: "
          f"wall {t_product / t_engine:.2f}x, CPU {cpu_product / cpu_engine:.2f}x")
    print(f"HTML overhead, product HTML half vs bare Jinja2: wall {t_html / t_jinja:.2f}x, CPU {cpu_html / cpu_jinja:.2f}x")
    print(f"PDF letters per second, product as the flow runs it: {rate_product:.1f} wall; {n / cpu_product:.1f} per CPU "
          f"second, so about {min(w, os.cpu_count() or 1) * n / cpu_product:.0f}/s on {w} idle cores (target >= 20)")
    print(f"identical inputs give identical PDF bytes: {same}")
    pages = json.dumps([len(d['blocks']) for d in docs[:1]])
    print(f"(first letter: {pages} top-level blocks; HTML {len(next(iter(htmls.values())))} bytes)")
    rec.write(args.json, {
        "cases": n, "workers": w, "database": url.split(":")[0], "rounds": rounds, "batch_size": size,
        "in_flight": in_flight, "compiles_at_once": compiles_at_once,
        "rows": [{"what": what, "letters": count, "wall_seconds": round(secs, 3), "cpu_seconds": round(cpu, 3),
                  "per_second": round(count / secs, 2) if secs else None, "notes": note}
                 for what, count, secs, cpu, note in rows],
        "pdf_overhead_vs_bare_typst": {"wall": round(t_product / t_same, 3), "cpu": round(cpu_product / cpu_same, 3),
                                       "rounds": [round(x, 3) for x in ratios],
                                       "median_round": round(statistics.median(ratios), 3)},
        "pdf_overhead_one_batch_at_a_time": {"wall": round(t_single / t_same1, 3),
                                             "cpu": round(cpu_single / cpu_same1, 3)},
        "pdf_overhead_vs_html_to_pdf_engine": {"wall": round(t_product / t_engine, 3),
                                               "cpu": round(cpu_product / cpu_engine, 3)},
        "html_overhead_vs_bare_jinja2": {"wall": round(t_html / t_jinja, 3), "cpu": round(cpu_html / cpu_jinja, 3)},
        "letters_per_second": round(rate_product, 2), "letters_per_cpu_second": round(n / cpu_product, 2),
        "identical_bytes": same == "yes",
    })
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
