"""The operator's retry, in the real Prefect UI: a deployment run of the daily pipeline died in the middle of
the send step (tests/e2e.py); its page is opened in Chromium at the link operators get (alerts, logs,
``retroauth trigger``), Retry is clicked and confirmed, and the run completes as the same run, with every case
sent exactly once and nothing redone. Screenshots: var/test-artifacts/browser-retry-*.png.

Needs the system Chromium (Debian ``chromium``, /usr/bin/chromium) and the ``playwright`` package (test
extras; its own browser download is never used). Without them the test is skipped, unless
RETROAUTH_REQUIRE_BROWSER is set (CI), where it fails."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests import e2e
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = ROOT / "var" / "test-artifacts"

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
              pytest.mark.usefixtures("app_env")]


@pytest.fixture
def browser():
    """Opens Chromium for a ``with`` block. Playwright's sync API runs an event loop in this thread while a
    browser is open, and Prefect's client calls must not run inside it: open it only for the clicks."""
    missing = [what for what, there in (("/usr/bin/chromium (Debian package chromium)", CHROMIUM.is_file()),
                                        ("the playwright package (pip install -e '.[test]')",
                                         importlib.util.find_spec("playwright") is not None)) if not there]
    if missing:
        if os.environ.get("RETROAUTH_REQUIRE_BROWSER"):
            pytest.fail(f"RETROAUTH_REQUIRE_BROWSER is set and the browser test lacks {', '.join(missing)}")
        pytest.skip(f"no browser: {', '.join(missing)} missing")

    @contextmanager
    def page(url: str) -> Iterator[Any]:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                pg = b.new_page(viewport={"width": 1400, "height": 900})
                pg.goto(url)
                yield pg
            finally:
                b.close()

    return page


def test_retry_clicked_in_the_prefect_ui_completes_a_crashed_daily_run_and_sends_each_case_once(
        browser, engine, tmp_path, monkeypatch):
    from playwright.sync_api import expect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The session's test server serves no UI: this test starts `prefect server start`, which does.
    with e2e.prefect_server_with_ui(tmp_path / "prefect-home", tmp_path / "server.log") as api, \
            temporary_settings({PREFECT_API_URL: api}), \
            e2e.pipeline(api, engine, tmp_path, monkeypatch) as p:
        flow_run_id, after_crash = e2e.crash_a_daily_run(p)
        url = f"{api.removesuffix('/api')}/runs/flow-run/{flow_run_id}"  # the link in alerts and logs

        with browser(url) as page:
            sent: list[dict] = []
            page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST"
                    and r.url.endswith(f"/flow_runs/{flow_run_id}/set_state") else None)
            badge = page.locator(".state-badge").first
            expect(badge).to_contain_text("Crashed", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "browser-retry-1-crashed.png"))
            page.get_by_role("button", name="Retry").click()
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text("Retry")
            dialog.get_by_role("button", name="Retry").click()
            p.mark("Retry clicked and confirmed in the UI")
            expect(badge).not_to_contain_text("Crashed", timeout=30_000)  # AwaitingRetry, then the worker's
        assert [(b["state"]["type"], b["state"]["name"]) for b in sent] == [("SCHEDULED", "AwaitingRetry")], sent

        e2e.assert_retried_once(p, flow_run_id, after_crash)
        with browser(url) as page:
            expect(page.locator(".state-badge").first).to_contain_text("Completed", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "browser-retry-2-completed.png"))
