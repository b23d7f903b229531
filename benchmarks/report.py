"""BENCHMARKS.md from the JSON results the benchmarks wrote under var/bench/.

    .venv/bin/python benchmarks/report.py [--dir var/bench] [--out BENCHMARKS.md]

Reads sweep.json, letters.json, day.json, urgent.json and load.json (whichever are there; ``make bench``
writes the first four, ``make load`` the last) and writes, for each figure, the numbers, the ratio or
target, the exact command that reproduces it, and the machine it ran on (CPU model and count, RAM, load
average at start and end, Python, Prefect and SQLite versions, date, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("sweep", "letters", "day", "urgent", "load")
SWEEP_4M = 4_000_000


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _load(doc: dict) -> str:
    a, b = doc["started"]["load"], doc["finished"]["load"]
    return f"{a[0]:.2f} / {a[1]:.2f} / {a[2]:.2f} at start, {b[0]:.2f} / {b[1]:.2f} / {b[2]:.2f} at end"


def _ran(doc: dict) -> list[str]:
    code = doc.get("code") or {}
    commit = code.get("commit") or "unknown"
    dirty = code.get("uncommitted_files")
    code_s = f"commit {commit}" + (f" with {dirty} uncommitted changed files" if dirty else "")
    lines = [
        f"- Command: `{doc['command']}`",
        f"- Ran {doc['started']['at']} to {doc['finished']['at']} ({_f(doc['finished']['seconds'], 0)} s), "
        f"{code_s}; load average (1 / 5 / 15 min) {_load(doc)}",
        f"- Machine: {m['cpu_model']}, {m['cpus']} processors, kernel {m['kernel']}"
        if (m := doc.get("machine")) else "- Machine: not recorded",
    ]
    if doc.get("note"):
        lines.append(f"- Note: {doc['note']}")
    return lines


def machine_section(docs: dict[str, dict]) -> list[str]:
    m = next(iter(docs.values()))["machine"]
    out = ["## The machine", "",
           "| | |", "|---|---|",
           f"| CPU | {m['cpu_model']}, {m['cpus']} processors (/proc/cpuinfo) |",
           f"| RAM | {m['ram_gib']} GiB |",
           f"| kernel | {m['kernel']} |",
           f"| Python | {m['python']} |",
           f"| Prefect | {m['prefect']} |",
           f"| SQLite | {m['sqlite']} (SQLAlchemy {m['sqlalchemy']}) |",
           f"| Typst (Python package) | {m['typst']} |", ""]
    others = {name: d["machine"] for name, d in docs.items() if d["machine"] != m}
    if others:
        out += [f"(Some results ran on another machine or environment: {', '.join(others)}; see their sections.)", ""]
    out += ["The machine is shared (other test suites run on it at the same time): each section gives the load "
            "average at its start and end. Read the ratios, which compare two things measured in the same run, "
            "rather than the seconds.", ""]
    return out


def summary_rows(docs: dict[str, dict]) -> list[str]:
    rows = ["| figure | result | target | met? | load (1 min) at start -> end |", "|---|---|---|---|---|"]

    def ld(d: dict) -> str:
        return f"{d['started']['load'][0]:.1f} -> {d['finished']['load'][0]:.1f}"

    if "sweep" in docs:
        for s in docs["sweep"]["results"]["sizes"]:
            rows.append(f"| sweep vs bare SQL, {_f(s['service_lines'])} lines | {s['ratio']:.2f}x the bare query "
                        f"({s['sweep_seconds']:.1f} s vs {s['bare_seconds']:.1f} s), same lines: "
                        f"{'yes' if s['same_lines'] else 'NO'} | same lines as the bare query | "
                        f"{'yes' if s['same_lines'] else 'NO'} | {s.get('load_at_start', ['-'])[0]} (at this size's start) |")
    if "letters" in docs:
        r = docs["letters"]["results"]
        o = r["pdf_overhead_vs_bare_typst"]
        shape = f", batches of {r['batch_size']}, {r['in_flight']} in flight" if "batch_size" in r else ""
        rounds = (f" (rounds {', '.join(f'{x:.2f}' for x in o['rounds'])}"
                  + (f", median {o['median_round']:.2f}" if "median_round" in o else "") + ")") if o.get("rounds") else ""
        rows.append(f"| letters vs bare Typst, {r['cases']} letters{shape} | {o['wall']:.2f}x wall{rounds}, "
                    f"{o['cpu']:.2f}x CPU; {r['letters_per_second']:.1f} letters/s | <= 1.2x | "
                    f"{_met(o['wall'] <= 1.2 and o['cpu'] <= 1.2, 'wall' if o['wall'] <= 1.2 else None)} | "
                    f"{ld(docs['letters'])} |")
    if "day" in docs:
        r = docs["day"]["results"]
        for i, rnd in enumerate(r["rounds"], 1):
            d, p = rnd["direct"], rnd["prefect"]
            same = all(rnd["same_end_state"].values())
            n = r["template"]["cases_for_packets"]
            rows.append(f"| a day of {_f(n)} cases through Prefect vs direct (round {i}) | Prefect's share "
                        f"{rnd['prefect_share'] * 100:.1f}% ({p['seconds']:.0f} s vs {d['seconds']:.0f} s), "
                        f"same end state: {'yes' if same else 'NO'} | <= 15% | "
                        f"{_met(rnd['prefect_share'] <= 0.15 and same)} | {ld(docs['day'])} |")
    if "urgent" in docs:
        r = docs["urgent"]["results"]
        rows.append(f"| urgent trigger -> submitted, warm worker | median {r['median_seconds']:.1f} s, max "
                    f"{r['max_seconds']:.1f} s over {len(r['runs']) - 1} runs | <= {r['target_seconds']:g} s "
                    f"median | {_met(r['met'])} | {ld(docs['urgent'])} |")
    if "load" in docs:
        r = docs["load"]["results"]
        lat = r["latency_seconds"]
        checks = r.get("checks") or {}
        dup_free = _load_no_duplicates(r)
        rows.append(f"| {r['triggers']} urgent triggers within {r['within_seconds']:g} s | {r['completed']} of "
                    f"{r['triggers']} submitted; p50 {_f(lat['p50'])} s, p95 {_f(lat['p95'])} s "
                    f"trigger -> submitted; {_f(r['throughput_per_minute'], 2)}/min; server not OK in "
                    f"{r['health']['not_ok']} of {r['health']['polls']} health polls; the last trigger call returned after "
                    f"{r['triggering_took_seconds']:.1f} s | all triggered within {r['within_seconds']:g} s, each "
                    f"processed exactly once, server healthy | "
                    f"{_met(bool(checks) and all(checks.values()))}: no duplicate {'yes' if dup_free else 'NO'}, all "
                    f"processed {'yes' if r['all_completed'] else 'NO'}, healthy "
                    f"{'yes' if r['health']['not_ok'] == 0 else 'NO'}, triggered in time "
                    f"{'yes' if r['triggering_took_seconds'] <= r['within_seconds'] + 1 else 'NO'} | "
                    f"{ld(docs['load'])} |")
    return rows + [""]


def _load_no_duplicates(r: dict) -> bool:
    db, p = r["database"], r["prefect"]
    return db["encounters_with_more_cases"] == 0 and db["cases_with_more_submissions"] == 0 \
        and p["keys_with_more_runs"] == 0


def _met(ok: bool, partly: str | None = None) -> str:
    return "yes" if ok else (f"NO ({partly} only)" if partly else "**NO**")


def sweep_section(doc: dict) -> list[str]:
    r = doc["results"]
    out = ["## The sweep against bare SQL (`benchmarks/sweep.py`)", "",
           "The product's sweep end to end (rules loaded, encounters paged, cases upserted and evaluated, audit "
           "events written) against one hand-written SQL statement that finds the same uncovered service lines, "
           "each in its own process on a copy of the same generated SQLite database (100 payers). Both must find "
           "the same lines.", "",
           "| service lines | bare query s | sweep s | ratio | lines/s | lines found | same lines | peak MB bare / sweep | load at start |",
           "|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for s in r["sizes"]:
        out.append(f"| {_f(s['service_lines'])} | {s['bare_seconds']:.2f} | {s['sweep_seconds']:.2f} | "
                   f"{s['ratio']:.2f}x | {_f(s['lines_per_second'])} | {_f(s['found'])} | "
                   f"{'yes' if s['same_lines'] else 'NO'} | {s['bare_peak_mb']} / {s['sweep_peak_mb']} | "
                   f"{s.get('load_at_start', ['-'])[0]} |")
    out.append("")
    sizes = sorted(r["sizes"], key=lambda s: s["service_lines"])
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        grow = b["service_lines"] / a["service_lines"]
        out += [f"Scaling: from {_f(a['service_lines'])} to {_f(b['service_lines'])} service lines ({grow:.1f}x), "
                f"the sweep took {b['sweep_seconds'] / a['sweep_seconds']:.1f}x as long and the bare query "
                f"{b['bare_seconds'] / a['bare_seconds']:.1f}x (linear: {grow:.1f}x); peak memory of the sweep "
                f"{a['sweep_peak_mb']} MB -> {b['sweep_peak_mb']} MB (it pages the encounters). The small sizes "
                "take seconds, so their ratio is the noisiest on a shared machine.", ""]
    if not any(s["lines_requested"] >= SWEEP_4M for s in r["sizes"]):
        out += [f"**The {SWEEP_4M:,}-line size has not been run yet** (it did not fit the time available for "
                f"this run of the benchmarks); its command: "
                f"`.venv/bin/python benchmarks/sweep.py --lines {SWEEP_4M} --json var/bench/sweep-4m.json` "
                f"(or `make bench BENCH_SIZES=\"250000 1000000 4000000\"`).", ""]
    return out + _ran(doc) + [""]


def letters_section(doc: dict) -> list[str]:
    r = doc["results"]
    if "batch_size" in r:
        what = (f"{r['cases']} PDF letters through the product's batch path as the render flow runs it (`render_letters` "
                f"on batches of {r['batch_size']}, {r['in_flight']} in flight: set-based load, Jinja2, HTML to Typst, "
                "Typst PDF, hashes, storage writes, letter rows, state changes, audit events), and as many one batch "
                "at a time, each against bare Typst compiling the same documents in a process of its own")
    else:
        what = (f"{r['cases']} PDF letters through the product's batch path (`render_letters`) against bare Typst "
                "compiling the same documents")
    out = ["## Letters against the bare engine (`benchmarks/letters.py`)", "",
           f"{what}, {r['workers']} threads each, alternating in {r['rounds']} rounds (database: {r['database']}).", "",
           "| what | letters | wall s | per s | CPU s | notes |", "|---|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        out.append(f"| {row['what']} | {row['letters']} | {row['wall_seconds']:.2f} | {_f(row['per_second'])} | "
                   f"{row['cpu_seconds']:.2f} | {row['notes']} |")
    o, e, h = r["pdf_overhead_vs_bare_typst"], r["pdf_overhead_vs_html_to_pdf_engine"], r["html_overhead_vs_bare_jinja2"]
    single = r.get("pdf_overhead_one_batch_at_a_time")
    out += ["",
            f"- PDF: the product is **{o['wall']:.2f}x** bare Typst in wall time, {o['cpu']:.2f}x in CPU (target "
            "<= 1.2x)" + (f"; round by round {', '.join(f'{x:.2f}' for x in o['rounds'])}" if o.get("rounds") else "")
            + (f" (median {o['median_round']:.2f})" if "median_round" in o else "")
            + (f"; one batch at a time {single['wall']:.2f}x / {single['cpu']:.2f}x" if single else "")
            + f"; {e['wall']:.2f}x / {e['cpu']:.2f}x the HTML-to-PDF engine alone"
            + (f"; {a['wall']:.2f}x / {a['cpu']:.2f}x bare Typst on other documents drawn alike."
               if (a := r.get("pdf_overhead_vs_bare_typst_alike_documents")) else "."),
            f"- HTML half: {h['wall']:.2f}x / {h['cpu']:.2f}x bare Jinja2 on the same templates and contexts.",
            f"- {r['letters_per_second']:.1f} letters per second wall, {r['letters_per_cpu_second']:.1f} per CPU "
            f"second; identical inputs give identical PDF bytes: {'yes' if r['identical_bytes'] else 'NO'}.", ""]
    return out + _ran(doc) + [""]


def _cpu_share(d: dict, p: dict) -> float:
    direct = d["cpu_seconds"] + (d.get("server_cpu_seconds") or 0.0)
    prefect = p["cpu_seconds"] + (p.get("server_cpu_seconds") or 0.0)
    return (prefect - direct) / prefect


def day_section(doc: dict) -> list[str]:
    r = doc["results"]
    t = r["template"]
    out = ["## A whole day through Prefect against the same work called directly (`benchmarks/day.py`)", "",
           f"The data: {_f(t['encounters'])} generated encounters ({_f(t['service_lines'])} service lines, "
           f"{t['days']} day(s) ending {t['end']}, seed {t['seed']}); the sweep as of {r['as_of']} finds "
           f"{_f(t['cases'])} cases, {_f(t['not_eligible'])} of them not eligible (the payer takes no retro "
           f"request for that reason, or its window has passed), and {_f(t['cases_for_packets'])} that go all "
           f"the way. To let them, the documents their packets lacked ({_f(t['documents_added'])} notes for "
           f"{_f(t['cases_lacking_documents'])} cases) were added to the template once, before the copies "
           "were made. Two identical copies of the template (database and storage), each day in a fresh "
           "process: *direct*, the domain functions called straight with the same batch sizes, threads and "
           "per-payer send limit as the flows; *Prefect*, the real `daily_run` flow in-process against a real "
           "Prefect server (SQLite, started by the benchmark, deployments/setup.py applied). Submissions go "
           "through the payers' real channels (packet PDFs, X12 278 files) into each copy's storage.", ""]
    if t["cases_for_packets"] < 1900:
        out += [f"**This run used a smaller day ({_f(t['cases_for_packets'])} cases) than the 2,000-case day the "
                "target is set for; the full size (`.venv/bin/python benchmarks/day.py --json var/bench/day.json`, "
                "360,000 encounters) is still to be run.**", ""]
    for i, rnd in enumerate(r["rounds"], 1):
        d, p = rnd["direct"], rnd["prefect"]
        sub = (p.get("server") or {}).get("subflows", {})
        names = {"sweep": "daily-sweep", "assemble": "assemble-documentation", "render": "render-letters",
                 "submit": "submit-requests"}
        out += [f"Round {i} (order: {', '.join(rnd['order'])}; direct: {d['mode']}):", "",
                "| step | direct s | Prefect s (subflow run) |", "|---|---:|---:|"]
        for step, secs in d["steps"].items():
            ps = (sub.get(names.get(step, "")) or {}).get("seconds")
            out.append(f"| {step} | {secs:.1f} | {_f(ps)} |")
        out += [f"| **the day** | **{d['seconds']:.1f}** | **{p['seconds']:.1f}** |", "",
                f"- **Prefect's share of the day: {rnd['prefect_share'] * 100:.1f}%** "
                f"((t_prefect - t_direct) / t_prefect; target <= 15%: "
                f"{'met' if rnd['prefect_share'] <= 0.15 else 'NOT met'}).",
                f"- By CPU seconds instead of wall time (less sensitive to what else the shared machine ran): "
                f"Prefect's share {_cpu_share(d, p) * 100:.1f}% (the run's process plus the server during it, "
                f"against the same for the direct run).",
                f"- CPU seconds: direct {d['cpu_seconds']:.0f}, Prefect run {p['cpu_seconds']:.0f} plus the Prefect "
                f"server {_f(p.get('server_cpu_seconds'), 0)} (the server during the direct run: "
                f"{_f(d.get('server_cpu_seconds'), 0)}). Process start and imports, not in the times: direct "
                f"{d['import_seconds']:.1f} s, Prefect {p['import_seconds']:.1f} s.",
                f"- Load average (1 min): direct {d['load_before'][0]} -> {d['load_after'][0]}, Prefect "
                f"{p['load_before'][0]} -> {p['load_after'][0]}."
                + (" The two runs did not see the same load (other work on the shared machine), which weighs on "
                   "the wall-time share; `--rounds 2` (or more) alternates the order and reports the median."
                   if abs(d['load_before'][0] - p['load_before'][0]) > 1.5 or abs(d['load_after'][0] - p['load_after'][0]) > 1.5
                   else ""),
                f"- Cases at the end: {d['summary']['statuses']}; same status for every case (by encounter and "
                f"payer): {'yes' if rnd['same_end_state']['case_statuses'] else 'NO'}; same submissions "
                f"{d['end_state']['submissions']}: {'yes' if rnd['same_end_state']['submissions'] else 'NO'}; same "
                f"outbound files {d['end_state']['outbound_files']}: "
                f"{'yes' if rnd['same_end_state']['outbound_files'] else 'NO'}.",
                f"- Batches retried (a batch that raised, e.g. SQLite's 30 s busy timeout; the direct path retries "
                f"as the tasks do): direct {d.get('batches_retried') or 'none'}, Prefect "
                f"{p['server'].get('retried') or 'none'}.",
                f"- Prefect: flow run {p['server']['state']}, {p['server']['task_runs']} task runs "
                f"{p['server']['task_run_states']}, subflows "
                + ", ".join(f"{k} {v['state']}" for k, v in sub.items()) + ".",
                ""]
        if "sequential" in rnd:
            out += [f"- The direct path with one batch at a time: {rnd['sequential']['seconds']:.1f} s.", ""]
    return out + _ran(doc) + [""]


def urgent_section(doc: dict) -> list[str]:
    r = doc["results"]
    out = ["## An urgent case: trigger to submitted (`benchmarks/urgent.py`)", "",
           f"A real Prefect server, deployments applied, one process worker on the `urgent` queue polling every "
           f"{r['poll_seconds']:g} s and warm; {_f(r['background_encounters'])} generated encounters in the "
           "database. Each run: `run_deployment('urgent-case/urgent-case', ...)` as `retroauth trigger urgent` "
           "calls it, then the database polled until the case is `submitted`.", "",
           "| run | trigger -> submitted s | created -> Running s | Running -> final state s | state |",
           "|---|---:|---:|---:|---|"]
    for run in r["runs"]:
        out.append(f"| {run['run']} | {run['latency_seconds']:.1f} | {_f(run['waiting_for_worker_seconds'])} | "
                   f"{_f(run['flow_run_seconds'])} | {run['state']} |")
    out += ["", f"- **Median {r['median_seconds']:.1f} s**, max {r['max_seconds']:.1f} s over the warm runs (target: "
            f"median <= {r['target_seconds']:g} s: {'met' if r['met'] else 'NOT met'}).",
            "- Created -> Running: the worker finding the run (it polls every "
            f"{r['poll_seconds']:g} s) and starting its flow-run process (a new Python process: start-up and "
            "imports) until the flow reports Running. Running -> final state: the flow itself and its final "
            "state report, which can land well after the case is submitted (the run still publishes its report "
            "artifact and result), so the last two columns need not add up to the first.", ""]
    return out + _ran(doc) + [""]


def load_section(doc: dict) -> list[str]:
    r = doc["results"]
    lat, p, db, h = r["latency_seconds"], r["prefect"], r["database"], r["health"]
    out = ["## Urgent triggers under load (`benchmarks/load.py`, `make load`)", "",
           f"{r['triggers']} urgent triggers spread over {r['within_seconds']:g} s, each on a different encounter "
           f"that needs a retro request, against the running stack: a Prefect server ({r.get('prefect_database', 'SQLite')} under it), deployments "
           f"applied, {r['workers']} process worker(s) on the `urgent` queue polling every {r['poll_seconds']:g} s, "
           f"at most {r['limit_per_worker']} flow runs each at a time; {_f(r['background_encounters'])} generated "
           "encounters in the database. Waited up to "
           f"{r['deadline_seconds']:.0f} s after the first trigger.", "",
           f"- **{r['completed']} of {r['triggers']} submitted** "
           f"({'all' if r['all_completed'] else 'not all'} within the wait of {r['waited_seconds']:.0f} s); "
           f"the triggers took {r['triggering_took_seconds']:.1f} s (each call: median {_f(r['trigger_call_ms']['p50'], 0)} "
           f"ms, max {_f(r['trigger_call_ms']['max'], 0)} ms), {r['trigger_errors']} failed.",
           *([f"- **Not all cases were submitted: {r['triggers'] - r['completed']} of {r['triggers']} were still "
               f"waiting when the benchmark stopped waiting ({r['deadline_seconds']:.0f} s after the first trigger). "
               "The latencies below cover only the completed ones: the slowest are missing, so the true p50 and "
               "p95 over all of them are higher.**"] if not r["all_completed"] else []),
           *([f"- **The triggers themselves took {r['triggering_took_seconds']:.1f} s, not {r['within_seconds']:g} s:** "
               "each `run_deployment` call waited for the server (see the call times), so the load the server saw "
               "was spread over a longer time than asked."]
             if r["triggering_took_seconds"] > r["within_seconds"] + 1 else []),
           f"- **Trigger to submitted: p50 {_f(lat['p50'])} s, p95 {_f(lat['p95'])} s** (min {_f(lat['min'])} s, "
           f"max {_f(lat['max'])} s); throughput {_f(r['throughput_per_minute'], 2)} cases per minute "
           f"(first trigger to last submission: {_f(r['first_trigger_to_last_submitted_seconds'], 0)} s).",
           f"- Where a run's time went: created -> Running (waiting for a free worker slot, then the flow-run "
           f"process starting) p50 {_f(p['waiting_for_a_worker_seconds']['p50'])} s "
           f"(p95 {_f(p['waiting_for_a_worker_seconds']['p95'])} s); Running -> final state p50 "
           f"{_f(p['flow_run_seconds']['p50'])} s (p95 {_f(p['flow_run_seconds']['p95'])} s). CPU: "
           f"{_f(r['cpu_seconds']['workers_and_flow_runs'], 0)} s in the workers and their flow-run processes "
           f"({_f(r['cpu_seconds']['per_completed_run'])} s per completed run), "
           f"{_f(r['cpu_seconds']['server'], 0)} s in the server.",
           *([f"- Capacity: each urgent run costs about {r['cpu_seconds']['per_completed_run']:.1f} CPU seconds "
               f"(each run is a new flow-run process: start-up, imports and the flow), so {doc['machine']['cpus']} cores "
               f"drain at most about {doc['machine']['cpus'] * 60 / r['cpu_seconds']['per_completed_run']:.0f} runs "
               f"a minute with the machine to themselves (measured: {_f(r['throughput_per_minute'], 1)} a minute, "
               "the machine shared). A burst of this size is therefore drained over many minutes, and the "
               "latency is mostly queueing for a worker slot: it is a capacity figure for this box, not the "
               "latency of one urgent case (see the section above)."]
             if r["cpu_seconds"].get("per_completed_run") else []),
           f"- Exactly once, in the database: {db['encounters_with_one_case']} encounters with one case "
           f"({db['encounters_with_more_cases']} with more), {db['cases_with_one_submission']} cases with one "
           f"submission ({db['cases_with_more_submissions']} with more).",
           f"- Exactly once, on the Prefect server: {p['flow_runs']} flow runs for {p['keys']} idempotency keys "
           f"({p['keys_with_more_runs']} keys with more than one run); states {p['states']}; failed or crashed: "
           f"{p['failed_or_crashed']}.",
           "- Checks: " + (", ".join(f"{k.replace('_', ' ')}: {'yes' if v else '**NO**'}"
                                    for k, v in (r.get("checks") or {}).items()) or "-") + ".",
           f"- Server health: {h['polls']} polls of /api/health, {h['not_ok']} not OK (longest streak "
           f"{h['longest_not_ok_streak_polls']}); answer time p95 {_f(h['p95_seconds'], 3)} s, max "
           f"{_f(h['max_seconds'], 3)} s.", ""]
    return out + _ran(doc) + [""]


SECTIONS = {"sweep": sweep_section, "letters": letters_section, "day": day_section, "urgent": urgent_section,
            "load": load_section}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=ROOT / "var" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    docs: dict[str, dict] = {}
    for name in ORDER:
        path = args.dir / f"{name}.json"
        if path.exists():
            docs[name] = json.loads(path.read_text())
    extra = args.dir / "sweep-4m.json"  # the 4M size run on its own
    if "sweep" in docs and extra.exists():
        more = json.loads(extra.read_text())
        docs["sweep"]["results"]["sizes"] += more["results"]["sizes"]
    if not docs:
        print(f"no results under {args.dir}: run `make bench` (and `make load`)", file=sys.stderr)
        return 1
    lines = ["# Benchmarks", "",
             f"Written by `benchmarks/report.py` from the JSON results under `{args.dir.relative_to(ROOT) if args.dir.is_relative_to(ROOT) else args.dir}` "
             "(`make bench`: sweep, letters, the day, urgent latency; `make load`: urgent triggers under load). "
             "Every figure below names the command that reproduces it.", ""]
    lines += ["## Summary", "", *summary_rows(docs)]
    lines += machine_section(docs)
    for name in ORDER:
        if name in docs:
            lines += SECTIONS[name](docs[name])
    missing = [n for n in ORDER if n not in docs]
    if missing:
        lines += [f"Not run this time: {', '.join(missing)}.", ""]
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
