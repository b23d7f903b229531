"""After the letters: each rendered case goes into the outbox, then each pending submission to its channel."""

from __future__ import annotations

from prefect import flow
from prefect.futures import wait

from tasks.submit import enqueue_batch, find_cases_to_submit, find_pending_submissions, send_batch


def _batches(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@flow(name="submit-requests", log_prints=False)
def submit_requests(case_ids: list[int] | None = None, batch_size: int = 100) -> dict:
    """Queue ``case_ids`` (default: every letter_rendered case), then send their pending submissions (default:
    every pending one, including rows a crashed run left behind), one task run per batch of ``batch_size``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    ids = list(case_ids) if case_ids is not None else find_cases_to_submit()
    queued = [enqueue_batch.submit(b) for b in _batches(ids, batch_size)]
    wait(queued)
    enqueued = [f.result() for f in queued]
    pending = find_pending_submissions(case_ids)
    sends = [send_batch.submit(b) for b in _batches(pending, batch_size)]
    wait(sends)  # every batch runs to its end before a failed one fails the flow run
    results = [f.result() for f in sends]
    return {
        "enqueued": sum(r["enqueued"] for r in enqueued),
        "sent": sum(r["sent"] for r in results),
        "refused": {k: v for r in results for k, v in r["refused"].items()},
        "decided": {k: v for r in results for k, v in r["decided"].items()},
    }
