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
    from prefect.settings import (
        PREFECT_RESULTS_PERSIST_BY_DEFAULT, PREFECT_TASKS_DEFAULT_PERSIST_RESULT, temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    # The flows' own results are persisted here, their tasks' as in production (only where a task asks).
    # A test reads a flow's return value from its final state; when the server's SQLite stalls (database is
    # locked) the client may retry setting that state and take the server's copy back, which carries the
    # value only if it was persisted: the test would fail with MissingResult although the run completed.
    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True, PREFECT_TASKS_DEFAULT_PERSIST_RESULT: False}), \
            prefect_test_harness(server_startup_timeout=120):
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
