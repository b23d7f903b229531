"""Every few hours: ask payers about what is pending, appeal each denial in time, escalate what waits too long."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from prefect import flow
from prefect.futures import wait

from flows.alerts import ALERT_HOOKS
from flows.render import render_letters
from tasks import context
from tasks.follow_ups import (
    escalate_overdue, file_appeals, find_appeal_letters_to_render, find_appeals_to_file, find_due_inquiries,
    inquire_batch, lapse_appeals, open_appeals, publish_follow_up_report,
)
from tasks.submit import find_pending_submissions, send_batch


def _batches(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _all(futures: list) -> list:  # noqa: ANN001 - Prefect futures
    wait(futures)  # every batch runs to its end before a failed one fails the flow run
    return [f.result() for f in futures]


@flow(name="follow-ups", log_prints=False, **ALERT_HOOKS)
def follow_ups(as_of: datetime | None = None, batch_size: int = 200) -> dict:
    """Follow up as of ``as_of`` (default: now): inquire about due requests and record the answers; let
    unfiled appeals past their deadline lapse; open appeals for denials; render and file them; escalate
    cases past the payer's review SLA. Every step is safe to run again."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    as_of = context.aware(as_of) if as_of else datetime.now(timezone.utc)

    asked = _all([inquire_batch.submit(b, as_of) for b in _batches(find_due_inquiries(as_of), batch_size)])
    lapsed = lapse_appeals(as_of)
    appeals = open_appeals(as_of)
    to_render = find_appeal_letters_to_render()
    if to_render:
        render_letters(case_ids=to_render, batch_size=batch_size, as_of=as_of)
    filed = _all([file_appeals.submit(b) for b in _batches(find_appeals_to_file(), batch_size)])
    pending = find_pending_submissions()  # the appeals just filed, and any row a crashed run left unsent
    sent = _all([send_batch.submit(b) for b in _batches(pending, batch_size)])
    escalated = escalate_overdue(as_of)

    summary = {
        "asked": sum(r["asked"] for r in asked),
        "decisions": dict(Counter(v for r in asked for v in r["decided"].values())),
        "appeals_opened": appeals["opened"],
        "appeals_filed": sum(r["enqueued"] for r in filed),
        "appeal_decisions": dict(Counter(v for r in sent for v in r["decided"].values())),
        "closed": appeals["closed"],
        "expired": sorted(set(appeals["expired"]) | set(lapsed)),
        "escalated": sorted({*escalated, *(c for r in asked for c in r["escalated"])}),
    }
    publish_follow_up_report(summary, as_of)
    return summary
