"""Every morning: which services needed authorization and have none, why, and by when."""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from tasks import context
from tasks.sweep import publish_sweep_report, sweep_window


@flow(name="daily-sweep", log_prints=False)
def daily_sweep(as_of: datetime | None = None, lookback_days: int | None = None,
                payer_ids: list[str] | None = None) -> dict:
    """Sweep the lookback window as of ``as_of`` (default: when the run was scheduled, which a retry keeps)
    and publish the day's summary."""
    as_of = context.aware(as_of) if as_of else context.run_time()
    lookback_days = lookback_days or context.settings().sweep_lookback_days
    found = sweep_window(as_of, lookback_days, payer_ids)
    publish_sweep_report(found["case_ids"], as_of)
    return found["summary"]
