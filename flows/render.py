"""After assembly: each ready case's request letter (and each open appeal's letter), as HTML and PDF."""

from __future__ import annotations

from datetime import datetime

from prefect import flow
from prefect.futures import wait

from retroauth.letters import merge_results
from tasks import context
from tasks.letters import find_cases_to_render, publish_letter_report, render_batch


@flow(name="render-letters", log_prints=False)
def render_letters(case_ids: list[int] | None = None, batch_size: int = 100, as_of: datetime | None = None) -> dict:
    """Render the letters of ``case_ids`` (default: every ready case and every denied case with an open
    appeal), one task run per batch of ``batch_size`` cases. The letters are dated ``as_of``
    (default: when the run was scheduled, which a retry keeps)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    as_of = context.aware(as_of) if as_of else context.run_time()
    ids = list(case_ids) if case_ids is not None else find_cases_to_render()
    futures = [render_batch.submit(ids[i:i + batch_size], as_of) for i in range(0, len(ids), batch_size)]
    wait(futures)  # every batch runs to its end before a failed one fails the flow run
    summary = merge_results(f.result() for f in futures)
    publish_letter_report(summary, as_of)
    return summary
