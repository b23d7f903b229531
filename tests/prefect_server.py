"""A real, throw-away Prefect server for flow tests (prefect_test_harness starts one on SQLite)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def app_env(monkeypatch, db_url, tmp_path):
    """Point the flows' settings at this test's database and storage."""
    from tasks import context

    monkeypatch.setenv("RETROAUTH_DATABASE_URL", db_url)
    monkeypatch.setenv("RETROAUTH_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    context.reset()
    yield
    context.reset()
