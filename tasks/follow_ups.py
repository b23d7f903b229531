"""Thin tasks over the follow-ups (retroauth.followups): one task run per batch, retried with backoff and jitter."""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from retroauth import followups
from retroauth.letters import cases_with_open_appeals
from retroauth.outbox import appeals_to_file, enqueue_appeals
from tasks import context

RETRY = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5)


@task(name="find-due-inquiries", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def find_due_inquiries(as_of: datetime) -> list[int]:
    return followups.due_inquiries(context.engine(), as_of)


@task(name="inquire", **RETRY)
def inquire_batch(follow_up_ids: list[int], as_of: datetime) -> dict:
    """Ask the payers about a batch of due inquiries. Transient failures fail the task after the others are
    recorded; the retry asks only about those (the rest are closed)."""
    summary = followups.run_inquiries(context.engine(), context.storage(), context.rule_library(),
                                      context.settings(), follow_up_ids, as_of, actor=context.actor())
    if summary.failed:
        raise followups.FollowUpsIncomplete(summary.failed)
    return summary.as_dict()


@task(name="lapse-appeals", **RETRY)
def lapse_appeals(as_of: datetime) -> list[int]:
    return followups.lapse_appeals(context.engine(), as_of, actor=context.actor())


@task(name="open-appeals", **RETRY)
def open_appeals(as_of: datetime) -> dict:
    return followups.open_appeals(context.engine(), context.rule_library(), as_of, actor=context.actor()).as_dict()


@task(name="find-appeal-letters-to-render", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def find_appeal_letters_to_render() -> list[int]:
    return cases_with_open_appeals(context.engine())


@task(name="find-appeals-to-file", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def find_appeals_to_file() -> list[int]:
    return appeals_to_file(context.engine())


@task(name="file-appeals", **RETRY)
def file_appeals(case_ids: list[int]) -> dict:
    """Denied -> appealed with the appeal's outbox row, for the batch's cases whose appeal letter is ready."""
    return enqueue_appeals(context.engine(), case_ids, library=context.rule_library(), actor=context.actor()).as_dict()


@task(name="escalate-overdue", **RETRY)
def escalate_overdue(as_of: datetime) -> list[int]:
    return followups.escalate_overdue(context.engine(), as_of, actor=context.actor())


@task(name="publish-follow-up-report")
def publish_follow_up_report(summary: dict, as_of: datetime) -> None:
    """What the follow-ups did, for the operator: counts, case ids and codes only."""
    def ids(v: object) -> str:
        items = sorted(int(x) for x in (v or []))
        return ", ".join(map(str, items[:50])) + (" ..." if len(items) > 50 else "") or "none"

    lines = [
        f"# Follow-ups, {as_of:%Y-%m-%d %H:%M %Z}",
        "",
        f"- inquiries made: **{summary['asked']}**; answers: {summary['decisions'] or 'none'}",
        f"- appeals opened: **{len(summary['appeals_opened'])}** (cases {ids(summary['appeals_opened'])})",
        f"- appeals filed: **{summary['appeals_filed']}**; decided at once: {summary['appeal_decisions'] or 'none'}",
        f"- denials final (no further level): {ids(summary['closed'])}",
        f"- expired (appeal window passed): {ids(summary['expired'])}",
        f"- escalated for a person to call the payer: **{len(summary['escalated'])}** (cases {ids(summary['escalated'])})",
        "",
        "Worklist: `retroauth cases --status denied --status in_review --status appealed`; one case: "
        "`retroauth case show ID`.",
    ]
    create_markdown_artifact("\n".join(lines), key="follow-ups", description="Status inquiries, appeals, escalations")
