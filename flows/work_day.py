"""The day's work after the sweep, shared: packets, letters, submissions, by every run of the day at once.

The daily run works through its day itself, and with ``helpers`` it also starts that many runs of this
flow (deployment ``work-day``, on whichever workers take them) in the same round of claims. Each run, the
daily one too, claims a batch of a step that no other run holds, works it, hands it back, and goes on
until the step has nothing left (retroauth.claims): each case is worked by one run, and on several
workers the day is done sooner.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow

from flows.alerts import ALERT_HOOKS
from flows.assemble import assemble_documentation
from flows.render import render_letters
from flows.submit import submit_requests
from retroauth import documents, letters
from tasks import context
from tasks.day import HELPED


class DailyRunIncomplete(Exception):
    """Some steps of the day failed (their names and error classes only); the others did their work."""

    def __init__(self, failed: dict[str, str]):
        self.failed = dict(failed)
        super().__init__("steps failed: " + ", ".join(f"{k} ({v})" for k, v in self.failed.items()))


def run_step(subflow: Any, failed: dict[str, str], name: str, **kwargs: Any) -> dict | None:
    """Run one step as a subflow whose finished result a retry of this run reuses; note a failure and go on."""
    state = subflow.with_options(persist_result=True)(**kwargs, return_state=True)
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    failed[name] = type(error).__name__ if isinstance(error, BaseException) else state.name
    return None


def work_through_the_day(as_of: datetime, claim_round: str, batch_size: int | None,
                         failed: dict[str, str]) -> dict[str, dict | None]:
    """Packets, letters, submissions: each step claims its batches in ``claim_round`` until none is left."""
    size = {"batch_size": batch_size} if batch_size else {}
    return {
        "assemble": run_step(assemble_documentation, failed, "assemble", as_of=as_of, claim_round=claim_round, **size),
        "render": run_step(render_letters, failed, "render", as_of=as_of, claim_round=claim_round, **size),
        "submit": run_step(submit_requests, failed, "submit", claim_round=claim_round, **size),
    }


def add_up(steps: dict[str, dict | None], more: dict[str, dict | None]) -> dict[str, dict | None]:
    """The counts of two runs' shares of a day (``work_through_the_day`` results), added up."""
    out = dict(steps)
    if more.get("assemble") is not None:
        out["assemble"] = documents.merge_results([r for r in (steps.get("assemble"), more["assemble"]) if r])
    if more.get("render") is not None:
        out["render"] = letters.merge_results([r for r in (steps.get("render"), more["render"]) if r])
    if (theirs := more.get("submit")) is not None:
        mine = steps.get("submit") or {"enqueued": 0, "sent": 0, "refused": {}, "decided": {}}
        out["submit"] = {"enqueued": mine["enqueued"] + theirs["enqueued"], "sent": mine["sent"] + theirs["sent"],
                         "refused": {**mine["refused"], **theirs["refused"]},
                         "decided": {**mine["decided"], **theirs["decided"]}}
    return out


def with_helpers(steps: dict[str, dict | None], helped: dict[str, dict[str, Any]],
                 failed: dict[str, str]) -> dict[str, dict | None]:
    """The day's counts with the helpers' shares (``tasks.day.wait_for_helpers``) added; a helper that
    neither completed nor was called off is noted in ``failed`` by its state."""
    for run in helped.values():
        steps = add_up(steps, run.get("steps") or {})
    bad = sorted({run["state"] for run in helped.values() if run["state"] not in HELPED})
    if bad:
        failed["helpers"] = ", ".join(bad)
    return steps


@flow(name="work-day", log_prints=False, persist_result=True, **ALERT_HOOKS)
def work_day(claim_round: str | None = None, as_of: datetime | None = None, batch_size: int | None = None) -> dict:
    """Help with a day: assemble, render and submit in the daily run's ``claim_round`` (default: a round of
    this run's own, which redoes what no run holds now), the letters dated ``as_of``. Returns this run's
    share of the counts (the daily run adds them up in its report)."""
    as_of = context.aware(as_of) if as_of else context.run_time()
    failed: dict[str, str] = {}
    steps = work_through_the_day(as_of, claim_round or context.claim_round(), batch_size, failed)
    if failed:
        raise DailyRunIncomplete(failed)
    return steps
