"""Thin tasks over the sweep: the domain does the work, in batches, idempotently."""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from retroauth.sweep import sweep
from retroauth.worklist import sweep_report
from tasks import context


@task(name="sweep-window", retries=3, retry_delay_seconds=[5, 30, 120], retry_jitter_factor=0.5)
def sweep_window(as_of: datetime, lookback_days: int, payer_ids: list[str] | None = None,
                 encounter_ids: list[int] | None = None) -> dict:
    """Find and evaluate the cases of the window (or of the given encounters); safe to rerun."""
    result = sweep(
        context.engine(), context.rule_library(), as_of=as_of, lookback_days=lookback_days,
        actor=context.actor(), encounter_ids=encounter_ids, payer_ids=payer_ids,
    )
    return {"summary": result.as_dict(), "case_ids": result.case_ids}


@task(name="publish-sweep-report")
def publish_sweep_report(case_ids: list[int], as_of: datetime) -> dict:
    """The day's summary as Prefect artifacts: case ids and codes only, never patient data."""
    report = sweep_report(context.engine(), case_ids, as_of)
    if report["by_payer_reason"]:
        create_table_artifact(report["by_payer_reason"], key="daily-sweep-summary",
                              description=f"Cases found by the sweep as of {as_of:%Y-%m-%d}, by payer and reason")
    due = report["due"]
    lines = [
        f"# Retro-authorization sweep, {as_of:%Y-%m-%d}",
        "",
        f"- open cases due within 24 h: **{due.get('24h', 0)}**, 72 h: **{due.get('72h', 0)}**, 7 days: **{due.get('7d', 0)}**",
        f"- dollars at risk in open cases: **${float(report['amount_at_risk']):,.2f}**",
        "- not eligible: " + (", ".join(f"{k}: {v}" for k, v in report["not_eligible"].items()) or "none"),
        "",
        "## Most urgent",
        "",
        "| case | payer | reason | due (UTC) | at risk | priority |",
        "|---:|---|---|---|---:|---:|",
        *(f"| {u['case']} | {u['payer']} | {u['reason']} | {u['due'] or '-'} | ${float(u['amount_at_risk']):,.2f} | {u['priority']} |"
          for u in report["most_urgent"]),
        "",
        "Work them with `retroauth cases` and `retroauth case show ID`.",
    ]
    create_markdown_artifact("\n".join(lines), key="daily-sweep-urgent", description="Most urgent open cases")
    return report
