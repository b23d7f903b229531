"""After the sweep, and again whenever documents arrive: each case's packet, or what it still lacks."""

from __future__ import annotations

from datetime import datetime

from prefect import flow
from prefect.futures import wait

from retroauth.documents import merge_results
from tasks import context
from tasks.documents import assemble_batch, find_cases_needing_packets, publish_packet_report


@flow(name="assemble-documentation", log_prints=False)
def assemble_documentation(case_ids: list[int] | None = None, batch_size: int = 200,
                           as_of: datetime | None = None) -> dict:
    """Assemble the packets of ``case_ids`` (default: every identified, awaiting or ready case),
    one task run per batch of ``batch_size`` cases."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    as_of = context.aware(as_of) if as_of else context.run_time()
    ids = list(case_ids) if case_ids is not None else find_cases_needing_packets()
    futures = [assemble_batch.submit(ids[i:i + batch_size], as_of) for i in range(0, len(ids), batch_size)]
    wait(futures)  # every batch runs to its end before a failed one fails the flow run
    summary = merge_results(f.result() for f in futures)
    publish_packet_report(summary, as_of)
    return summary
