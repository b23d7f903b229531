"""A deployment run of the daily pipeline dies in the middle of the send step; the operator retries it from
the UI (the exact request its Retry button sends). The same run completes, every case reached the payer
exactly once, and the steps that had finished did not work again. The scenario: tests/e2e.py."""

from __future__ import annotations

import pytest

from tests import e2e

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
              pytest.mark.usefixtures("prefect_server", "app_env")]


def test_a_crashed_daily_run_retried_as_the_ui_does_completes_and_sends_each_case_once(engine, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    with e2e.pipeline(PREFECT_API_URL.value(), engine, tmp_path, monkeypatch) as p:
        flow_run_id, after_crash = e2e.crash_a_daily_run(p)

        answer = p.ui_retry(flow_run_id)
        p.mark("retry requested: the UI's request, sent to the API")
        assert answer["status"] == "ACCEPT", answer
        assert (answer["state"]["type"], answer["state"]["name"]) == ("SCHEDULED", "AwaitingRetry")

        e2e.assert_retried_once(p, flow_run_id, after_crash)
