"""The daily-sweep flow on a real Prefect server: cases found, artifacts published without patient data."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from sqlmodel import select

from retroauth.db import session_scope
from retroauth.models import CaseEvent, Coverage, Patient, RetroCase
from tests.conftest import DATA, table_counts
from tests.factories import CHI, add_encounter

pytestmark = pytest.mark.usefixtures("prefect_server", "app_env")


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_daily_sweep_flow_finds_cases_and_publishes_a_phi_free_summary(engine, monkeypatch):
    from flows.daily_sweep import daily_sweep

    monkeypatch.setenv("RETROAUTH_PAYER_RULES_DIR", str(DATA / "payers"))
    add_encounter(engine, cls="emergency", pos="23")
    add_encounter(engine, payer="test-noretro", cls="emergency", pos="23")

    state = daily_sweep(as_of=datetime(2026, 11, 20, 6, tzinfo=CHI), lookback_days=30, return_state=True)
    summary = state.result()
    assert summary["cases_created"] == 2 and summary["not_eligible"] == 1

    with session_scope(engine) as s:
        run_ids = {e.run_id for e in s.exec(select(CaseEvent))}
        assert run_ids == {str(state.state_details.flow_run_id)}  # the audit trail names the flow run
        assert len(s.exec(select(RetroCase)).all()) == 2

    artifacts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    keys = {a.key for a in artifacts}
    assert {"daily-sweep-summary", "daily-sweep-urgent"} <= keys
    text = " ".join(str(a.data) for a in artifacts)
    assert "test-commercial" in text and "emergency" in text
    with session_scope(engine) as s:  # the names and member ids really stored: none in any artifact
        phi = {p.family_name for p in s.exec(select(Patient))} | {c.member_id for c in s.exec(select(Coverage))}
    assert phi and not any(value in text for value in phi)

    # A second run of the flow for the same day changes nothing.
    before = table_counts(engine)
    daily_sweep(as_of=datetime(2026, 11, 20, 6, tzinfo=CHI), lookback_days=30)
    assert table_counts(engine) == before
