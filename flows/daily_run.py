"""Every morning, the whole day: find what needs a retro request, gather its documents, write the letters,
send them. Each step works in batches on what the database says is left to do, so a step that fails does
not hold back the next ones (their cases are worked now; the failed ones wait for a retry of this run or
tomorrow's), and the run then fails, which alerts. A retry of the run (from the UI) skips what finished."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow

from flows.alerts import ALERT_HOOKS
from flows.assemble import assemble_documentation
from flows.daily_sweep import daily_sweep
from flows.render import render_letters
from flows.submit import submit_requests
from tasks import context
from tasks.day import publish_day_report


class DailyRunIncomplete(Exception):
    """Some steps of the day failed (their names and error classes only); the others did their work."""

    def __init__(self, failed: dict[str, str]):
        self.failed = dict(failed)
        super().__init__("steps failed: " + ", ".join(f"{k} ({v})" for k, v in self.failed.items()))


def _step(subflow: Any, failed: dict[str, str], name: str, **kwargs: Any) -> dict | None:
    """Run one step as a subflow whose finished result a retry of this run reuses; note a failure and go on."""
    state = subflow.with_options(persist_result=True)(**kwargs, return_state=True)
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    failed[name] = type(error).__name__ if isinstance(error, BaseException) else state.name
    return None


@flow(name="daily-run", log_prints=False, **ALERT_HOOKS)
def daily_run(as_of: datetime | None = None) -> dict:
    """The day as of ``as_of`` (default: when the run was scheduled, which a retry keeps): sweep, assemble,
    render, submit; then the day's report, which points to the worklist."""
    as_of = context.aware(as_of) if as_of else context.run_time()
    failed: dict[str, str] = {}
    steps = {
        "sweep": _step(daily_sweep, failed, "sweep", as_of=as_of),
        "assemble": _step(assemble_documentation, failed, "assemble", as_of=as_of),
        "render": _step(render_letters, failed, "render", as_of=as_of),
        "submit": _step(submit_requests, failed, "submit"),
    }
    report = publish_day_report(as_of, steps, failed)
    if failed:
        raise DailyRunIncomplete(failed)
    return {**steps, "statuses": report["statuses"]}
