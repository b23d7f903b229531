"""After the letters: each rendered case goes into the outbox, then each pending submission to its channel."""

from __future__ import annotations

from prefect import flow

from flows.batches import IN_FLIGHT, each_batch, work_in_batches
from tasks.submit import enqueue_batch, find_cases_to_submit, find_pending_submissions, send_batch


@flow(name="submit-requests", log_prints=False)
def submit_requests(case_ids: list[int] | None = None, batch_size: int = 100, claim_round: str | None = None,
                    in_flight: int = IN_FLIGHT) -> dict:
    """Queue ``case_ids`` (default: every letter_rendered case), then send their pending submissions, one task
    run per batch of ``batch_size``. By default every pending submission is sent (including rows a crashed
    run left behind), claimed batch by batch with the other runs of ``claim_round`` (default: a round of this
    run's own), ``in_flight`` at a time: the payer's latency is where more runs pay off."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    ids = list(case_ids) if case_ids is not None else find_cases_to_submit()
    enqueued = [f.result() for f in each_batch(ids, batch_size, enqueue_batch)]  # safe if another run queues too
    pending = find_pending_submissions(case_ids) if case_ids is not None else None  # None: claimed
    sends = work_in_batches("send", pending, batch_size, send_batch, claim_round=claim_round, in_flight=in_flight)
    results = [f.result() for f in sends]  # a failed batch fails the run, after all the others
    return {
        "enqueued": sum(r["enqueued"] for r in enqueued),
        "sent": sum(r["sent"] for r in results),
        "refused": {k: v for r in results for k, v in r["refused"].items()},
        "decided": {k: v for r in results for k, v in r["decided"].items()},
    }
