"""The ``retroauth`` command for billing staff and operators (typer + rich).

Every command has ``--help``; the ones a script would read take ``--json``. Settings come from the
environment (``RETROAUTH_*``); a bad one stops the command with a message naming it.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Table

from config.settings import Settings, SettingsError, load_settings
from retroauth import cli_ops
from retroauth.cases import OPEN_STATES
from retroauth.db import make_engine, migrate
from retroauth.storage import open_storage

app = typer.Typer(
    help="Retro-authorization for US medical billing: find services that needed authorization and "
    "have none, ask the payer after the fact, and follow up until it is decided.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold patient data
)
payers_app = typer.Typer(help="The payer rule library (config/payers/*.yaml).", no_args_is_help=True)
case_app = typer.Typer(help="One retro-authorization case.", no_args_is_help=True)
import_app = typer.Typer(help="Bring records in: FHIR bulk exports, CSV files, X12 835 remittances.",
                         no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(payers_app, name="payers")
app.add_typer(case_app, name="case")
templates_app = typer.Typer(help="Letter templates (templates/): check them all.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")
packets_app = typer.Typer(help="Documentation packets: what each case encloses or still lacks.", no_args_is_help=True)
app.add_typer(packets_app, name="packets")
app.add_typer(cli_ops.app)  # the operators' commands: serve, worker, trigger urgent

console = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]

# What a person does about an escalated case, by the escalation's code (cases.escalate).
ESCALATION_HELP = {
    "": "no payer answer in time, call the payer",
    "review_sla_passed": "the payer's review time is over without an answer: call the payer",
    "max_inquiries": "no answer after every status inquiry: call the payer",
    "cannot_inquire": "this payer cannot be asked automatically: call the payer",
    "auth_number_of_another_case": "the payer's approval carries an authorization number already on another "
                                   "case: check both with the payer, then `retroauth record CASE --approved`",
    "approval_without_coverage": "the payer approved, but the case has no coverage to record it against: "
                                 "add it, then `retroauth record CASE --approved`",
    "approval_without_lines": "the payer approved, but the case has no service lines: check the case",
}


class Exit(Exception):
    """A user-facing failure: printed without a traceback, exit code 2."""


@lru_cache(maxsize=1)
def settings() -> Settings:
    return load_settings()


def engine() -> sa.Engine:
    return make_engine(settings().database_url)


def storage():  # noqa: ANN201 - a Storage
    s = settings()
    return open_storage(s.storage_url, **s3_options(s))


def s3_options(s: Settings) -> dict[str, Any]:
    if not s.storage_url.startswith("s3://"):
        return {}
    return {"endpoint_url": s.s3_endpoint_url, "sse": s.s3_sse, "kms_key_id": s.s3_kms_key_id}


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# --- set-up -------------------------------------------------------------------------------------


@app.command()
def init() -> None:
    """Create or upgrade the database to the current schema and prepare document storage."""
    s = settings()
    migrate(s.database_url)
    storage()
    console.print(f"[green]database ready[/] ({_safe_url(s.database_url)})")
    console.print(f"[green]storage ready[/]  ({s.storage_url})")


@app.command("settings")
def show_settings(as_json: JsonOpt = False) -> None:
    """Show the settings in effect (after environment variables and .env)."""
    data = {k: str(v) for k, v in settings().model_dump().items()}
    data["database_url"] = _safe_url(data["database_url"])
    if as_json:
        emit_json(data)
        return
    table = Table("setting", "value", title="retroauth settings")
    for k, v in data.items():
        table.add_row(f"RETROAUTH_{k.upper()}", v)
    console.print(table)


def _safe_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


# --- imports -------------------------------------------------------------------------------------


def _report_import(kind: str, source: Path, summary, started, as_json: bool) -> None:  # noqa: ANN001
    from retroauth.ingest.errors import record_import

    run_id = record_import(engine(), kind, str(source), summary, started)
    if as_json:
        emit_json({"import_run": run_id, **summary.as_dict()})
    else:
        table = Table("record", "read", "inserted", "updated", "unchanged", "skipped", "errors",
                      title=f"Import {run_id}: {kind} from {source}")
        for name, c in sorted(summary.counts.items()):
            table.add_row(name, *(str(v) for v in (c.read, c.inserted, c.updated, c.unchanged, c.skipped, c.errors)))
        console.print(table)
        for p in summary.problems[:20]:
            err.print(f"[yellow]{p}[/]")
        if summary.error_count > 20:
            err.print(f"... {summary.error_count - 20} more: retroauth imports show {run_id}")
    if summary.error_count:
        raise SystemExit(1)  # the good records went in; the exit code tells a script some did not


def _progress_bar(as_json: bool):  # noqa: ANN202
    from rich.progress import BarColumn, Progress, TextColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} records"),
                    console=err, disable=as_json)


@import_app.command("fhir")
def import_fhir_cmd(
    directory: Annotated[Path, typer.Argument(help="Directory of FHIR R4 bulk NDJSON files.", exists=True, file_okay=False)],
    coverage: Annotated[Path | None, typer.Option(help="Coverage CSV for exports without Coverage resources.")] = None,
    default_payer: Annotated[str | None, typer.Option(help="Payer id for patients with no coverage in the export.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a FHIR bulk export (Patient, Encounter, Procedure, Condition, DocumentReference, ...)."""
    from retroauth.ingest.fhir import import_fhir
    from retroauth.models import utcnow

    started = utcnow()
    with _progress_bar(as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(resource_type: str, done: int) -> None:
            if resource_type not in tasks:
                tasks[resource_type] = bar.add_task(resource_type, total=None)
            bar.update(tasks[resource_type], completed=done)

        summary = import_fhir(engine(), storage(), directory, coverage_csv=coverage, default_payer=default_payer,
                              progress=progress)
    _report_import("fhir", directory, summary, started, as_json)


@import_app.command("csv")
def import_csv_cmd(
    directory: Annotated[Path, typer.Argument(help="Directory of CSV files in the documented format (examples/csv).",
                                              exists=True, file_okay=False)],
    as_json: JsonOpt = False,
) -> None:
    """Import a practice-management export: patients, coverages, encounters, service lines, diagnoses,
    authorizations on file, documents and payer outages (format: examples/csv/README.md)."""
    from retroauth.ingest.csvfiles import import_csv
    from retroauth.models import utcnow

    started = utcnow()
    with _progress_bar(as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(record_type: str, done: int) -> None:
            if record_type not in tasks:
                tasks[record_type] = bar.add_task(record_type, total=None)
            bar.update(tasks[record_type], completed=done)

        summary = import_csv(engine(), storage(), directory, progress=progress)
    _report_import("csv", directory, summary, started, as_json)


@import_app.command("remit")
def import_remit_cmd(
    path: Annotated[Path, typer.Argument(help="An X12 835 file (005010X221A1), or a directory of them.", exists=True)],
    as_json: JsonOpt = False,
) -> None:
    """Import remittance advice: lines denied for missing or invalid authorization (CARC 197, 198,
    15, 39; RARC M62, N54) are marked with the remittance date, the anchor of denial-based windows."""
    from retroauth.ingest.remit import import_remit
    from retroauth.models import utcnow

    started = utcnow()
    with _progress_bar(as_json) as bar:
        task = bar.add_task("claims", total=None)
        summary = import_remit(engine(), path, progress=lambda *a: bar.update(task, completed=a[-1]))
    _report_import("remit", path, summary, started, as_json)


@app.command("imports")
def imports_cmd(
    run_id: Annotated[int | None, typer.Argument(help="Show the rejected records of this import run.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Past imports and what each rejected: nothing is dropped silently."""
    from sqlmodel import Session, select

    from retroauth.models import ImportErrorRecord, ImportRun

    with Session(engine()) as s:
        if run_id is None:
            runs = s.exec(select(ImportRun).order_by(ImportRun.id.desc()).limit(limit)).all()
            if as_json:
                emit_json([r.model_dump() for r in runs])
                return
            table = Table("run", "kind", "source", "started", "records", "rejected", title="Imports")
            for r in runs:
                total = sum(c.get("read", 0) for c in (r.counts or {}).values())
                table.add_row(str(r.id), r.kind, r.source, _when(r.started_at), str(total), str(r.error_count))
            console.print(table)
            return
        errors = s.exec(select(ImportErrorRecord).where(ImportErrorRecord.import_run_id == run_id)
                        .order_by(ImportErrorRecord.id).limit(limit)).all()
        if as_json:
            emit_json([e.model_dump() for e in errors])
            return
        table = Table("file", "line", "record", "field", "problem", title=f"Rejected records of import {run_id}")
        for e in errors:
            table.add_row(e.file, str(e.line or ""), e.record, e.field, e.message)
        console.print(table)


# --- synthetic data -------------------------------------------------------------------------------


@app.command("generate")
def generate_cmd(
    encounters: Annotated[int, typer.Option(help="How many encounters (about 2.9 service lines each).")] = 1000,
    seed: Annotated[int, typer.Option(help="Same seed and options, same data; a rerun changes nothing.")] = 1,
    days: Annotated[int, typer.Option(help="Spread over this many days ...")] = 1,
    end: Annotated[datetime | None, typer.Option(help="... ending on this day (default today).")] = None,
    payer: Annotated[list[str] | None, typer.Option(help="Only these payer ids (default: every CPT/HCPCS payer).")] = None,
    extra_payers: Annotated[int, typer.Option(help="Also this many synthetic payers cloned from the shipped ones.")] = 0,
    write_payers: Annotated[Path | None, typer.Option(help="Write the synthetic payers' rule files here (a sweep needs them).")] = None,
    documents: Annotated[bool, typer.Option(help="Also write placeholder note bodies to storage.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Synthetic patients, encounters, services, diagnoses, documents and authorizations on file at
    realistic proportions, written in bulk: for demos, benchmarks and load tests. Nobody in it is real."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from retroauth.generate import SYNTHETIC_PREFIX, GenerateError, generate, write_payer_files
    from retroauth.rules import load_rule_library

    day = (end or datetime.now(_facility_zone())).date()
    with Progress(TextColumn("generating encounters"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=as_json) as bar:
        task = bar.add_task("generate", total=encounters)
        try:
            summary = generate(engine(), load_rule_library(settings().payer_rules_dir), encounters=encounters,
                               seed=seed, days=days, end=day, payer_ids=payer, extra_payers=extra_payers,
                               documents=documents, storage=storage() if documents else None,
                               progress=lambda n: bar.update(task, completed=n))
        except GenerateError as exc:
            raise Exit(str(exc)) from None
    if write_payers and extra_payers:
        write_payer_files(summary.library, [p for p in summary.payer_ids if p.startswith(SYNTHETIC_PREFIX)],
                          write_payers)
    out = summary.as_dict()
    if as_json:
        emit_json(out)
        return
    if summary.skipped:
        console.print(f"set gen:{seed} with these options is already there: nothing written")
    from retroauth.generate import TABLES

    table = Table("table", "rows", title=f"Generated set gen:{seed} ({summary.seconds:.1f} s)")
    for name in TABLES:
        table.add_row(name, f"{out[name]:,}")
    console.print(table)
    console.print(f"{summary.auth_required_lines:,} services need authorization; "
                  f"{summary.unauthorized_lines:,} have none on file (what the next sweep will find)")


# --- payers -------------------------------------------------------------------------------------


@payers_app.command("check")
def payers_check(
    directory: Annotated[Path | None, typer.Argument(help="Directory of payer YAML files (default: the configured one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate every payer file; each problem names the file, the field and the line."""
    from retroauth.rules import PayerRuleError, check_directory

    directory = directory or settings().payer_rules_dir
    try:
        summaries = check_directory(directory)
    except PayerRuleError as exc:
        if as_json:
            emit_json({"ok": False, "problems": [p.__dict__ for p in exc.problems]})
            raise SystemExit(2) from None
        raise Exit(str(exc)) from None
    if as_json:
        emit_json({"ok": True, "payers": summaries})
        return
    _payer_table(summaries, f"{len(summaries)} payer files in {directory}: all valid")


@payers_app.command("list")
def payers_list(as_json: JsonOpt = False) -> None:
    """The payers in the configured library and their retro policies."""
    from retroauth.rules import load_rule_library

    summaries = load_rule_library(settings().payer_rules_dir).summaries()
    if as_json:
        emit_json(summaries)
        return
    _payer_table(summaries, "Payer rule library")


def _payer_table(summaries: list[dict], title: str) -> None:
    table = Table("payer", "name", "rules", "codes", "retro", "channel", title=title)
    for p in summaries:
        retro = "\n".join(p["retro_windows"]) if p["retro_accepted"] else "[red]not accepted[/]"
        table.add_row(p["id"], p["name"], str(p["auth_rules"]), str(p["codes"]), retro, p["channel"])
    console.print(table)


# --- sweep ----------------------------------------------------------------------------------------


@app.command("sweep")
def sweep_cmd(
    as_of: Annotated[datetime | None, typer.Option(help="Run as of this date or time (facility zone); default now.")] = None,
    lookback_days: Annotated[int | None, typer.Option(help="Days of encounters to review (default from settings).")] = None,
    payer: Annotated[list[str] | None, typer.Option(help="Only this payer id (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the services that needed authorization and have none; print the day's worklist."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from retroauth.cases import Actor
    from retroauth.rules import load_rule_library
    from retroauth.sweep import sweep

    s = settings()
    when = _aware(as_of) if as_of else datetime.now(timezone.utc)
    with Progress(TextColumn("sweeping encounters"), BarColumn(), MofNCompleteColumn(), console=err,
                  disable=as_json) as bar:
        task = bar.add_task("sweep", total=None)
        result = sweep(engine(), load_rule_library(s.payer_rules_dir), as_of=when,
                       lookback_days=lookback_days or s.sweep_lookback_days, payer_ids=payer,
                       actor=Actor(run_id=None, name="cli"), progress=lambda n: bar.update(task, completed=n))
    if as_json:
        emit_json(result.as_dict())
        return
    console.print(
        f"swept {result.encounters_scanned} encounters ({result.since:%Y-%m-%d} to {result.until:%Y-%m-%d}): "
        f"{result.lines_uncovered} services without authorization, {result.cases_created} new cases, "
        f"{result.not_eligible} not eligible, {result.withdrawn} withdrawn, {result.expired} expired"
    )
    cases_list(status=None, payer=None, all_states=False, due_within=None, limit=25, as_json=False)


def _aware(t: datetime) -> datetime:
    from config.settings import in_facility_zone

    return in_facility_zone(t, settings())


# --- cases ----------------------------------------------------------------------------------------


@app.command("cases")
def cases_list(
    status: Annotated[list[str] | None, typer.Option(help="Only these states (repeatable).")] = None,
    payer: Annotated[str | None, typer.Option(help="Only this payer id.")] = None,
    all_states: Annotated[bool, typer.Option("--all", help="Include closed and other final cases.")] = False,
    due_within: Annotated[float | None, typer.Option(help="Only cases due within this many hours.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The worklist: open cases, the nearest deadline first."""
    from retroauth.worklist import worklist

    states = status or (None if all_states else sorted(OPEN_STATES))
    rows = worklist(engine(), states=states, payer_id=payer, limit=limit, due_within_hours=due_within)
    if as_json:
        emit_json([r._asdict() for r in rows])
        return
    table = Table("case", "status", "payer", "reason", "due", "time left", "at risk", "priority",
                  title=f"Worklist ({len(rows)} shown; [red]![/] escalated: call the payer)")
    now = datetime.now(timezone.utc)
    for r in rows:
        table.add_row(
            str(r.id) + (" [red]![/]" if r.escalated_at else ""), r.status, r.payer_id, r.reason or "",
            _when(r.due_at), _left(r.due_at, now), f"${r.amount_at_risk:,.2f}", str(r.priority),
        )
    console.print(table)


@case_app.command("show")
def case_show(case_id: int, as_json: JsonOpt = False) -> None:
    """One case: its services, deadline and the full audit trail."""
    from retroauth.worklist import case_detail

    detail = case_detail(engine(), case_id)
    if detail is None:
        raise Exit(f"no case {case_id}")
    if as_json:
        emit_json(detail)
        return
    c = detail["case"]
    console.print(f"[bold]Case {c['id']}[/]  {c['status']}  payer {c['payer_id']}  encounter {c['encounter_id']}")
    console.print(f"reason: {c['reason'] or '-'}  due: {_when(c['due_at'])}  ({c['deadline_rule'] or 'no deadline'})")
    if c["not_eligible_why"]:
        console.print(f"[yellow]not eligible: {c['not_eligible_why']}[/]")
    lines = Table("line", "code", "date", "units", "charge", "rule", title="Services")
    for ln in detail["service_lines"]:
        lines.add_row(str(ln["line_number"]), f"{ln['code_system']} {ln['code']}", str(ln["service_date"]),
                      str(ln["units"]), f"${ln['charge']:,.2f}", ln["rule_category"] or "")
    console.print(lines)
    if detail["packet"]:
        _packet_table(detail["packet"])
    if detail["letters"]:
        letters = Table("letter", "kind", "version", "template", "PDF", title="Letters")
        for ltr in detail["letters"]:
            kind = ltr["kind"] + (f" level {ltr['appeal_level']}" if ltr["appeal_level"] else "")
            letters.add_row(str(ltr["id"]), kind, str(ltr["version"]), ltr["template_name"], ltr["pdf_key"])
        console.print(letters)
    if detail["submissions"]:
        subs = Table("submission", "attempt", "channel", "status", "tracking", "sent", title="Submissions")
        for sub in detail["submissions"]:
            subs.add_row(str(sub["id"]), str(sub["attempt"]), sub["channel"], sub["status"],
                         sub["tracking_number"] or "", _when(sub["sent_at"]))
        console.print(subs)
    if c["escalated_at"]:
        whys = [e["details"].get("why") for e in detail["events"] if e["event"] == "escalated" and e["details"]]
        help_ = ESCALATION_HELP.get(whys[-1] if whys else "", ESCALATION_HELP[""])
        console.print(f"[red]escalated {_when(c['escalated_at'])}: {help_}[/]")
    if detail["appeals"]:
        appeals = Table("level", "status", "denial codes", "due", "filed", "decided", title="Appeals")
        for a in detail["appeals"]:
            appeals.add_row(str(a["level"]), a["status"], a["denial_codes"] or "", _when(a["due_at"]),
                            _when(a["filed_at"]), _when(a["decided_at"]))
        console.print(appeals)
    if detail["follow_ups"]:
        fus = Table("follow-up", "due", "done", "outcome", title="Follow-ups")
        for f in detail["follow_ups"]:
            fus.add_row(f["kind"], _when(f["due_at"]), _when(f["done_at"]), f["outcome"] or "")
        console.print(fus)
    events = Table("when", "event", "from", "to", "run", "details", title="Audit trail")
    for ev in detail["events"]:
        events.add_row(_when(ev["occurred_at"]), ev["event"], ev["from_status"] or "", ev["to_status"] or "",
                       ev["run_id"] or "", json.dumps(ev["details"]) if ev["details"] else "")
    console.print(events)


# --- letters --------------------------------------------------------------------------------------


@app.command("letter")
def letter_cmd(
    case_id: int,
    fmt: Annotated[str, typer.Option("--format", help="pdf or html.")] = "pdf",
    out: Annotated[Path | None, typer.Option(help="Write here (default: <case>-letter.<format> in this directory).")] = None,
    kind: Annotated[str | None, typer.Option(help="request or appeal (default: what the case is at).")] = None,
    level: Annotated[int | None, typer.Option(help="Appeal level (1, 2, 3 = external review).")] = None,
) -> None:
    """Write one case's letter for a person to read (it is also stored and versioned)."""
    from retroauth.letters import LetterError, LetterTemplateError, render_one
    from retroauth.rules import load_rule_library

    if fmt not in ("pdf", "html"):
        raise Exit("--format must be pdf or html")
    try:
        data = render_one(engine(), storage(), settings(), load_rule_library(settings().payer_rules_dir), case_id,
                          fmt, kind=kind, appeal_level=level)
    except (LetterError, LetterTemplateError) as exc:
        raise Exit(str(exc)) from None
    path = out or Path(f"case-{case_id}-letter.{fmt}")
    path.write_bytes(data)
    console.print(f"wrote {path} ({len(data):,} bytes)")


@templates_app.command("check")
def templates_check(
    directory: Annotated[Path | None, typer.Argument(help="Templates directory (default: templates/).")] = None,
) -> None:
    """Render every template for every reason, appeal level and payer override against sample data;
    each problem names the template and the line."""
    from retroauth.letters import TEMPLATES_DIR, check_templates

    problems = check_templates(directory or TEMPLATES_DIR, settings(), settings().payer_rules_dir)
    if problems:
        for p in problems:
            err.print(f"[red]{p}[/]")
        raise SystemExit(1)
    console.print("[green]every template renders for every reason, appeal level and payer override[/]")


# --- submission ---------------------------------------------------------------------------------


@app.command("submit")
def submit_cmd(
    case: Annotated[list[int] | None, typer.Option("--case", help="Only this case id (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue the cases whose letter is rendered and send every pending submission. Safe to repeat:
    each submission carries an idempotency key, so nothing is ever sent twice."""
    from retroauth.cases import Actor
    from retroauth.outbox import cases_to_enqueue, enqueue, pending_submissions, send_pending
    from retroauth.rules import load_rule_library

    library, actor = load_rule_library(settings().payer_rules_dir), Actor(name="cli")
    queued = enqueue(engine(), case or cases_to_enqueue(engine()), library=library, actor=actor)
    sent = send_pending(engine(), storage(), library, settings(), actor=actor,
                        submission_ids=pending_submissions(engine(), case) if case else None)
    out = {**queued.as_dict(), **sent.as_dict()}
    if as_json:
        emit_json(out)
    else:
        console.print(f"{out['enqueued']} queued, {out['sent']} sent; refused: {out['refused'] or 'none'}; "
                      f"still pending after errors: {out['failed'] or 'none'}; decided at once: {out['decided'] or 'none'}")
    if sent.failed or sent.refused:
        raise SystemExit(1)


@app.command("record")
def record_cmd(
    case_id: int,
    approved: Annotated[bool, typer.Option("--approved/--denied", help="The payer's decision.")],
    auth_number: Annotated[str | None, typer.Option(help="The authorization number (with --approved).")] = None,
    reason: Annotated[list[str] | None, typer.Option(help="Denial reason code (repeatable, with --denied).")] = None,
) -> None:
    """Record a decision received by portal, fax or phone; an approval writes the authorization back
    so the next sweep sees the services covered."""
    from retroauth.cases import Actor
    from retroauth.outbox import OutboxError, record_outcome

    if approved and not auth_number:
        raise Exit("--approved needs --auth-number")
    try:
        status = record_outcome(engine(), case_id, approved=approved, auth_number=auth_number,
                                reason_codes=reason or [], actor=Actor(name="cli"))
    except OutboxError as exc:
        raise Exit(str(exc)) from None
    console.print(f"case {case_id}: {status}")


@app.command("follow-ups")
def follow_ups_cmd(
    as_of: Annotated[datetime | None, typer.Option(help="Follow up as of this time (facility zone); default now.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask payers about pending requests, record their answers, open and file appeals for denials within
    their windows, and flag cases waiting past the payer's review SLA (runs the follow-ups flow)."""
    from flows.follow_ups import follow_ups

    summary = follow_ups(as_of=_aware(as_of) if as_of else None)
    if as_json:
        emit_json(summary)
        return
    console.print(f"{summary['asked']} inquiries, answers {summary['decisions'] or 'none'}; "
                  f"{len(summary['appeals_opened'])} appeals opened, {summary['appeals_filed']} filed "
                  f"(answered at once: {summary['appeal_decisions'] or 'none'}); "
                  f"{len(summary['escalated'])} escalated, {len(summary['expired'])} expired, "
                  f"{len(summary['closed'])} denials final")


@app.command("payer-sim")
def payer_sim_cmd(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8089,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    config: Annotated[Path | None, typer.Option(help="JSON or YAML decisions (see retroauth/payer_sim.py); "
                                                     "default: approve everything.", exists=True)] = None,
) -> None:
    """A payer speaking Da Vinci PAS (Claim/$submit, Claim/$inquire) for tests and demos."""
    from retroauth.payer_sim import main

    raise SystemExit(main(["--host", host, "--port", str(port), *(["--config", str(config)] if config else [])]))


# --- packets --------------------------------------------------------------------------------------


@packets_app.command("build")
def packets_build(
    case: Annotated[list[int] | None, typer.Option("--case", help="Only this case id (repeatable).")] = None,
    as_of: Annotated[datetime | None, typer.Option(help="Build as of this time (facility zone); default now.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Assemble (or check again) the packets of cases that need one; unchanged ones are not rebuilt."""
    from retroauth.cases import Actor
    from retroauth.documents import assemble, cases_needing_packets
    from retroauth.rules import load_rule_library

    when = _aware(as_of) if as_of else datetime.now(timezone.utc)
    ids = case or cases_needing_packets(engine())
    result = assemble(engine(), storage(), load_rule_library(settings().payer_rules_dir), ids,
                      actor=Actor(name="cli"), as_of=when)
    if as_json:
        emit_json(result.as_dict())
        return
    console.print(f"{len(ids)} cases: {result.built} packets built, {result.unchanged} unchanged, "
                  f"{result.ready} ready, {result.awaiting} awaiting documentation")
    if result.missing:
        table = Table("case", "missing", title="Waiting for documents")
        for cid, missing in sorted(result.missing.items()):
            table.add_row(str(cid), ", ".join(missing))
        console.print(table)


@packets_app.command("show")
def packets_show(case_id: int, as_json: JsonOpt = False) -> None:
    """The packet of one case: each enclosure, where it came from, and what is still missing."""
    from retroauth.worklist import case_detail

    detail = case_detail(engine(), case_id)
    if detail is None or detail["packet"] is None:
        raise Exit(f"no packet for case {case_id}")
    if as_json:
        emit_json(detail["packet"])
        return
    _packet_table(detail["packet"])


def _packet_table(packet: dict) -> None:
    state = "complete" if packet["complete"] else "missing: " + ", ".join(packet["missing"] or [])
    table = Table("item", "what", "status", "source", "sha256",
                  title=f"Documentation packet v{packet['version']} ({state})")
    for item in packet["items"]:
        status = "[green]included[/]" if item["status"] == "included" else f"[red]{item['status']}[/]"
        table.add_row(item["type"], item.get("label") or "", status, str(item.get("source") or ""),
                      (item.get("sha256") or "")[:12])
    console.print(table)


def _when(t: datetime | None) -> str:
    if t is None:
        return "-"
    return t.astimezone(_facility_zone()).strftime("%Y-%m-%d %H:%M %Z")


def _left(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "-"
    hours = (t - now).total_seconds() / 3600
    if hours < 0:
        return "[red]overdue[/]"
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} d"


@lru_cache(maxsize=1)
def _facility_zone():  # noqa: ANN202
    from zoneinfo import ZoneInfo

    return ZoneInfo(settings().facility_timezone)


# --- demo -----------------------------------------------------------------------------------------


@app.command()
def demo(
    fixtures: Annotated[Path | None, typer.Option(help="Synthea FHIR export to import.")] = None,
) -> None:
    """Run the whole pipeline on the embedded defaults and show what it did."""
    from flows.demo import run_demo

    run_demo(settings(), console, fixtures=fixtures)


def main() -> None:
    try:
        app()
    except SettingsError as exc:
        err.print(f"[red]{exc}[/]")
        raise SystemExit(2) from None
    except Exit as exc:
        err.print(f"[red]{exc}[/]")
        raise SystemExit(2) from None
