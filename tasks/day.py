"""The day's closing report: what each step did and where the work is now (ids, codes and counts only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from retroauth.worklist import status_counts, worklist
from tasks import context

OPEN_WORK = ["identified", "awaiting_documentation", "ready", "letter_rendered", "submitting"]


@task(name="publish-day-report", retries=2, retry_delay_seconds=[5, 30])
def publish_day_report(as_of: datetime, steps: dict[str, dict[str, Any] | None], failed: dict[str, str]) -> dict:
    """The daily run's final artifact ``daily-run``: counts per step, cases by status, the most urgent open
    cases (case id, status, payer, reason code, due, priority) and the commands of the worklist."""
    engine = context.engine()
    counts = status_counts(engine)
    rows = worklist(engine, states=OPEN_WORK, limit=20)
    sweep, packets, letters, sent = (steps.get(k) or {} for k in ("sweep", "assemble", "render", "submit"))

    def n(d: dict, key: str) -> str:
        v = d.get(key, "-")
        return str(len(v)) if isinstance(v, (dict, list)) else str(v)

    lines = [
        f"# The day's run, as of {as_of:%Y-%m-%d %H:%M %Z}",
        "",
        "| step | result |",
        "|---|---|",
        f"| sweep | {n(sweep, 'cases_created')} new cases, {n(sweep, 'not_eligible')} not eligible, "
        f"{n(sweep, 'expired')} expired, {n(sweep, 'withdrawn')} withdrawn |",
        f"| documentation | {n(packets, 'built')} packets built, {n(packets, 'ready')} ready, "
        f"{n(packets, 'awaiting')} awaiting documents |",
        f"| letters | {n(letters, 'rendered')} rendered, {n(letters, 'moved')} cases moved to letter_rendered, "
        f"{n(letters, 'failed')} failed |",
        f"| submission | {n(sent, 'enqueued')} queued, {n(sent, 'sent')} sent, {n(sent, 'refused')} refused, "
        f"{n(sent, 'decided')} decided at once |",
        "",
    ]
    if failed:
        lines += ["**Steps that failed** (retry the run from the UI: finished batches are skipped, the rest redone):",
                  "", *(f"- {step}: `{code}`" for step, code in failed.items()), ""]
    lines += [
        "## Cases by status",
        "",
        "| status | cases |",
        "|---|---:|",
        *(f"| {s} | {c} |" for s, c in counts.items()),
        "",
        "## Open work, nearest deadline first",
        "",
        "| case | status | payer | reason | due (UTC) | priority |",
        "|---:|---|---|---|---|---:|",
        *(f"| {r.id} | {r.status} | {r.payer_id} | {r.reason or '-'} | "
          f"{r.due_at:%Y-%m-%d %H:%M} | {r.priority} |" if r.due_at else
          f"| {r.id} | {r.status} | {r.payer_id} | {r.reason or '-'} | - | {r.priority} |" for r in rows),
        "",
        "## The worklist",
        "",
        "- `retroauth cases`: every open case, nearest deadline first",
        "- `retroauth cases --status awaiting_documentation`: cases waiting for a document",
        "- `retroauth case show ID`: one case, its packet, letters, submissions and audit trail",
    ]
    create_markdown_artifact("\n".join(lines), key="daily-run",
                             description="The day's run: what each step did, and the worklist")
    return {"statuses": counts, "open_cases_shown": [r.id for r in rows]}
