"""On demand, for one encounter or one case that cannot wait for tomorrow: the whole pipeline, now.

Billing staff ask for it (``retroauth trigger urgent``) when a payer's window closes within hours. The
run sweeps only that encounter, then assembles, renders and sends its case(s), each step one batch. It
runs on the ``urgent`` queue of the pool, which workers serve before the daily work.
"""

from __future__ import annotations

from prefect import flow

from flows.alerts import ALERT_HOOKS
from tasks import context
from tasks.documents import assemble_batch
from tasks.letters import render_batch
from tasks.submit import enqueue_batch, find_pending_submissions, send_batch
from tasks.sweep import sweep_window
from tasks.urgent import UrgentCaseError, find_encounter, publish_urgent_report, statuses


@flow(name="urgent-case", log_prints=False, **ALERT_HOOKS)
def urgent_case(encounter_id: int | None = None, case_id: int | None = None) -> dict:
    """Sweep, assemble, render and submit now for ``encounter_id`` (all its cases) or ``case_id`` (that
    case), exactly one of them. Returns the case ids and their statuses afterwards."""
    if (encounter_id is None) == (case_id is None):
        raise UrgentCaseError("give exactly one of encounter_id and case_id")
    as_of = context.run_time()

    encounter = find_encounter(encounter_id, case_id)
    found = sweep_window(as_of, context.settings().sweep_lookback_days, encounter_ids=[encounter])
    case_ids = [case_id] if case_id is not None else found["case_ids"]
    sent = 0
    if case_ids:
        assemble_batch(case_ids, as_of)
        render_batch(case_ids, as_of)
        enqueue_batch(case_ids)
        sent = send_batch(find_pending_submissions(case_ids))["sent"]

    now = statuses(case_ids)
    publish_urgent_report(encounter, now, sent)
    return {"encounter_id": encounter, "case_ids": case_ids, "statuses": {str(k): v for k, v in now.items()}}
