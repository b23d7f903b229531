"""Thin tasks over the submission outbox: one task run per batch, retried with backoff and jitter."""

from __future__ import annotations

from prefect import task
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

from retroauth.outbox import (
    SendSummary, SendsIncomplete, cases_to_enqueue, enqueue, pending_submissions, send_pending,
)
from retroauth.worklist import submissions_by_payer
from tasks import context


SLOT_LEASE = 60  # seconds (Prefect's default, 300, holds a crashed worker's slot for five minutes)


def payer_api_limit(payer_id: str) -> str:
    """The global concurrency limit that bounds sends to one payer across every worker
    (created for each payer of the rule library by ``deployments/setup.py``)."""
    return f"payer-api-{payer_id}"


@task(name="find-cases-to-submit", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def find_cases_to_submit(limit: int | None = None) -> list[int]:
    """Cases whose request letter is rendered and not yet queued (ids only)."""
    return cases_to_enqueue(context.engine(), limit)


@task(name="find-pending-submissions", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def find_pending_submissions(case_ids: list[int] | None = None, limit: int | None = None) -> list[int]:
    """Outbox rows not yet sent (of ``case_ids``, or all), including those a crashed run left behind."""
    return pending_submissions(context.engine(), case_ids, limit)


@task(name="enqueue-submissions", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_jitter_factor=0.5)
def enqueue_batch(case_ids: list[int]) -> dict:
    """Move the batch's letter_rendered cases to submitting with their outbox rows (one transaction)."""
    return enqueue(context.engine(), case_ids, library=context.rule_library(), actor=context.actor()).as_dict()


@task(name="send-submissions", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_jitter_factor=0.5)
def send_batch(submission_ids: list[int]) -> dict:
    """Send the batch's pending submissions and record them, one payer at a time, each inside a slot of
    that payer's global concurrency limit (``payer-api-<payer id>``: so many batches per payer at once,
    across all workers; without the limit on the server the send is not held back). A claimed batch is one
    payer's (retroauth.claims), so it takes one slot: each take costs two calls to the server. A transient
    failure fails the run after the others are recorded; the retry sends only those still pending, with the
    same idempotency keys."""
    summary = SendSummary()
    for payer_id, ids in submissions_by_payer(context.engine(), submission_ids).items():
        # The lease is renewed while the batch sends; a killed worker's slot comes back after SLOT_LEASE.
        with concurrency(payer_api_limit(payer_id), occupy=1, strict=False, lease_duration=SLOT_LEASE):
            part = send_pending(context.engine(), context.storage(), context.rule_library(), context.settings(),
                                actor=context.actor(), submission_ids=ids)
        summary.sent += part.sent
        summary.refused.update(part.refused)
        summary.failed.update(part.failed)
        summary.decided.update(part.decided)
    if summary.failed:
        raise SendsIncomplete(summary.failed)
    return summary.as_dict()
