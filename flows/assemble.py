"""After the sweep, and again whenever documents arrive: each case's packet, or what it still lacks."""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from flows.batches import IN_FLIGHT, work_in_batches
from retroauth.documents import merge_results
from tasks import context
from tasks.documents import assemble_batch, publish_packet_report


@flow(name="assemble-documentation", log_prints=False)
def assemble_documentation(case_ids: list[int] | None = None, batch_size: int = 200,
                           as_of: datetime | None = None, claim_round: str | None = None,
                           in_flight: int = IN_FLIGHT) -> dict:
    """Assemble the packets of ``case_ids``, one task run per batch of ``batch_size`` cases; by default, of
    every identified, awaiting or ready case, claimed batch by batch (most urgent first) with the other runs
    of ``claim_round`` (default: a round of this run's own), ``in_flight`` batches at a time."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    as_of = context.aware(as_of) if as_of else context.run_time()
    done = work_in_batches("assemble", case_ids, batch_size, assemble_batch, claim_round=claim_round, in_flight=in_flight,
                           as_of=as_of)
    summary = merge_results(f.result() for f in done)  # a failed batch fails the run, after all the others
    publish_packet_report(summary, as_of)
    return summary
