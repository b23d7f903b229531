"""Every morning, the whole day: find what needs a retro request, gather its documents, write the letters,
send them. Each step works in batches on what the database says is left to do, so a step that fails does
not hold back the next ones (their cases are worked now; the failed ones wait for a retry of this run or
tomorrow's), and the run then fails, which alerts. A retry of the run (from the UI) skips what finished.

After the sweep, ``helpers`` more runs (deployment work-day, on whichever workers take them) can share the
day: every run claims batches that no other run holds (flows/work_day.py), so each case is worked once."""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from flows.alerts import ALERT_HOOKS
from flows.daily_sweep import daily_sweep
from flows.work_day import DailyRunIncomplete, run_step, with_helpers, work_through_the_day
from tasks import context
from tasks.day import publish_day_report, start_helpers, wait_for_helpers

__all__ = ["DailyRunIncomplete", "daily_run"]


@flow(name="daily-run", log_prints=False, **ALERT_HOOKS)
def daily_run(as_of: datetime | None = None, helpers: int = 0, batch_size: int | None = None) -> dict:
    """The day as of ``as_of`` (default: when the run was scheduled, which a retry keeps): sweep, assemble,
    render, submit; then the day's report, which points to the worklist. ``helpers``: so many work-day runs
    share the work after the sweep (those no worker has started by the time this run is through are called
    off); ``batch_size``: the cases of each claimed batch (default: each step's own)."""
    if helpers < 0:
        raise ValueError("helpers must be 0 or more")
    as_of = context.aware(as_of) if as_of else context.run_time()
    claim_round = context.claim_round()
    failed: dict[str, str] = {}
    steps = {"sweep": run_step(daily_sweep, failed, "sweep", as_of=as_of)}
    helper_runs = start_helpers(helpers, claim_round, as_of, batch_size) if helpers else []
    steps |= work_through_the_day(as_of, claim_round, batch_size, failed)
    helped = wait_for_helpers(helper_runs) if helper_runs else {}
    steps = with_helpers(steps, helped, failed)  # their counts added up; a helper that failed fails the day
    report = publish_day_report(as_of, steps, failed, helped)
    if failed:
        raise DailyRunIncomplete(failed)
    return {**steps, "statuses": report["statuses"]}
