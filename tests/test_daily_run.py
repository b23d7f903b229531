"""The daily run on a real Prefect server: a generated day from sweep to submitted, a PHI-free report that
points to the worklist, a rerun that writes nothing, and a failed step that does not stop the others."""

from __future__ import annotations

import asyncio
from datetime import date, datetime

import pytest
from sqlmodel import select

from config.settings import load_settings
from retroauth.db import session_scope
from retroauth.generate import generate
from retroauth.models import Coverage, Patient, RetroCase, Submission
from retroauth.rules import load_rule_library
from retroauth.storage import open_storage
from tests.conftest import DATA, table_counts
from tests.factories import CHI

pytestmark = pytest.mark.usefixtures("prefect_server", "app_env")
AS_OF = datetime(2026, 11, 20, 6, tzinfo=CHI)


@pytest.fixture
def generated_day(engine, monkeypatch):
    """Yesterday at a small hospital (200 encounters), for the test payers: one takes retro requests
    through the packet channel and needs no documents beyond the generated ones, one takes none."""
    monkeypatch.setenv("RETROAUTH_PAYER_RULES_DIR", str(DATA / "payers"))
    settings = load_settings()
    library = load_rule_library(settings.payer_rules_dir)
    generate(engine, library, encounters=200, seed=4, days=1, end=date(2026, 11, 19), payer_ids=list(library),
             documents=True, storage=open_storage(settings.storage_url))
    return engine


def _cases(engine) -> dict[int, tuple[str, str]]:
    with session_scope(engine) as s:
        return {c.id: (c.payer_id, c.status) for c in s.exec(select(RetroCase))}


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_the_day_goes_from_sweep_to_submitted_and_a_rerun_writes_nothing(generated_day):
    from flows.daily_run import daily_run

    engine = generated_day
    state = daily_run(as_of=AS_OF, return_state=True)
    result = state.result()
    assert set(result) == {"sweep", "assemble", "render", "submit", "statuses"}

    cases = _cases(engine)
    assert cases and {s for _, s in cases.values()} <= {"submitted", "not_eligible"}
    submitted = sorted(cid for cid, (p, s) in cases.items() if s == "submitted")
    assert submitted and all(cases[c][0] == "test-commercial" for c in submitted)
    assert all(s == "not_eligible" for p, s in cases.values() if p == "test-noretro")
    assert result["submit"]["sent"] == len(submitted) == result["statuses"]["submitted"]
    with session_scope(engine) as s:
        assert {sub.channel for sub in s.exec(select(Submission))} == {"packet"}

    artifacts = {a.key: a for a in asyncio.run(_artifacts(state.state_details.flow_run_id))}
    report = str(artifacts["daily-run"].data)
    assert "retroauth cases" in report and "| submitted |" in report
    with session_scope(engine) as s:
        phi = ({p.family_name for p in s.exec(select(Patient))} | {p.given_name for p in s.exec(select(Patient))}
               | {c.member_id for c in s.exec(select(Coverage))})
    assert phi and not any(value in report for value in phi if value)

    before = table_counts(engine)
    assert daily_run(as_of=AS_OF)["submit"]["sent"] == 0
    assert table_counts(engine) == before


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_failed_step_does_not_stop_the_others_and_fails_the_run(generated_day, monkeypatch):
    """Assembly breaks for every batch: the cases it could not reach wait, letters and sends still run for
    what was ready, the report names the failed step by its error class, and the run fails (and alerts)."""
    from flows.daily_run import DailyRunIncomplete, daily_run
    from tasks import documents

    def broken(*args, **kwargs):
        raise OSError("storage unreachable")

    monkeypatch.setattr(documents, "assemble", broken)
    monkeypatch.setattr(documents.assemble_batch, "retries", 0)
    state = daily_run(as_of=AS_OF, return_state=True)
    assert state.is_failed()
    with pytest.raises(DailyRunIncomplete, match=r"assemble \(OSError\)"):
        state.result()
    assert {s for _, s in _cases(generated_day).values()} <= {"identified", "not_eligible"}
    artifacts = {a.key: a for a in asyncio.run(_artifacts(state.state_details.flow_run_id))}
    assert "assemble: `OSError`" in str(artifacts["daily-run"].data)
