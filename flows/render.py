"""After assembly: each ready case's request letter (and each open appeal's letter), as HTML and PDF."""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from flows.batches import IN_FLIGHT, work_in_batches
from retroauth.letters import merge_results
from tasks import context
from tasks.letters import publish_letter_report, render_batch


@flow(name="render-letters", log_prints=False)
def render_letters(case_ids: list[int] | None = None, batch_size: int = 100, as_of: datetime | None = None,
                   claim_round: str | None = None, in_flight: int = IN_FLIGHT) -> dict:
    """Render the letters of ``case_ids``, one task run per batch of ``batch_size`` cases; by default, of
    every ready case and every denied case with an open appeal, claimed batch by batch (most urgent first)
    with the other runs of ``claim_round`` (default: a round of this run's own), ``in_flight`` at a time.
    The letters are dated ``as_of`` (default: when the run was scheduled, which a retry keeps)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    as_of = context.aware(as_of) if as_of else context.run_time()
    done = work_in_batches("render", case_ids, batch_size, render_batch, claim_round=claim_round, in_flight=in_flight,
                           as_of=as_of)
    summary = merge_results(f.result() for f in done)  # a failed batch fails the run, after all the others
    publish_letter_report(summary, as_of)
    return summary
