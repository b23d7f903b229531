"""The day's closing report: what each step did and where the work is now (ids, codes and counts only)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from retroauth.claims import LEASE
from retroauth.worklist import status_counts, worklist
from tasks import context

OPEN_WORK = ["identified", "awaiting_documentation", "ready", "letter_rendered", "submitting"]
WORK_DAY = "work-day/work-day"  # deployments/prefect.yaml
HELPED = {"COMPLETED", "CANCELLED"}  # a helper that did its share, or was called off with nothing left for it


@task(name="start-helpers", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def start_helpers(count: int, claim_round: str, as_of: datetime, batch_size: int | None) -> list[str]:
    """``count`` work-day runs in this round (ids only in their parameters), for whichever workers take them.
    Their idempotency keys make a retry of this task start no more."""
    from prefect.deployments import run_deployment

    parameters: dict[str, Any] = {"claim_round": claim_round, "as_of": as_of}
    if batch_size:
        parameters["batch_size"] = batch_size
    return [str(run_deployment(WORK_DAY, parameters=parameters, timeout=0, tags=["helper"],
                               idempotency_key=f"work-day-{claim_round}-{i}").id) for i in range(1, count + 1)]


@task(name="wait-for-helpers")
def wait_for_helpers(run_ids: list[str], timeout_seconds: float = LEASE.total_seconds(),
                     poll_seconds: float = 2.0) -> dict[str, dict[str, Any]]:
    """Called when this run is through the day: the helpers still working finish their batches (waited for,
    up to ``timeout_seconds``); those no worker has started yet are called off (Cancelled: nothing is left
    for them). Per run: its name, state type and name, and its share of the counts when it finished."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, StateType

    deadline = time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(UUID(r)) for r in run_ids]
            for fr in runs:
                if fr.state is not None and fr.state.type == StateType.SCHEDULED:
                    client.set_flow_run_state(fr.id, Cancelled(message="the day was done before a worker took it"))
            if all(fr.state is not None and fr.state.is_final() for fr in runs) or time.monotonic() > deadline:
                break
            time.sleep(poll_seconds)
    out: dict[str, dict[str, Any]] = {}
    for fr in runs:
        steps = None
        if fr.state is not None and fr.state.is_completed():
            try:
                steps = fr.state.result()  # persisted by the work-day flow where every worker reads results
            except Exception:  # noqa: BLE001 - its counts are missing from the report, nothing else
                steps = None
        out[str(fr.id)] = {"name": fr.name, "state": fr.state.type.value if fr.state else "UNKNOWN",
                           "state_name": fr.state.name if fr.state else "unknown",
                           "steps": steps if isinstance(steps, dict) else None}
    return out


@task(name="publish-day-report", retries=2, retry_delay_seconds=[5, 30])
def publish_day_report(as_of: datetime, steps: dict[str, dict[str, Any] | None], failed: dict[str, str],
                       helpers: dict[str, dict[str, Any]] | None = None) -> dict:
    """The daily run's final artifact ``daily-run``: counts per step (with the helpers' shares), the helper
    runs, cases by status, the most urgent open cases (case id, status, payer, reason code, due, priority) and
    the commands of the worklist."""
    engine = context.engine()
    counts = status_counts(engine)
    rows = worklist(engine, states=OPEN_WORK, limit=20)
    sweep, packets, letters, sent = (steps.get(k) or {} for k in ("sweep", "assemble", "render", "submit"))

    def n(d: dict, key: str) -> str:
        v = d.get(key, "-")
        return str(len(v)) if isinstance(v, (dict, list)) else str(v)

    lines = [
        f"# The day's run, as of {as_of:%Y-%m-%d %H:%M %Z}",
        "",
        "| step | result |",
        "|---|---|",
        f"| sweep | {n(sweep, 'cases_created')} new cases, {n(sweep, 'not_eligible')} not eligible, "
        f"{n(sweep, 'expired')} expired, {n(sweep, 'withdrawn')} withdrawn |",
        f"| documentation | {n(packets, 'built')} packets built, {n(packets, 'ready')} ready, "
        f"{n(packets, 'awaiting')} awaiting documents |",
        f"| letters | {n(letters, 'rendered')} rendered, {n(letters, 'moved')} cases moved to letter_rendered, "
        f"{n(letters, 'failed')} failed |",
        f"| submission | {n(sent, 'enqueued')} queued, {n(sent, 'sent')} sent, {n(sent, 'refused')} refused, "
        f"{n(sent, 'decided')} decided at once |",
        *([f"| helpers | {len(helpers)} work-day runs: " + ", ".join(
            f"{h['name']} {h['state_name']}" + ("" if h.get("steps") or h["state"] != "COMPLETED" else " (counts missing)")
            for h in helpers.values()) + " |"] if helpers else []),
        "",
    ]
    if failed:
        lines += ["**Steps that failed** (retry the run from the UI: finished batches are skipped, the rest redone):",
                  "", *(f"- {step}: `{code}`" for step, code in failed.items()), ""]
    lines += [
        "## Cases by status",
        "",
        "| status | cases |",
        "|---|---:|",
        *(f"| {s} | {c} |" for s, c in counts.items()),
        "",
        "## Open work, nearest deadline first",
        "",
        "| case | status | payer | reason | due (UTC) | priority |",
        "|---:|---|---|---|---|---:|",
        *(f"| {r.id} | {r.status} | {r.payer_id} | {r.reason or '-'} | "
          f"{r.due_at:%Y-%m-%d %H:%M} | {r.priority} |" if r.due_at else
          f"| {r.id} | {r.status} | {r.payer_id} | {r.reason or '-'} | - | {r.priority} |" for r in rows),
        "",
        "## The worklist",
        "",
        "- `retroauth cases`: every open case, nearest deadline first",
        "- `retroauth cases --status awaiting_documentation`: cases waiting for a document",
        "- `retroauth case show ID`: one case, its packet, letters, submissions and audit trail",
    ]
    create_markdown_artifact("\n".join(lines), key="daily-run",
                             description="The day's run: what each step did, and the worklist")
    return {"statuses": counts, "open_cases_shown": [r.id for r in rows]}
